#!/usr/bin/env python
"""A/B of jaxft train-step variants against eager torch, side by side in one process.

    python tools/step_ab.py [--arch resnet18] [--strategy full] [--image-size 224] [--batch-size 16]
                            [--repeats 5] [--variants default ynn=REDUCE xla-reduce ...]

Each variant is the Engine's jitted train step (Adam, BN policy ``torch``) compiled with its own
XLA options (``compile(compiler_options=...)``, so several configurations run in one process) and
optionally with another BatchNorm module swapped into the model (``bn=NAME``, NAME a class in
``BN_VARIANTS`` below). Steps run round-robin (variant A, B, ..., torch, repeat), each variant on its
own donated state chain; prints the median step of each and its ratio to eager torch's.

Variant syntax: words joined by '+': ``default`` (XLA's defaults), ``ynn=T1,T2`` (sets
xla_cpu_experimental_ynn_fusion_type: REDUCE, INDIVIDUAL_CONVOLUTION, ELTWISE, DOT, INDIVIDUAL_DOT;
``ynn=`` turns YNN fusions off), ``bn=NAME``, ``tapgrad=0`` (``layers.Conv`` never takes its
matmul route for the kernel gradient: XLA's convolution everywhere, as before that route),
``pointwise=0`` (unpadded 1x1 convolutions as XLA's convolution, as before they became matmuls),
``tapwide=0`` (the tap route only for >= 128 output channels, as before it took vgg16's ``features_2``),
``hostgrad=0`` (no convolution by torch's kernels, ``layers._conv_by_torch``: as before that route).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torchvision

import jaxft.models.resnet as resnet_module
import jaxft.models.vgg as vgg_module
from jaxft import create_model, to_torch
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy
from jaxft.models import layers
from jaxft.optim import OptimConfig
from jaxft.parity import freeze_like
from jaxft.pretrained import init_variables
from step_args import step_parser  # tools/step_args.py, beside this script

# BatchNorm modules to A/B (bn=NAME): add a candidate class here
BN_VARIANTS = {"current": layers.BatchNorm}


def parse_variant(text: str) -> tuple[dict, str]:
    options, bn = {}, "current"
    for word in text.split("+"):
        if word == "default":
            continue
        key, _, value = word.partition("=")
        if key == "ynn":
            options["xla_cpu_experimental_ynn_fusion_type"] = ",".join(
                f"LIBRARY_FUSION_TYPE_{v.strip().upper()}" for v in value.split(",") if v.strip())
        elif key == "bn":
            bn = value
        elif key == "pointwise":  # pointwise=0: unpadded 1x1 convolutions as XLA's convolution, not matmuls
            options["_pointwise"] = value
        elif key == "tapgrad":  # tapgrad=0: Conv's kernel gradient as XLA's convolution everywhere
            options["_tapgrad"] = value
        elif key == "hostgrad":  # hostgrad=0: no convolution by torch's kernels, XLA's or the taps as before
            options["_hostgrad"] = value
        elif key == "tapwide":  # tapwide=0: the tap route for >= 128 output channels only, as before 2026-11-29
            options["_tapwide"] = value
        else:
            options[key] = {"true": True, "false": False}.get(value, value)
    return options, bn


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    model = create_model(args.arch, num_classes=10)
    variables = init_variables(model)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch_size)}
    runners = {}
    default_min_bytes = layers.TAP_KERNEL_GRAD_MIN_BYTES
    default_torch_cells = layers.TORCH_CONV_MIN_CELLS
    default_torch_channels = layers.TORCH_CONV_MAX_CHANNELS_ANY_MAP
    default_wide_bytes = layers.TAP_KERNEL_GRAD_ANY_FEATURES_MIN_BYTES
    use_pointwise = layers._use_pointwise_matmul
    for text in args.variants:
        options, bn = parse_variant(text)
        for module in (resnet_module, vgg_module):
            module.BatchNorm = BN_VARIANTS[bn]
        tap_route, tap_wide = options.pop("_tapgrad", "1") != "0", options.pop("_tapwide", "1") != "0"
        torch_route = options.pop("_hostgrad", "1") != "0"
        layers.TORCH_CONV_MIN_CELLS = default_torch_cells if torch_route else float("inf")
        layers.TORCH_CONV_MAX_CHANNELS_ANY_MAP = default_torch_channels if torch_route else 0
        layers.TAP_KERNEL_GRAD_MIN_BYTES = default_min_bytes if tap_route else float("inf")
        layers.TAP_KERNEL_GRAD_ANY_FEATURES_MIN_BYTES = default_wide_bytes if tap_route and tap_wide else float("inf")
        layers._use_pointwise_matmul = (lambda *a: False) if options.pop("_pointwise", "1") == "0" else use_pointwise
        engine = Engine(create_model(args.arch, num_classes=10), variables, parse_strategy(args.strategy),
                        OptimConfig("adam", lr=1e-4), bn_policy="torch")
        state, placed, halted, settings = engine.step_arguments(batch)
        start = time.perf_counter()
        compiled = engine.compiled_train_step.lower(state, placed, halted, settings).compile(
            compiler_options=options or None)
        compile_s = time.perf_counter() - start
        runners[text] = {"compiled": compiled, "state": state, "batch": placed, "halted": halted,
                         "settings": settings, "times": [], "compile": compile_s}
    for module in (resnet_module, vgg_module):
        module.BatchNorm = layers.BatchNorm
    layers.TAP_KERNEL_GRAD_MIN_BYTES = default_min_bytes
    layers.TORCH_CONV_MIN_CELLS = default_torch_cells
    layers.TORCH_CONV_MAX_CHANNELS_ANY_MAP = default_torch_channels
    layers.TAP_KERNEL_GRAD_ANY_FEATURES_MIN_BYTES = default_wide_bytes
    layers._use_pointwise_matmul = use_pointwise

    def run(name: str) -> float:
        r = runners[name]
        start = time.perf_counter()
        r["state"], metrics, r["halted"] = r["compiled"](r["state"], r["batch"], r["halted"], r["settings"])
        loss = float(metrics["loss_sum"] / metrics["count"])
        r["times"].append(time.perf_counter() - start)
        return loss

    net = torchvision.models.get_model(args.arch, weights=None, num_classes=10)
    net.load_state_dict(to_torch(args.arch, variables))
    engine0 = Engine(model, variables, parse_strategy(args.strategy), OptimConfig("adam", lr=1e-4), bn_policy="torch")
    optimizer = torch.optim.Adam(freeze_like(net, model, engine0.labels), lr=1e-4)
    net.train()
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(batch["label"])
    torch_times = []

    def torch_step() -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = loss.item()
        torch_times.append(time.perf_counter() - start)
        return value

    first = {name: run(name) for name in runners}  # warm-up, and the first step's loss
    torch_first = None if args.no_torch else torch_step()
    for r in runners.values():
        r["times"].clear()
    torch_times.clear()
    for _ in range(args.repeats):
        for name in runners:
            run(name)
        if not args.no_torch:
            torch_step()
    print(f"# {args.arch} {args.strategy}, Adam, batch {args.batch_size} x {args.image_size} px, BN policy torch, "
          f"median of {args.repeats}, round-robin in one process")
    base = statistics.median(runners[args.variants[0]]["times"])
    torch_median = statistics.median(torch_times) if torch_times else float("nan")
    print("| variant | step s | all steps s | vs first variant | jaxft/eager | first loss | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runners.items():
        med = statistics.median(r["times"])
        print(f"| {name} | {med:.3f} | {' '.join(f'{t:.2f}' for t in r['times'])} | {base / med:.3f} | "
              f"{torch_median / med:.2f} | {first[name]:.6f} | {r['compile']:.1f} |")
    if torch_times:
        print(f"| eager torch | {torch_median:.3f} | {' '.join(f'{t:.2f}' for t in torch_times)} | | 1.00 | "
              f"{torch_first:.6f} | |")


if __name__ == "__main__":
    main()
