"""TrainState, the jitted train and eval steps, and data-parallel sharding. No I/O here.

The train step differentiates only the trainable leaves (frozen ones enter the loss as
constants, so XLA does no backward work for a frozen prefix), applies the optax
transformation from ``jaxft.optim``, and leaves frozen leaves untouched bit for bit.
Batches are split over a 1-D ``'data'`` mesh of every device (sharded ``jax.jit``);
BatchNorm statistics are then global-batch statistics, so 1 and N devices agree. In a
multi-host job the mesh holds the devices of every process, each process passes its own
block of every batch (``jaxft.distributed.batch_share``), and the state is replicated on all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxft.freeze import FROZEN, Strategy, frozen_batchnorm_paths, lr_groups
from jaxft.optim import OptimConfig, build_optimizer, runtime_values, state_bytes, transfer_state

BN_POLICIES = ("running", "torch")
# {'image': (N, H, W, 3) float32, or uint8 normalised on the device, 'label': (N,) int, 'mask': (N,) float32}
Batch = Mapping[str, Any]
Normalization = Optional[tuple[Sequence[float], Sequence[float]]]  # (mean, std) per channel


class NonFiniteLossError(FloatingPointError):
    """The loss, gradients, optimizer state or parameters became NaN/inf (the state: or over
    ``SAFE_MAGNITUDE``, 2**126, in magnitude); the state kept is the last good one. ``index``:
    which of the collected steps was refused; ``collected``: the metrics of the steps before it,
    which did train."""

    index: int = 0
    collected: Sequence[dict] = ()


@struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # raw uint32 key data: checkpoints as a plain array

    @classmethod
    def create(cls, variables: Mapping[str, Any], tx: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        params = variables["params"]
        # One compiled program for the whole optimizer state: run eagerly, each leaf's zeros_like
        # compiles a program per shape (0.63 s for resnet18's Adam state, 1.4 s for resnet50's;
        # jitted 0.09 s once the persistent cache holds it).
        opt_state = jax.jit(tx.init)(params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                   opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)))

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def model_for_policy(model: nn.Module, labels: Mapping[str, Any], bn_policy: str) -> nn.Module:
    """``running``: BatchNorm layers with frozen scale use running statistics while training
    and never update them. ``torch``: every layer uses batch statistics and updates its
    running statistics, as ``requires_grad=False`` + ``model.train()`` does in PyTorch."""
    if bn_policy not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {bn_policy!r}; choose one of {', '.join(BN_POLICIES)}")
    frozen = frozen_batchnorm_paths(labels) if bn_policy == "running" else frozenset()
    return model.clone(frozen_bn=frozen)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: Any = 0.0) -> jnp.ndarray:
    """Per-sample cross-entropy; label smoothing as torch's ``CrossEntropyLoss(label_smoothing=)``.
    ``label_smoothing`` may be a traced array (the steps take it as an argument); at 0 the
    smoothed targets are the one-hot targets exactly."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def model_input(images: jnp.ndarray, normalization: Normalization) -> jnp.ndarray:
    """A batch as the model takes it. uint8 images (as the loader sends them, a quarter of the
    bytes of float32) are normalised here, on the device, with the host's formula
    (jaxft.data.transforms.normalize: ``x * (1 / (255 std)) - mean / std``, constants rounded
    from float64)."""
    if images.dtype != jnp.uint8:
        return images
    if normalization is None:
        raise ValueError("uint8 images need the engine's normalization (mean, std) to be normalised on the device")
    mean, std = (np.asarray(v, np.float64) for v in normalization)
    scale, shift = (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)
    return images.astype(jnp.float32) * scale - shift


def _split(tree: Mapping[str, Any], labels: Mapping[str, Any]) -> tuple[dict, dict]:
    flat, flat_labels = traverse_util.flatten_dict(dict(tree)), traverse_util.flatten_dict(dict(labels))
    trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return trainable, frozen


def _merge(*parts: Mapping) -> dict:
    return traverse_util.unflatten_dict({k: v for part in parts for k, v in part.items()})


# The NaN guard refuses a state with any value beyond this magnitude, not only NaN/inf: the
# state it checks and the one the step keeps are the same update computed in two places, which
# XLA may round differently (a multiply-add contracted into an FMA in one and not the other). With
# every kept value at most 2**126, such a rounding cannot carry a checked value past float32's
# largest (just under 2**128), so the kept state is finite whenever the checked one passes.
SAFE_MAGNITUDE = np.float32(2.0**126)


