"""The one place that turns optimizer settings and a label pytree into an optax transformation.

``clip (torch's clip_grad_norm_) -> optax.partition({frozen: set_to_zero, group: base optimizer
at unit learning rate x the group's multiplier}) -> scale_by_learning_rate(schedule)``, each
piece written to PyTorch's formula (tests/test_optim.py holds every option to torch.optim). Frozen leaves
get ``set_to_zero`` and so carry no optimizer state, and weight decay lives inside the
trainable groups' chains only: it can never move a frozen leaf. The schedule sits outside the
partition so its step counter is one for the whole run: a group that appears later (gradual
unfreezing) joins the schedule where it is, while its own Adam moments and bias correction
start fresh, as a newly added torch param group's would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
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


# Optimizer settings the compiled train step reads as arrays rather than constants, so runs and
# tuning trials that differ only in them share one compiled step (in one process, and across
# processes through JAX's persistent compilation cache). Whether a setting is zero or absent
# (weight decay, momentum, clipping) still shapes the optimizer state, so that stays static.
RUNTIME_SETTINGS = ("lr", "weight_decay", "momentum", "clip_grad")


def runtime_values(cfg: OptimConfig) -> dict[str, float]:
    """``cfg``'s runtime settings (see RUNTIME_SETTINGS) as plain floats."""
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum,
            "clip_grad": cfg.clip_grad if cfg.clip_grad is not None else 0.0}


def learning_rate_schedule(cfg: OptimConfig, total_steps: int, lr: Any = None) -> optax.Schedule:
    """The learning rate of each optimizer step (0-based), equal to PyTorch's schedulers step for
    step (tests/test_optim.py), for ``total_steps`` T and ``cfg.warmup_steps`` w. Every schedule is
    the peak rate times a schedule of unit peak, so the peak (``lr``, default ``cfg.lr``) may be a
    traced array:

    - constant: ``LinearLR(start_factor=0.01, total_iters=w)``: warm-up from 1% of the rate, as
      torchvision's classification recipe (``--lr-warmup-decay 0.01``); no warm-up: constant.
    - cosine: ``CosineAnnealingLR(T_max=T)``; with warm-up, torchvision's ``SequentialLR([LinearLR(
      start_factor=0.01, total_iters=w), CosineAnnealingLR(T_max=T - w)], milestones=[w])``.
    - onecycle: ``OneCycleLR(max_lr=lr, total_steps=T, pct_start=min(w / T, 1) if w else 0.3)``, its
      defaults (cosine, div_factor 25, final_div_factor 1e4, two phases) but without momentum
      cycling (``cycle_momentum=False``): momentum and Adam's beta1 stay fixed.

    Past T steps the rate stays where the schedule ends. Degenerate sizes (T of 1 or 2, w >= T)
    are clamped, never divided by: a warm-up as long as the run never reaches the peak, as in torch."""
    total = max(int(total_steps), 1)
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.schedule == "onecycle":
        unit = _one_cycle(1.0, total, min(warmup / total, 1.0) if warmup else _ONECYCLE_PCT_START)
    else:
        main = _cosine(1.0, max(total - warmup, 1)) if cfg.schedule == "cosine" else optax.constant_schedule(1.0)
        unit = _warmup(1.0, warmup, main) if warmup else main
    peak = cfg.lr if lr is None else lr
    return lambda count: peak * unit(count)


_WARMUP_START = 0.01  # torchvision's --lr-warmup-decay: warm-up starts at 1% of the rate
_ONECYCLE_PCT_START, _ONECYCLE_DIV, _ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # torch OneCycleLR's defaults


def _steps(count: jax.typing.ArrayLike) -> jnp.ndarray:
    """optax's int32 step count (or a Python int) as float32."""
    return jnp.asarray(count, jnp.float32)


def _anneal(start: float, end: float, step: jnp.ndarray, first: float, last: float) -> jnp.ndarray:
    """Cosine annealing from ``start`` at step ``first`` to ``end`` at ``last``: torch's ``end + (start
    - end) * (1 + cos(pi * pct)) / 2``, ``pct = (step - first) / (last - first)``, written as a sum of
    two non-negative terms, ``sin**2`` of the distance from the lower end, so a rate near the low end
    keeps float32's relative precision (``1 + cos`` near pi would cancel). A span of 0 counts as 1."""
    span = last - first if last > first else 1.0
    if start >= end:
        return end + (start - end) * jnp.sin(0.5 * np.pi * (last - step) / span) ** 2
    return start + (end - start) * jnp.sin(0.5 * np.pi * (step - first) / span) ** 2


