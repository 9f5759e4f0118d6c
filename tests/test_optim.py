"""Optimizer options held to PyTorch: learning-rate schedules step for step against torch's
schedulers; optimizer trajectories through the real ``Engine.train_step`` against torch.optim;
per-group learning rates and layer decay against torch parameter groups on a resnet18.

Trajectories are judged as docs/parity.md judges ill-conditioned parity: the reference is torch
in float64, and jaxft must be no further from it than torch's own float32 run is, within a factor
2 (two float32 programs that round and sum in different orders are each about as far off), or
within a floor of a few float32 ulps (torch float32 can land closer than its rounding warrants by
chance, on a loss or a small tensor). Which float32 program rounds closer on one trajectory is
chance, and the chance moves with the CPU (the summation orders of AVX2 and AVX-512 kernels
differ): so each trajectory runs from SEEDS starts (the initial weights and the batch order), each
seed's jaxft distance is judged against torch float32's on the same seed, and the median over the
seeds must be within the bound (``assert_no_further_than_torch_over_seeds``). An error every seed
shares, such as optax's own bias correction below, still fails.

Two places where optax's own transforms differ from torch are written to torch's formula in
jaxft.optim: Adam's bias correction (optax rounds beta2 to float32 first, 1.3e-5 off at t = 1) and
clipping (torch divides by norm + 1e-6); with optax's versions, "adam*" and "sgd-clip*" fail here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch.optim import lr_scheduler

from jaxft import create_model, from_torch, to_torch
from jaxft.data.builtin import digits
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy, stages
from jaxft.models.head import LinearHead
from jaxft.optim import SCHEDULES, OptimConfig, learning_rate_schedule
from jaxft.parity import rel_l2, torch_train_loop

FLOOR = 4 * float(np.finfo(np.float32).eps)  # 4.8e-7: a few float32 ulps
STEPS, BATCH = 10, 64  # linear-classifier trajectories
SEEDS = range(5)  # starts of each linear-classifier trajectory (initial weights, batch order)
CLIP = 0.15  # well below every pre-clip gradient norm of the "clip" trajectory (asserted)


def torch_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int,
                    warmup: int) -> lr_scheduler.LRScheduler:
    """The PyTorch recipe each jaxft schedule stands for (docs/engine.md); warm-up as torchvision's
    references/classification/train.py (``--lr-warmup-method linear --lr-warmup-decay 0.01``)."""
    if schedule == "onecycle":
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total,
            pct_start=min(warmup / total, 1.0) if warmup else 0.3, anneal_strategy="cos", div_factor=25.0,
            final_div_factor=1e4, three_phase=False, cycle_momentum=False)
    warm = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup) if warmup else None
    if schedule == "cosine":
        if not warmup:
            return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
        return lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])
    return warm or lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def torch_learning_rates(schedule: str, lr: float, total: int, warmup: int) -> list[float]:
    """``get_last_lr()`` before each of the ``total`` optimizer steps."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch_scheduler(optimizer, schedule, total, warmup)
    rates = []
    for step in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        if step < total - 1:
            scheduler.step()
    return rates


def jaxft_learning_rates(schedule: str, lr: float, total: int, warmup: int, steps: int) -> np.ndarray:
    """The schedule jitted over a traced step count, as optax's ``scale_by_schedule`` calls it."""
    fn = learning_rate_schedule(OptimConfig(lr=lr, schedule=schedule, warmup_steps=warmup), total)
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(steps)), np.float64)


