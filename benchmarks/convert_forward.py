#!/usr/bin/env python
"""Conversion time and forward-pass speed, JAX (jit) against torch (eager), same inputs.

    python benchmarks/convert_forward.py [--archs resnet50 vgg16] [--batch-size 8] [--image-size 224]

Prints a markdown table: conversion from an in-memory state_dict and from a .pth file, and
the median forward time of each framework with the torch/JAX ratio (> 1: JAX is faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, machine_line, print_table

from jaxft import create_model, from_torch


def bench_arch(arch: str, batch_size: int, image_size: int, repeats: int) -> list:
    torch_model = torchvision.models.get_model(arch, weights=None).eval()
    state_dict = torch_model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.pth"
        torch.save(state_dict, path)
        start = time.perf_counter()
        from_torch(arch, state_dict)
        convert_memory = time.perf_counter() - start
        start = time.perf_counter()
        variables = from_torch(arch, path)
        convert_file = time.perf_counter() - start

    model = create_model(arch)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x_nhwc = jax.device_put(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()))
    start = time.perf_counter()
    forward(variables, x_nhwc).block_until_ready()
    compile_s = time.perf_counter() - start

    def run_torch():
        with torch.inference_mode():
            torch_model(x)

    medians = interleaved_medians(
        {"jax": lambda: forward(variables, x_nhwc).block_until_ready(), "torch": run_torch}, repeats)
    return [arch, f"{convert_memory:.2f}", f"{convert_file:.2f}", f"{compile_s:.1f}",
            f"{medians['jax'] * 1e3:.0f}", f"{medians['torch'] * 1e3:.0f}",
            f"{batch_size / medians['jax']:.1f}", f"{batch_size / medians['torch']:.1f}",
            f"{medians['torch'] / medians['jax']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# convert + forward, batch {args.batch_size} x {args.image_size}px, fp32; {machine_line()}\n")
    rows = [bench_arch(a, args.batch_size, args.image_size, args.repeats) for a in args.archs]
    print_table(["arch", "convert dict s", "convert .pth s", "jit compile s", "jax fwd ms", "torch fwd ms",
                 "jax img/s", "torch img/s", "torch/jax"], rows)


if __name__ == "__main__":
    main()