def _warmup(lr: float, steps: int, after: optax.Schedule) -> optax.Schedule:
    """torch ``LinearLR(start_factor=0.01, total_iters=steps)`` for the first ``steps`` steps
    (``lr * (0.01 + 0.99 * s / steps)``), then ``after`` counted from the end of the warm-up."""

    def schedule(count):
        step = _steps(count)
        ramp = lr * (_WARMUP_START + (1.0 - _WARMUP_START) * jnp.clip(step, 0.0, steps) / steps)
        return jnp.where(step < steps, ramp, after(step - steps))

    return schedule


def _cosine(lr: float, period: int) -> optax.Schedule:
    """torch ``CosineAnnealingLR(T_max=period, eta_min=0)``: ``lr * (1 + cos(pi * t / period)) / 2``,
    held at 0 after ``period`` (torch's would rise again)."""

    def schedule(count):
        t = jnp.clip(_steps(count), 0.0, period)
        return _anneal(lr, 0.0, t, 0.0, period)

    return schedule


def _one_cycle(lr: float, total: int, pct_start: float) -> optax.Schedule:
    """torch ``OneCycleLR`` (two phases, cosine) to its formula: phase one rises from lr / 25 at step
    0 to lr at step ``pct_start * total - 1``, phase two falls to lr / 25 / 1e4 at step ``total - 1``
    (optax's ``cosine_onecycle_schedule`` puts these at ``int(pct_start * total)`` and ``total``).
    The boundary may be fractional or below 0, as in torch; where torch would divide by zero (a
    boundary at step 0) step 0 is the starting rate."""
    initial = lr / _ONECYCLE_DIV
    final = initial / _ONECYCLE_FINAL_DIV
    peak = float(pct_start * total) - 1.0  # torch's end_step of phase one
    last = float(total - 1)

    def schedule(count):
        step = jnp.clip(_steps(count), 0.0, last)
        rising, falling = _anneal(initial, lr, step, 0.0, peak), _anneal(lr, final, step, peak, last)
        return jnp.where(step <= peak, rising, falling)

    return schedule


def _scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with torch's bias correction. optax computes ``1 - b**t`` from ``b``
    rounded to float32 (``1 - 0.999f`` is 1.3e-5 off), which makes early steps ~6e-6 smaller than
    torch's; ``-expm1(t * log b)`` with ``log b`` taken in float64 is exact to float32. The state is
    optax's own ``ScaleByAdamState``, so checkpoints and state transfer see no difference."""
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                      nu=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = -jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2)
        direction = jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _clip_by_global_norm(max_norm: Optional[float]) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))`` (optax's own
    scales by ``max_norm / norm``). Without a limit, the identity: both have an empty state, so a
    run resumed with clipping switched on or off restores the same optimizer-state tree."""
    if max_norm is None:
        return optax.identity()

    def update(updates, state, params=None):
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _base(cfg: OptimConfig, values: Mapping[str, Any]) -> optax.GradientTransformation:
    """The direction of an update at learning rate 1 (the schedule scales it afterwards).
    torch semantics: SGD and Adam weight decay is L2 added to the gradient; AdamW's is
    decoupled and, as in torch, scaled by the learning rate. ``cfg`` decides the structure,
    ``values`` the numbers."""
    if cfg.optimizer == "adamw":
        return optax.chain(_scale_by_adam(), optax.add_decayed_weights(values["weight_decay"]))
    l2 = [optax.add_decayed_weights(values["weight_decay"])] if cfg.weight_decay else []
    if cfg.optimizer == "sgd":
        return optax.chain(*l2, optax.trace(decay=values["momentum"]) if cfg.momentum else optax.identity())
    return optax.chain(*l2, _scale_by_adam())


def build_optimizer(cfg: OptimConfig, labels: Mapping[str, Any], multipliers: Optional[Mapping[str, float]] = None,
                    total_steps: int = 1, values: Optional[Mapping[str, Any]] = None) -> optax.GradientTransformation:
    """The full transformation for ``labels`` (see module doc). ``values`` (RUNTIME_SETTINGS,
    default ``cfg``'s) may be traced arrays: the train step passes them in as arguments."""
    cfg.check()
    values = runtime_values(cfg) if values is None else values
    schedule = learning_rate_schedule(cfg, total_steps, values["lr"])
    groups = set(jax.tree_util.tree_leaves(labels)) - {FROZEN}
    multipliers = dict(multipliers or {})
    transforms = {FROZEN: optax.set_to_zero()}
    for group in groups:
        mult = multipliers.get(group, 1.0)
        base = _base(cfg, values)
        transforms[group] = base if mult == 1.0 else optax.chain(base, optax.scale(mult))
    clip = values["clip_grad"] if cfg.clip_grad is not None else None
    return optax.chain(_clip_by_global_norm(clip), optax.partition(transforms, labels),
                       optax.scale_by_learning_rate(schedule))


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
