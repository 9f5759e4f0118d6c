"""The fine-tuning engine: freezing is exact, training matches PyTorch, devices agree."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import traverse_util

from jaxft import create_model, from_torch, to_torch
from jaxft.engine import Engine, NonFiniteLossError
from jaxft.freeze import FROZEN, StrategyError, parse_strategy, stages
from jaxft.optim import OptimConfig
from jaxft.parity import freeze_like
from jaxft.pretrained import init_variables

from test_optim import _distance, assert_no_further_than_torch

STRATEGIES = ["full", "head", "body", "partial:0.8", "regex:layer4_.*=trainable;fc/.*=trainable;rest=frozen",
              "gradual"]


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def _batch(seed: int, n: int = 8, size: int = 32, classes: int = 5):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32), "label": rng.integers(0, classes, n)}


@pytest.fixture(scope="module")
def resnet18_setup():
    model = create_model("resnet18", num_classes=5)
    return model, init_variables(model, seed=0)


@pytest.mark.parametrize("bn_policy", ["running", "torch"])
@pytest.mark.parametrize("spec", STRATEGIES)
def test_frozen_leaves_and_statistics_stay_bit_identical(resnet18_setup, spec, bn_policy):
    model, variables = resnet18_setup

    def negative_zero_first(x):  # -0.0 == +0.0 as values: only bytes tell whether p + 0 ran
        x = np.array(x)
        x.reshape(-1)[0] = -0.0
        return x

    variables = {**variables, "params": jax.tree_util.tree_map(negative_zero_first, variables["params"])}
    # AdamW with weight decay: decay must never reach a frozen leaf.
    engine = Engine(model, variables, parse_strategy(spec), OptimConfig("adamw", lr=1e-2, weight_decay=0.1),
                    total_steps=10, bn_policy=bn_policy)
    labels = _flat(engine.labels)
    before_params, before_stats = _flat(variables["params"]), _flat(variables["batch_stats"])
    for step in range(2):
        engine.train_step(_batch(step))
    after_params, after_stats = _flat(engine.state.params), _flat(engine.state.batch_stats)

    assert any(label == FROZEN for label in labels.values()) == (spec != "full")
    for path, label in labels.items():
        moved = before_params[path].tobytes() != np.asarray(after_params[path]).tobytes()
        assert moved == (label != FROZEN), f"{'/'.join(path)} ({label}) moved={moved}"
    for path in before_stats:  # path = (..., bn, mean|var)
        bn_frozen = labels[path[:-1] + ("scale",)] == FROZEN
        moved = np.asarray(before_stats[path]).tobytes() != np.asarray(after_stats[path]).tobytes()
        assert moved == (bn_policy == "torch" or not bn_frozen), f"{'/'.join(path)} moved={moved}"


@pytest.mark.parametrize("spec", ["full", "head", "partial:0.8"])
def test_sgd_training_matches_pytorch_step_by_step(spec, source_checkpoint, digits_5_9):
    """Same converted weights and batches, SGD with momentum and weight decay, BatchNorm as torch:
    the 5 steps' losses and every tensor after them no further from a float64 torch run than torch
    float32 is (test_optim's judgement). BatchNorm biases move by near-cancelling gradient sums
    (docs/parity.md), so float32 alone puts torch and jaxft ~1e-3 apart on some; what jaxft owes is
    to round no worse than torch, not to round where torch rounds."""
    x, y = digits_5_9
    source = torchvision.models.resnet18(num_classes=5)
    source.load_state_dict(torch.load(source_checkpoint, weights_only=True))
    torch.manual_seed(0)
    source.fc.reset_parameters()  # a fresh head for the new task, shared by every run
    model = create_model("resnet18", num_classes=5)
    variables = from_torch("resnet18", source.state_dict())
    strategy = parse_strategy(spec)
    engine = Engine(model, variables, strategy, OptimConfig("sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
                    bn_policy="torch")
    labels = strategy.labels(model, variables["params"])
    torch_runs = {}
    for dtype in (torch.float32, torch.float64):
        twin = copy.deepcopy(source).to(dtype).train()
        trainable = freeze_like(twin, model, labels)
        torch_runs[dtype] = (twin, torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4))

    losses = {"jaxft": [], torch.float32: [], torch.float64: []}
    for step in range(5):
        xb, yb = x[step * 16:(step + 1) * 16], y[step * 16:(step + 1) * 16]
        for dtype, (twin, optimizer) in torch_runs.items():
            images = torch.from_numpy(xb).permute(0, 3, 1, 2).to(dtype)
            loss = torch.nn.functional.cross_entropy(twin(images), torch.from_numpy(yb))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[dtype].append(loss.item())
        metrics = engine.train_step({"image": xb, "label": yb})
        losses["jaxft"].append(metrics["loss_sum"] / metrics["count"])

    # The losses as one trajectory: a single step's loss is one float32 number, which torch float32
    # sometimes lands on by luck (3.7e-8 from float64 at one step, 1e-6 at the next).
    distances = {"losses of the 5 steps": _distance(*(np.array(losses[run]) for run in
                                                      ("jaxft", torch.float32, torch.float64)))}
    exported = to_torch("resnet18", engine.state.variables)
    state32, state64 = (torch_runs[dtype][0].state_dict() for dtype in (torch.float32, torch.float64))
    for key, value in state64.items():
        if not key.endswith("num_batches_tracked"):
            distances[key] = _distance(exported[key].numpy(), state32[key].numpy(), value.numpy())
    assert_no_further_than_torch(distances)


def test_head_optimizer_state_is_the_head_alone(resnet18_setup):
    model, variables = resnet18_setup
    head_bytes = sum(v.nbytes for v in jax.tree_util.tree_leaves(jax.device_get(variables["params"]["fc"])))
    all_bytes = sum(v.nbytes for v in jax.tree_util.tree_leaves(jax.device_get(variables["params"])))
    head = Engine(model, variables, parse_strategy("head"), OptimConfig("adam")).optimizer_state_bytes()
    full = Engine(model, variables, parse_strategy("full"), OptimConfig("adam")).optimizer_state_bytes()
    scalars = 16  # Adam's and the schedule's step counters
    assert 2 * head_bytes <= head <= 2 * head_bytes + scalars
    assert 2 * all_bytes <= full <= 2 * all_bytes + scalars


def _by_group(opt_state, field: str) -> dict[str, object]:
    """``field`` (mu, count) of each optimizer-state group, keyed by the group's label."""
    found = {}
    for path, value in optax.tree.get_all_with_path(opt_state, field):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        found[keys[0] if keys else "schedule"] = value
    return found


def test_gradual_unfreezing_carries_state_and_compiles_once_per_stage(resnet18_setup):
    model, variables = resnet18_setup
    engine = Engine(model, variables, parse_strategy("gradual:2"), OptimConfig("adam", lr=1e-3))
    assert [s[0] for s in stages(model)] == ["fc", "layer4_0", "layer3_0", "layer2_0", "layer1_0", "conv1"]
    for step in range(3):
        engine.train_step(_batch(step))
    assert engine._train._cache_size() == 1
    mu_before = jax.device_get(_by_group(engine.state.opt_state, "mu")["trainable"]["fc"])
    assert engine.set_epoch(1) is False  # gradual:2 moves on every second epoch
    assert engine.set_epoch(2) is True
    labels = {p[0]: lb for p, lb in _flat(engine.labels).items() if lb != FROZEN}
    assert labels == {"fc": "trainable", "layer4_0": "trainable1", "layer4_1": "trainable1"}
    mu = _by_group(engine.state.opt_state, "mu")
    mu_after = jax.device_get(mu["trainable"]["fc"])
    assert all(np.array_equal(mu_before[k], mu_after[k]) for k in mu_before)  # carried across the stage change
    assert not np.any(jax.device_get(mu["trainable1"]["layer4_0"]["conv1"]["kernel"]))  # fresh moments
    counts = {group: int(c) for group, c in _by_group(engine.state.opt_state, "count").items()}
    # the head's Adam and the schedule continue from step 3; the new stage's bias correction starts at 0
    assert counts == {"trainable": 3, "trainable1": 0, "schedule": 3}
    for step in range(3):
        engine.train_step(_batch(10 + step))
    assert engine._train._cache_size() == 1  # one compile for the new stage


def test_learning_rate_groups_scale_updates(resnet18_setup):
    model, variables = resnet18_setup
    engine = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=0.1, momentum=0.0),
                    lr_rules=[("fc/.*", 10.0)], layer_decay=0.5)
    labels = _flat(engine.labels)
    assert labels[("fc", "kernel")] == "trainable*10" and labels[("layer4_0", "conv1", "kernel")] == "trainable*0.5"
    assert labels[("conv1", "kernel")] == "trainable*0.03125"  # stem: 5 stages below the head
    batch = _batch(0)
    before = _flat(variables["params"])
    engine.train_step(batch)
    after = _flat(engine.state.params)
    # SGD without momentum: the update is -lr * mult * grad; compare against a plain run.
    plain = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=0.1, momentum=0.0))
    plain.train_step(batch)
    plain_after = _flat(plain.state.params)
    for path, mult in ((("fc", "kernel"), 10.0), (("layer4_0", "conv1", "kernel"), 0.5)):
        np.testing.assert_allclose(after[path] - before[path], mult * (plain_after[path] - before[path]),
                                   rtol=1e-4, atol=1e-7)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("freeze_all", "unknown strategy 'freeze_all'"),
    ("partial:0", r"F in \(0, 1\]"),
    ("partial:1.5", r"F in \(0, 1\]"),
    ("partial:abc", "needs a fraction"),
    ("head:3", "takes no argument"),
    ("gradual:0", "gradual:N"),
    ("regex:layer4_(=trainable", "not a valid regular expression"),
])
def test_bad_strategy_specs(spec, match):
    with pytest.raises(StrategyError, match=match):
        parse_strategy(spec)


