"""Interrupted runs, resumed, reach the result of an uninterrupted run: gradual unfreezing stopped
mid-epoch and right after an epoch's checkpoint, a NaN stop resumed with a lower learning rate,
a finished run extended by epochs, `full` through torch's kernel gradients killed, and `head` on
the CPU split into two devices killed. Each test proves that its interruption happened."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from clitools import (TWO_CORES, assert_same_result, cli, interrupt_when, logged_steps, progress_at, saved_steps,
                      start_training)

# digits 5-9 at 32 px: 717 training images, 22 steps of 32 per epoch
STEPS_PER_EPOCH = 22
BASE = ["--batch-size", "32", "--quiet", "--log-every", "1"]
GRADUAL = [*BASE, "--strategy", "gradual", "--epochs", "3", "--save-every", "1000"]


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _resume_events(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "resume"]


@pytest.fixture(scope="module")
def gradual_reference(tmp_path_factory, source_checkpoint, jaxft_cache):
    """gradual:1 over 3 epochs (head, then layer4, then layer3), uninterrupted."""
    env = {**os.environ, "JAXFT_CACHE": str(jaxft_cache)}
    run = tmp_path_factory.mktemp("gradual") / "reference"
    result = cli("jaxft.train", *GRADUAL, "--out", run, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return _summary(run)


def _killed_after_a_checkpoint(args, run, env, steps: int) -> int:
    """Starts ``jaxft.train *args --out run``, kills it (SIGKILL) once a checkpoint is saved,
    and returns that checkpoint's step, which must be short of the run's ``steps``."""
    proc = start_training(*args, "--out", run, env=env)
    code, stderr = interrupt_when(proc, lambda: bool(saved_steps(run)), signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    latest = saved_steps(run)[-1]
    assert 0 < latest < steps and not (run / "summary.json").exists()
    return latest


def test_gradual_stopped_by_ctrl_c_mid_epoch_resumes_to_the_same_result(env, tmp_path, gradual_reference):
    run = tmp_path / "run"
    proc = start_training(*GRADUAL, "--out", run, env=env)
    # a few steps into epoch 2, where layer4 has joined: the optimizer state has two groups
    code, stderr = interrupt_when(proc, lambda: max(logged_steps(run), default=0) >= STEPS_PER_EPOCH + 4,
                                  signal.SIGINT)
    assert code == 130 and "--resume" in stderr, stderr[-2000:]
    latest = saved_steps(run)[-1]
    progress = progress_at(run, latest)
    assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH
    assert not (run / "summary.json").exists()

    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert progress["stage_epoch"] == 1
    assert f"resumed {run} at step {latest} (epoch 2" in result.stdout
    assert_same_result(_summary(run), gradual_reference)
    # the summary counts what trained by the end (fc, layer4 and layer3), not the first stage
    assert _summary(run)["parameters"]["trainable"] == gradual_reference["parameters"]["trainable"] > 10 ** 6


def test_gradual_killed_right_after_an_epoch_checkpoint_resumes_to_the_same_result(env, tmp_path,
                                                                                   gradual_reference):
    """The end-of-epoch checkpoint holds the ending epoch's optimizer state with the next epoch
    as progress: resume must restore the state in its own stage, then move on."""
    run = tmp_path / "run"
    proc = start_training(*GRADUAL, "--out", run, env=env)
    code, stderr = interrupt_when(proc, lambda: bool(saved_steps(run)), signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-2000:]
    latest = saved_steps(run)[-1]
    progress = progress_at(run, latest)
    assert latest % STEPS_PER_EPOCH == 0 and progress["step_in_epoch"] == 0  # only epoch ends save here
    assert progress["epoch"] in (1, 2) and not (run / "summary.json").exists()

    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert progress["stage_epoch"] == progress["epoch"] - 1  # the pair: the state is the ending epoch's
    assert f"resumed {run} at step {latest} (epoch {progress['epoch'] + 1}, step 0/" in result.stdout
    assert_same_result(_summary(run), gradual_reference)


def test_nan_stop_resumed_with_a_lower_lr_finishes_like_an_uninterrupted_run(env, tmp_path):
    """Stopped mid-epoch, continued with a learning rate that overflows (the update is refused
    and the run stops with exit 3), then continued with the original rate: the refused batch is
    trained again, every epoch finishes, and the result is the uninterrupted run's."""
    args = [*BASE, "--strategy", "partial:0.8", "--epochs", "2", "--save-every", "1000"]
    reference = tmp_path / "reference"
    result = cli("jaxft.train", *args, "--out", reference, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    proc = start_training(*args, "--out", run, env=env)
    code, stderr = interrupt_when(proc, lambda: max(logged_steps(run), default=0) >= STEPS_PER_EPOCH + 3,
                                  signal.SIGINT)
    assert code == 130, stderr[-2000:]
    stopped_at = saved_steps(run)[-1]
    assert stopped_at > STEPS_PER_EPOCH

    diverged = cli("jaxft.train", "--resume", run, "--lr", "1e39", "--quiet", env=env)  # inf in float32
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    refused = f"the parameters became NaN/inf or over 2**126 in magnitude at step {stopped_at + 1}; the update was"
    assert f"{refused} refused" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert saved_steps(run)[-1] == stopped_at  # nothing after the last good step
    assert max(logged_steps(run)) == stopped_at

    result = cli("jaxft.train", "--resume", run, "--lr", "0.001", "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run} at step {stopped_at} (epoch 2" in result.stdout and "--lr 0.001 (was 1e+39)" in result.stdout
    assert_same_result(_summary(run), _summary(reference))
    assert logged_steps(run) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    # each change is recorded at the step it took effect, and the run's config has the rate it ends with
    assert [(e["step"], e["changes"]) for e in _resume_events(run)] == [
        (stopped_at, {"lr": {"from": 0.001, "to": 1e39}}),
        (stopped_at, {"lr": {"from": 1e39, "to": 0.001}})]
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001


def test_a_finished_run_extended_by_epochs_equals_a_longer_run(env, tmp_path):
    """--epochs on --resume extends a run; with a constant rate that is the longer run exactly.
    Settings that fixed what the run computed are refused, and so is taking epochs back."""
    args = [*BASE, "--strategy", "partial:0.8", "--schedule", "constant", "--save-every", "1000"]
    reference = tmp_path / "reference"
    result = cli("jaxft.train", *args, "--epochs", "2", "--out", reference, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    result = cli("jaxft.train", *args, "--epochs", "1", "--out", run, env=env)
    assert result.returncode == 0 and _summary(run)["epochs"] == 1, result.stderr[-3000:]
    before = sorted(p.name for p in run.iterdir()), (run / "config.json").read_text()
    for flags, needle in ((["--batch-size", "16"], "cannot change --batch-size 16 (the run has 32)"),
                          (["--strategy", "full", "--epochs", "2"], "cannot change --strategy full"),
                          (["--epochs", "0"], "--epochs must be at least 1")):
        refused = cli("jaxft.train", "--resume", run, *flags, "--quiet", env=env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert needle in refused.stderr, refused.stderr[-2000:]
    assert (sorted(p.name for p in run.iterdir()), (run / "config.json").read_text()) == before

    result = cli("jaxft.train", "--resume", run, "--epochs", "2", "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--epochs 2 (was 1)" in result.stdout
    assert_same_result(_summary(run), _summary(reference))
    assert [e["changes"] for e in _resume_events(run)] == [{"epochs": {"from": 1, "to": 2}}]

    shorter = cli("jaxft.train", "--resume", run, "--epochs", "1", "--quiet", env=env)
    assert shorter.returncode == 2 and "has already trained 2 epoch(s)" in shorter.stderr, shorter.stderr[-2000:]


def test_full_through_torchs_kernel_gradients_killed_and_resumed_matches_the_uninterrupted_run(env, tmp_path):
    """`full` at 64 px and batch 64, whose stem (the one layer over the route's floor there) is
    computed by torch's kernels called from the step (jaxft/models/host_conv.py): killed after a
    checkpoint and resumed, the run ends where the uninterrupted run does, bit for bit (torch's
    kernels give the same bits again). The same run with every kernel XLA's
    (JAXFT_TORCH_KERNELS=0) ends elsewhere in its last bits, which shows that the CLI took the
    route."""
    import jax
    import jax.numpy as jnp

    from jaxft.models import layers

    stem_input = jax.ShapeDtypeStruct((64, 64, 64, 3), jnp.float32)  # the route this run takes
    assert layers._use_torch_conv(stem_input, 64, (7, 7), (2, 2), ((3, 3), (3, 3)), 1)
    args = ["--strategy", "full", "--image-size", "64", "--batch-size", "64", "--epochs", "1", "--save-every", "4",
            "--log-every", "1", "--quiet"]
    reference = tmp_path / "reference"
    result = cli("jaxft.train", *args, "--out", reference, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    latest = _killed_after_a_checkpoint(args, run, env, _summary(reference)["steps"])
    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run} at step {latest}" in result.stdout
    assert_same_result(_summary(run), _summary(reference))

    xla_only = tmp_path / "xla_only"
    result = cli("jaxft.train", *args, "--out", xla_only, env={**env, "JAXFT_TORCH_KERNELS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(xla_only)["train"]["loss"] != _summary(reference)["train"]["loss"]
    assert _summary(xla_only)["train"]["loss"] == pytest.approx(_summary(reference)["train"]["loss"], rel=1e-3)


@TWO_CORES
def test_head_on_the_split_cpu_killed_and_resumed_matches_the_uninterrupted_run_and_one_device(env, tmp_path):
    """`head` over 16 x 112^2 pixels a step runs on the two CPU devices the CLI makes
    (jaxft/runtime.py): killed after a checkpoint and resumed, on both halves again, it ends
    where the uninterrupted run does, bit for bit; on one device it ends there up to rounding."""
    env = {**env, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # no device count of the user's: jaxft chooses
    args = ["--strategy", "head", "--image-size", "112", "--batch-size", "16", "--augment", "--epochs", "1",
            "--save-every", "10", "--log-every", "1", "--quiet"]
    reference = tmp_path / "reference"
    result = cli("jaxft.train", *args, "--out", reference, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps and evaluation on 2 CPU devices" in result.stdout and _summary(reference)["devices"] == 2

    run = tmp_path / "run"
    latest = _killed_after_a_checkpoint(args, run, env, _summary(reference)["steps"])
    elsewhere = tmp_path / "elsewhere"  # the same stopped run, to be resumed launched another way
    shutil.copytree(run, elsewhere)
    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run} at step {latest}" in result.stdout
    assert "steps and evaluation on 2 CPU devices" in result.stdout
    assert "device(s) and continue on" not in result.stdout
    assert_same_result(_summary(run), _summary(reference))

    # resumed on one device, it says the result will not be bit for bit, and ends there up to rounding
    result = cli("jaxft.train", "--resume", elsewhere, "--quiet", env={**env, "JAXFT_XLA_DEFAULTS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {elsewhere} at step {latest}" in result.stdout
    assert "the steps so far ran on 2 device(s) and continue on 1" in result.stdout, result.stdout[-3000:]
    assert _summary(elsewhere)["devices"] == 1
    for split in ("train", "val"):
        assert _summary(elsewhere)[split]["loss"] == pytest.approx(_summary(reference)[split]["loss"], rel=1e-6)
        assert _summary(elsewhere)[split]["accuracy"] == _summary(reference)[split]["accuracy"], split

    one = tmp_path / "one"
    result = cli("jaxft.train", *args, "--out", one, env={**env, "JAXFT_XLA_DEFAULTS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU devices" not in result.stdout and _summary(one)["devices"] == 1
    for split in ("train", "val"):  # measured: train loss 3e-9 apart
        assert _summary(one)[split]["loss"] == pytest.approx(_summary(reference)[split]["loss"], rel=1e-6), split
        assert _summary(one)[split]["accuracy"] == _summary(reference)[split]["accuracy"], split