# --- schedules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("total,warmup", [(37, 0), (37, 5), (10, 0), (10, 3)])
def test_schedule_matches_torch_at_every_step(schedule, total, warmup):
    expected = torch_learning_rates(schedule, 0.1, total, warmup)
    got = jaxft_learning_rates(schedule, 0.1, total, warmup, total)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    # train.py logs the rate with a plain Python int step
    fn = learning_rate_schedule(OptimConfig(lr=0.1, schedule=schedule, warmup_steps=warmup), total)
    assert float(fn(total - 1)) == pytest.approx(expected[-1], rel=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_stay_finite_at_degenerate_sizes(schedule):
    """T of 1 or 2 steps, warm-up as long as the run or longer: finite rates in [0, lr], step 0
    trains, and the rates are torch's wherever torch defines them (a OneCycleLR boundary at step 0
    divides by zero in torch)."""
    for total, warmup in itertools.product((1, 2), (0, 1, 2, 5)):
        lrs = jaxft_learning_rates(schedule, 0.1, total, warmup, total + 3)  # and past the end
        case = f"{schedule} T={total} w={warmup}: {lrs}"
        assert np.all(np.isfinite(lrs)) and np.all(lrs >= 0) and np.all(lrs <= 0.1 * (1 + 1e-6)), case
        assert lrs[0] > 0, case
        try:
            expected = torch_learning_rates(schedule, 0.1, total, warmup)
        except ZeroDivisionError:
            continue
        np.testing.assert_allclose(lrs[:total], expected, rtol=1e-6, atol=0, err_msg=case)


# --- optimizer trajectories: a linear softmax classifier on real digits ---------------------------

@dataclass(frozen=True)
class Trajectory:
    cfg: OptimConfig
    torch_optimizer: Callable[..., torch.optim.Optimizer]
    label_smoothing: float = 0.0


def _adam(**kwargs):
    return lambda params: torch.optim.Adam(params, **kwargs)


def _sgd(**kwargs):
    return lambda params: torch.optim.SGD(params, **kwargs)


TRAJECTORIES = {
    "adam": Trajectory(OptimConfig("adam", lr=0.01), _adam(lr=0.01)),
    "adamw-decoupled-decay": Trajectory(OptimConfig("adamw", lr=0.01, weight_decay=0.5),
                                        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.5)),
    "adam-l2-decay": Trajectory(OptimConfig("adam", lr=0.01, weight_decay=0.5), _adam(lr=0.01, weight_decay=0.5)),
    "sgd-momentum-decay": Trajectory(OptimConfig("sgd", lr=0.5, momentum=0.9, weight_decay=0.01),
                                     _sgd(lr=0.5, momentum=0.9, weight_decay=0.01)),
    "sgd-clip-global-norm": Trajectory(OptimConfig("sgd", lr=0.5, momentum=0.9, clip_grad=CLIP),
                                       _sgd(lr=0.5, momentum=0.9)),
    "adam-label-smoothing": Trajectory(OptimConfig("adam", lr=0.01), _adam(lr=0.01), label_smoothing=0.1),
    "constant-warmup": Trajectory(OptimConfig("adam", lr=0.01, warmup_steps=4), _adam(lr=0.01)),
    "cosine-warmup": Trajectory(OptimConfig("adam", lr=0.01, schedule="cosine", warmup_steps=4), _adam(lr=0.01)),
    "onecycle-warmup": Trajectory(OptimConfig("sgd", lr=0.5, momentum=0.9, schedule="onecycle", warmup_steps=4),
                                  _sgd(lr=0.5, momentum=0.9)),
}


@pytest.fixture(scope="module")
def digit_batches() -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per seed, STEPS batches of real digits 5-9 in that seed's order, flattened 8x8 grey levels in [0, 1]."""
    images, labels, _ = digits(range(5, 10))
    x = images[..., 0].reshape(len(images), 64).astype(np.float32) / 255.0
    orders = [np.random.default_rng(seed).permutation(len(x))[:STEPS * BATCH].reshape(STEPS, BATCH) for seed in SEEDS]
    return [[(x[idx], labels[idx]) for idx in order] for order in orders]