def test_regex_rules_must_cover_every_leaf_exactly_once(resnet18_setup):
    model, variables = resnet18_setup
    params = variables["params"]
    with pytest.raises(StrategyError, match="matching no parameter: layer5_.*"):
        parse_strategy("regex:layer5_.*;rest=frozen").labels(model, params)
    with pytest.raises(StrategyError, match="match no rule: conv1/kernel"):
        parse_strategy("regex:layer4_.*;fc/.*").labels(model, params)
    with pytest.raises(StrategyError, match=r"more than one rule: fc/bias \(by fc/.* and .*bias\)"):
        parse_strategy("regex:fc/.*;.*bias=frozen;rest=frozen").labels(model, params)
    with pytest.raises(StrategyError, match="nothing would train"):
        parse_strategy("partial:1").labels(model, params)


def test_nan_loss_stops_with_the_last_good_state(resnet18_setup):
    model, variables = resnet18_setup
    engine = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=0.01))
    engine.train_step(_batch(0))
    good = _flat(engine.state.params), int(engine.state.step)
    poisoned = _batch(1)
    poisoned["image"][0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteLossError, match="NaN/inf at step 2.*last good one"):
        engine.train_step(poisoned)
    assert int(engine.state.step) == good[1]
    after = _flat(engine.state.params)
    assert all(np.array_equal(good[0][k], after[k]) for k in after)
    engine.train_step(_batch(2))  # and training can go on from there
    assert int(engine.state.step) == good[1] + 1


