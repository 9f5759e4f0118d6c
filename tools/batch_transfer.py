"""What the batch's form costs a train step: float32 against uint8 (normalised on the device),
each step waited for or dispatched back to back as the training loop does.

    PYTHONPATH=. python tools/batch_transfer.py [--arch resnet18] [--strategy partial:0.8]
                                                [--batch-size 64] [--image-size 224] [--steps 30]

On a GPU a short step (resnet18 at batch 64 is a few ms of kernels) is dominated by placing its
batch: 38.5 MB of float32 against 9.6 MB of uint8. The figures in docs/benchmarks.md ("On a GPU")
come from this script. One engine runs every case, so the rows compare side by side.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.steps import NUM_CLASSES, bench_engine, model_kwargs, random_batch
from jaxft.engine import Engine
from jaxft.models import create_model
from jaxft.pretrained import init_variables


def ms_per_step(engine: Engine, batch: dict, wait_each_step: bool, steps: int) -> float:
    for _ in range(3):  # compiles for this batch's dtype, then settles
        metrics = engine.train_step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        metrics = engine.dispatch_step(batch)
        if wait_each_step:
            float(metrics["loss_sum"])
    jax.block_until_ready((engine.state, metrics))
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--strategy", default="partial:0.8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    model = create_model(args.arch, num_classes=NUM_CLASSES, **model_kwargs(args.arch))
    engine = bench_engine(model, init_variables(model), args.strategy, jax.devices()[:1])
    batch = random_batch(args.batch_size, args.image_size)
    forms = {"float32": {"image": batch["image"], "label": batch["label"]},
             "uint8": {"image": batch["pixels"], "label": batch["label"]}}
    print(f"# {args.arch} {args.strategy}, batch {args.batch_size} x {args.image_size} px, {jax.devices()[0].platform}")
    print("| batch from host | waited each step ms | dispatched back to back ms | MB per batch |")
    print("|---|---|---|---|")
    for name, form in forms.items():
        waited, queued = (ms_per_step(engine, form, wait, args.steps) for wait in (True, False))
        print(f"| {name} | {waited:.2f} | {queued:.2f} | {np.asarray(form['image']).nbytes / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
