#!/usr/bin/env python
"""End to end: the PyTorch tutorial recipe against ``python -m jaxft.train``, whole jobs.

    python -m benchmarks.end_to_end [--quick] [--device cpu]

Both frameworks run as their own process, one after the other (never concurrently: the
machine has two cores), in alternating order per strategy so that load drifts hit both,
and each is timed by this parent from process start to exit. The job:

* data: scikit-learn's digits 5-9 written once as 64 px RGB PNG files into an ImageFolder
  tree (``train/<class>``, ``val/<class>``) holding jaxft's own seeded stratified split of
  ``digits:5-9``, so both frameworks decode the same files;
* weights: the offline source checkpoint (torchvision resnet18 trained in PyTorch on digits
  0-4) with a new 5-class head. jaxft draws the head from its seed; the torch recipe is
  handed those same initial values, so both start from identical weights (checked: val loss
  and accuracy before training must agree);
* recipe: the tutorial's (RandomResizedCrop + flip for training, Resize + CenterCrop for
  validation, Adam at a constant rate, batch 32, two loader workers, ``requires_grad=False``
  for frozen tensors with the model in ``train()`` mode, hence jaxft's ``--bn-frozen torch``).
  Two details follow jaxft rather than the tutorial's text: the val Resize is the one jaxft
  derives from the weights' metadata (these were trained on whole 32 px digits: Resize(size),
  not size * 256 / 224), and ``partial:F`` freezes the tensors jaxft's rule picks. One stays
  different: jaxft drops an epoch's last partial batch (22 steps of 32 over 717 images), the
  DataLoader keeps it (23 steps).

The jobs see the same data and start from the same weights but draw different batches and
augmentations (each framework's own RNG), so their accuracies agree only up to that noise:
see ``MARGIN`` for how far apart they may be.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.process_memory import run_watched
from benchmarks.report import Section

ARCH = "resnet18"
DATA = "digits:5-9"
SEED = 0
PNG_SIZE = 64  # the 8x8 digits upscaled (PIL bilinear, as the source checkpoint's inputs are)
BATCH_SIZE = 32
LR = 1e-3
WORKERS = 2
TORCH_RECIPE = Path(__file__).with_name("torch_recipe.py")

# Full mode: 64 px (at 224 px one epoch of full fine-tuning takes minutes per framework on
# two cores; see docs/benchmarks.md) and 5 epochs, where every strategy has levelled off.
# Quick mode: the head alone at 32 px for 2 epochs, under ~90 s with both process starts.
MODES = {
    False: {"strategies": ("head", "partial:0.8", "full"), "image_size": 64, "epochs": 5},
    True: {"strategies": ("head",), "image_size": 32, "epochs": 2},
}
# How far the best val accuracies may differ (points); 179 val images, one is 0.56 points.
# Full mode: the one point. Measured on this recipe it is below single-run noise:
# each framework is deterministic for a seed, but the recipe's augmentation (RandomResizedCrop
# keeps as little as 8% of a digit, plus flips) and BatchNorm in train() mode make val accuracy
# swing by up to 10 points from epoch to epoch, and partial:0.8's best over 5 epochs was
# 83.2 / 74.9 / 71.0% for torch and 71.5 / 67.0 / 79.9% for jaxft with seeds 0 / 1 / 2. So full
# mode fails on noise; the one-point parity of the two trainers is shown with shared batches
# by strategies_vs_torch.py. Quick mode: 2 epochs of the head at 32 px, the torch recipe alone,
# seeds 0-3, reached 36.3, 35.2, 45.3 and 36.9% (a 10-point range); 12 points passes that noise
# and still fails a head that does not train (it stays at its start, 16.8%).
MARGIN = {False: 1.0, True: 12.0}
# Before training both evaluate the same model on the same files: the same loss up to float
# rounding (measured: 1e-7 apart) and at most one image's difference in accuracy (a tie).
START_MARGIN = 0.6
START_LOSS_RTOL = 1e-4


@dataclass
class Job:
    """One framework's job for one strategy, as the parent saw it."""

    framework: str
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # epoch records, epoch 0 = before training
    trainable_params: int | None = None
    error: str | None = None
    started: float = 0.0  # time.time() at process start
    peak_rss_mib: float | None = None  # the training process (benchmarks.process_memory)
    peak_tree_pss_mib: float | None = None  # with its loader workers, sampled

    @property
    def trained(self) -> list[dict]:
        return [r for r in self.history if r["epoch"] > 0]

    @property
    def best(self) -> dict:
        return max(self.trained, key=lambda r: r["val_accuracy"])  # the earliest of equals, as both frameworks

    @property
    def loop_seconds(self) -> float:
        return sum(r["epoch_seconds"] for r in self.trained)

    def reached(self, target: float) -> dict | None:
        """The first trained epoch at or above ``target`` accuracy."""
        return next((r for r in self.trained if r["val_accuracy"] >= target - 1e-9), None)