def test_an_update_that_overflows_the_parameters_is_refused(resnet18_setup):
    """Loss and gradients are finite, but the learning rate (inf in float32) makes the parameters
    non-finite: the step must not keep them."""
    model, variables = resnet18_setup
    engine = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=1e39, momentum=0.0))
    before = _flat(engine.state.params)
    refused = r"the parameters became NaN/inf or over 2\*\*126 in magnitude at step 1; the update was refused"
    with pytest.raises(NonFiniteLossError, match=refused):
        engine.train_step(_batch(0))
    assert int(engine.state.step) == 0
    after = _flat(engine.state.params)
    assert all(np.array_equal(before[k], after[k]) for k in after)


def test_a_finite_update_within_a_rounding_of_overflow_is_refused():
    """The guard checks the update and the step keeps the same update computed again, which XLA
    may round differently: a state beyond 2**126 (finite, but a rounding from float32's overflow
    at 2**128) is refused too. One sample, zero weights: the gradient is -0.8 for the true class
    and 0.2 for the four others, so SGD at lr 2e38 would make weights 1.6e38 and -4e37."""
    from jaxft.engine import SAFE_MAGNITUDE
    from jaxft.models.head import LinearHead

    variables = {"params": {"fc": {"kernel": np.zeros((4, 5), np.float32), "bias": np.zeros(5, np.float32)}}}
    engine = Engine(LinearHead(in_features=4, num_classes=5), variables, parse_strategy("full"),
                    OptimConfig("sgd", lr=2e38, momentum=0.0))
    would_be = np.float32(2e38) * np.float32(0.8)
    assert np.isfinite(would_be) and would_be > SAFE_MAGNITUDE
    with pytest.raises(NonFiniteLossError, match=r"the parameters became NaN/inf or over 2\*\*126"):
        engine.train_step({"image": np.ones((1, 4), np.float32), "label": np.array([0])})
    assert int(engine.state.step) == 0 and not np.any(np.asarray(engine.state.params["fc"]["kernel"]))


