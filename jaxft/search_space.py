"""The search space of ``jaxft.tune``: which training settings a study varies, over which ranges.

A space maps a setting (a ``jaxft.train`` flag name, or ``partial_fraction``) to a spec:

    lr: 1e-5:1e-2:log          a float range, sampled on a log scale
    label_smoothing: 0:0.2     a float range
    epochs: 2:6                an int range (the setting is an int)
    batch_size: [16, 32, 64]   a choice ("16,32,64" on the command line)
    strategy: [head, partial, full]
    partial_fraction: 0.5:0.95 F of partial:F, sampled only when the strategy is "partial"
    optimizer: adam            one value: fixed for every trial, not searched

or the long form ``{low: 1e-5, high: 1e-2, log: true}`` / ``{choices: [...]}``. Every mistake
is a ConfigError that names the setting.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from jaxft.config import CONFIG_FIELDS, ConfigError

PARTIAL_FRACTION = "partial_fraction"

# Settings a trial may vary and their kinds; the rest (data, arch, paths, workers...) describe the
# job, not a hyperparameter, and come from the base configuration.
SEARCHABLE = {
    "lr": float, "weight_decay": float, "label_smoothing": float, "momentum": float, "warmup_epochs": float,
    "clip_grad": float, "layer_decay": float, PARTIAL_FRACTION: float,
    "batch_size": int, "epochs": int, "image_size": int,
    "optimizer": str, "schedule": str, "strategy": str, "bn_frozen": str,
}

# Suits fine-tuning a pretrained CNN with Adam: rates from 1e-5 to 1e-2, light regularisation, and
# how much of the backbone to train; epochs, batch size and schedule come from the base config
# unless the space names them.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": "1e-5:1e-2:log",
    "weight_decay": "1e-6:1e-2:log",
    "label_smoothing": "0:0.2",
    "optimizer": ["adam", "adamw"],
    "strategy": ["head", "partial", "full"],
    PARTIAL_FRACTION: "0.5:0.95",
}


@dataclass(frozen=True)
class Param:
    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[tuple] = None

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return self.choices[0] if self.fixed else trial.suggest_categorical(self.name, list(self.choices))
        if SEARCHABLE[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return ",".join(map(str, self.choices))
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


def _number(name: str, text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"search space {name}: {text!r} is not a number") from None
    if SEARCHABLE[name] is int and not value.is_integer():
        raise ConfigError(f"search space {name}: {text!r} must be a whole number ({name} is an integer)")
    return value


def _choice(name: str, value: Any) -> Any:
    kind = SEARCHABLE[name]
    if kind is str:
        return str(value).strip()
    return int(_number(name, value)) if kind is int else _number(name, value)


def parse_param(name: str, spec: Any) -> Param:
    """One setting's spec (see the module docstring) as a Param; mistakes name the setting."""
    if name not in SEARCHABLE:
        close = difflib.get_close_matches(name, SEARCHABLE, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = "is a training setting but not a hyperparameter" if name in CONFIG_FIELDS else "is not a setting"
        raise ConfigError(f"search space: {name!r} {where}{hint}; searchable: {', '.join(sorted(SEARCHABLE))}")
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"low", "high", "log", "choices"}
        if unknown:
            raise ConfigError(f"search space {name}: unknown key(s) {sorted(unknown)}; use low/high/log or choices")
        if "choices" in spec:
            return _checked(Param(name, choices=tuple(_choice(name, c) for c in spec["choices"])))
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"search space {name}: a range needs both low and high, got {dict(spec)}")
        log = str(spec.get("log", False)).strip().lower() in ("true", "yes", "1")  # text when read from YAML
        return _checked(Param(name, _number(name, spec["low"]), _number(name, spec["high"]), log))
    if isinstance(spec, (list, tuple)):
        return _checked(Param(name, choices=tuple(_choice(name, c) for c in spec)))
    text = str(spec).strip()
    if ":" in text and SEARCHABLE[name] is not str:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ConfigError(f"search space {name}: {text!r} must be LOW:HIGH or LOW:HIGH:log")
        return _checked(Param(name, _number(name, parts[0]), _number(name, parts[1]), len(parts) == 3))
    return _checked(Param(name, choices=tuple(_choice(name, c) for c in text.split(","))))


