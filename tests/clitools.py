"""Running jaxft's command lines as a user does, and interrupting them on cue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from jaxft.runtime import available_cores

# the command-line tools split the CPU into two devices only where there are two cores
TWO_CORES = pytest.mark.skipif(available_cores() < 2, reason="the CPU is split only with two cores or more")


def cli(module: str, *args, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def start_training(*args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxft.train", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> list[int]:
    """Steps in the run's metrics.jsonl so far (a line being written is skipped)."""
    path = run / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step":
            steps.append(record["step"])
    return steps


def saved_steps(run: Path) -> list[int]:
    """Steps of the run's complete orbax checkpoints (orbax renames a finished save to its step)."""
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int = signal.SIGKILL,
                   timeout: float = 300) -> tuple[int, str]:
    """Send ``sig`` to ``proc`` as soon as ``ready()``; returns (exit code, stderr). Fails if the
    process ended or the moment never came, so a test cannot pass without the interruption."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be interrupted: " \
                                    f"{proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the moment to interrupt never came"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def progress_at(run: Path, step: int) -> dict:
    from jaxft.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(run / "checkpoints", read_only=True)
    try:
        return ckpts.progress(step)
    finally:
        ckpts.close()


def assert_same_result(got: dict, expected: dict) -> None:
    """Two summary.json files describe the same training: every metric equal, bit for bit."""
    for key in ("best_epoch", "steps", "epochs", "parameters", "before_training"):
        assert got[key] == expected[key], key
    for split in ("train", "val"):
        assert got[split]["loss"] == expected[split]["loss"], split
        assert got[split]["accuracy"] == expected[split]["accuracy"], split
    assert got["val"]["confusion_matrix"] == expected["val"]["confusion_matrix"]


def device_probe(script: str, *args, timeout: int = 120, **env) -> dict:
    """The JSON last printed by ``script`` in a fresh CPU-only interpreter, with no device count of
    the user's unless ``env`` sets one."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env={**environ, "JAX_PLATFORMS": "cpu",
                          **env}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
