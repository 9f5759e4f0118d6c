"""Freeze strategies as data: a strategy turns a params pytree into a label pytree.

Labels are ``"frozen"`` or the name of a trainable group (``"trainable"`` unless per-group
learning rates split it). ``jaxft.optim`` feeds them to ``optax.partition``; the engine
differentiates only non-frozen leaves. Strategies, as ``--strategy`` spells them:

* ``full``         everything trains (fine-tuning; with ``weights=None``, from scratch)
* ``head``         only the classifier trains (linear probe / feature extraction)
* ``body``         everything but the classifier trains
* ``partial:F``    the first fraction F of parameter tensors, in torchvision's
                   ``model.parameters()`` order, is frozen (``partial:0.8`` freezes 80%)
* ``regex:RULES``  ``PATTERN=LABEL`` rules separated by ``;`` over paths such as
                   ``layer4_0/conv1/kernel``; LABEL is ``trainable`` (default) or ``frozen``;
                   ``rest=LABEL`` covers leaves no other rule matched. Every leaf must match
                   exactly one rule.
* ``gradual[:N]``  head first, then one more stage (layer4, layer3, ... / VGG blocks) every
                   N epochs (default 1); stage k's leaves are the group ``trainable<k>``
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jaxft.convert import model_layout

FROZEN = "frozen"
TRAINABLE = "trainable"
STRATEGIES = ("full", "head", "body", "partial:F", "regex:RULES", "gradual[:N]")

Path = tuple[str, ...]


class StrategyError(ValueError):
    """A freeze strategy that cannot be applied; the message says why and what to write."""


def path_str(path: Path) -> str:
    return "/".join(path)


def torch_order(model: nn.Module) -> list[Path]:
    """Parameter paths in torchvision's ``model.parameters()`` order."""
    return [path for collection, path in model_layout(model) if collection == "params"]


def stages(model: nn.Module) -> list[list[str]]:
    """Top-level module names grouped into stages, head first: the unit of gradual unfreezing
    and of layer-wise learning-rate decay. ResNet: fc, layer4, ..., layer1, stem. VGG:
    the last Linear, the other Linears, then the conv blocks between pools, last first."""
    vgg_block = _vgg_blocks(model) if hasattr(model, "cfg") else {}
    groups: dict[str, list[str]] = {}
    for path in torch_order(model):
        name = path[0]
        if name == model.head_name:
            key = "head"
        elif name.startswith("layer"):
            key = name.split("_")[0]
        elif name.startswith("classifier"):
            key = "classifier"
        elif name.startswith("features"):
            key = f"block{vgg_block[int(name.split('_')[1])]}"
        else:
            key = "stem"
        if name not in groups.setdefault(key, []):
            groups[key].append(name)
    return list(groups.values())[::-1]


def _vgg_blocks(model: nn.Module) -> dict[int, int]:
    """``features`` index -> 1-based block number (blocks end at each max-pool)."""
    blocks, index, block = {}, 0, 1
    for v in model.cfg:
        if v == "M":
            index, block = index + 1, block + 1
            continue
        blocks[index] = blocks[index + 1] = block  # the conv and, with batch_norm, its BatchNorm
        index += 3 if model.batch_norm else 2
    return blocks


def lr_groups(labels: Mapping[str, Any], model: nn.Module, rules: Sequence[tuple[str, float]] = (),
              layer_decay: Optional[float] = None) -> tuple[dict, dict[str, float]]:
    """Split trainable leaves into learning-rate groups: ``rules`` are (pattern, multiplier)
    over leaf paths (first match wins), ``layer_decay`` multiplies by decay**k for the k-th
    stage below the head. Returns the new labels and {group: multiplier}."""
    compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]
    depth = {name: k for k, stage in enumerate(stages(model)) for name in stage}
    flat = traverse_util.flatten_dict(dict(labels))
    idle = [pattern for pattern, _ in rules if not any(re.fullmatch(pattern, path_str(p)) for p in flat)]
    if idle:
        raise StrategyError(f"learning-rate pattern(s) matching no parameter: {', '.join(idle)}")
    multipliers: dict[str, float] = {}
    grouped = {}
    for path, label in flat.items():
        if label == FROZEN:
            grouped[path] = label
            continue
        mult = next((m for regex, m in compiled if regex.fullmatch(path_str(path))), 1.0)
        if layer_decay is not None:
            mult *= layer_decay ** depth[path[0]]
        group = label if mult == 1.0 else f"{label}*{mult:.6g}"
        multipliers[group] = mult
        grouped[path] = group
    return traverse_util.unflatten_dict(grouped), multipliers