def _initial_linear(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(64, 5)
    return {"weight": layer.weight.detach().numpy().copy(), "bias": layer.bias.detach().numpy().copy()}


def _torch_trajectory(case: Trajectory, batches, init, dtype: torch.dtype):
    """(loss per step, final {'kernel', 'bias'} in Flax layout, pre-clip gradient norms)."""
    layer = torch.nn.Linear(64, 5).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(init["weight"]))
        layer.bias.copy_(torch.from_numpy(init["bias"]))
    optimizer = case.torch_optimizer(layer.parameters())
    scheduler = torch_scheduler(optimizer, case.cfg.schedule, STEPS, case.cfg.warmup_steps)
    losses, norms = [], []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(layer(torch.from_numpy(x).to(dtype)), torch.from_numpy(y),
                                                 label_smoothing=case.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        if case.cfg.clip_grad:
            norms.append(float(torch.nn.utils.clip_grad_norm_(layer.parameters(), case.cfg.clip_grad)))
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    final = {"kernel": layer.weight.detach().double().numpy().T, "bias": layer.bias.detach().double().numpy()}
    return np.array(losses), final, norms


def _jaxft_trajectory(case: Trajectory, batches, init):
    variables = {"params": {"fc": {"kernel": init["weight"].T.copy(), "bias": init["bias"]}}}
    engine = Engine(LinearHead(in_features=64, num_classes=5), variables, parse_strategy("full"), case.cfg,
                    total_steps=STEPS, label_smoothing=case.label_smoothing)
    losses, norms = [], []
    for x, y in batches:
        metrics = engine.train_step({"image": x, "label": y})
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
        norms.append(float(metrics["grad_norm"]))
    return np.array(losses), jax.device_get(engine.state.params["fc"]), norms


def _distance(got, torch32, reference) -> tuple[float, float]:
    """(jaxft, torch float32) relative L2 distances from the float64 reference."""
    reference = np.atleast_1d(reference)
    return rel_l2(np.atleast_1d(got), reference), rel_l2(np.atleast_1d(torch32), reference)


def share_of_bound(ours: float, theirs: float) -> float:
    """jaxft's distance from float64 as a share of the bound, twice torch float32's or FLOOR: > 1 fails."""
    return ours / max(2 * theirs, FLOOR)


def assert_no_further_than_torch(distances: dict[str, tuple[float, float]]) -> None:
    """jaxft within twice torch float32's distance from float64, or within FLOOR (module doc)."""
    for what, (ours, theirs) in distances.items():
        assert share_of_bound(ours, theirs) <= 1, f"{what}: jaxft {ours:.2e} from float64, torch float32 {theirs:.2e}"


def assert_no_further_than_torch_over_seeds(per_seed: Sequence[dict[str, tuple[float, float]]]) -> None:
    """Per step loss and per tensor, the median over seeds of jaxft's share of the bound, each seed's
    jaxft distance against torch float32's on that seed, is at most 1 (module doc). Paired by seed,
    because a seed sets how ill-conditioned a tensor's trajectory is: torch float32's own distance
    on one tensor spans 65x over five seeds (docs/parity.md)."""
    assert len(per_seed) >= 3 and all(d.keys() == per_seed[0].keys() for d in per_seed)
    for what in per_seed[0]:
        shares = [share_of_bound(*d[what]) for d in per_seed]
        assert np.median(shares) <= 1, (
            f"{what}: jaxft's distance from float64 over the bound on most seeds; per seed, jaxft "
            f"{' '.join(f'{d[what][0]:.2e}' for d in per_seed)}, torch float32 "
            f"{' '.join(f'{d[what][1]:.2e}' for d in per_seed)}")


def trajectory_distances(case: Trajectory, batches, seed: int) -> tuple[dict[str, tuple[float, float]],
                                                                         dict[str, list]]:
    """{name: (jaxft, torch float32) distance from torch float64} for every step's loss and every
    final parameter, and the pre-clip gradient norms of jaxft and of torch float64."""
    init = _initial_linear(seed)
    losses64, final64, norms64 = _torch_trajectory(case, batches, init, torch.float64)
    losses32, final32, _ = _torch_trajectory(case, batches, init, torch.float32)
    losses, final, norms = _jaxft_trajectory(case, batches, init)
    found = {f"loss step {step}": _distance(losses[step], losses32[step], losses64[step]) for step in range(STEPS)}
    found.update({name: _distance(final[name], final32[name], final64[name]) for name in ("kernel", "bias")})
    return found, {"torch float64": norms64, "jaxft": norms}


@pytest.mark.parametrize("name", TRAJECTORIES)
def test_optimizer_trajectory_matches_torch(name, digit_batches):
    case = TRAJECTORIES[name]
    per_seed = []
    for seed, batches in zip(SEEDS, digit_batches):
        distances, norms = trajectory_distances(case, batches, seed)
        if case.cfg.clip_grad:  # the clip must really clip, at every step, on both sides
            assert min(norms["torch float64"]) > CLIP and min(norms["jaxft"]) > CLIP, (seed, norms)
        per_seed.append(distances)
    assert_no_further_than_torch_over_seeds(per_seed)


# --- per-group learning rates and layer decay on a resnet18 ---------------------------------------

GROUP_STEPS, GROUP_BATCH, GROUP_LR, GROUP_WARMUP = 6, 16, 1e-3, 2
TRAINABLE = "regex:layer4_.*/conv.*=trainable;fc/.*=trainable;rest=frozen"
FC_MULT, LAYER_DECAY = 10.0, 0.5


def _torch_grouped_run(state: dict, batches, dtype: torch.dtype):
    """Adam over torch parameter groups built from the documented rule, not from jaxft's labels:
    fc gets its --lr-mult 10 times layer_decay**0 (the head is stage 0), layer4's conv kernels
    layer_decay**1 (the first stage below the head). BatchNorm frozen: eval() mode, running stats."""
    net = torchvision.models.resnet18(num_classes=5)
    net.load_state_dict(state)
    net = net.to(dtype).eval()
    head = [net.fc.weight, net.fc.bias]
    layer4_convs = [p for name, p in net.layer4.named_parameters() if ".conv" in name]
    assert len(layer4_convs) == 4
    for param in net.parameters():
        param.requires_grad_(False)
    for param in head + layer4_convs:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": head, "lr": GROUP_LR * FC_MULT * LAYER_DECAY ** 0},
                                  {"params": layer4_convs, "lr": GROUP_LR * LAYER_DECAY ** 1}], lr=GROUP_LR)
    losses = torch_train_loop(net, optimizer, batches, dtype,
                              scheduler=torch_scheduler(optimizer, "cosine", GROUP_STEPS, GROUP_WARMUP))
    trained = [name for name, p in net.named_parameters() if p.requires_grad]
    return np.array(losses), {k: v.detach().double().numpy() for k, v in net.state_dict().items()}, trained


