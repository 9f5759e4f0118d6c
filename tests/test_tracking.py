"""--tensorboard and --wandb: what a run logs, read back by TensorBoard's own reader and from the
records of a W&B offline run, against the run's metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import cli

RUN = ("--epochs", "2", "--image-size", "32", "--strategy", "head", "--log-every", "5", "--quiet")


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (W&B's append-only log: a 7-byte file header, then
    32 KiB blocks of records split into FULL/FIRST/MIDDLE/LAST chunks, LevelDB's log format).
    wandb 0.31 reads these in its Go core only, so the test reads them itself."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_tensorboard_and_wandb_log_what_the_run_wrote(env, tmp_path):
    run = tmp_path / "run"
    result = cli("jaxft.train", *RUN, "--out", run, "--tensorboard", "--wandb", "jaxft-tests", "--wandb-group", "g1",
                 env={**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    summary = json.loads((run / "summary.json").read_text())
    assert len(steps) >= 4 and [r["epoch"] for r in epochs] == [0, 1, 2]

    # TensorBoard, read by its own event reader (scalars are stored as float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert scalars("val/accuracy") == [(r["step"], f32(r["val_accuracy"])) for r in epochs]
    assert scalars("epoch/train_loss") == [(r["step"], f32(r["train_loss"])) for r in epochs[1:]]
    assert scalars("train/lr") == [(r["step"], f32(r["lr"])) for r in steps]
    assert scalars("train/loss") == [(r["step"], f32(r["loss"])) for r in steps]
    assert scalars("summary/val_accuracy") == [(summary["steps"], f32(summary["val"]["accuracy"]))]
    for name in ("curves", "confusion_val"):
        [image] = events.Images(f"plots/{name}")
        width, height = Image.open(run / "plots" / f"{name}.png").size
        assert (image.step, image.width, image.height) == (summary["steps"], width, height)
    [config] = events.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert re.search(r"^\| strategy +\| head +\|$", text, re.M) and re.search(r"^\| image_size +\| 32 +\|$", text, re.M)

    # W&B, offline: one run in the group, its history and summary as logged
    [log] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary_updates, runs = [], {}, []

    def items(entries):  # a name with "/" is stored as a nested key
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entries}

    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary_updates.update(items(record.summary.update))
    assert {(r.project, r.run_group, r.display_name, r.run_id) for r in runs} == {
        ("jaxft-tests", "g1", "run", (run / "wandb_run_id").read_text())}
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["strategy"] == "head" and config["lr"] == 1e-3
    logged_val = [(h["_step"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    assert logged_val == [(r["step"], r["val_accuracy"]) for r in epochs]
    logged_loss = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert logged_loss == [(r["step"], r["loss"]) for r in steps]
    assert any(h.get("plots/curves/_type") == "image-file" for h in history)
    assert summary_updates["val_accuracy"] == summary["val"]["accuracy"]
    assert summary_updates["best_epoch"] == summary["best_epoch"]


def test_wandb_without_the_extra_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from jaxft.train import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    assert main([*RUN, "--out", str(tmp_path / "run"), "--wandb", "p"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--wandb needs Weights & Biases" in err and "pip install 'jaxft[wandb]'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["jaxft.compare", "jaxft.tune"])
def test_wandb_without_the_extra_stops_compare_and_tune_before_they_start(tmp_path, capsys, monkeypatch, module):
    import importlib

    main = importlib.import_module(module).main
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([*RUN[:-1], "--out", str(tmp_path / "out"), "--wandb", "p"]) == 2
    assert "pip install 'jaxft[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tensorboard_after_kill_and_resume_holds_each_step_once(env, tmp_path):
    """SIGKILL after steps were logged past the last checkpoint, then --resume: TensorBoard's
    reader shows each step once, with the values of the run that counts (metrics.jsonl's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clitools import interrupt_when, logged_steps, saved_steps, start_training

    run = tmp_path / "run"
    proc = start_training("--epochs", "2", "--image-size", "32", "--log-every", "1", "--save-every", "1000",
                          "--quiet", "--tensorboard", "--out", run, env=env)
    # 717 training images at batch 32: 22 full batches an epoch, the first epoch's checkpoint at step 22
    code, stderr = interrupt_when(proc, lambda: saved_steps(run) == [22] and max(logged_steps(run), default=0) >= 25)
    assert code < 0, stderr
    assert saved_steps(run) == [22]
    assert max(logged_steps(run)) > 22  # steps past the checkpoint were logged, and will be logged again
    result = cli("jaxft.train", "--resume", run, "--quiet", env=env)
    assert result.returncode == 0, result.stderr

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 45))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in steps]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(e.step, e.value) for e in events.Scalars("val/accuracy")] == [
        (r["step"], float(np.float32(r["val_accuracy"]))) for r in epochs]
