"""Training configuration: one dataclass, the command-line flags built from it, and config files.

A config file (YAML or JSON) uses the flag names as keys (``batch_size`` or ``batch-size``);
flags given on the command line override it. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jaxft.engine import BN_POLICIES
from jaxft.models import ARCHS
from jaxft.optim import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the key."""


@dataclass
class TrainConfig:
    arch: str = field(default="resnet18", metadata={"help": "torchvision architecture", "choices": ARCHS})
    weights: str = field(default="source", metadata={
        "help": "imagenet (torchvision DEFAULT), an enum name (IMAGENET1K_V2), a .pth/.safetensors path, "
                "'source' (the offline source checkpoint: resnet18 trained in PyTorch on digits 0-4, built on "
                "first use) or none (random init, training from scratch)"})
    data: str = field(default="digits:5-9", metadata={
        "help": "an image folder (root/class_x/*.jpg, optional train/ val/ test/), tfds:NAME, digits, digits:5-9 "
                "or lfw"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "where TFDS datasets are prepared",
                                                           "on_resume": True})
    strategy: str = field(default="full", metadata={
        "help": "what trains: full, head, body, partial:F (freeze the first fraction F of tensors), "
                "regex:'PATTERN=trainable;...;rest=frozen', gradual[:N]"})
    bn_frozen: str = field(default="running", metadata={
        "help": "BatchNorm in frozen layers: running (use and keep running statistics) or torch (batch "
                "statistics, running stats updated: what requires_grad=False + model.train() does)",
        "choices": BN_POLICIES})
    epochs: int = field(default=5, metadata={"help": "passes over the training split", "on_resume": True})
    batch_size: int = field(default=32, metadata={"help": "global batch size (split over all devices)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate", "on_resume": True})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    schedule: str = field(default="cosine", metadata={
        "help": "learning-rate schedule, stepped every optimizer step, as PyTorch's: constant; cosine "
                "(CosineAnnealingLR to 0 over the steps after warm-up); onecycle (OneCycleLR: cosine from lr/25 up "
                "to lr, then down to lr/25/1e4; unlike torch's default, momentum and Adam's beta1 are not cycled, "
                "i.e. cycle_momentum=False)", "choices": SCHEDULES})
    warmup_epochs: float = field(default=0.0, metadata={
        "help": "linear warm-up from 1%% of --lr (torchvision's --lr-warmup-decay 0.01), in epochs (fractions "
                "allowed, rounded down to steps); constant and cosine: LinearLR, then the schedule; onecycle: the "
                "length of the rise (pct_start = warm-up steps / total steps; without it 0.3 of the run)"})
    clip_grad: Optional[float] = field(default=None, metadata={"help": "clip gradients to this global norm",
                                                               "on_resume": True})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (AdamW: decoupled; else L2)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    lr_mult: Optional[str] = field(default=None, metadata={
        "help": "per-group learning-rate multipliers, 'PATTERN=MULT;...' over paths like layer4_0/conv1/kernel"})
    layer_decay: Optional[float] = field(default=None, metadata={
        "help": "layer-wise learning-rate decay per stage below the head (e.g. 0.7)"})
    image_size: Optional[int] = field(default=None, metadata={
        "help": "crop size (default: the weights' preprocessing, 224 for ImageNet, 32 for 'source')"})
    augment: Optional[bool] = field(default=None, metadata={
        "help": "RandomResizedCrop + flip while training; default: on, except for the built-ins (8x8 digits, "
                "25x25 faces), which it would crop to a few pixels"})
    val_split: float = field(default=0.2, metadata={"help": "fraction of train held out when there is no val/"})
    seed: int = field(default=0, metadata={"help": "seed for init, split, shuffling and augmentation"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype (params stay float32)",
                                                    "choices": ("float32", "bfloat16")})
    workers: int = field(default=0, metadata={"help": "data loader worker processes (0: in-process)",
                                              "on_resume": True})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and every epoch)",
                                                  "on_resume": True})
    keep: int = field(default=3, metadata={"help": "latest checkpoints kept (the best is kept too)",
                                           "on_resume": True})
    log_every: int = field(default=10, metadata={"help": "write step metrics every N steps", "on_resume": True})
    out: Optional[str] = field(default=None, metadata={"help": "run directory (default: runs/ARCH-DATA-STRATEGY)"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write TensorBoard event files to RUN_DIR/tensorboard (scalars, config, plots; no TensorFlow "
                "needed)", "on_resume": True})
    wandb: Optional[str] = field(default=None, metadata={
        "help": "also log to this Weights & Biases project (extra [wandb]; WANDB_MODE=offline works without a "
                "network)", "on_resume": True})
    wandb_group: Optional[str] = field(default=None, metadata={
        "help": "W&B run group (jaxft.compare and jaxft.tune set it to the comparison's or the study's name)",
        "on_resume": True})

    def check(self) -> "TrainConfig":
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "save_every": self.save_every,
                    "keep": self.keep, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0.0 < self.val_split < 1.0:
            raise ConfigError(f"--val-split must be in (0, 1), got {self.val_split}: it is the fraction of the "
                              f"training data held out for validation when the data has no val split of its own")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"--image-size must be at least 16 px, got {self.image_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.wandb:
            from jaxft.tracking import require_wandb

            require_wandb()  # before anything is written or trained
        self.lr_rules()  # parses and compiles the patterns: a bad one is a ConfigError now
        if self.arch not in ARCHS:
            from jaxft.models import check_arch

            check_arch(self.arch)
        return self

    def augmentation(self) -> bool:
        """``augment`` as given, else on for folders and TFDS and off for the tiny built-ins."""
        if self.augment is not None:
            return self.augment
        from jaxft.data.builtin import BUILTINS

        return self.data.partition(":")[0] not in BUILTINS

    def lr_rules(self) -> list[tuple[str, float]]:
        rules = []
        for rule in filter(None, (r.strip() for r in (self.lr_mult or "").split(";"))):
            pattern, _, mult = rule.rpartition("=")
            try:
                rules.append((pattern, float(mult)))
                re.compile(pattern)
            except ValueError:
                raise ConfigError(f"--lr-mult rule {rule!r} must be PATTERN=MULTIPLIER, e.g. 'fc/.*=10'") from None
            except re.error as exc:
                raise ConfigError(f"--lr-mult rule {rule!r}: invalid regular expression ({exc})") from None
        return rules


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


_TYPES = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float, "bool": bool,
          "Optional[bool]": bool}


