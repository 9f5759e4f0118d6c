"""python -m jaxft.train: fine-tune a torchvision CNN in JAX, end to end.

Orchestration only: data comes from ``jaxft.data``, weights from ``jaxft.pretrained``, the
math from ``jaxft.engine``, checkpoints from ``jaxft.checkpoint``, files for people from
``jaxft.report``. A run directory holds everything a run produced:

    config.json        the resolved configuration (flags and config file merged)
    environment.json   versions, devices, command line
    model.json         arch, classes, preprocessing: what predict and export need
    metrics.jsonl      one line per logged step, per evaluation, per epoch
    checkpoints/       orbax: the latest checkpoints and the best by validation accuracy
    best/              the best model's variables (jaxft variables format)
    summary.json       final metrics, per-class accuracy, best epoch, wall time, images/s
    plots/             curves.png, confusion_val.png (and confusion_test.png)
    tensorboard/       with --tensorboard: TensorBoard event files (jaxft.tracking)
    wandb/             with --wandb: the W&B run's local files (wandb_run_id: its id, for --resume)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxft import runtime
from jaxft.config import (ConfigError, TrainConfig, add_config_flags, build_config, config_for_resume, config_to_dict,
                          flag_name, load_config_file)
from jaxft.pretrained import NO_WEIGHTS
from jaxft.rundir import RunError, RunWriter, check_resumable, prepare_run_dir, read_run_config, write_json
from jaxft.tracking import Callback, trackers_for

EXAMPLES = """\
examples:
  python -m jaxft.train                      # offline default: resnet18 from the source checkpoint, digits 5-9
  python -m jaxft.train --data ~/pets --weights imagenet --arch resnet50 --strategy head --epochs 10
  python -m jaxft.train --data tfds:cats_vs_dogs --strategy partial:0.8 --image-size 160
  python -m jaxft.train --config run.yaml --lr 3e-4          # flags override the file
  python -m jaxft.train --resume runs/resnet18-digits_5-9-full  # continue an interrupted run

Strategies: full (fine-tune everything), head (linear probe), body, partial:0.8 (freeze the first
80% of parameter tensors, torchvision order), regex:'layer4_.*=trainable;fc/.*=trainable;rest=frozen',
gradual[:N] (unfreeze one stage more every N epochs). --weights none trains from scratch.
"""


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean a user mistake: reported as one line, never a traceback."""
    from jaxft.checkpoint import CheckpointError
    from jaxft.convert import ConversionError
    from jaxft.data.split import DataError
    from jaxft.freeze import StrategyError
    from jaxft.models import UnknownArchError
    from jaxft.optim import OptimizerError
    from jaxft.weights import WeightsError

    return (ConfigError, RunError, CheckpointError, ConversionError, DataError, StrategyError, UnknownArchError,
            OptimizerError, WeightsError)


# --- run directory --------------------------------------------------------------------------------

def default_run_dir(cfg: TrainConfig, *parts: str) -> Path:
    """``runs/[PARTS-]ARCH-DATA``, with the strategy when no ``parts`` are given (a train run's
    directory; jaxft.tune passes "tune"); ``-2``, ``-3``... appended: a default is never reused."""
    data = Path(cfg.data).name if os.path.exists(cfg.data) else cfg.data
    names = (*parts, cfg.arch, data) if parts else (cfg.arch, data, cfg.strategy.split(":")[0])
    base = Path("runs") / "-".join(part.replace(":", "_").replace("/", "_") for part in names)
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import jax

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    packages = ("jaxft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "torch", "torchvision",
                "numpy", "tensorflow-datasets")
    return {
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: installed(name) for name in packages},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }


# --- the run --------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Everything besides the TrainState needed to continue a run exactly (saved as JSON beside
    it: a checkpoint is the pair, and resume loads the pair as it is)."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0
    global_step: int = 0
    stage_epoch: int = 0  # the epoch whose freeze stage (gradual) the saved optimizer state belongs to
    iterator: Any = None  # the data iterator's state: the next batch to train on
    train_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss_sum, correct, count
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluated epoch
    train_seconds: float = 0.0  # inside train steps
    wall_seconds: float = 0.0  # the whole loop, evaluation and checkpoints included
    images_seen: int = 0
    # how many devices the steps ran on (0: saved before it was recorded); a run continued on
    # another count ends where it would have up to float32 rounding, not bit for bit
    devices: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> "Progress":
        progress = cls(**{k: v for k, v in saved.items() if k in {f.name for f in fields(cls)}})
        if "stage_epoch" not in saved:  # saved before the stage was: an epoch-end save holds the ending epoch's
            progress.stage_epoch = max(progress.epoch - (progress.step_in_epoch == 0), 0)
        return progress

    def best(self) -> tuple[int, float]:
        """(epoch, validation accuracy) of the best epoch so far, the first of equals; (0, -1) before any."""
        trained = [r for r in self.history if r["epoch"] >= 1]
        if not trained:
            return 0, -1.0
        record = max(trained, key=lambda r: (r["val_accuracy"], -r["epoch"]))
        return record["epoch"], record["val_accuracy"]


