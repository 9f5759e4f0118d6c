"""python -m jaxft.train, predict, compare and export, run as a user runs them: subprocesses on real data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clitools import (TWO_CORES, assert_same_result, cli, interrupt_when, logged_steps, saved_steps,
                      start_training)

# Small and fast: digits 5-9 at 32 px, two epochs of 22 steps.
FAST = ["--epochs", "2", "--batch-size", "32", "--strategy", "partial:0.8", "--quiet"]


def assert_run_outputs(run: Path, classes: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["classes"]) == classes
    for split in ("val",):
        assert 0.0 <= summary[split]["accuracy"] <= 1.0 and summary[split]["loss"] > 0
        assert len(summary[split]["per_class_accuracy"]) == classes
        assert np.array(summary[split]["confusion_matrix"]).sum() == summary[split]["samples"]
    assert summary["images_per_sec"] > 0 and summary["wall_seconds"] > 0 and summary["best_epoch"] >= 1
    for plot in ("curves.png", "confusion_val.png"):
        assert (run / "plots" / plot).stat().st_size > 5000  # a real image, not an empty file
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(summary["epochs"] + 1))
    # the summary's val figures are the best epoch's pass (reused, not run again)
    best = next(e for e in events if e["event"] == "epoch" and e["epoch"] == summary["best_epoch"])
    assert (summary["val"]["loss"], summary["val"]["accuracy"]) == (best["val_loss"], best["val_accuracy"])
    assert {"config.json", "environment.json", "model.json"} <= {p.name for p in run.iterdir()}
    return summary


def test_default_digits_run_learns_and_exports(env, tmp_path):
    run = tmp_path / "run"
    result = cli("jaxft.train", *FAST, "--out", run, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best val accuracy" in result.stdout
    summary = assert_run_outputs(run, classes=5)
    assert summary["val"]["accuracy"] > 0.8  # the source backbone transfers: digits 5-9 learn fast
    assert summary["val"]["accuracy"] > summary["before_training"]["val_accuracy"] + 0.3
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"]  # partial:0.8 froze some

    # checkpoints restorable: the latest, through orbax, into the same structure
    from jaxft.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(run / "checkpoints", read_only=True)
    assert ckpts.latest_step() == summary["steps"]
    assert ckpts.progress(ckpts.latest_step())["epoch"] == 2

    # export to torchvision: strict load, same predictions as jaxft predict
    exported = tmp_path / "finetuned.pth"
    result = cli("jaxft.convert", "--to-torch", run, "--out", exported, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    torch_model = torchvision.models.resnet18(num_classes=5)
    torch_model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    torch_model.eval()

    from PIL import Image

    from jaxft.data.builtin import digits
    from jaxft.data.transforms import EvalTransform

    images, labels, _ = digits(range(5, 10))
    paths = []
    for i in (0, 1, 2):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    result = cli("jaxft.predict", *paths, "--checkpoint", run, "--top-k", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout)
    info = json.loads((run / "model.json").read_text())
    transform = EvalTransform(info["resize_size"], info["image_size"], tuple(info["mean"]), tuple(info["std"]))
    x = torch.from_numpy(np.stack([transform(images[i]) for i in (0, 1, 2)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        probabilities = torch.softmax(torch_model(x), -1).numpy()
    for row, prediction in zip(probabilities, predictions):
        best = prediction["top_k"][0]
        assert best["class"] == info["classes"][int(row.argmax())]
        assert best["probability"] == pytest.approx(float(row.max()), abs=1e-4)


def test_lfw_and_a_real_image_folder(env, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    # a small real folder: crops of scikit-image's photographs, two classes
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name, image in (("astronaut", skdata.astronaut()), ("coffee", skdata.coffee())):
        (root / name).mkdir(parents=True)
        for i in range(12):
            y, x = rng.integers(0, 200, 2)
            Image.fromarray(image[y:y + 200, x:x + 200]).save(root / name / f"{i}.jpg")
    for data, classes in (("lfw", 2), (root, 2)):
        run = tmp_path / f"run_{Path(str(data)).name}"
        result = cli("jaxft.train", "--data", data, "--epochs", "2", "--batch-size", "16", "--strategy", "head",
                     "--image-size", "32", "--out", run, "--quiet", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = assert_run_outputs(run, classes)
        assert summary["val"]["samples"] > 0


def test_same_seed_twice_gives_identical_metrics(env, tmp_path):
    summaries = []
    for name in ("a", "b"):
        result = cli("jaxft.train", *FAST, "--epochs", "1", "--out", tmp_path / name, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    for key in ("train", "val"):
        assert summaries[0][key]["loss"] == summaries[1][key]["loss"]
        assert summaries[0][key]["accuracy"] == summaries[1][key]["accuracy"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(env, tmp_path):
    """Killed at random steps, mid-save and by Ctrl-C, or stopped by a checkpoint that cannot be
    written (a full disk), then resumed: the same result, bit for bit, with augmentation on (its
    draws must resume too)."""
    args = [*FAST, "--augment", "--save-every", "4", "--log-every", "1"]
    reference = tmp_path / "reference"
    result = cli("jaxft.train", *args, "--out", reference, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((reference / "summary.json").read_text())
    total = expected["steps"]

    rng = random.Random(0)
    for trial, trigger in enumerate(("step", "save", "step", "ctrl-c", "sigterm")):
        run = tmp_path / f"killed{trial}"
        proc = start_training(*args, "--out", run, env=env)
        at = rng.randint(6, total - 4)
        if trigger == "save":  # the moment orbax writes a checkpoint after the first
            def ready(run=run):
                folder = run / "checkpoints"
                return bool(saved_steps(run)) and any("tmp" in p.name for p in folder.iterdir())
        else:  # and a checkpoint on disk to resume from (saves are asynchronous: step 4's may still be written)
            def ready(run=run, at=at):
                return max(logged_steps(run), default=0) >= at and bool(saved_steps(run))
        sig = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM}.get(trigger, signal.SIGKILL)
        code, stderr = interrupt_when(proc, ready, sig)
        if sig != signal.SIGKILL:  # finish the step, checkpoint, exit 128 + signal with the resume command
            assert code == 128 + sig and f"{sig.name} received, checkpoint saved" in stderr, stderr[-2000:]
            assert "--resume" in stderr, stderr[-2000:]
        else:
            assert code == -signal.SIGKILL, (trial, code, stderr[-2000:])
        assert not (run / "summary.json").exists() and saved_steps(run), trial
        result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
        assert result.returncode == 0, f"trial {trial}: {result.stderr[-3000:]}"
        resumed_at = int(result.stdout.split("resumed ")[1].split(" at step ")[1].split()[0])
        assert 0 < resumed_at < total, (trial, resumed_at)
        assert_same_result(json.loads((run / "summary.json").read_text()), expected)
        assert not list((run / "checkpoints").glob("*tmp*")), "a temporary checkpoint was left behind"
        steps = logged_steps(run)
        assert steps == list(range(1, total + 1)), "metrics.jsonl misses or repeats steps after the resume"

    # The disk fills up mid-run: a file-size limit set on the running process once a checkpoint
    # is on disk, so a later checkpoint's files (tens of MB) cannot be written while metrics.jsonl's
    # lines still can. Saves are asynchronous: the failure surfaces at the next save.
    import resource
    import time

    run = tmp_path / "disk_full"
    proc = start_training(*args, "--out", run, env=env)
    while not saved_steps(run):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    _, stderr = proc.communicate(timeout=300)
    # jaxft's one line (orbax's writer thread logs its own traceback beside it, in any order)
    ours = [line for line in stderr.splitlines() if line.startswith("python -m jaxft.train: error:")]
    assert proc.returncode == 2 and len(ours) == 1, stderr[-3000:]
    assert "could not be written into" in ours[0] and "File too large" in ours[0] and f"--resume {run}" in ours[0]
    assert saved_steps(run) and not (run / "summary.json").exists()
    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_result(json.loads((run / "summary.json").read_text()), expected)
    assert logged_steps(run) == list(range(1, total + 1))


def test_compare_table(env, tmp_path):
    out = tmp_path / "compare"
    result = cli("jaxft.compare", "--strategies", "head", "scratch", "--epochs", "1", "--batch-size", "64",
                 "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| strategy") and "| head" in table and "| scratch" in table
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 3 and (out / "comparison.png").stat().st_size > 5000
    # --overwrite replaces an earlier comparison, never a folder of the user's
    (out / "notes.md").write_text("mine")
    refused = cli("jaxft.compare", "--strategies", "head", "--epochs", "1", "--out", out, "--overwrite", env=env)
    assert refused.returncode == 2 and "refuses to write into" in refused.stderr and "notes.md" in refused.stderr
    assert (out / "notes.md").read_text() == "mine" and (out / "comparison.md").read_text() == table


# --- bad input -------------------------------------------------------------------------------------

def _one_clear_line(result: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert errors[0].startswith("python -m jaxft.train: error:"), errors[0]


def test_bad_input_is_one_clear_line_and_touches_nothing(env, tmp_path):
    run = tmp_path / "existing"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "keep.txt").write_text("precious")
    empty = tmp_path / "empty_folder"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    other_arch = tmp_path / "vgg11.pth"
    torch.save(torchvision.models.vgg11(num_classes=3).state_dict(), other_arch)
    changed = tmp_path / "changed_classes"  # a run trained on other classes than its data has now
    (changed / "checkpoints").mkdir(parents=True)
    (changed / "config.json").write_text(json.dumps({"data": "digits:5-9", "epochs": 1}))
    (changed / "model.json").write_text(json.dumps({"num_classes": 2, "classes": ["cat", "dog"]}))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    project = tmp_path / "project"  # a user's folder that happens to hold a config.json
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"arch": "resnet18", "data": "mine", "strategy": "full"}))
    (project / "train.py").write_text("# the user's own code")

    cases = [
        (["--data", tmp_path / "no_such_folder"], "no_such_folder"),
        (["--data", empty], "no usable images"),
        (["--config", bad_config], "'learning_rate'"),
        (["--resume", tmp_path], "not a jaxft run directory"),
        (["--resume", changed], "trained on 2 classes"),
        (["--weights", other_arch, "--epochs", "1"], "looks like a vgg11"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--out", run], "--overwrite"),
        (["--strategy", "partial:2"], "(0, 1]"),
        (["--out", project, "--overwrite"], "refuses to empty"),
        (["--val-split", "0"], "--val-split must be in (0, 1)"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", readonly / "run"], "cannot write"))
    for args, needle in cases:
        result = cli("jaxft.train", *args, "--quiet", *([] if "--out" in args or "--resume" in args else
                                                         ["--out", tmp_path / "new_run"]), env=env)
        _one_clear_line(result, needle)
    assert (run / "keep.txt").read_text() == "precious" and sorted(p.name for p in run.iterdir()) == [
        "config.json", "keep.txt"]
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "train.py"]
    assert json.loads((project / "config.json").read_text())["data"] == "mine"
    assert not (tmp_path / "new_run").exists()  # failed runs leave no half-made directory


def test_nan_loss_stops_and_checkpoints_the_last_good_state(env, tmp_path):
    run = tmp_path / "diverged"
    result = cli("jaxft.train", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "1", "--save-every", "1000",
                 "--out", run, "--quiet", env=env)
    _one_clear_line(result, "became NaN/inf at step 2", code=3)
    assert f"--resume {run} --lr 1e+29" in result.stderr  # the way on, with a lower rate
    from jaxft.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(run / "checkpoints", read_only=True)
    step = ckpts.latest_step()
    assert step is not None and ckpts.progress(step)["global_step"] == step  # saved at the last good step


def test_lr_mult_reaches_the_head_trained_on_cached_features(source_checkpoint, tmp_path):
    """The head strategy trains a LinearHead on cached features; --lr-mult rules written for the
    whole model (one for a frozen stage, one for the head) work there as they do without the cache."""
    from flax import traverse_util

    from jaxft.config import build_config
    from jaxft.train import build_run

    cfg = build_config({"strategy": "head", "lr_mult": "layer4_.*=0.1;fc/bias=10", "epochs": 1}, {})
    parts = build_run(cfg, tmp_path, resume=False, log=lambda *_: None)
    assert parts.use_features
    labels = traverse_util.flatten_dict(parts.engine.labels)
    assert labels == {("fc", "kernel"): "trainable", ("fc", "bias"): "trainable*10"}
    with pytest.raises(Exception, match="matching no parameter: layer5_"):
        build_run(build_config({"strategy": "head", "lr_mult": "layer5_.*=0.1"}, {}), tmp_path, False, lambda *_: None)


def test_a_second_ctrl_c_interrupts_at_once():
    """The first Ctrl-C or SIGTERM asks the loop to stop after its step (and checkpoint); the second,
    for a user who will not wait, raises at once (main turns it into exit 130 without a traceback)."""
    import time

    from jaxft.train import InterruptFlag

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for first, second in ((signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)):
        with InterruptFlag() as interrupt:
            os.kill(os.getpid(), first)
            time.sleep(0.05)
            assert interrupt.requested and interrupt.signum == first
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), second)
                time.sleep(1.0)
        assert {number: signal.getsignal(number) for number in previous} == previous


def test_steps_read_the_device_only_at_log_intervals(source_checkpoint, tmp_path, monkeypatch):
    """No device-to-host transfer between log intervals: from each queued step to the next
    collect, every read of an array's value fails: jax.transfer_guard (which guards real device
    memory, a GPU's) and, because a CPU array is host memory that guard never sees, a patched
    jax.Array value read (float() of a metric, np.asarray, device_get, a checkpoint's write all
    go through it). Collects come every --log-every steps, before a checkpoint and at the
    epoch's end, and together they cover every step once."""
    import jax
    from jax._src.array import ArrayImpl

    from jaxft.config import build_config
    from jaxft.engine import Engine
    from jaxft.rundir import prepare_run_dir
    from jaxft.train import train

    guard, collected = None, []
    dispatch, collect, value = Engine.dispatch_step, Engine.collect, ArrayImpl._value

    def read_value(array):
        assert guard is None, "an array was read on the host between two collects"
        return value.fget(array)

    def guarded_dispatch(self, batch):
        nonlocal guard
        if guard is None:
            guard = jax.transfer_guard_device_to_host("disallow_explicit")
            guard.__enter__()
        return dispatch(self, batch)

    def unguarded_collect(self, pending):
        nonlocal guard
        if guard is not None:
            guard.__exit__(None, None, None)
            guard = None
        collected.append(len(pending))
        return collect(self, pending)

    monkeypatch.setattr(ArrayImpl, "_value", property(read_value))
    monkeypatch.setattr(Engine, "dispatch_step", guarded_dispatch)
    monkeypatch.setattr(Engine, "collect", unguarded_collect)
    cfg = build_config({"epochs": 2, "batch_size": 64, "log_every": 4, "save_every": 6}, {})
    summary = train(cfg, prepare_run_dir(tmp_path / "run", overwrite=False), quiet=True, log=lambda *_: None)
    steps_per_epoch = 717 // 64  # digits 5-9: 717 training images, full batches only: 11 steps
    # collects at global steps 4, 6 (a checkpoint), 8, 11 (epoch end) | 12, 16, 18 (checkpoint), 20, 22 (end)
    assert collected == [4, 2, 2, 3, 1, 4, 2, 2, 2] and sum(collected) == 2 * steps_per_epoch
    assert summary["val"]["accuracy"] > 0.5 and summary["steps"] == 2 * steps_per_epoch