@pytest.mark.parametrize("optimizer", [OptimConfig("adam", lr=1e-3), OptimConfig("adamw", lr=1e-3, weight_decay=0.01),
                                       OptimConfig("sgd", lr=0.01)])
def test_the_step_holds_the_trained_state_once(optimizer):
    """The compiled step's scratch is the gradient and little else: the parameters and optimizer
    moments are updated in place, the NaN guard's check and the gradient norm write nothing the
    size of a parameter (before: 3.25x the trained bytes under Adam, 2.25x under SGD). Under
    jaxft's default XLA flags: without copy insertion's region analysis XLA copies the moments."""
    from jaxft.models.head import LinearHead

    rng = np.random.default_rng(0)
    model = LinearHead(in_features=1024, num_classes=2048)
    kernel = rng.normal(size=(1024, 2048)).astype(np.float32) * 0.01
    variables = {"params": {"fc": {"kernel": kernel, "bias": np.zeros(2048, np.float32)}}}
    engine = Engine(model, variables, parse_strategy("full"), optimizer)
    batch = {"image": rng.normal(size=(8, 1024)).astype(np.float32), "label": rng.integers(0, 2048, 8)}
    compiled = engine.compiled_train_step.lower(*engine.step_arguments(batch)).compile()
    trained_bytes = kernel.nbytes + 2048 * 4
    scratch = compiled.memory_analysis().temp_size_in_bytes
    assert scratch <= 1.1 * trained_bytes, (
        f"scratch {scratch / trained_bytes:.2f}x the trained bytes; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} (jaxft "
        f"adds its flags only for the jaxlib releases in jaxft.runtime.CHECKED_JAXLIB)")
    before = _flat(engine.state.params)
    engine.train_step(batch)  # and the step it compiled trains
    after = _flat(engine.state.params)
    assert not np.array_equal(before[("fc", "kernel")], after[("fc", "kernel")])


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import traverse_util
    from jaxft.data.builtin import digits
    from jaxft.engine import Engine, data_mesh
    from jaxft.freeze import parse_strategy
    from jaxft.optim import OptimConfig
    from jaxft.parity import rel_l2
    from jaxft.pretrained import load_pretrained
    from jaxft.source_checkpoint import resize_images

    assert jax.device_count() == 4, jax.devices()
    model, variables, _ = load_pretrained("resnet18", sys.argv[1], num_classes=5, new_head=True)
    images, labels, _ = digits(range(5, 10))
    x = (resize_images(images[:64], 32).astype(np.float32) / 255 - 0.45) / 0.225
    spans = ((0, 16), (16, 32), (32, 48), (48, 58), (58, 64))
    batches = [{"image": x[a:b], "label": labels[a:b]} for a, b in spans]
    out, notes, final = {}, [], {}  # the last two batches (10, 6) do not divide over 4 devices
    for n_dev in (1, 4):
        engine = Engine(model, variables, parse_strategy(sys.argv[2]), OptimConfig("sgd", lr=0.01),
                        bn_policy="torch", mesh=data_mesh(jax.devices()[:n_dev]), on_padding=notes.append)
        losses = [float(m["loss_sum"] / m["count"]) for m in map(engine.train_step, batches)]
        placed = engine._place(batches[0])["image"]
        final[n_dev] = traverse_util.flatten_dict(jax.device_get(engine.state.variables))
        out[n_dev] = {"losses": losses, "shards": [list(s.data.shape) for s in placed.addressable_shards]}
    out["worst_leaf_error"] = max(rel_l2(final[4][k], final[1][k]) for k in final[1])
    out["leaves"] = len(final[1])
    out["notes"] = notes
    print(json.dumps(out))