# Ctrl-C, and what a scheduler sends before it kills (SLURM at a time limit or preemption,
# Kubernetes when it deletes a pod, after which it waits 30 s by default)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Ctrl-C or SIGTERM: checkpoint and leave, with exit status 128 + ``signum``."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptFlag:
    """The first Ctrl-C or SIGTERM asks the loop to stop after the current step (which then
    checkpoints): ``signum`` says which, 0 before any; a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> "InterruptFlag":
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.signum = signum

        self._previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)


@dataclass
class Evaluation:
    """One pass over a split: the sums (``StepStats``), and every sample's label and prediction."""

    stats: Any
    labels: np.ndarray
    predictions: np.ndarray


def evaluate(engine, loader) -> Evaluation:
    """Loss/accuracy over every sample of ``loader``, with labels and predictions."""
    from jaxft.engine import StepStats

    stats, labels, predictions = StepStats(), [], []
    for batch in loader:
        metrics = engine.eval_step(batch)
        stats.add(metrics)
        labels.append(metrics["labels"])  # the whole batch's: in a multi-host job this process loaded a part
        predictions.append(metrics["predictions"])
    return Evaluation(stats, np.concatenate(labels), np.concatenate(predictions))


def resolve_weights(cfg: TrainConfig, log: Callable[[str], None]) -> Any:
    """'source' is the offline source checkpoint, built on first use; 'none' means random init."""
    if cfg.weights == "source":
        from jaxft.source_checkpoint import SOURCE_ARCHS, SourceRecipe, ensure_source_checkpoint

        if cfg.arch not in SOURCE_ARCHS:
            raise ConfigError(f"--weights source exists for {', '.join(SOURCE_ARCHS)}, not {cfg.arch}; use "
                              f"--weights imagenet, a checkpoint file, or none")
        return ensure_source_checkpoint(SourceRecipe(arch=cfg.arch), log=log)
    return None if cfg.weights.lower() in NO_WEIGHTS else cfg.weights


def crop_size_of(cfg: TrainConfig) -> int:
    """The crop size ``cfg``'s weights were trained at, without loading them."""
    from jaxft.weights import Preprocessing, preprocessing_of, sidecar_meta, weights_enum

    if cfg.weights == "source":
        from jaxft.source_checkpoint import SourceRecipe

        return SourceRecipe().image_size
    if cfg.weights.lower() in NO_WEIGHTS:
        return Preprocessing().crop_size
    if os.path.exists(cfg.weights):
        return sidecar_meta(Path(cfg.weights)).preprocessing.crop_size
    return preprocessing_of(weights_enum(cfg.arch, cfg.weights)).crop_size


@dataclass
class RunParts:
    """Everything a run is built from: data, model, engine and loaders."""

    strategy: Any
    splits: Any
    model: Any
    variables: dict[str, Any]  # the whole model's initial variables
    info: Any
    full_labels: dict
    eval_transform: Any
    engine: Any
    loader: Any
    val_loader: Any
    test_loader: Any
    schedule: Callable[[int], float]
    use_features: bool
    feature_reason: str

    def full_variables(self, engine_variables: dict[str, Any]) -> dict[str, Any]:
        """The whole model's variables (best/ and exports hold the whole model), also when the
        engine trains a LinearHead on cached features."""
        if not self.use_features:
            return engine_variables
        head = self.model.head_name
        return {**self.variables, "params": {**self.variables["params"], head: engine_variables["params"][head]}}

    def engine_part(self, whole: dict[str, Any]) -> dict[str, Any]:
        """The inverse: what the engine trains, out of the whole model's variables."""
        if not self.use_features:
            return whole
        return {"params": {self.model.head_name: whole["params"][self.model.head_name]}, "batch_stats": {}}