def prepare_folder(log: Callable[[str], None] = print) -> Path:
    """The digits 5-9 ImageFolder tree (written once into jaxft's cache dir), split as jaxft
    splits ``digits:5-9`` with seed SEED."""
    import numpy as np
    from PIL import Image

    from jaxft.data.sources import open_builtin
    from jaxft.source_checkpoint import cache_dir, resize_images

    root = cache_dir() / "benchmarks" / f"digits5-9_{PNG_SIZE}px_seed{SEED}"
    if root.is_dir():
        return root
    splits = open_builtin(DATA, val_fraction=0.2, seed=SEED)
    images = resize_images(splits.train.store.images, PNG_SIZE)
    # written beside its final place and renamed: a run that dies half way leaves no half tree
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    for split in (splits.train, splits.val):
        for key, label in zip(split.keys, split.labels):
            out = tmp / split.name / split.classes[label] / f"{int(key):04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(images[key])).save(out)
    try:
        tmp.rename(root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp)
    log(f"wrote {len(splits.train)} train / {len(splits.val)} val PNGs ({PNG_SIZE} px) to {root}")
    return root


def prepare_start(source: Path, strategies: Sequence[str], image_size: int, log: Callable[[str], None] = print
                  ) -> dict:
    """What jaxft decides and the torch recipe is told: the new head's initial values (jaxft's
    seed rule), the tensors each ``partial:F`` freezes (jaxft's rule) and the val resize jaxft
    derives from the weights' metadata.

    The head and freeze lists are cached: drawing the head costs ~10 s (load_pretrained
    compiles the whole model's init), a sixth of the quick budget. A stale cache cannot pass
    unnoticed: both frameworks' val loss before training must agree (:func:`compare`)."""
    from jaxft import __version__
    from jaxft.data.transforms import transforms_for
    from jaxft.source_checkpoint import cache_dir
    from jaxft.weights import sidecar_meta

    stat = source.stat()
    key = f"{ARCH}:{SEED}:{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:jaxft {__version__}"
    root = cache_dir() / "benchmarks" / f"start_{ARCH}_seed{SEED}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    # every partial:F of full mode too, so a quick run fills the cache for a full one
    partial = dict.fromkeys(spec for spec in (*strategies, *MODES[False]["strategies"]) if spec.startswith("partial:"))
    files = {"head": root / "init_head.pth",
             "freeze": {spec: root / f"freeze_{spec.replace(':', '_')}.json" for spec in partial}}
    if not files["head"].exists() or not all(path.exists() for path in files["freeze"].values()):
        _write_start(source, files)
        log(f"wrote the start (jaxft's initial head, freeze lists) to {root}")
    _, eval_t = transforms_for(sidecar_meta(source).preprocessing, image_size)
    return {**files, "resize": eval_t.resize_size}


def _write_start(source: Path, files: dict) -> None:
    import torch
    import torchvision

    from jaxft import load_pretrained, to_torch
    from jaxft.freeze import parse_strategy
    from jaxft.parity import freeze_like
    from jaxft.rundir import atomic_write

    # the same call jaxft.train makes for --weights PATH (5 classes, seed SEED, a new head)
    model, variables, info = load_pretrained(ARCH, source, num_classes=5, seed=SEED, new_head=True)
    state = to_torch(ARCH, variables)
    files["head"].parent.mkdir(parents=True, exist_ok=True)
    head = {key.removeprefix("fc."): torch.as_tensor(state[key]) for key in info.replaced_keys}
    atomic_write(files["head"], lambda tmp: torch.save(head, tmp))
    for spec, path in files["freeze"].items():
        torch_model = torchvision.models.get_model(ARCH, weights=None, num_classes=5)
        freeze_like(torch_model, model, parse_strategy(spec).labels(model, variables["params"]))
        frozen = [name for name, param in torch_model.named_parameters() if not param.requires_grad]
        atomic_write(path, lambda tmp, frozen=frozen: tmp.write_text(json.dumps(frozen)))


def _run(cmd: list[str], log_path: Path, env: dict, job: Job) -> None:
    """Run ``cmd`` for ``job``, output to ``log_path``: its start, wall time, host memory and error, if any."""
    job.started = time.time()
    with open(log_path, "w") as out:
        watched = run_watched(cmd, out, env)
    job.wall_seconds, job.peak_rss_mib, job.peak_tree_pss_mib = (
        watched.wall_seconds, watched.peak_rss_mib, watched.peak_tree_pss_mib)
    if watched.returncode:
        tail = log_path.read_text().strip().splitlines()[-5:]
        job.error = f"exit {watched.returncode}: " + " / ".join(tail)