def _checked(param: Param) -> Param:
    name = param.name
    if param.choices is not None:
        if not param.choices or any(c in ("", None) for c in param.choices):
            raise ConfigError(f"search space {name}: empty choice in {list(param.choices)}")
        if len(set(param.choices)) != len(param.choices):
            raise ConfigError(f"search space {name}: a choice is listed twice in {list(param.choices)}")
        field = CONFIG_FIELDS.get(name)
        allowed = field.metadata.get("choices") if field is not None else None
        bad = [c for c in param.choices if allowed and c not in allowed]
        if bad:
            raise ConfigError(f"search space {name}: {bad} not among {list(allowed)}")
        if name == "strategy":
            from jaxft.freeze import parse_strategy

            for spec in param.choices:
                if spec != "partial":  # plain "partial": F comes from partial_fraction
                    parse_strategy(spec)
        return param
    if param.low > param.high:
        raise ConfigError(f"search space {name}: low {param.low:g} is above high {param.high:g}; write LOW:HIGH")
    if param.log and param.low <= 0:
        raise ConfigError(f"search space {name}: a log range needs low > 0, got {param.low:g}")
    if name == PARTIAL_FRACTION and not 0 < param.low <= param.high <= 1:
        raise ConfigError(f"search space {name}: F of partial:F must lie in (0, 1], got {param.describe()}")
    if any(math.isnan(v) or math.isinf(v) for v in (param.low, param.high)):
        raise ConfigError(f"search space {name}: bounds must be finite, got {param.describe()}")
    return param


def parse_space(specs: Mapping[str, Any], source: str) -> dict[str, Param]:
    """A whole space; an empty one, or one that searches nothing, is a ConfigError."""
    space = {str(name).replace("-", "_"): parse_param(str(name).replace("-", "_"), spec)
             for name, spec in specs.items()}
    if not any(not p.fixed for p in space.values()):
        raise ConfigError(f"the search space from {source} is empty: it varies no setting. Give at least one "
                          f"range or choice, e.g. lr: 1e-5:1e-2:log (python -m jaxft.tune --help lists the form)")
    return space


def load_space_file(path: str | Path) -> dict[str, Any]:
    """A search-space file, YAML or JSON. YAML is read with every scalar as text: YAML 1.1 would
    read ``epochs: 2:6`` as the base-60 number 126 and ``label_smoothing: 0:0.2`` as 0.2."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    text, is_yaml = path.read_text(), path.suffix in (".yaml", ".yml")
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader) if is_yaml else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"search space file {path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"search space file {path} must hold a mapping of settings to specs")
    return data


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """``["lr=1e-4:1e-2:log", ...]`` (the --param flags) as a mapping."""
    out = {}
    for item in assignments:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ConfigError(f"--param {item!r} must be NAME=SPEC, e.g. lr=1e-5:1e-2:log or batch_size=16,32")
        out[name.strip().replace("-", "_")] = spec.strip()
    return out


def parse_trial_values(text: str, space: Mapping[str, Param]) -> dict[str, Any]:
    """``"lr=1e-3,strategy=head"`` (an --enqueue flag) as one trial's params; each must be in the space."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not value.strip():
            raise ConfigError(f"--enqueue {text!r}: {item!r} must be NAME=VALUE, e.g. lr=1e-3,strategy=head")
        if name not in space:
            raise ConfigError(f"--enqueue {text!r}: {name!r} is not in the search space "
                              f"({', '.join(space)}); a setting outside it comes from the base config")
        choice = _choice(name, value)
        allowed = space[name].choices
        if allowed is not None and choice not in allowed:
            raise ConfigError(f"--enqueue {text!r}: {name} {choice!r} is not among the space's {list(allowed)}")
        values[name] = choice
    if not values:
        raise ConfigError(f"--enqueue {text!r} names no setting")
    return values


def sample(space: Mapping[str, Param], trial: Any, base_strategy: str) -> dict[str, Any]:
    """A trial's settings, as jaxft.train config values: ``partial`` and F become ``partial:F``
    (F is searched too when the base strategy is partial:F and the space names only F)."""
    values = {name: p.suggest(trial) for name, p in space.items() if name != PARTIAL_FRACTION}
    strategy = values.get("strategy", base_strategy)
    if strategy == "partial" or ("strategy" not in space and strategy.startswith("partial:")
                                 and PARTIAL_FRACTION in space):
        fraction = space.get(PARTIAL_FRACTION, Param(PARTIAL_FRACTION, choices=(0.8,)))
        values["strategy"] = f"partial:{fraction.suggest(trial):.4g}"
    return values


def to_json(space: Mapping[str, Param]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in space.items():
        out[name] = list(p.choices) if p.choices is not None else {"low": p.low, "high": p.high, "log": p.log}
    return out