def build_run(cfg: TrainConfig, run_dir: Path, resume: bool, log: Callable[[str], None]) -> RunParts:
    """Open the data, load the weights with a new head, choose the feature-cache route, and
    build the loaders and the engine. Bad input fails here, before anything trains."""
    import jax.numpy as jnp
    from flax import traverse_util

    from jaxft.data.pipeline import eval_loader, train_loader
    from jaxft.data.sources import open_dataset
    from jaxft.data.transforms import transforms_for, unnormalized
    from jaxft.distributed import batch_share
    from jaxft.engine import Engine, data_mesh
    from jaxft.features import extract_features, feature_cache_decision
    from jaxft.freeze import describe, lr_groups, parse_strategy, path_str
    from jaxft.models.head import head_for
    from jaxft.optim import OptimConfig, learning_rate_schedule
    from jaxft.pretrained import load_pretrained

    strategy = parse_strategy(cfg.strategy)
    splits = open_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_split, seed=cfg.seed)
    log(splits.summary())
    if resume:
        trained = json.loads((run_dir / "model.json").read_text())
        if trained["classes"] != list(splits.classes):
            raise RunError(f"--resume {run_dir}: the run was trained on {trained['num_classes']} classes "
                           f"({', '.join(trained['classes'][:5])}...) but {cfg.data} now has {len(splits.classes)} "
                           f"({', '.join(splits.classes[:5])}...); start a new run instead")
    weights = resolve_weights(cfg, log)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model, variables, info = load_pretrained(cfg.arch, weights, num_classes=len(splits.classes), seed=cfg.seed,
                                             new_head=weights is not None, dtype=dtype)
    log(f"model {cfg.arch}: {info.param_count:,} parameters, weights from {info.meta.source}"
        + (f"; new head ({', '.join(info.replaced_keys)})" if info.replaced_keys else ""))
    train_t, eval_t = transforms_for(info.meta.preprocessing, cfg.image_size, cfg.augmentation())
    if cfg.arch.startswith("vgg") and eval_t.crop_size < 32:
        raise ConfigError(f"{cfg.arch} halves the image five times: it needs --image-size 32 or more "
                          f"(got {eval_t.crop_size})")
    full_labels = strategy.labels(model, variables["params"])
    log(describe(full_labels, variables["params"], strategy))
    lr_rules = cfg.lr_rules()
    lr_groups(full_labels, model, lr_rules, cfg.layer_decay)  # every pattern must match the model: checked now

    # The head strategy on deterministic inputs trains a LinearHead on backbone features
    # computed once per split (and cached on disk), instead of running the frozen backbone
    # every step; the head it trains is the same.
    use_features, reason = feature_cache_decision(model, strategy, augment=cfg.augmentation(),
                                                  bn_policy=cfg.bn_frozen)
    # every device of every process (each process loads its own rows of every batch); where the
    # tool split the CPU into two devices, both only for forward-pass steps over enough pixels
    # whose convolutions are not all torch's kernels on one device
    mesh = data_mesh(runtime.run_devices(trains_backbone=strategy.name != "head", batch_size=cfg.batch_size,
                                         image_size=eval_t.crop_size, model=model))
    eval_batch = max(cfg.batch_size, 64)
    eval_mesh = data_mesh(runtime.run_devices(trains_backbone=False, batch_size=eval_batch,
                                              image_size=eval_t.crop_size, model=model))  # forward passes
    if runtime.cpu_split_in_use(list(eval_mesh.devices.flat)):
        on = "steps and evaluation" if eval_mesh == mesh else "evaluation (the steps on one)"
        log(f"{on} on {eval_mesh.devices.size} CPU devices, a part of each batch on each: XLA:CPU runs many "
            f"convolutions on one core (JAXFT_XLA_DEFAULTS=0 keeps one device; docs/engine.md)")
    share = batch_share(mesh)
    if cfg.batch_size % share.multiple:
        log(f"a batch of {cfg.batch_size} does not divide over {share.multiple} devices: padded with "
            f"{-cfg.batch_size % share.multiple} masked samples (they change no loss, metric or BatchNorm statistic)")
    if strategy.name == "head":
        log(f"feature cache {'on' if use_features else 'off'}: {reason}")
    if use_features:
        named = {name: split for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))
                 if split is not None}
        features = {name: extract_features(model, variables, split, eval_t, batch_size=eval_batch,
                                           num_workers=cfg.workers, mesh=eval_mesh) for name, split in named.items()}
        log("features: " + ", ".join(f"{name} {'from cache' if f.from_cache else 'computed'}"
                                     for name, f in features.items()))
        data = {"test": None, **{name: f.as_split(name) for name, f in features.items()}}
        train_t = loader_eval_t = None  # features need no transform
        engine_model = head_for(model, features["train"].features.shape[1])
        engine_variables = {"params": {model.head_name: variables["params"][model.head_name]}}
        engine_strategy = parse_strategy("full")
        # the LinearHead holds the classifier alone: the rules for other (frozen) layers have nothing to scale
        head_paths = [path_str((model.head_name, *path)) for path in
                      traverse_util.flatten_dict(variables["params"][model.head_name])]
        lr_rules = [(pattern, mult) for pattern, mult in lr_rules
                    if any(re.fullmatch(pattern, path) for path in head_paths)]
        normalization = None
    else:
        data = {"train": splits.train, "val": splits.val, "test": splits.test}
        # batches cross to the device as uint8 and are normalised there
        train_t, loader_eval_t = unnormalized(train_t), unnormalized(eval_t)
        normalization = (eval_t.mean, eval_t.std)
        engine_model, engine_variables, engine_strategy = model, variables, strategy

    workers = 0 if use_features else cfg.workers
    loader = train_loader(data["train"], train_t, cfg.batch_size, seed=cfg.seed, num_epochs=cfg.epochs,
                          num_workers=workers, share=share)
    # Evaluation loads with threads in this process, not worker processes: a pass starts a new
    # iterator, and spawning workers for it (they import jaxft afresh) took ~2 s, every epoch.
    val_loader = eval_loader(data["val"], loader_eval_t, eval_batch, num_threads=max(workers, 1), share=share)
    test_loader = (eval_loader(data["test"], loader_eval_t, eval_batch, num_threads=max(workers, 1), share=share)
                   if data["test"] is not None else None)
    optim = OptimConfig(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule,
                        int(cfg.warmup_epochs * loader.steps_per_epoch), cfg.clip_grad)
    engine = Engine(engine_model, engine_variables, engine_strategy, optim, total_steps=len(loader),
                    bn_policy=cfg.bn_frozen, label_smoothing=cfg.label_smoothing, lr_rules=lr_rules,
                    layer_decay=cfg.layer_decay, seed=cfg.seed, mesh=mesh, normalization=normalization,
                    eval_mesh=eval_mesh)
    return RunParts(strategy, splits, model, variables, info, full_labels, eval_t, engine, loader, val_loader,
                    test_loader, learning_rate_schedule(optim, len(loader)), use_features, reason)


