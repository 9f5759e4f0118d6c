"""python -m jaxft.tune run as a user runs it: real studies on digits in SQLite storage, a SIGKILL
mid-trial, two workers on one study, the best config trained again, optuna-dashboard over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clitools import cli, interrupt_when, saved_steps

optuna = pytest.importorskip("optuna")

# head on 32 px digits with cached features: a trial takes seconds, so a study fits in a test
TRIAL = ("--image-size", "32", "--param", "strategy=head", "--param", "weight_decay=0", "--param",
         "label_smoothing=0", "--param", "optimizer=adam", "--prune-startup", "2", "--prune-warmup", "1",
         "--heartbeat", "2")


def load(study_dir: Path):
    settings = json.loads((study_dir / "study.json").read_text())
    return optuna.load_study(study_name=settings["study_name"], storage=settings["storage"])


def snapshot(study) -> dict[int, tuple]:
    return {t.number: (t.state.name, t.value, dict(t.params)) for t in study.get_trials()}


def epochs_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["epoch"] for r in records if r.get("event") == "epoch"]


def test_a_study_prunes_fails_a_diverged_trial_survives_sigkill_and_resumes_as_if_uninterrupted(env, tmp_path):
    study_dir = tmp_path / "study"
    # Enqueued first: two sound rates, one that diverges, one too small to learn (pruned); the
    # sampler draws the rest. The study is killed during trial 4, after its first epoch's checkpoint.
    args = ("jaxft.tune", "--out", study_dir, "--n-trials", "6", "--epochs", "3", *TRIAL,
            "--param", "lr=1e-4:3e-2:log", "--enqueue", "lr=3e-3", "--enqueue", "lr=1e-2",
            "--enqueue", "lr=1e38", "--enqueue", "lr=1e-6")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], env=env, stdout=log, stderr=subprocess.PIPE,
                            text=True)
    victim = study_dir / "trials" / "0004"
    code, stderr = interrupt_when(proc, lambda: bool(saved_steps(victim)) and 1 in epochs_logged(victim))
    assert code == -signal.SIGKILL, stderr
    before = snapshot(load(study_dir))
    # the kill came mid-trial: trial 4 was running, its run unfinished
    assert before[4][0] == "RUNNING" and not (victim / "summary.json").exists()
    assert [before[n][0] for n in range(4)] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]

    # after the heartbeat's grace period (2 x --heartbeat 2 s) the dead trial is stale at the first
    # ask, and is re-run before any new trial: the study then continues as if never interrupted
    time.sleep(5)
    result = cli("jaxft.tune", "--resume", study_dir, env=env)
    assert result.returncode == 0, result.stderr
    study = load(study_dir)
    after = snapshot(study)
    # the same study never interrupted: the same trials, params, states and values, in order
    reference = cli(*(str(study_dir.parent / "reference") if a == study_dir else a for a in args), env=env)
    assert reference.returncode == 0, reference.stderr
    assert kept_trials(study) == kept_trials(load(study_dir.parent / "reference"))
    for number in range(4):  # no finished trial lost or re-run
        assert after[number] == before[number]
    failed = study.trials[2]
    assert failed.user_attrs["failed"].startswith("diverged: ") and "NaN/inf" in failed.user_attrs["failed"]
    assert after[4][0] == "FAIL"  # went stale when its process died, then was re-run:
    rerun = [t for t in study.trials if t.system_attrs.get("failed_trial") == 4]
    assert len(rerun) == 1 and rerun[0].params == before[4][2] and rerun[0].state.name in ("COMPLETE", "PRUNED")
    # ... continuing trial 4's own run directory from its checkpoint, not starting over
    records = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("resume") == 1
    assert rerun[0].user_attrs["run_dir"] == "trials/0004"
    # the budget: 6 trials besides the one that was re-run
    assert len(study.trials) == 7 and sum(t.state.name == "PRUNED" for t in study.trials) >= 1
    assert "re-run as trial" in (study_dir / "trials.md").read_text()
    for name in ("trials.csv", "best.yaml", "plots/optimization_history.png", "plots/param_importances.png",
                 "plots/parallel_coordinate.png"):
        assert (study_dir / name).stat().st_size > 0, name

    # best.yaml trains the best trial again to the same validation accuracy
    again = cli("jaxft.train", "--config", study_dir / "best.yaml", "--out", tmp_path / "again", "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["val"]["accuracy"] == study.best_value

    # optuna-dashboard serves the study's trials from its storage
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = json.loads((study_dir / "study.json").read_text())["storage"]
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host",
                                  "127.0.0.1", "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert dashboard.poll() is None, "optuna-dashboard exited"
                time.sleep(0.1)
        assert studies is not None, "optuna-dashboard never answered"
        [summary_row] = [s for s in studies if s["study_name"] == study.study_name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary_row['study_id']}",
                                    timeout=30) as response:
            served = json.load(response)["trials"]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert [(t["number"], t["state"]) for t in served] == [(t.number, t.state.name.capitalize())
                                                           for t in study.trials]
    served_values = {t["number"]: t["values"][0] for t in served if t.get("values")}
    assert served_values == {t.number: t.value for t in study.trials if t.value is not None}  # pruned: last report


def kept_trials(study) -> list[tuple]:
    """(state, value, params) of every trial in order, leaving out the ones that were re-run."""
    dead = {n for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    return [v for number, v in sorted(snapshot(study).items()) if number not in dead]


def test_ctrl_c_checkpoints_the_running_trial_and_resume_ends_as_if_uninterrupted(env, tmp_path):
    study_dir = tmp_path / "study"
    args = ("jaxft.tune", "--out", study_dir, "--n-trials", "3", "--epochs", "3", *TRIAL,
            "--param", "lr=1e-3:3e-2:log", "--pruner", "none")
    proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    victim = study_dir / "trials" / "0001"
    code, stderr = interrupt_when(proc, lambda: bool(saved_steps(victim)) and 1 in epochs_logged(victim),
                                  sig=signal.SIGINT)
    assert code == 130, stderr
    assert f"continue with python -m jaxft.tune --resume {study_dir}" in stderr
    study = load(study_dir)
    interrupted = study.trials[1]  # failed at once (no heartbeat wait) and queued again with its params
    assert interrupted.state.name == "FAIL" and interrupted.user_attrs["failed"] == "interrupted"
    [queued] = [t for t in study.trials if t.state.name == "WAITING"]
    assert queued.system_attrs["failed_trial"] == 1 and queued.params == interrupted.params
    assert not (victim / "summary.json").exists() and epochs_logged(victim)[-1] < 3

    result = cli("jaxft.tune", "--resume", study_dir, env=env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("resume") == 1  # continued from Ctrl-C's checkpoint
    reference = cli(*(str(tmp_path / "reference") if a == study_dir else a for a in args), env=env)
    assert reference.returncode == 0, reference.stderr
    assert kept_trials(load(study_dir)) == kept_trials(load(tmp_path / "reference"))


def test_two_workers_share_one_study_without_duplicating_trials(env, tmp_path):
    study_dir = tmp_path / "study"
    args = ["--n-trials", "6", "--epochs", "2", *TRIAL, "--param", "lr=1e-4:3e-2:log", "--pruner", "none"]
    first = subprocess.Popen([sys.executable, "-m", "jaxft.tune", "--out", str(study_dir), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (study_dir / "study.db").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-m", "jaxft.tune", "--resume", str(study_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [proc.communicate(timeout=600) for proc in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err for _, err in outputs]
    ran = [[int(line.split()[1]) for line in out.splitlines() if line.startswith("trial ")] for out, _ in outputs]
    assert ran[0] and ran[1], f"both workers must run trials: {ran}"
    assert sorted(ran[0] + ran[1]) == list(range(6))  # each trial run once, by one worker
    study = load(study_dir)
    assert [t.number for t in study.trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.params["lr"] for t in study.trials}) == 6  # the workers' samplers drew different trials


@pytest.mark.parametrize("extra, message", [
    (["--param", "lr=1e-2:1e-5:log"], "search space lr: low 0.01 is above high 1e-05"),
    (["--param", "learning_rate=1e-4:1e-2"], "'learning_rate' is not a setting"),
    (["--param", "arch=resnet50"], "'arch' is a training setting but not a hyperparameter"),
    (["--param", "lr=0:1e-2:log"], "a log range needs low > 0"),
    (["--param", "optimizer=adam,lion"], "['lion'] not among"),
    (["--enqueue", "momentum=0.5"], "'momentum' is not in the search space"),
])
def test_bad_search_spaces_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    from jaxft.tune import main

    assert main(["--out", str(tmp_path / "study"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m jaxft.tune: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "study").exists()


def test_an_empty_space_file_and_foreign_storage_are_refused(tmp_path, capsys):
    from jaxft.tune import main

    empty = tmp_path / "space.yaml"
    empty.write_text("{}\n")
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("lr: 1e-3\noptimizer: adam\n")
    text_file = tmp_path / "notes.db"
    text_file.write_text("not a database\n")
    other_db = tmp_path / "other.db"
    with sqlite3.connect(other_db) as db:
        db.execute("CREATE TABLE photos (path TEXT)")
    cases = [(["--space", str(empty)], "is empty: it varies no setting"),
             (["--space", str(fixed)], "is empty: it varies no setting"),
             (["--storage", str(text_file)], f"storage {text_file} is not an Optuna database"),
             (["--storage", str(other_db)], "is an SQLite database but not Optuna's (tables: photos)"),
             (["--resume", str(tmp_path / "nothing")], "no study there")]
    for extra, message in cases:
        assert main(["--out", str(tmp_path / "study"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "study").exists()
    assert text_file.read_text() == "not a database\n"  # nothing written over the user's files


def test_a_yaml_space_file_reads_ranges_as_written(tmp_path):
    """YAML 1.1 reads 2:6 as the base-60 number 126 and 0:0.2 as 0.2: the space file must not."""
    from jaxft.search_space import load_space_file, parse_space

    path = tmp_path / "space.yaml"
    path.write_text("epochs: 2:6\nlabel_smoothing: 0:0.2\nlr: {low: 1e-5, high: 1e-2, log: true}\n"
                    "weight_decay: {low: 0, high: 0.1, log: false}\nbatch_size: [16, 32]\noptimizer: adam\n")
    space = parse_space(load_space_file(path), str(path))
    assert (space["epochs"].low, space["epochs"].high) == (2, 6)
    assert (space["label_smoothing"].low, space["label_smoothing"].high) == (0.0, 0.2)
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-5, 1e-2, True)
    assert space["weight_decay"].log is False
    assert space["batch_size"].choices == (16, 32) and space["optimizer"].fixed
