"""The one place that turns optimizer settings and a label pytree into an optax transformation.

``clip_by_global_norm -> optax.partition({frozen: set_to_zero, group: base optimizer at unit
learning rate x the group's multiplier}) -> scale_by_learning_rate(schedule)``. Frozen leaves
get ``set_to_zero`` and so carry no optimizer state, and weight decay lives inside the
trainable groups' chains only: it can never move a frozen leaf. The schedule sits outside the
partition so its step counter is one for the whole run: a group that appears later (gradual
unfreezing) joins the schedule where it is, while its own Adam moments and bias correction
start fresh, as a newly added torch param group's would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import jax
import numpy as np
import optax

from jaxft.freeze import FROZEN

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


class OptimizerError(ValueError):
    """Optimizer settings that do not make sense; the message names the setting."""


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_grad: Optional[float] = None  # global-norm clipping over trainable gradients

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise OptimizerError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise OptimizerError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise OptimizerError(f"learning rate must be > 0 (got {self.lr})")
        if self.weight_decay < 0 or (self.clip_grad is not None and self.clip_grad <= 0):
            raise OptimizerError("weight decay must be >= 0 and clip-grad > 0")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """constant (after optional linear warm-up), cosine decay with warm-up, or one-cycle."""
    total_steps = max(total_steps, 1)
    warmup = min(cfg.warmup_steps, total_steps - 1) if total_steps > 1 else 0
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total_steps)
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, cfg.lr)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    return optax.constant_schedule(cfg.lr)


def _base(cfg: OptimConfig) -> optax.GradientTransformation:
    """The direction of an update at learning rate 1 (the schedule scales it afterwards).
    torch semantics: SGD and Adam weight decay is L2 added to the gradient; AdamW's is
    decoupled and, as in torch, scaled by the learning rate."""
    if cfg.optimizer == "adamw":
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay))
    l2 = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    if cfg.optimizer == "sgd":
        return optax.chain(*l2, optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity())
    return optax.chain(*l2, optax.scale_by_adam())


def build_optimizer(cfg: OptimConfig, labels: Mapping[str, Any], multipliers: Optional[Mapping[str, float]] = None,
                    total_steps: int = 1) -> optax.GradientTransformation:
    """The full transformation for ``labels`` (see module doc)."""
    cfg.check()
    schedule = learning_rate_schedule(cfg, total_steps)
    groups = set(jax.tree_util.tree_leaves(labels)) - {FROZEN}
    multipliers = dict(multipliers or {})
    transforms = {FROZEN: optax.set_to_zero()}
    for group in groups:
        mult = multipliers.get(group, 1.0)
        transforms[group] = _base(cfg) if mult == 1.0 else optax.chain(_base(cfg), optax.scale(mult))
    clip = [optax.clip_by_global_norm(cfg.clip_grad)] if cfg.clip_grad else []
    return optax.chain(*clip, optax.partition(transforms, labels), optax.scale_by_learning_rate(schedule))


def state_bytes(opt_state: Any) -> int:
    """Bytes held by an optimizer state's arrays (scalars such as step counts included)."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(opt_state))


def transfer_state(old_state: Any, new_state: Any) -> Any:
    """Carry optimizer state across a change of labels (gradual unfreezing): every leaf of
    ``new_state`` whose key path and shape exist in ``old_state`` takes the old value, so
    Adam moments and step counts of already-trainable leaves continue; new leaves start fresh."""
    old = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(old_state)}

    def pick(path, leaf):
        previous = old.get(jax.tree_util.keystr(path))
        return previous if previous is not None and np.shape(previous) == np.shape(leaf) else leaf

    return jax.tree_util.tree_map_with_path(pick, new_state)