def resume_progress(parts: RunParts, cfg: TrainConfig, run_dir: Path, ckpts: Any) -> Progress:
    """Load the latest (state, progress) pair into the engine, as it was saved."""
    latest = ckpts.latest_step()
    if latest is None:
        raise RunError(f"--resume {run_dir}: the run has no checkpoint yet; start it again with --out")
    progress = Progress.from_json(ckpts.progress(latest))
    started = progress.epoch + (progress.step_in_epoch > 0)
    if cfg.epochs < started:
        raise RunError(f"--epochs {cfg.epochs}: {run_dir} has already trained {progress.epoch} epoch(s)"
                       f"{' and started the next' if progress.step_in_epoch else ''}; --epochs can extend a run, "
                       f"not take back trained epochs (--epochs {started} or more)")
    # gradual unfreezing: the optimizer state has the shape of the stage it was saved in
    parts.engine.set_epoch(progress.stage_epoch)
    parts.engine.state, _ = ckpts.restore(latest, parts.engine.state)
    return progress


def fit(parts: RunParts, cfg: TrainConfig, files: RunWriter, resume: bool, log: Callable[[str], None],
        quiet: bool, model_meta: dict[str, Any], changes: Optional[dict[str, tuple[Any, Any]]] = None,
        callbacks: Sequence[Callback] = ()) -> tuple[Progress, Optional[Evaluation]]:
    """The epoch loop: train steps, logs, checkpoints, evaluation after every epoch, the best
    model in best/ (with ``model_meta``, model.json, as its header). Returns the progress and
    the validation pass of the best epoch when this process ran it (None when the best epoch was
    trained before a resume: an epoch that beats every earlier one is the run's best so far). Resumes from the latest
    checkpoint when ``resume``, with ``changes`` ({setting: (old, new)}) to the run's
    configuration recorded at the step they take effect. Every record of metrics.jsonl also
    goes to ``callbacks`` (trackers, the tuner's pruner).

    In a multi-host job every process runs this loop over the same steps (each loading its
    rows of every batch), and ``files`` writes on process 0 only."""
    from tqdm import tqdm

    from jaxft.checkpoint import RunCheckpoints, save_variables
    from jaxft.data.pipeline import close_iterator, start_workers
    from jaxft.distributed import is_multihost, largest_of_processes
    from jaxft.engine import NonFiniteLossError, StepStats
    from jaxft.freeze import describe

    engine, steps_per_epoch, run_dir = parts.engine, parts.loader.steps_per_epoch, files.run_dir
    ckpts = RunCheckpoints(run_dir / "checkpoints", keep=cfg.keep)
    progress = Progress()
    best_val: Optional[Evaluation] = None
    iterator = iter(parts.loader)
    metrics_log: Any = None
    wall_mark = time.perf_counter()
    multihost = is_multihost()

    def save(val_accuracy: Optional[float] = None, iterator_state: Any = None) -> None:
        nonlocal wall_mark
        now = time.perf_counter()
        progress.wall_seconds += now - wall_mark
        wall_mark = now
        progress.iterator = iterator_state if iterator_state is not None else iterator.get_state()
        progress.stage_epoch = engine.epoch
        progress.devices = engine.devices
        ckpts.save(progress.global_step, engine.state, progress.to_json(), val_accuracy)

    def write(record: dict[str, Any]) -> None:
        metrics_log.write(record)
        for callback in callbacks:
            callback.on_record(record)

    def record_epoch(record: dict[str, Any]) -> None:
        progress.history.append(record)
        write({"event": "epoch", "step": progress.global_step, **record})

    def stop_requested(interrupt: InterruptFlag, due: bool = True) -> int:
        """The signal to stop for after this step (0: go on). A Ctrl-C or SIGTERM on any process
        of a multi-host job stops every process at the same step: they agree at the steps they
        collect (``due``) anyway, which adds no host sync per step."""
        if not multihost:
            return interrupt.signum
        return largest_of_processes(interrupt.signum) if due else 0

    try:
        if resume:
            progress = resume_progress(parts, cfg, run_dir, ckpts)
            iterator.set_state(progress.iterator)
            files.truncate_metrics(progress.global_step)
            if changes:
                files.json("config.json", config_to_dict(cfg))  # a later resume continues with them
            log(f"resumed {run_dir} at step {progress.global_step} (epoch {progress.epoch + 1}, "
                f"step {progress.step_in_epoch}/{steps_per_epoch})"
                + "".join(f"; {flag_name(k)} {new} (was {old})" for k, (old, new) in (changes or {}).items()))
            if progress.devices and progress.devices != engine.devices:
                log(f"note: the steps so far ran on {progress.devices} device(s) and continue on {engine.devices}: "
                    f"each batch is split another way, so the run ends where it would have up to float32 rounding, "
                    f"not bit for bit. To continue it exactly, resume it launched as it was started (the same "
                    f"XLA_FLAGS, JAX_NUM_CPU_DEVICES, JAXFT_XLA_DEFAULTS and processes; docs/guarantees.md)")
        if progress.global_step < len(parts.loader):
            start_workers(iterator)  # they start up during the first val pass, not the first steps
        metrics_log = files.open_metrics()
        for callback in callbacks:
            callback.on_start(cfg, run_dir, progress.global_step, progress.history)
        if resume:
            write({"event": "resume", "step": progress.global_step, "epoch": progress.epoch + 1,
                   "changes": {k: {"from": old, "to": new} for k, (old, new) in (changes or {}).items()}})
        wall_mark = time.perf_counter()  # the wall time counts training, not setting up or restoring
        if not resume:
            stats = evaluate(engine, parts.val_loader).stats
            record_epoch({"epoch": 0, "val_loss": stats.loss, "val_accuracy": stats.accuracy})
            log(f"before training: val loss {stats.loss:.4f}, accuracy {stats.accuracy:.4f}")
            wall_mark = time.perf_counter()
        with InterruptFlag() as interrupt:
            for epoch in range(progress.epoch, cfg.epochs):
                if engine.set_epoch(epoch):
                    log(describe(parts.strategy.labels(parts.model, parts.variables["params"], epoch),
                                 parts.variables["params"], parts.strategy))
                running = StepStats(*progress.train_sums)
                bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=True if quiet else None, leave=False,
                           unit="step")
                epoch_start = interval_mark = time.perf_counter()
                # Steps are queued on the device and their metrics read every log interval (and
                # before a checkpoint, an interrupt or the epoch's end), not per step: a per-step
                # read would make the host wait for the device, and the next batch could not be
                # loaded and placed while the current step runs.
                pending: list[tuple[Any, dict]] = []  # (iterator state before the batch, device metrics)

                def collect() -> None:
                    nonlocal interval_mark
                    try:
                        fetched = engine.collect([metrics for _, metrics in pending])
                    except NonFiniteLossError as error:
                        # The refused step and those queued after it did not train: roll back to it,
                        # so the checkpoint and a resume start with the refused batch.
                        refused = len(pending) - error.index
                        progress.global_step -= refused
                        progress.step_in_epoch -= refused
                        add_to_totals(error.collected)
                        save(iterator_state=pending[error.index][0])
                        ckpts.wait()  # on disk before this block's signal handling ends
                        raise
                    images = add_to_totals(fetched)
                    now = time.perf_counter()
                    progress.train_seconds += now - interval_mark
                    images_per_sec = images / max(now - interval_mark, 1e-9)
                    interval_mark = now
                    pending.clear()
                    bar.update(len(fetched))
                    bar.set_postfix(loss=f"{running.loss:.3f}", acc=f"{running.accuracy:.3f}",
                                    img_s=f"{images_per_sec:.0f}")
                    if progress.global_step % cfg.log_every == 0:  # the last collected step
                        last = fetched[-1]
                        write({"event": "step", "step": progress.global_step, "epoch": epoch + 1,
                               "loss": float(last["loss_sum"] / last["count"]),
                               "accuracy": float(last["correct"] / last["count"]),
                               "lr": float(parts.schedule(progress.global_step - 1)),
                               "grad_norm": float(last["grad_norm"]),
                               "images_per_sec": round(images_per_sec, 1)})

                def add_to_totals(fetched: Sequence[dict]) -> int:
                    """Add trained steps to the epoch's sums; returns how many images they held."""
                    images = sum(int(metrics["count"]) for metrics in fetched)
                    for metrics in fetched:
                        running.add(metrics)
                    progress.images_seen += images
                    progress.train_sums = [running.loss_sum, running.correct, running.count]
                    return images

                while progress.step_in_epoch < steps_per_epoch:
                    position = iterator.get_state()
                    batch = next(iterator)
                    pending.append((position, engine.dispatch_step(batch)))
                    progress.global_step += 1
                    progress.step_in_epoch += 1
                    epoch_end = progress.step_in_epoch == steps_per_epoch
                    save_due = progress.global_step % cfg.save_every == 0 and not epoch_end
                    due = progress.global_step % cfg.log_every == 0 or epoch_end or save_due
                    stop = stop_requested(interrupt, due)
                    if due or stop:
                        collect()
                    if stop and not epoch_end:
                        raise StopRequested(stop)  # (at an epoch's last step: after its evaluation and save)
                    if save_due:
                        save()
                        interval_mark = time.perf_counter()  # the wall time counts training, not saving
                bar.close()
                evaluation = evaluate(engine, parts.val_loader)
                stats = evaluation.stats
                improved = stats.accuracy > progress.best()[1]
                if improved:
                    files.best(lambda directory: save_variables(
                        directory, parts.full_variables(engine.state.variables), model_meta))
                    best_val = evaluation
                record_epoch({"epoch": epoch + 1, "train_loss": running.loss, "train_accuracy": running.accuracy,
                              "val_loss": stats.loss, "val_accuracy": stats.accuracy,
                              "epoch_seconds": round(time.perf_counter() - epoch_start, 2)})
                log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {running.loss:.4f} acc {running.accuracy:.4f} | "
                    f"val loss {stats.loss:.4f} acc {stats.accuracy:.4f}{' *' if improved else ''}")
                progress.epoch, progress.step_in_epoch, progress.train_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
                save(stats.accuracy)
                stop = stop_requested(interrupt)
                if stop and epoch + 1 < cfg.epochs:
                    raise StopRequested(stop)
            # The last save's files are written in the background: waited for here, where a Ctrl-C
            # or SIGTERM still only sets the flag, so that one cannot cut the run's last checkpoint.
            ckpts.wait()
    except StopRequested:
        save()  # after a whole step: the iterator is at the next batch
        raise
    finally:
        if metrics_log is not None:
            metrics_log.close()
        try:
            ckpts.close()  # waits for the last asynchronous save, and raises if a save failed
        finally:
            close_iterator(iterator)
    return progress, best_val