def run_jaxft(folder: Path, source: Path, spec: str, setup: dict, workdir: Path, device: str) -> Job:
    run_dir = workdir / f"jaxft-{spec.replace(':', '_')}"
    cmd = [sys.executable, "-m", "jaxft.train", "--data", str(folder), "--weights", str(source), "--arch", ARCH,
           "--strategy", spec, "--epochs", str(setup["epochs"]), "--batch-size", str(BATCH_SIZE), "--lr", str(LR),
           "--optimizer", "adam", "--schedule", "constant", "--image-size", str(setup["image_size"]), "--augment",
           "--bn-frozen", "torch", "--seed", str(SEED), "--workers", str(WORKERS), "--quiet", "--out", str(run_dir)]
    env = dict(os.environ)
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"  # a GPU build must not take the accelerator in a CPU comparison
    job = Job("jaxft")
    _run(cmd, workdir / f"{run_dir.name}.log", env, job)
    if job.error is None:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        job.history = [r for r in records if r.get("event") == "epoch"]
        job.trainable_params = json.loads((run_dir / "summary.json").read_text())["parameters"]["trainable"]
    return job


def run_torch(folder: Path, source: Path, spec: str, setup: dict, start: dict, workdir: Path, device: str) -> Job:
    out = workdir / f"torch-{spec.replace(':', '_')}.json"
    cmd = [sys.executable, str(TORCH_RECIPE), "--data", str(folder), "--weights", str(source), "--arch", ARCH,
           "--strategy", spec, "--init-head", str(start["head"]), "--epochs", str(setup["epochs"]),
           "--batch-size", str(BATCH_SIZE), "--lr", str(LR), "--image-size", str(setup["image_size"]),
           "--resize", str(start["resize"]), "--workers", str(WORKERS), "--seed", str(SEED),
           "--device", "cpu" if device == "cpu" else "cuda", "--out", str(out)]
    if spec in start["freeze"]:
        cmd += ["--freeze", str(start["freeze"][spec])]
    job = Job("torch")
    _run(cmd, out.with_suffix(".log"), dict(os.environ), job)
    if job.error is None:
        result = json.loads(out.read_text())
        job.history, job.trainable_params = result["history"], result["trainable_params"]
    return job


def _pct(accuracy: float) -> str:
    return f"{100 * accuracy:.1f}"


def _when(job: Job, target: float) -> str:
    """'ep N, S s': the first epoch at the target and seconds from its process start to that epoch's end."""
    record = job.reached(target)
    return "not reached" if record is None else f"ep {record['epoch']}, {record['time'] - job.started:.1f} s"


HEADERS = ["strategy", "trainable params", "jaxft wall s", "torch wall s", "torch/jaxft wall", "jaxft loop s",
           "torch loop s", "start val %", "jaxft best val % (ep)", "torch best val % (ep)", "diff pts",
           "jaxft final val %", "torch final val %", "target val %", "jaxft to target", "torch to target"]


def compare(spec: str, jax_job: Job, torch_job: Job, margin: float) -> tuple[list, list[str]]:
    """The table row for one strategy and what failed."""
    failures = [f"{spec}: {job.framework} failed ({job.error})" for job in (jax_job, torch_job) if job.error]
    if failures:
        return [spec] + ["-"] * (len(HEADERS) - 1), failures
    jb, tb = jax_job.best, torch_job.best
    diff = 100 * (jb["val_accuracy"] - tb["val_accuracy"])
    if abs(diff) > margin:
        failures.append(f"{spec}: best val accuracy jaxft {_pct(jb['val_accuracy'])}% vs torch "
                        f"{_pct(tb['val_accuracy'])}% ({diff:+.1f} points; margin {margin:g})")
    start_j, start_t = jax_job.history[0]["val_accuracy"], torch_job.history[0]["val_accuracy"]
    loss_j, loss_t = jax_job.history[0]["val_loss"], torch_job.history[0]["val_loss"]
    if abs(100 * (start_j - start_t)) > START_MARGIN or abs(loss_j - loss_t) > START_LOSS_RTOL * loss_t:
        failures.append(f"{spec}: before training jaxft has val loss {loss_j:.5f}, accuracy {_pct(start_j)}%, "
                        f"torch {loss_t:.5f}, {_pct(start_t)}%: they do not start from the same model or do not "
                        f"evaluate the same images (a stale start cache? see prepare_start)")
    if jax_job.trainable_params != torch_job.trainable_params:
        failures.append(f"{spec}: trainable parameters jaxft {jax_job.trainable_params:,} vs torch "
                        f"{torch_job.trainable_params:,}")
    # a target both reach: the lower best, minus 2 points (about 4 of 179 images)
    target = min(jb["val_accuracy"], tb["val_accuracy"]) - 0.02
    row = [spec, f"{jax_job.trainable_params:,}", f"{jax_job.wall_seconds:.1f}", f"{torch_job.wall_seconds:.1f}",
           f"{torch_job.wall_seconds / jax_job.wall_seconds:.2f}", f"{jax_job.loop_seconds:.1f}",
           f"{torch_job.loop_seconds:.1f}",
           _pct(start_j) if start_j == start_t else f"{_pct(start_j)} / {_pct(start_t)}",
           f"{_pct(jb['val_accuracy'])} ({jb['epoch']})", f"{_pct(tb['val_accuracy'])} ({tb['epoch']})",
           f"{diff:+.1f}", _pct(jax_job.trained[-1]["val_accuracy"]), _pct(torch_job.trained[-1]["val_accuracy"]),
           _pct(target), _when(jax_job, target), _when(torch_job, target)]
    return row, failures


