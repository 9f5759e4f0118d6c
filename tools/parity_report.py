#!/usr/bin/env python
"""Measure JAX-vs-torchvision parity for every arch and print a markdown table.

    python tools/parity_report.py [--archs resnet18 vgg16 ...] [--sizes 224 197x231 32 64 250]

Eval-mode logits (randomised BatchNorm statistics and affine parameters, 10 classes, batch 2)
at each size; the table gives the worst relative L2 error per arch. docs/parity.md records it.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

from jaxft import ARCHS, create_model, from_torch
from jaxft.parity import nchw_to_nhwc, rel_l2, torch_reference


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--sizes", nargs="+", default=["224", "197x231", "32", "64", "250"])
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    print("| arch | " + " | ".join(f"{h}x{w}" for h, w in sizes) + " | worst |")
    print("|---" * (len(sizes) + 2) + "|")
    for arch in args.archs:
        torch_model = torch_reference(arch, num_classes=10)
        variables = from_torch(arch, torch_model.state_dict())
        model = create_model(arch, num_classes=10)
        apply = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
        errors = []
        for h, w in sizes:
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected = torch_model(x).numpy()
            errors.append(rel_l2(np.asarray(apply(variables, nchw_to_nhwc(x))), expected))
        print(f"| {arch} | " + " | ".join(f"{e:.1e}" for e in errors) + f" | {max(errors):.1e} |", flush=True)


if __name__ == "__main__":
    main()
