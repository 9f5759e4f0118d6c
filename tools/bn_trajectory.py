#!/usr/bin/env python
"""Adam through BatchNorm against PyTorch: how far jaxft and torch float32 each land from torch float64.

    python tools/bn_trajectory.py [--size 32] [--strategy full] [--bn-policy torch] [--steps 4] [--lr 2e-4]

The measurement behind tests/test_bn_parity.py and docs/parity.md: resnet18 from the offline source
checkpoint with a fresh seeded head, digits 5-9 upscaled to --size, batch 16, Adam at a constant
rate, the same batches for all three. Prints the per-step loss distances and the tensors where jaxft
is furthest from float64 relative to torch float32.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch
import torchvision

from jaxft import create_model, from_torch, to_torch
from jaxft.data.builtin import digits
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy
from jaxft.optim import OptimConfig
from jaxft.parity import rel_l2, torch_adam_trajectory
from jaxft.source_checkpoint import ensure_source_checkpoint, normalized_images

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--bn-policy", default="torch", choices=["torch", "running"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()

    images, labels, _ = digits(range(5, 10))
    x = normalized_images(images, args.size)
    order = np.random.default_rng(0).permutation(len(x))[:args.steps * BATCH].reshape(args.steps, BATCH)
    batches = [(x[idx], labels[idx]) for idx in order]
    net = torchvision.models.resnet18(num_classes=5)
    net.load_state_dict(torch.load(ensure_source_checkpoint(), weights_only=True))
    torch.manual_seed(0)
    net.fc.reset_parameters()
    state = net.state_dict()

    model = create_model("resnet18", num_classes=5)
    engine = Engine(model, from_torch("resnet18", state),
                    parse_strategy(args.strategy), OptimConfig("adam", lr=args.lr, schedule="constant"),
                    total_steps=args.steps, bn_policy=args.bn_policy)
    losses = []
    for xb, yb in batches:
        metrics = engine.train_step({"image": xb, "label": yb})
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    final = to_torch("resnet18", jax.device_get(engine.state.variables), as_tensors=False)
    losses64, final64 = torch_adam_trajectory("resnet18", state, model, engine.labels, batches, args.lr,
                                              torch.float64, args.bn_policy)
    losses32, final32 = torch_adam_trajectory("resnet18", state, model, engine.labels, batches, args.lr,
                                              torch.float32, args.bn_policy)

    print(f"# resnet18 {args.strategy}, BN policy {args.bn_policy}, {args.size} px, batch {BATCH}, Adam lr {args.lr}")
    print("| what | jaxft from float64 | torch float32 from float64 |\n|---|---|---|")
    for step in range(args.steps):
        print(f"| loss after step {step + 1} | {abs(losses[step] - losses64[step]) / abs(losses64[step]):.1e} | "
              f"{abs(losses32[step] - losses64[step]) / abs(losses64[step]):.1e} |")
    rows = []
    for key, reference in final64.items():
        if key.endswith("num_batches_tracked") or np.array_equal(reference, state[key].double().numpy()):
            continue
        ours, theirs = rel_l2(final[key], reference), rel_l2(final32[key], reference)
        rows.append((ours / max(theirs, 1e-12), key, ours, theirs))
    for _, key, ours, theirs in sorted(rows, reverse=True)[:5]:
        print(f"| {key} | {ours:.1e} | {theirs:.1e} |")
    print(f"worst jaxft/torch32 ratio over {len(rows)} changed tensors: {max(r[0] for r in rows):.2f}")


if __name__ == "__main__":
    main()
