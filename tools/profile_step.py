#!/usr/bin/env python
"""Where a jaxft train step's time goes, by kind of XLA operation, from a real profiler trace.

    python tools/profile_step.py [--arch resnet18] [--strategy full] [--image-size 224] [--batch-size 16]
                                 [--bn-policy torch] [--steps 3]

Runs the Engine's train step under ``jax.profiler.trace`` (on the default backend: the XLA
operations of the CPU's threads, or the kernels on a GPU's streams), reads the trace back with
``jax.profiler.ProfileData`` and sums the duration of every XLA operation (thunk) by kind:
convolution, dot, YNN fusions (convolutions or reductions: the trace does not say which), XLA's
own reductions, other fusions (elementwise), copies and the rest. Prints a table and the ten most
expensive operations. The numbers in docs/benchmarks.md ("Where the time goes at 224 px") come
from this script.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax
import numpy as np

from jaxft import create_model
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy
from jaxft.optim import OptimConfig
from jaxft.pretrained import init_variables
from step_args import step_parser  # tools/step_args.py, beside this script

KINDS = [  # (kind, pattern over the operation's name), first match wins
    ("convolution", r"convolution|conv"),
    # GPU kernels: cuDNN/cuBLAS/CUTLASS calls are the convolutions and matmuls
    ("library call (cuDNN/cuBLAS)", r"custom-call|cudnn|cublas|gemm|xmma|cutlass|sm\d+_"),
    ("pooling", r"reduce-window|select-and-scatter"),
    ("dot (matmul)", r"^dot|\bdot\b|gemm|matmul"),
    # jaxlib 0.10's XLA:CPU runs convolutions AND reductions as YNN fusions: the name alone cannot
    # tell them apart (join the trace with the compiled HLO for that)
    ("YNN fusion (convolution or reduction)", r"ynn"),
    ("reduction", r"reduce"),
    ("copy/transpose", r"copy|transpose|bitcast"),
    ("fusion (elementwise)", r"fusion|loop|add|multiply|select|maximum"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--bn-policy", default="torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="how many of the most expensive operations to list")
    args = parser.parse_args()

    model = create_model(args.arch, num_classes=10)
    engine = Engine(model, init_variables(model), parse_strategy(args.strategy), OptimConfig("adam", lr=1e-4),
                    bn_policy=args.bn_policy)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch_size)}
    engine.train_step(batch)  # compile outside the trace
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.train_step(batch)  # waits for the step's metrics
            wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)

    by_kind: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                name = event.name
                if (line.name.startswith("tf_XLA") and not name.startswith(
                        ("ThreadpoolListener", "end: ", "ThunkExecutor"))) or (
                        plane.name.startswith("/device:GPU") and line.name.startswith("Stream")):
                    by_kind[kind_of(name)] += event.duration_ns  # threads overlap: a sum of thread time
                    by_op[name] += event.duration_ns
    total = sum(by_kind.values())
    if not total:  # a profiler that names its lines differently: show what the trace holds
        for plane in profile.planes:
            print(f"plane {plane.name}: lines {sorted({line.name for line in plane.lines})[:12]}")
    print(f"# {args.arch} {args.strategy}, batch {args.batch_size} x {args.image_size} px, BN policy {args.bn_policy}; "
          f"{args.steps} steps; XLA operations {total / 1e6 / args.steps:.0f} thread-ms/step, "
          f"the step {wall_ms:.0f} ms/step wall (traced)")
    print("| kind | thread-ms/step | share |\n|---|---|---|")
    for kind, ns in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ns / 1e6 / args.steps:.0f} | {ns / max(total, 1):.0%} |")  # thread-ms
    print("\ntop operations:")
    for name, ns in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ns / 1e6 / args.steps:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