def _coerce(key: str, value: Any, source: str) -> Any:
    """A config-file value as its field's type; a wrong type names the key."""
    type_name = str(CONFIG_FIELDS[key].type)
    kind = _TYPES.get(type_name, str)
    if value is None:
        if type_name.startswith("Optional"):
            return None
        raise ConfigError(f"{source}: {key} needs a value (got null)")
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}") from None


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are left unset so config files can fill them."""
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata.get('help', '')} (default: {f.default}"
        help_text += "; --resume may change it)" if f.metadata.get("on_resume") else ")"
        if f.type in ("bool", bool, "Optional[bool]"):
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        kind = _TYPES.get(str(f.type), str)
        parser.add_argument(flag_name(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), metavar=f.name.upper() if "choices" not in f.metadata
                            else None, help=help_text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ConfigError(f"config file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}:"
                          f" {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any], source: str = "config") -> TrainConfig:
    """TrainConfig from a config file's values overridden by flags; unknown keys are errors."""
    unknown = [k for k in file_values if k not in CONFIG_FIELDS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, CONFIG_FIELDS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source} has unknown key(s) {', '.join(hints)}; valid keys are the flags of "
                          f"python -m jaxft.train --help")
    values = {**{k: _coerce(k, v, source) for k, v in file_values.items()}, **flag_values}
    try:
        return TrainConfig(**values).check()
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Settings a resumed run may change: the rest fix what the run so far computed (its data,
# model, batches, optimizer), so changing them mid-run would give a run that no single
# configuration describes.
CHANGEABLE_ON_RESUME = tuple(name for name, f in CONFIG_FIELDS.items() if f.metadata.get("on_resume"))


def config_for_resume(saved: dict[str, Any], file_values: dict[str, Any], flag_values: dict[str, Any],
                      source: str) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The configuration of a resumed run: its saved ``config.json`` with the changes asked for
    on the command line, and those changes as {key: (old, new)}. A change to a setting that
    cannot change mid-run is a ConfigError naming it."""
    saved = config_to_dict(build_config(saved, {}, source))  # a setting it lacks (an older jaxft's) is the default
    cfg = build_config({**saved, **file_values}, flag_values, source)
    changes = {k: (saved[k], v) for k, v in config_to_dict(cfg).items() if saved[k] != v}
    fixed = [k for k in changes if k not in CHANGEABLE_ON_RESUME]
    if fixed:
        asked = ", ".join(f"{flag_name(k)} {changes[k][1]} (the run has {changes[k][0]})" for k in fixed)
        raise ConfigError(f"--resume continues a run with its own settings and cannot change {asked}; start a new "
                          f"run for that. --resume may change: {', '.join(map(flag_name, CHANGEABLE_ON_RESUME))}")
    return cfg, changes