""")


@pytest.mark.parametrize("spec", ["full", "partial:0.8"])
def test_one_and_four_devices_agree(spec, source_checkpoint):
    """The same steps on 1 and 4 forced CPU devices, from the source checkpoint on real digits."""
    import os

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, str(source_checkpoint), spec],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert one["shards"] == [[16, 32, 32, 3]] and four["shards"] == [[4, 32, 32, 3]] * 4
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    # every parameter and BatchNorm statistic after 5 steps: float32 reduction-order noise only
    # (measured: about 2e-7). From random init on noise inputs, gradients of norm ~60 amplify
    # that noise chaotically, so the comparison uses real weights and data.
    assert out["leaves"] == 62 + 40 and out["worst_leaf_error"] <= 1e-5
    assert out["notes"] == ["a batch of 10 does not divide over 4 devices: padded with 2 masked samples "
                            "(they change no loss, metric or BatchNorm statistic)"]  # said once, not per batch


def test_uint8_batches_normalised_on_the_device_train_as_host_normalised_ones(resnet18_setup):
    """The loader sends uint8 crops and the step normalises them: the model sees the host's
    normalize() within an ulp (XLA may fuse the multiply and subtract into one rounding), and
    losses and predictions of eval and train steps agree."""
    from jaxft.data.transforms import EvalTransform, normalize, unnormalized
    from jaxft.engine import model_input

    model, variables = resnet18_setup
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(8)]
    transform = EvalTransform(36, 32)
    crops = np.stack([unnormalized(transform)(p) for p in photos])
    floats = np.stack([transform(p) for p in photos])
    assert crops.dtype == np.uint8 and np.array_equal(floats, np.stack([normalize(c, transform.mean, transform.std)
                                                                         for c in crops]))
    normalization = (transform.mean, transform.std)
    on_device = np.asarray(jax.jit(model_input, static_argnums=1)(crops, normalization))
    assert on_device.dtype == np.float32
    np.testing.assert_allclose(on_device, floats, rtol=0, atol=float(np.spacing(np.float32(2.7))))

    labels = rng.integers(0, 5, 8)
    uint8_engine = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=1e-2),
                          normalization=normalization)
    float_engine = Engine(model, variables, parse_strategy("full"), OptimConfig("sgd", lr=1e-2))
    got, expected = (e.eval_step({"image": x, "label": labels}) for e, x in ((uint8_engine, crops),
                                                                            (float_engine, floats)))
    np.testing.assert_allclose(got["loss_sum"], expected["loss_sum"], rtol=1e-6)
    assert np.array_equal(got["predictions"], expected["predictions"])
    for _ in range(2):
        got = uint8_engine.train_step({"image": crops, "label": labels})
        expected = float_engine.train_step({"image": floats, "label": labels})
        np.testing.assert_allclose(got["loss_sum"], expected["loss_sum"], rtol=1e-5)
    with pytest.raises(ValueError, match="need the engine's normalization"):
        float_engine.train_step({"image": crops, "label": labels})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_runs_that_differ_only_in_runtime_settings_share_one_compiled_step(resnet18_setup, optimizer):
    """The learning rate, weight decay, momentum, clipping norm and label smoothing are arguments
    of the compiled steps, not constants: two runs that differ only in them lower to one program
    (so a tuning trial loads an earlier trial's step from the persistent compilation cache instead
    of compiling it), and each still trains with its own values."""
    model, variables = resnet18_setup

    def engine(lr, weight_decay, momentum, clip, smoothing):
        cfg = OptimConfig(optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum, clip_grad=clip,
                          schedule="cosine")
        return Engine(model, variables, parse_strategy("partial:0.5"), cfg, total_steps=4, label_smoothing=smoothing)

    a, b = engine(1e-3, 1e-4, 0.9, 1.0, 0.1), engine(3e-2, 5e-3, 0.5, 0.25, 0.0)
    batch = _batch(0)
    train_program = [e.compiled_train_step.lower(*e.step_arguments(batch)).as_text() for e in (a, b)]
    assert train_program[0] == train_program[1]
    eval_program = [e.compiled_eval_step.lower(*e.eval_arguments(batch)).as_text() for e in (a, b)]
    assert eval_program[0] == eval_program[1]
    losses = [e.eval_step(batch)["loss_sum"] for e in (a, b)]
    assert losses[0] != losses[1]  # the same weights: only label smoothing differs
    for e in (a, b):
        e.train_step(batch)
    moved = [jax.tree_util.tree_map(lambda new, old: np.asarray(new) - np.asarray(old), e.state.params,
                                    variables["params"]) for e in (a, b)]
    step_a, step_b = (np.abs(m["fc"]["kernel"]).max() for m in moved)
    assert step_b > 3 * step_a  # b's rate is 30x a's (clipped harder); a's own step, not b's
