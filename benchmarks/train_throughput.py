#!/usr/bin/env python
"""Train-step throughput (images/s), jaxft against the same step in PyTorch, side by side.

    python benchmarks/train_throughput.py [--archs resnet18 resnet50 vgg16] [--strategies full partial:0.8 head]
                                          [--batch-size 16] [--image-size 64] [--repeats 5] [--no-compile]

One step = forward, backward of what trains, Adam update. PyTorch freezes with
``requires_grad=False`` (the tutorials' way) and runs eager, and ``torch.compile`` where it
works on this machine. Contenders are timed round-robin in one process; the ratio column
is what to read (> 1: jaxft is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, machine_line, print_table  # noqa: E402

from jaxft import create_model, to_torch  # noqa: E402
from jaxft.engine import Engine  # noqa: E402
from jaxft.freeze import parse_strategy  # noqa: E402
from jaxft.optim import OptimConfig  # noqa: E402
from jaxft.parity import freeze_like  # noqa: E402
from jaxft.pretrained import init_variables  # noqa: E402


def torch_step_fn(arch, variables, labels, model, batch, compile_model: bool):
    torch_model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    torch_model.load_state_dict(to_torch(arch, variables))
    optimizer = torch.optim.Adam(freeze_like(torch_model, model, labels), lr=1e-4)
    torch_model.train()
    forward = torch.compile(torch_model) if compile_model else torch_model
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(batch["label"])

    def step():
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench(arch: str, spec: str, batch_size: int, image_size: int, repeats: int, try_compile: bool) -> list:
    model = create_model(arch, num_classes=10)
    variables = init_variables(model)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size)}
    engine = Engine(model, variables, parse_strategy(spec), OptimConfig("adam", lr=1e-4))
    contenders = {
        "jaxft": lambda: engine.train_step(batch),  # device_get of metrics: waits for the step
        "torch": torch_step_fn(arch, variables, engine.labels, model, batch, compile_model=False),
    }
    compiled = "n/a"
    if try_compile:
        try:
            step = torch_step_fn(arch, variables, engine.labels, model, batch, compile_model=True)
            step()  # compile now, so a failure is caught here
            contenders["torch.compile"] = step
        except Exception as exc:  # noqa: BLE001 - report, don't fail the whole table
            compiled = f"failed: {type(exc).__name__}"
    medians = interleaved_medians(contenders, repeats, warmup=2)
    ips = {name: batch_size / t for name, t in medians.items()}
    if "torch.compile" in ips:
        compiled = f"{ips['torch.compile']:.1f}"
    best_torch = max(v for k, v in ips.items() if k != "jaxft")
    return [arch, spec, f"{ips['jaxft']:.1f}", f"{ips['torch']:.1f}", compiled,
            f"{ips['jaxft'] / ips['torch']:.2f}", f"{ips['jaxft'] / best_torch:.2f}",
            f"{engine.optimizer_state_bytes() / 2**20:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "vgg16"])
    parser.add_argument("--strategies", nargs="+", default=["full", "partial:0.8", "head"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"# train step, Adam, batch {args.batch_size} x {args.image_size}px, fp32; {machine_line()}\n")
    rows = []
    for arch in args.archs:
        for spec in args.strategies:
            rows.append(bench(arch, spec, args.batch_size, args.image_size, args.repeats, args.compile))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(["arch", "strategy", "jaxft img/s", "torch eager img/s", "torch.compile img/s", "jaxft/eager",
                 "jaxft/best torch", "jaxft opt state MiB"], rows)


if __name__ == "__main__":
    main()