@TWO_CORES
def test_evaluation_runs_on_the_split_cpu_while_steps_train_on_one_device_as_without_the_split(env, tmp_path):
    """`partial:0.8` at 64 px: its steps (16 x 64^2 pixels) are under the split's threshold and
    run on one device; its evaluation passes (64 x 64^2, forward only) are over it and run on the
    CPU's two devices. The training is the one-device run's bit for bit, and so are the val
    accuracies; val losses differ only in the order of their float32 sums."""
    env = {**env, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # no device count of the user's: jaxft chooses
    args = ["--strategy", "partial:0.8", "--image-size", "64", "--batch-size", "16", "--epochs", "1",
            "--log-every", "5", "--quiet"]
    runs = {"split": tmp_path / "split", "one": tmp_path / "one"}
    split = cli("jaxft.train", *args, "--out", runs["split"], env=env)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "evaluation (the steps on one) on 2 CPU devices" in split.stdout, split.stdout[-3000:]
    one = cli("jaxft.train", *args, "--out", runs["one"], env={**env, "JAXFT_XLA_DEFAULTS": "0"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert "CPU devices" not in one.stdout
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    assert (summaries["split"]["devices"], summaries["split"]["eval_devices"]) == (1, 2)
    assert (summaries["one"]["devices"], summaries["one"]["eval_devices"]) == (1, 1)

    records = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for name, run in runs.items()}
    steps = {name: [(r["step"], r["loss"], r["accuracy"], r["grad_norm"]) for r in rs if r["event"] == "step"]
             for name, rs in records.items()}
    assert len(steps["one"]) >= 8 and steps["split"] == steps["one"]  # the same training, bit for bit
    assert summaries["split"]["train"] == summaries["one"]["train"]
    epochs = {name: [r for r in rs if r["event"] == "epoch"] for name, rs in records.items()}
    for split_epoch, one_epoch in zip(epochs["split"], epochs["one"], strict=True):
        assert split_epoch["val_accuracy"] == one_epoch["val_accuracy"]
        assert split_epoch["val_loss"] == pytest.approx(one_epoch["val_loss"], rel=1e-6)
    assert summaries["split"]["val"]["confusion_matrix"] == summaries["one"]["val"]["confusion_matrix"]