def final_report(parts: RunParts, cfg: TrainConfig, files: RunWriter, progress: Progress,
                 best_val: Optional[Evaluation] = None) -> dict[str, Any]:
    """The best model on val and test; write summary.json and the plots. ``best_val``: the
    validation pass the loop ran on the best epoch, reused as it is (the
    evaluation is deterministic, and best/ holds those very variables); otherwise, and for test,
    the model is read back from best/ and evaluated. Every process of a multi-host job evaluates
    (each loads its rows of the batches) and reads best/ (the run directory is on storage they
    share); process 0 writes."""
    import jax

    from jaxft.checkpoint import load_variables
    from jaxft.engine import replicate
    from jaxft.freeze import FROZEN, summarize
    from jaxft.report import confusion_matrix, per_class_accuracy, plot_confusion, plot_curves
    from jaxft.rundir import read_jsonl

    engine, classes, spec, run_dir = parts.engine, parts.splits.classes, parts.strategy.spec, files.run_dir
    best_epoch = progress.best()[0]
    if best_val is None or parts.test_loader is not None:
        best, _ = load_variables(run_dir / "best")
        best = replicate(parts.engine_part(best), engine.mesh)
        engine.state = engine.state.replace(params=best["params"], batch_stats=best.get("batch_stats", {}))
    last = progress.history[-1]
    summary: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()), "arch": cfg.arch, "data": cfg.data, "strategy": spec,
        "bn_frozen": cfg.bn_frozen, "classes": list(classes), "best_epoch": best_epoch,
        "epochs": cfg.epochs, "steps": progress.global_step, "devices": int(engine.mesh.devices.size),
        "train": {"loss": last["train_loss"], "accuracy": last["train_accuracy"],
                  "note": "running average over the last epoch, with augmentation"},
    }
    for name, loader in (("val", parts.val_loader), ("test", parts.test_loader)):
        if loader is None:
            continue
        evaluation = best_val if name == "val" and best_val is not None else evaluate(engine, loader)
        stats = evaluation.stats
        matrix = confusion_matrix(evaluation.labels, evaluation.predictions, len(classes))
        summary[name] = {"loss": stats.loss, "accuracy": stats.accuracy, "samples": int(stats.count),
                         "per_class_accuracy": per_class_accuracy(matrix, classes),
                         "confusion_matrix": matrix.tolist()}
        files.file(f"plots/confusion_{name}.png", functools.partial(
            plot_confusion, matrix, classes, title=f"{cfg.arch} {spec}: {name} (best epoch {best_epoch})"))
    # what trained by the end: gradual's last stage, every other strategy's only one
    final_labels = parts.strategy.labels(parts.model, parts.variables["params"], epoch=cfg.epochs - 1)
    rows = summarize(final_labels, parts.variables["params"])
    summary.update({
        "before_training": {"val_loss": progress.history[0]["val_loss"],
                            "val_accuracy": progress.history[0]["val_accuracy"]},
        "parameters": {"total": sum(r[2] for r in rows), "trainable": sum(r[2] for r in rows if r[0] != FROZEN)},
        "optimizer_state_bytes": engine.optimizer_state_bytes(),
        "wall_seconds": round(progress.wall_seconds, 2),
        "train_seconds": round(progress.train_seconds, 2),
        "images_per_sec": round(progress.images_seen / max(progress.train_seconds, 1e-9), 1),
        "devices": engine.devices,
        "eval_devices": engine.eval_devices,
        "processes": jax.process_count(),
        "feature_cache": ({"used": parts.use_features, "reason": parts.feature_reason}
                          if parts.strategy.name == "head" else None),
    })
    files.json("summary.json", summary)
    files.file("plots/curves.png", lambda path: plot_curves(
        [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "epoch"], path))
    return summary


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, log: Callable[[str], None] = print,
          quiet: bool = False, changes: Optional[dict[str, tuple[Any, Any]]] = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` (fresh, or resumed with ``changes`` to its config); returns
    the summary. ``callbacks`` get every record, after the trackers ``cfg`` asks for. In a
    multi-host job every process calls this; process 0 alone writes, tracks and calls back."""
    from jaxft.distributed import is_writer

    files = RunWriter(run_dir, active=is_writer())
    parts = build_run(cfg, run_dir, resume, log)
    if resume:
        model_meta = json.loads((run_dir / "model.json").read_text())
    else:
        eval_t = parts.eval_transform
        model_meta = {
            "arch": cfg.arch, "num_classes": len(parts.splits.classes), "classes": list(parts.splits.classes),
            "image_size": eval_t.crop_size, "resize_size": eval_t.resize_size, "dtype": cfg.dtype,
            "mean": list(eval_t.mean), "std": list(eval_t.std), "weights": parts.info.meta.source}
        files.json("model.json", model_meta)
    trackers = [*trackers_for(cfg), *callbacks] if files.active else []
    try:
        progress, best_val = fit(parts, cfg, files, resume, log, quiet, model_meta, changes, trackers)
        summary = final_report(parts, cfg, files, progress, best_val)
        for tracker in trackers:
            tracker.on_end(summary, run_dir)
    finally:
        for tracker in trackers:
            tracker.close()
    return summary


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxft.train",
        description="Fine-tune a torchvision ResNet/VGG in JAX: pretrained weights, a new head, a freeze strategy, "
                    "checkpoints you can resume, and reports (metrics.jsonl, summary.json, plots).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file whose keys are these flags' names; flags override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out run directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                        help="join a multi-host job. By default jaxft joins one when the environment names more "
                             "than one process (srun, mpirun, JAX_NUM_PROCESSES; see docs/distributed.md); "
                             "--distributed also lets JAX detect a cluster it alone knows (a Cloud TPU pod), "
                             "--no-distributed runs on this host only")
    add_config_flags(parser)
    return parser


COMMAND_OPTIONS = ("config", "resume", "overwrite", "quiet", "distributed")  # flags that are not TrainConfig's
STOPPED_ALONE = (1, 2, 4)  # exit codes of a process that may stop without the others (see main)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxft.distributed import DistributedError, exit_now, join_cluster

    try:
        multihost = join_cluster(args.distributed, announce=lambda line: print(line, file=sys.stderr))
    except DistributedError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if not multihost:
        runtime.split_cpu_for_command(argv)  # before anything starts a backend
        return run_command(parser, args, multihost)
    # A process of a multi-host job that may be stopping alone (an error of its own, a lost
    # peer, a second Ctrl-C) leaves at once: waiting at JAX's exit barrier would keep the others
    # waiting in a collective for it. They learn of it at their next collective and stop too
    # ("lost contact"). Finishing, a NaN stop and a Ctrl-C stop are agreed: every process
    # checkpoints at the same step and they leave together.
    try:
        code = run_command(parser, args, multihost)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code in STOPPED_ALONE:
        exit_now(code)
    return code


def remove_if_untrained(created: Optional[Path]) -> None:
    """Remove the run directory this invocation ``created`` when it stopped before training."""
    if created is not None and not (created / "checkpoints").exists():
        shutil.rmtree(created, ignore_errors=True)


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, multihost: bool) -> int:
    """The command on this process; its exit status. In a multi-host job process 0 creates the
    run directory and prints the progress, and every process reports its own errors."""
    from jaxft.distributed import exit_now, from_writer, is_writer, lost_peer

    writer = not multihost or is_writer()
    log: Callable[[str], None] = print if writer else (lambda *_: None)
    who = ""
    if multihost:
        import jax

        who = f"process {jax.process_index()} of {jax.process_count()}: "
    flags = {k: v for k, v in vars(args).items() if k not in COMMAND_OPTIONS}
    created: Optional[Path] = None
    run_dir: Optional[Path] = None
    changes: dict[str, tuple[Any, Any]] = {}
    try:
        file_values = load_config_file(args.config) if args.config else {}
        if args.resume:
            run_dir = Path(args.resume)
            check_resumable(run_dir)
            saved = read_run_config(run_dir)
            cfg, changes = config_for_resume(saved, file_values, flags, str(run_dir / "config.json"))
        else:
            cfg = build_config(file_values, flags, args.config or "flags")
            if writer:
                run_dir = prepare_run_dir(Path(cfg.out) if cfg.out else default_run_dir(cfg), args.overwrite)
                created, cfg.out = run_dir, str(run_dir)
                write_json(run_dir / "config.json", config_to_dict(cfg))
                write_json(run_dir / "environment.json", environment())
            # the other processes train into the directory process 0 made, under the name it chose
            run_dir = Path(from_writer(str(run_dir) if writer else ""))
            cfg.out = str(run_dir)
        log(f"run directory: {run_dir}")
        summary = train(cfg, run_dir, resume=bool(args.resume), log=log, quiet=args.quiet or not writer,
                        changes=changes)
    except (StopRequested, KeyboardInterrupt) as exc:
        saved_now = isinstance(exc, StopRequested)
        how = f"{exc} received, checkpoint saved" if saved_now else "stopped at once, the latest checkpoint is kept"
        resume = f"; continue with python -m jaxft.train --resume {run_dir}" if run_dir else ""
        print(f"{who}interrupted: {how}{resume}", file=sys.stderr)
        if multihost and not saved_now:  # a second signal stopped this process alone: leave at once (see main)
            exit_now(130)
        return 128 + exc.signum if saved_now else 130
    except user_errors() as exc:
        from jaxft.checkpoint import CheckpointWriteError

        remove_if_untrained(created)
        resume = (f". The checkpoints before it are kept; once the cause is fixed (free disk space, say), continue "
                  f"with python -m jaxft.train --resume {run_dir}"
                  if isinstance(exc, CheckpointWriteError) and run_dir is not None else "")
        print(f"{parser.prog}: error: {who}{exc}{resume}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # NonFiniteLossError: the last good state is checkpointed
        print(f"{parser.prog}: error: {who}{exc} It is saved; to continue with a lower learning rate: "
              f"python -m jaxft.train --resume {run_dir} --lr {cfg.lr / 10:g}", file=sys.stderr)
        return 3
    except Exception as exc:
        if not lost_peer(exc):
            raise
        remove_if_untrained(created)
        first = str(exc).strip().splitlines()[0]
        resume = (f" When it is fixed, start every process again with --resume {run_dir}: training continues "
                  f"from the latest checkpoint." if run_dir is not None and (run_dir / "checkpoints").is_dir() else "")
        print(f"{parser.prog}: error: {who}lost contact with the other processes of this job ({first}): one of them "
              f"stopped or died; its own output says why.{resume}", file=sys.stderr)
        return 4
    test = f", test accuracy {summary['test']['accuracy']:.4f}" if "test" in summary else ""
    log(f"done: best val accuracy {summary['val']['accuracy']:.4f} at epoch {summary['best_epoch']}{test}; "
        f"{summary['images_per_sec']:.0f} images/s; results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