@dataclass(frozen=True)
class Strategy:
    """A parsed ``--strategy`` value."""

    name: str
    fraction: float = 0.0
    rules: tuple[tuple[str, str], ...] = ()
    epochs_per_stage: int = 1

    def labels(self, model: nn.Module, params: Mapping[str, Any], epoch: int = 0) -> dict:
        """The label pytree for ``params`` (at ``epoch``, which only ``gradual`` reads)."""
        order = torch_order(model)
        flat = traverse_util.flatten_dict(dict(params))
        if set(order) != set(flat):
            raise StrategyError("params do not match the model's layout; was the model built with another arch?")
        head = model.head_name
        if self.name == "full":
            assign = {p: TRAINABLE for p in order}
        elif self.name == "head":
            assign = {p: TRAINABLE if p[0] == head else FROZEN for p in order}
        elif self.name == "body":
            assign = {p: FROZEN if p[0] == head else TRAINABLE for p in order}
        elif self.name == "partial":
            n_frozen = int(self.fraction * len(order))
            assign = {p: FROZEN if i < n_frozen else TRAINABLE for i, p in enumerate(order)}
        elif self.name == "regex":
            assign = _apply_rules(self.rules, order)
        elif self.name == "gradual":
            # each stage is its own group, so its optimizer state starts fresh when it unfreezes
            stage_of = {m: k for k, stage in enumerate(stages(model)[: 1 + epoch // self.epochs_per_stage])
                        for m in stage}
            assign = {p: (TRAINABLE if stage_of[p[0]] == 0 else f"{TRAINABLE}{stage_of[p[0]]}")
                      if p[0] in stage_of else FROZEN for p in order}
        else:  # parse_strategy only builds the names above
            raise StrategyError(f"unknown strategy {self.name!r}")
        if all(label == FROZEN for label in assign.values()):
            raise StrategyError(f"strategy {self.spec} freezes every parameter: nothing would train")
        return traverse_util.unflatten_dict(assign)

    @property
    def spec(self) -> str:
        if self.name == "partial":
            return f"partial:{self.fraction:g}"
        if self.name == "regex":
            return "regex:" + ";".join(f"{p}={label}" for p, label in self.rules)
        if self.name == "gradual":
            return f"gradual:{self.epochs_per_stage}"
        return self.name


def _apply_rules(rules: Sequence[tuple[str, str]], order: Sequence[Path]) -> dict[Path, str]:
    compiled = [(pattern, re.compile(pattern), label) for pattern, label in rules if pattern != "rest"]
    rest = [label for pattern, label in rules if pattern == "rest"]
    assign: dict[Path, str] = {}
    unmatched, doubly = [], []
    hits = Counter()
    for path in order:
        name = path_str(path)
        matches = [(pattern, label) for pattern, regex, label in compiled if regex.fullmatch(name)]
        for pattern, _ in matches:
            hits[pattern] += 1
        if len(matches) > 1:
            doubly.append(f"{name} (by {' and '.join(p for p, _ in matches)})")
        elif matches:
            assign[path] = matches[0][1]
        elif rest:
            assign[path] = rest[0]
        else:
            unmatched.append(name)
    idle = [pattern for pattern, _, _ in compiled if hits[pattern] == 0]
    problems = []
    if idle:
        problems.append(f"pattern(s) matching no parameter: {', '.join(idle)} (paths look like "
                        f"{path_str(order[0])}, {path_str(order[-1])})")
    if doubly:
        problems.append(f"{len(doubly)} parameters match more than one rule: {', '.join(doubly[:4])}")
    if unmatched:
        problems.append(f"{len(unmatched)} parameters match no rule: {', '.join(unmatched[:4])}"
                        f"{' ...' if len(unmatched) > 4 else ''}; add a rule or 'rest=frozen'")
    if problems:
        raise StrategyError("regex strategy: " + "; ".join(problems))
    return assign


def parse_strategy(spec: str) -> Strategy:
    """``'partial:0.8'`` -> Strategy; every mistake is a StrategyError naming the fix."""
    name, _, arg = spec.strip().partition(":")
    if name in ("full", "head", "body"):
        if arg:
            raise StrategyError(f"strategy {name!r} takes no argument (got {spec!r})")
        return Strategy(name)
    if name == "partial":
        try:
            fraction = float(arg)
        except ValueError:
            raise StrategyError(f"partial needs a fraction, e.g. partial:0.8 (got {spec!r})") from None
        if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
            raise StrategyError(f"partial:F needs F in (0, 1], the fraction of parameter tensors to freeze "
                                f"(got {arg})")
        return Strategy("partial", fraction=fraction)
    if name == "regex":
        rules = []
        for rule in filter(None, (r.strip() for r in arg.split(";"))):
            pattern, _, label = rule.rpartition("=") if "=" in rule else (rule, "", TRAINABLE)
            label = label or TRAINABLE
            if label not in (TRAINABLE, FROZEN):
                raise StrategyError(f"regex rule {rule!r}: label must be 'trainable' or 'frozen'")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise StrategyError(f"regex rule {rule!r} is not a valid regular expression: {exc}") from None
            rules.append((pattern, label))
        if not rules:
            raise StrategyError("regex needs rules, e.g. regex:'layer4_.*=trainable;fc/.*=trainable;rest=frozen'")
        return Strategy("regex", rules=tuple(rules))
    if name == "gradual":
        try:
            every = int(arg or 1)
        except ValueError:
            every = 0
        if every < 1:
            raise StrategyError(f"gradual:N needs a whole number of epochs per stage >= 1 (got {arg!r})")
        return Strategy("gradual", epochs_per_stage=every)
    raise StrategyError(f"unknown strategy {spec!r}; choose one of: {', '.join(STRATEGIES)}")


def frozen_batchnorm_paths(labels: Mapping[str, Any]) -> frozenset[str]:
    """BatchNorm modules whose scale is frozen: under the ``running`` policy they normalise
    with running statistics and never update them."""
    flat = traverse_util.flatten_dict(dict(labels))
    return frozenset(path_str(p[:-1]) for p, label in flat.items() if p[-1] == "scale" and label == FROZEN)


def summarize(labels: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """``(label, tensors, parameters)`` per label, trainable groups first."""
    flat_labels = traverse_util.flatten_dict(dict(labels))
    flat_params = traverse_util.flatten_dict(dict(params))
    tensors, counts = Counter(), Counter()
    for path, label in flat_labels.items():
        tensors[label] += 1
        counts[label] += int(np.prod(np.shape(flat_params[path])))
    return sorted(((lb, tensors[lb], counts[lb]) for lb in tensors), key=lambda r: (r[0] == FROZEN, r[0]))


def describe(labels: Mapping[str, Any], params: Mapping[str, Any], strategy: Optional[Strategy] = None) -> str:
    """A printable table of which leaves train, with counts; then the top-level modules that
    train entirely and, for those only partly trainable, which of their parts train."""
    rows = summarize(labels, params)
    total = sum(r[2] for r in rows)
    lines = [f"strategy {strategy.spec}:" if strategy else "parameters:"]
    for label, n_tensors, n_params in rows:
        lines.append(f"  {label:<12} {n_tensors:>4} tensors {n_params:>13,} params ({100 * n_params / total:6.2f}%)")
    trains, partly = trainable_modules(labels)
    lines.append(f"  trains: {', '.join(trains) or 'no module entirely'}")
    if partly:
        lines.append("  partly: " + "; ".join(f"{name} ({', '.join(parts['trainable'])} trainable; "
                                              f"{', '.join(parts['frozen'])} frozen)"
                                              for name, parts in partly.items()))
    return "\n".join(lines)


def trainable_modules(labels: Mapping[str, Any]) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """Top-level modules whose every leaf trains, and those where only some do, each with its
    largest wholly trainable and wholly frozen parts (paths below the module, torch order)."""
    flat = traverse_util.flatten_dict(dict(labels))
    modules: dict[str, dict[Path, bool]] = {}
    for path, label in flat.items():
        modules.setdefault(path[0], {})[path[1:]] = label != FROZEN
    trains, partly = [], {}
    for name in sorted(modules, key=_natural_key):
        leaves = modules[name]
        if all(leaves.values()):
            trains.append(name)
        elif any(leaves.values()):
            parts = {"trainable": [], "frozen": []}
            for part, trainable in _uniform_parts(leaves):
                parts["trainable" if trainable else "frozen"].append(path_str(part))
            partly[name] = parts
    return trains, partly


def _uniform_parts(leaves: Mapping[Path, bool], prefix: Path = ()) -> list[tuple[Path, bool]]:
    """The largest sub-paths of ``prefix`` whose leaves all share one trainable flag."""
    children: dict[str, dict[Path, bool]] = {}
    for path, trainable in leaves.items():
        children.setdefault(path[0], {})[path[1:]] = trainable
    parts = []
    for child, below in children.items():
        flags = set(below.values())
        if len(flags) == 1:
            parts.append((prefix + (child,), flags.pop()))
        else:
            parts.extend(_uniform_parts(below, prefix + (child,)))
    return parts


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
