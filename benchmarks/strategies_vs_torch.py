#!/usr/bin/env python
"""Freeze strategies measured honestly: jaxft against the same recipe in PyTorch.

    python benchmarks/strategies_vs_torch.py [--epochs 8] [--strategies head partial:0.8 full body scratch]

Source weights: the offline source checkpoint (torchvision resnet18 trained in PyTorch on
digits 0-4). Task: digits 5-9, a seeded stratified 80/20 split, 32 px, no augmentation,
Adam. Both frameworks start from the same weights (including the freshly initialised
head), see the same batches in the same order and freeze the same tensors (PyTorch with
``requires_grad=False``). jaxft runs with BatchNorm policy ``torch`` for the comparison,
and with its default ``running`` policy in an extra column. ``scratch`` = random init, full.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, print_table

from jaxft import load_pretrained, to_torch
from jaxft.data.builtin import digits
from jaxft.engine import Engine, StepStats
from jaxft.freeze import FROZEN, parse_strategy, summarize
from jaxft.optim import OptimConfig
from jaxft.parity import freeze_like
from jaxft.source_checkpoint import ensure_source_checkpoint, normalized_images


def load_task(image_size: int, seed: int):
    images, labels, _ = digits(range(5, 10))
    x = normalized_images(images, image_size)
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=seed)
    return (x[idx_train], labels[idx_train]), (x[idx_val], labels[idx_val])


def batches(n: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True):
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def run_jax(model, variables, spec, train, val, args, bn_policy):
    steps = args.epochs * len(batches(len(train[1]), args.batch_size, 0, args.seed))
    engine = Engine(model, variables, parse_strategy(spec), OptimConfig("adam", lr=args.lr), total_steps=steps,
                    bn_policy=bn_policy)
    best, start = 0.0, time.perf_counter()
    for epoch in range(args.epochs):
        for idx in batches(len(train[1]), args.batch_size, epoch, args.seed):
            engine.train_step({"image": train[0][idx], "label": train[1][idx]})
        stats = StepStats()
        for idx in batches(len(val[1]), 256, 0, args.seed, shuffle=False):
            stats.add(engine.eval_step({"image": val[0][idx], "label": val[1][idx]}))
        best = max(best, stats.accuracy)
    return best, time.perf_counter() - start, engine


def run_torch(arch, model, variables, labels, train, val, args):
    torch_model = torchvision.models.get_model(arch, weights=None, num_classes=5)
    torch_model.load_state_dict(to_torch(arch, variables))
    optimizer = torch.optim.Adam(freeze_like(torch_model, model, labels), lr=args.lr)
    x_train, y_train = torch.from_numpy(train[0]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(train[1])
    x_val, y_val = torch.from_numpy(val[0]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(val[1])
    best, start = 0.0, time.perf_counter()
    for epoch in range(args.epochs):
        torch_model.train()
        for idx in batches(len(y_train), args.batch_size, epoch, args.seed):
            idx = torch.from_numpy(idx)
            loss = torch.nn.functional.cross_entropy(torch_model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch_model.eval()
        with torch.no_grad():
            best = max(best, float((torch_model(x_val).argmax(1) == y_val).float().mean()))
    return best, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["head", "partial:0.8", "full", "body", "scratch"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arch = "resnet18"
    source = ensure_source_checkpoint()
    train, val = load_task(args.image_size, args.seed)
    print(f"# {arch} from {source.name} on digits 5-9 ({len(train[1])} train / {len(val[1])} val, "
          f"{args.image_size}px), Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs; {machine_line()}\n")
    rows = []
    for name in args.strategies:
        spec, weights = ("full", None) if name == "scratch" else (name, source)
        model, variables, _ = load_pretrained(arch, weights, num_classes=5, seed=args.seed, new_head=True)
        jax_acc, jax_s, engine = run_jax(model, variables, spec, train, val, args, bn_policy="torch")
        torch_acc, torch_s = run_torch(arch, model, variables, engine.labels, train, val, args)
        running_acc, _, _ = run_jax(model, variables, spec, train, val, args, bn_policy="running")
        trainable = sum(n for label, _, n in summarize(engine.labels, variables["params"]) if label != FROZEN)
        rows.append([name, f"{trainable:,}", f"{100 * jax_acc:.1f}", f"{100 * torch_acc:.1f}",
                     f"{100 * (jax_acc - torch_acc):+.1f}", f"{100 * running_acc:.1f}", f"{jax_s:.1f}",
                     f"{torch_s:.1f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(["strategy", "trainable params", "jaxft best val % (BN torch)", "torch best val %", "diff (points)",
                 "jaxft best val % (BN running)", "jaxft s", "torch s"], rows)


if __name__ == "__main__":
    main()