def grouped_distances(source_checkpoint, digits_5_9):
    """{name: (jaxft, torch float32) distance from torch float64} for every step's loss and every
    trained tensor, and the first step's largest |update| / lr per group."""
    x, y = digits_5_9
    batches = [(x[i * GROUP_BATCH:(i + 1) * GROUP_BATCH], y[i * GROUP_BATCH:(i + 1) * GROUP_BATCH])
               for i in range(GROUP_STEPS)]
    net = torchvision.models.resnet18(num_classes=5)
    net.load_state_dict(torch.load(source_checkpoint, weights_only=True))
    torch.manual_seed(0)
    net.fc.reset_parameters()  # a fresh head for the new task, shared by every run
    state = net.state_dict()

    model = create_model("resnet18", num_classes=5)
    assert [stage[0] for stage in stages(model)][:2] == ["fc", "layer4_0"]  # the head is stage 0, layer4 stage 1
    cfg = OptimConfig("adam", lr=GROUP_LR, schedule="cosine", warmup_steps=GROUP_WARMUP)
    engine = Engine(model, from_torch("resnet18", state), parse_strategy(TRAINABLE), cfg, total_steps=GROUP_STEPS,
                    bn_policy="running", lr_rules=[("fc/.*", FC_MULT)], layer_decay=LAYER_DECAY)
    first_lr = float(learning_rate_schedule(cfg, GROUP_STEPS)(0))
    before = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    losses, first_step = [], {}
    for step, (xb, yb) in enumerate(batches):
        metrics = engine.train_step({"image": xb, "label": yb})
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
        if step == 0:
            after = to_torch("resnet18", jax.device_get(engine.state.variables), as_tensors=False)
            first_step = {k: float(np.max(np.abs(np.asarray(after[k], np.float64) - before[k]))) / first_lr
                          for k in ("fc.weight", "layer4.0.conv1.weight", "layer4.1.conv2.weight",
                                    "layer4.0.downsample.0.weight", "layer3.1.conv2.weight")}
    final = {k: np.asarray(v, np.float64) for k, v in
             to_torch("resnet18", jax.device_get(engine.state.variables), as_tensors=False).items()}

    losses64, final64, trained = _torch_grouped_run(state, batches, torch.float64)
    losses32, final32, _ = _torch_grouped_run(state, batches, torch.float32)
    found = {f"loss step {step}": _distance(losses[step], losses32[step], losses64[step])
             for step in range(GROUP_STEPS)}
    found.update({name: _distance(final[name], final32[name], final64[name]) for name in trained})
    return found, first_step


def test_lr_groups_and_layer_decay_match_torch_param_groups(source_checkpoint, digits_5_9):
    """--lr-mult 'fc/.*=10' and --layer-decay 0.5 on a resnet18 whose layer4 convs and head train
    (every BatchNorm frozen, running statistics), Adam with cosine + warm-up, against torch Adam
    over two parameter groups with lr x 10 and lr x 0.5."""
    distances, first_step = grouped_distances(source_checkpoint, digits_5_9)
    # Adam's first update is lr * mult * g / (|g| + eps): its largest element is the group's lr.
    # (1e-2: the float32 parameters round a 5e-6 update to ~1e-3 of itself)
    assert first_step["fc.weight"] == pytest.approx(FC_MULT, rel=1e-2), first_step
    assert first_step["layer4.0.conv1.weight"] == pytest.approx(LAYER_DECAY, rel=1e-2), first_step
    assert first_step["layer4.1.conv2.weight"] == pytest.approx(LAYER_DECAY, rel=1e-2), first_step
    assert first_step["layer4.0.downsample.0.weight"] == 0 and first_step["layer3.1.conv2.weight"] == 0
    assert len(distances) == GROUP_STEPS + 6  # every loss, fc weight and bias, four layer4 conv kernels
    assert_no_further_than_torch(distances)