MEMORY_HEADERS = ["strategy", "jaxft process peak MiB", "torch process peak MiB", "jaxft with workers MiB",
                  "torch with workers MiB", "jaxft/torch with workers"]
MEMORY_NOTE = ("Each job's host memory: the training process's peak resident set (the kernel's high-water mark), "
               "and the peak over samples every 0.25 s of the proportional set size summed over the process and "
               "its loader workers (shared pages counted once).")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def memory_row(spec: str, jax_job: Job, torch_job: Job) -> list[str]:
    ratio = (f"{jax_job.peak_tree_pss_mib / torch_job.peak_tree_pss_mib:.2f}"
             if jax_job.peak_tree_pss_mib and torch_job.peak_tree_pss_mib else "-")
    return [spec, _mib(jax_job.peak_rss_mib), _mib(torch_job.peak_rss_mib), _mib(jax_job.peak_tree_pss_mib),
            _mib(torch_job.peak_tree_pss_mib), ratio]


def run(quick: bool, device: str = "cpu", log: Callable[[str], None] = print,
        strategies: Sequence[str] | None = None) -> tuple[list[Section], list[str]]:
    """(the end-to-end table and its host-memory table, failures): one row per strategy, jaxft
    and the torch recipe side by side. ``strategies`` picks some of the mode's (or others
    jaxft and the recipe both know)."""
    from jaxft.source_checkpoint import ensure_source_checkpoint

    setup, margin = MODES[quick], MARGIN[quick]
    strategies = tuple(strategies or setup["strategies"])
    source = ensure_source_checkpoint(log=log)
    folder = prepare_folder(log)
    log(f"end to end, {ARCH} from {source.name} on {folder.name}: {setup['image_size']} px, {setup['epochs']} epochs, "
        f"Adam lr {LR} constant, batch {BATCH_SIZE}, {WORKERS} loader workers, device {device}; "
        f"margin {margin:g} points")
    rows, memory_rows, failures = [], [], []
    with tempfile.TemporaryDirectory(prefix="jaxft-e2e-") as tmp:
        workdir = Path(tmp)
        start = prepare_start(source, strategies, setup["image_size"], log)
        for i, spec in enumerate(strategies):
            order = ("jaxft", "torch") if i % 2 == 0 else ("torch", "jaxft")  # alternate: spread load drift
            jobs = {}
            for framework in order:
                jobs[framework] = (run_jaxft(folder, source, spec, setup, workdir, device) if framework == "jaxft"
                                   else run_torch(folder, source, spec, setup, start, workdir, device))
                job = jobs[framework]
                log(f"  {spec} {framework}: " + (job.error or f"{job.wall_seconds:.1f} s; val % by epoch (0: before "
                                                 f"training): " + " ".join(_pct(r["val_accuracy"]) for r in job.history)))
            row, failed = compare(spec, jobs["jaxft"], jobs["torch"], margin)
            rows.append(row)
            memory_rows.append(memory_row(spec, jobs["jaxft"], jobs["torch"]))
            failures += failed
    return [Section("End to end", HEADERS, rows), Section("End to end: host memory", MEMORY_HEADERS, memory_rows,
                                                          note=MEMORY_NOTE)], failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="head only, 32 px, 2 epochs (under ~90 s)")
    parser.add_argument("--device", default="cpu", help="cpu, or gpu (torch on cuda, JAX on its default backend)")
    parser.add_argument("--strategies", nargs="+", help="a subset (default: the mode's)")
    args = parser.parse_args()
    from benchmarks.report import print_section

    sections, failures = run(args.quick, args.device, strategies=args.strategies)
    for section in sections:
        print_section(section)
    for failure in failures:
        print(f"FAILED: {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