def _checked_sums(grads: Any, tagged: Sequence[tuple[int, Any]]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The gradients' global L2 norm, and a uint8 scalar with ``bit`` set for each ``(bit, tree)``
    in ``tagged`` that holds a NaN, an inf or a value beyond ``SAFE_MAGNITUDE``.

    The floating-point leaves are grouped by shape. Per group, the squares of its gradients are
    summed and its leaves folded element by element into a uint8 code (``bit`` where a leaf fails),
    and one two-operand reduction takes both: XLA fuses the squares and codes into it and writes
    nothing the size of a leaf. (The norm's reduction alone runs in YNNPACK, which fuses no
    producer: XLA wrote every squared gradient out first, 400 MB for vgg16's classifier.)"""
    squares: dict[tuple, jnp.ndarray] = {}
    for g in jax.tree_util.tree_leaves(grads):
        square = jnp.square(g.astype(jnp.float32))
        squares[g.shape] = square if g.shape not in squares else squares[g.shape] + square
    codes: dict[tuple, jnp.ndarray] = {}
    for bit, tree in tagged:
        for x in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(x.dtype, jnp.inexact):
                code = jnp.where(jnp.abs(x) <= SAFE_MAGNITUDE, np.uint8(0), np.uint8(bit))  # NaN fails too
                codes[x.shape] = code if x.shape not in codes else codes[x.shape] | code
    total, bits = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.uint8)
    for shape in {**squares, **codes}:
        square = squares.get(shape, jnp.zeros(shape, jnp.float32))
        code = codes.get(shape, jnp.zeros(shape, jnp.uint8))
        group_total, group_bits = jax.lax.reduce(
            (square, code), (np.float32(0), np.uint8(0)),
            lambda a, b: (a[0] + b[0], a[1] | b[1]), tuple(range(len(shape))))
        total, bits = total + group_total, bits | group_bits
    return jnp.sqrt(total), bits


Settings = Mapping[str, jnp.ndarray]  # the runtime settings a step takes as arrays (Engine.settings)
TrainStep = Callable[[TrainState, Batch, jnp.ndarray, Settings], tuple[TrainState, dict, jnp.ndarray]]


def make_train_step(model: nn.Module, labels: Mapping[str, Any],
                    optimizer: Callable[[Settings], optax.GradientTransformation],
                    normalization: Normalization = None) -> TrainStep:
    """The un-jitted train step for ``model`` (already cloned for the BatchNorm policy).

    ``settings`` holds the learning rate, weight decay, momentum, clipping norm (see
    ``optim.RUNTIME_SETTINGS``) and label smoothing as arrays: the step builds its optimizer from
    them (``optimizer(settings)``), so runs and tuning trials that differ only in these values
    share one compiled step. ``halted`` is a device-side flag that a non-finite step sets: once it
    is set, later steps leave the state as it is. The caller reads metrics only every few steps
    (no host sync per step), so the steps it queued after a NaN must not train on from the
    refused one; with the flag, the state it finds is the last good one, whenever it looks."""

    def step(state: TrainState, batch: Batch, halted: jnp.ndarray,
             settings: Settings) -> tuple[TrainState, dict, jnp.ndarray]:
        tx = optimizer(settings)
        trainable, frozen = _split(state.params, labels)
        mask = batch["mask"].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(mask), 1.0)
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images = model_input(batch["image"], normalization)

        def loss_fn(trainable_params):
            logits, updates = model.apply(
                {"params": _merge(trainable_params, frozen), "batch_stats": state.batch_stats},
                images, train=True, mask=batch["mask"], mutable=["batch_stats"],
                rngs={"dropout": dropout_rng})
            per_sample = cross_entropy(logits, batch["label"], settings["label_smoothing"])
            return jnp.sum(per_sample * mask) / count, (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        zero_frozen = {k: jnp.zeros_like(v) for k, v in frozen.items()}  # set_to_zero ignores them
        all_grads = _merge(grads, zero_frozen)

        def updated(params, opt_state) -> tuple[dict, Any]:
            """The trainable parameters and optimizer state this step's update makes from these."""
            updates, new_opt_state = tx.update(all_grads, opt_state, params)
            flat_updates = traverse_util.flatten_dict(updates)
            old_trainable, _ = _split(params, labels)
            return {k: v + flat_updates[k].astype(v.dtype) for k, v in old_trainable.items()}, new_opt_state

        # What became non-finite, in the order it would happen. A finite gradient can still
        # overflow Adam's second moment (g**2) or the parameters (p + huge update), so the
        # state the step would keep is checked too, not only the loss and the gradients. For the
        # check that state is computed from the old one behind a barrier, so that XLA neither
        # shares it with the update below nor writes it out: it fuses into the reductions of
        # _checked_sums, which read each leaf once and write nothing the size of one (and check
        # against SAFE_MAGNITUDE, because the update below is the same one computed again).
        checked_params, checked_opt_state = jax.lax.optimization_barrier((state.params, state.opt_state))
        candidate_trainable, candidate_opt_state = updated(checked_params, checked_opt_state)
        grad_norm, bits = _checked_sums(grads, [(1, candidate_opt_state), (2, candidate_trainable), (2, batch_stats)])
        checks = {"loss": jnp.isfinite(loss), "gradients": jnp.isfinite(grad_norm),
                  "optimizer state": (bits & 1) == 0, "parameters": (bits & 2) == 0}
        finite = functools.reduce(jnp.logical_and, checks.values())
        # On NaN/inf, or after one, keep the previous state, so the caller stops with the last good one.
        keep = finite & ~halted
        # The update itself, each element selected against the old one where it is computed: one
        # fused pass per leaf reads the parameter, its gradient and moments and writes the new
        # ones over the donated old ones (in place once copy insertion's region analysis sees that
        # the old moments are read before they are overwritten: runtime.CPU_XLA_FLAGS). The state
        # used to be computed once, checked, then committed (lax.cond), which held the trained
        # parameters and moments twice: 1.4 GB more for vgg16's classifier, faulted in every step.
        new_trainable, new_opt_state = updated(state.params, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=_merge(new_trainable, frozen),
                                  batch_stats=batch_stats, opt_state=new_opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
        metrics = {
            "loss_sum": loss * jnp.sum(mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
            "grad_norm": grad_norm,
            "finite": finite,
            "finite_parts": checks,
        }
        return new_state, metrics, halted | ~finite

    return step


def make_eval_step(model: nn.Module, normalization: Normalization = None) -> Callable[[Any, Batch, Any], dict]:
    """Sums of loss and correct predictions over the real (unmasked) samples, and predictions,
    for the model's ``variables``; the loss with ``label_smoothing`` (an array argument, as in
    the train step)."""

    def step(variables: Mapping[str, Any], batch: Batch, label_smoothing: jnp.ndarray) -> dict:
        logits = model.apply(variables, model_input(batch["image"], normalization), train=False)
        mask = batch["mask"].astype(jnp.float32)
        per_sample = cross_entropy(logits, batch["label"], label_smoothing)
        predictions = jnp.argmax(logits, -1)
        return {
            "loss_sum": jnp.sum(per_sample * mask),
            "correct": jnp.sum((predictions == batch["label"]) * mask),
            "count": jnp.sum(mask),
            "predictions": predictions,
            "labels": batch["label"],  # of the whole batch: in a multi-host job each process loaded only its rows
        }

    return step


# --- data parallelism ----------------------------------------------------------------------------

def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over every device (all processes' devices when multi-host),
    grouped by process: each process's devices hold consecutive rows of a batch."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` as arrays replicated on every device of ``mesh``. The values go through host
    memory: each process places its own copy (a multi-host job cannot place another
    process's device array), and the train step, which donates its state, never consumes the
    caller's arrays."""
    return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
    """Pad a host batch to a multiple of ``multiple`` with masked copies of sample 0.

    Padded samples have mask 0: they change neither loss, metrics nor BatchNorm statistics."""
    n = len(batch["label"])
    mask = np.asarray(batch.get("mask", np.ones(n, np.float32)), np.float32)
    pad = (-n) % multiple
    out = {k: np.asarray(v) for k, v in batch.items() if k != "mask"}
    out["mask"] = mask
    if pad:
        out = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in out.items()}
        out["mask"][n:] = 0.0
    return out, pad


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a (padded) host batch on the mesh, split along the batch axis. Multi-host: each
    process passes its own block of the global batch (the loader's ``BatchShare``), the same
    size on every process."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


@dataclass
class StepStats:
    """Running sums of step metrics; exact means over real samples."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.loss_sum += float(metrics["loss_sum"])
        self.correct += float(metrics["correct"])
        self.count += float(metrics["count"])

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1.0)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1.0)


@dataclass
class Engine:
    """Fine-tuning state and compiled steps for one model, strategy and optimizer.

    Recompiles only when gradual unfreezing moves to a new stage (once per stage), carrying
    the optimizer state of already-trainable leaves across."""

    model: nn.Module
    variables: Mapping[str, Any]
    strategy: Strategy
    optim: OptimConfig = field(default_factory=OptimConfig)
    total_steps: int = 1
    bn_policy: str = "running"
    label_smoothing: float = 0.0
    lr_rules: Sequence[tuple[str, float]] = ()
    layer_decay: Optional[float] = None
    seed: int = 0
    mesh: Optional[Mesh] = None
    on_padding: Optional[Callable[[str], None]] = None
    normalization: Normalization = None  # (mean, std) for uint8 batches, normalised on the device
    # the devices of evaluation passes (default: the train steps' mesh). A forward pass may gain
    # from devices a step would not (the CPU split in two: docs/engine.md); the weights are then
    # copied onto them once per state evaluated
    eval_mesh: Optional[Mesh] = None

    def __post_init__(self) -> None:
        self.mesh = self.mesh or data_mesh()
        self.eval_mesh = self.eval_mesh or self.mesh
        self.epoch = 0
        self.labels: dict = {}
        self.state: Optional[TrainState] = None
        self._eval_copy: Optional[tuple[TrainState, Any]] = None  # (a state, its variables etc. on eval_mesh)
        self._configure(self.strategy.labels(self.model, self.variables["params"], epoch=0))
        self._padding_reported = False

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def eval_devices(self) -> int:
        return self.eval_mesh.devices.size

    def _configure(self, labels: dict) -> None:
        self.labels, self.multipliers = lr_groups(labels, self.model, self.lr_rules, self.layer_decay)
        # the step builds its optimizer from the settings it is given (arrays), so that runs
        # differing only in those values share one compiled program; self.tx has the config's values
        optimizer = functools.partial(build_optimizer, self.optim, self.labels, self.multipliers, self.total_steps)
        self.tx = optimizer()
        variables = self.state.variables if self.state is not None else self.variables
        fresh = TrainState.create(variables, self.tx, self.seed)
        if self.state is not None:
            fresh = fresh.replace(step=self.state.step, rng=self.state.rng,
                                  opt_state=transfer_state(self.state.opt_state, fresh.opt_state))
        replicated = NamedSharding(self.mesh, P())
        self.state = replicate(fresh, self.mesh)
        policy_model = model_for_policy(self.model, self.labels, self.bn_policy)
        batch_sharding = NamedSharding(self.mesh, P("data"))
        self._train = jax.jit(make_train_step(policy_model, self.labels, optimizer, self.normalization),
                              in_shardings=(replicated, batch_sharding, replicated, replicated),
                              out_shardings=(replicated, replicated, replicated), donate_argnums=(0,))
        self._halted = self._no_halt()
        self._on_eval_mesh = NamedSharding(self.eval_mesh, P())
        self._eval = jax.jit(make_eval_step(self.model, self.normalization),
                             in_shardings=(self._on_eval_mesh, NamedSharding(self.eval_mesh, P("data")),
                                           self._on_eval_mesh),
                             out_shardings=self._on_eval_mesh)
        settings = {**runtime_values(self.optim), "label_smoothing": self.label_smoothing}
        with np.errstate(over="ignore"):  # float32 as the step computes: a rate of 1e39 is inf there too
            settings = {k: np.float32(v) for k, v in settings.items()}
        self.settings = replicate(settings, self.mesh)

    def set_epoch(self, epoch: int) -> bool:
        """Tell the engine which epoch starts; returns True when gradual unfreezing moved on."""
        self.epoch = epoch
        labels = self.strategy.labels(self.model, self.state.params, epoch=epoch)
        if labels == self._base_labels():
            return False
        self._configure(labels)
        return True

    def _base_labels(self) -> dict:
        """Current labels with learning-rate groups folded back to trainable/frozen."""
        flat = traverse_util.flatten_dict(self.labels)
        return traverse_util.unflatten_dict({k: FROZEN if v == FROZEN else v.split("*")[0] for k, v in flat.items()})

    def _place(self, batch: Mapping[str, np.ndarray], mesh: Optional[Mesh] = None) -> dict[str, jax.Array]:
        mesh = mesh or self.mesh
        if jax.process_count() > 1:  # this process's block, padded by the loader as every process pads
            return shard_batch(batch, mesh)
        padded, pad = pad_batch(batch, mesh.devices.size)
        if pad and not self._padding_reported and self.on_padding:
            self.on_padding(f"a batch of {len(batch['label'])} does not divide over {mesh.devices.size} devices: "
                            f"padded with {pad} masked samples (they change no loss, metric or BatchNorm statistic)")
            self._padding_reported = True
        return shard_batch(padded, mesh)

    def dispatch_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Queue a train step on the device and return its metrics as device arrays, without
        waiting for it: the host goes on to load the next batch while the device computes.
        Pass the metrics to ``collect`` (every few steps) to read them and to learn of a NaN."""
        # a new state makes the evaluation copy stale (eval_arguments checks which state it holds);
        # dropped here so that the copy's memory and the donated state are not held while training
        self._eval_copy = None
        self.state, metrics, self._halted = self._train(self.state, self._place(batch), self._halted, self.settings)
        return metrics

    def collect(self, pending: Sequence[Mapping[str, jax.Array]]) -> list[dict[str, Any]]:
        """Fetch the metrics of dispatched steps in one transfer. If one of them was refused as
        non-finite, raise NonFiniteLossError naming it; ``error.index`` is its position in
        ``pending``: that step and every later one left the state untouched."""
        fetched = jax.device_get(list(pending))
        for index, metrics in enumerate(fetched):
            if not bool(metrics["finite"]):
                self._halted = self._no_halt()
                broken = next(name for name, ok in metrics["finite_parts"].items() if not ok)
                what = "NaN/inf" if broken in ("loss", "gradients") else "NaN/inf or over 2**126 in magnitude"
                error = NonFiniteLossError(
                    f"the {broken} became {what} at step {int(self.state.step) + 1}; the update was refused and "
                    f"the state kept is the last good one (a lower learning rate, gradient clipping or float32 "
                    f"compute may help).")
                error.index, error.collected = index, fetched[:index]
                raise error
        return fetched

    def _no_halt(self) -> jax.Array:
        """A cleared ``halted`` flag on the mesh: no step refused yet."""
        return replicate(np.asarray(False), self.mesh)

    def step_arguments(self, batch: Mapping[str, np.ndarray]) -> tuple:
        """What ``dispatch_step`` passes the jitted train step for ``batch``: to lower it for
        XLA's cost and memory analyses (``self.compiled_train_step.lower(*args)``)."""
        return self.state, self._place(batch), self._halted, self.settings

    @property
    def compiled_train_step(self) -> Callable:
        """The jitted train step of the current stage (benchmarks lower it; tests count its compilations)."""
        return self._train

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """One step, waited for: its metrics on the host (NonFiniteLossError on a NaN)."""
        return self.collect([self.dispatch_step(batch)])[0]

    def eval_arguments(self, batch: Mapping[str, np.ndarray]) -> tuple:
        """What ``eval_step`` passes the jitted eval step for ``batch``: the model's variables
        and label smoothing on ``eval_mesh`` (placed there once per state: a copy where it is not
        the steps' mesh, the same arrays where it is), and the batch."""
        if self._eval_copy is None or self._eval_copy[0] is not self.state:
            arguments = (self.state.variables, self.settings["label_smoothing"])
            self._eval_copy = (self.state, jax.device_put(arguments, self._on_eval_mesh))
        variables, label_smoothing = self._eval_copy[1]
        return variables, self._place(batch, self.eval_mesh), label_smoothing

    @property
    def compiled_eval_step(self) -> Callable:
        return self._eval

    def eval_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Sums over the batch's real samples, and their labels and predictions (every
        process gets those of the whole global batch: its padding, masked, comes last)."""
        metrics = jax.device_get(self._eval(*self.eval_arguments(batch)))
        n = int(metrics["count"])
        metrics["predictions"], metrics["labels"] = metrics["predictions"][:n], metrics["labels"][:n]
        return metrics

    def optimizer_state_bytes(self) -> int:
        return state_bytes(self.state.opt_state)
