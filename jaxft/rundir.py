"""The run directory: what it holds, how to recognise one, and writes that a crash cannot tear.

A crash (SIGKILL, power loss) at any moment leaves each file either as it was or as it was
meant to be, never half written: JSON files and plots are written beside their target and
renamed over it, and ``best`` is a symbolic link swapped in one rename to a directory that is
complete before the link points to it. ``metrics.jsonl`` is appended (``report.MetricsLog``)
and read through :func:`read_jsonl`, which drops a last line a kill cut short; orbax writes
``checkpoints/`` its own atomic way. ``--overwrite`` empties a directory only when every entry
in it is one of these names, so a user's own folder is never taken for a run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

# What python -m jaxft.train writes at the top of a run directory.
RUN_FILES = ("config.json", "environment.json", "model.json", "metrics.jsonl", "summary.json",
             "log.txt", "wandb_run_id")  # log.txt: a jaxft.tune trial's log; wandb_run_id: --wandb
RUN_DIRS = ("checkpoints", "plots", "tensorboard", "wandb")  # the last two: --tensorboard, --wandb
BEST = "best"  # a link to best.N, the newest complete copy of the best model


class RunError(ValueError):
    """A directory that cannot be used as a run directory as asked; the message says why."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, flush it to disk and rename it
    over ``path``: readers see the old file or the new one, never part of one."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """``data`` as indented JSON, written atomically (numpy scalars and arrays as numbers and lists)."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short by a crash mid-append is dropped;
    a damaged line anywhere else is an error naming the file and the line."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by a kill during the append: the record it held is written again on resume
            raise RunError(f"{path}, line {number}, is not valid JSON; the file was edited or damaged") from None
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step`` (the checkpoint a run resumes from): the
    steps after it are trained and logged again."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))


class RunWriter:
    """Every write into a run directory goes through here. In a multi-host job process 0 alone
    writes (``active``); on the other processes each method returns without writing, so that
    the same training code runs on every process."""

    def __init__(self, run_dir: Path, active: bool = True):
        self.run_dir, self.active = Path(run_dir), active

    def json(self, name: str, data: Mapping[str, Any]) -> None:
        if self.active:
            write_json(self.run_dir / name, data)

    def file(self, name: str, write: Callable[[Path], Any]) -> None:
        """``write(path)`` for ``run_dir/name`` (a plot): it writes atomically itself."""
        if self.active:
            write(self.run_dir / name)

    def open_metrics(self) -> Any:
        """``metrics.jsonl`` opened for appending (``report.MetricsLog``); a log that keeps nothing elsewhere."""
        from jaxft.report import MetricsLog

        return MetricsLog(self.run_dir / "metrics.jsonl") if self.active else _NoLog()

    def truncate_metrics(self, last_step: int) -> None:
        if self.active:
            truncate_jsonl(self.run_dir / "metrics.jsonl", last_step)

    def best(self, write: Callable[[Path], Any]) -> None:
        """A new copy of the best model (:func:`replace_best`)."""
        if self.active:
            replace_best(self.run_dir, write)


class _NoLog:
    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# --- the best model ---------------------------------------------------------------------------------

def _best_versions(run_dir: Path) -> list[Path]:
    """The complete copies ``best.N`` (not a ``best.N.tmp`` a crash left half written)."""
    return [p for p in run_dir.glob(f"{BEST}.*") if re.fullmatch(rf"{BEST}\.\d+", p.name)]


def replace_best(run_dir: Path, write: Callable[[Path], Any]) -> Path:
    """Write a new copy of the best model with ``write(directory)`` and make ``run_dir/best``
    point to it in one atomic rename; older copies are removed afterwards."""
    run_dir = Path(run_dir)
    numbers = [int(p.name.split(".")[1]) for p in _best_versions(run_dir)]
    version = run_dir / f"{BEST}.{max(numbers, default=0) + 1}"
    staging = version.with_name(version.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    staging.rename(version)
    link, target = run_dir / f".{BEST}.link", run_dir / BEST
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)  # relative: the run directory can be moved or copied
    if target.is_dir() and not target.is_symlink():  # a run written before best became a link
        target.rename(run_dir / f"{BEST}.0")
    os.replace(link, target)
    for stale in run_dir.glob(f"{BEST}.*"):  # older copies and staging left by a crash
        if stale != version:
            shutil.rmtree(stale, ignore_errors=True)
    return target


# --- recognising and preparing run directories ------------------------------------------------------

def _is_run_entry(name: str) -> bool:
    if name in RUN_FILES or name in RUN_DIRS or name == BEST:
        return True
    if name.startswith(f"{BEST}.") or name.startswith(f".{BEST}."):
        return True  # best.N copies, and the staging names of a swap a crash interrupted
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write's temporary files


def foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` that python -m jaxft.train did not write."""
    return sorted(p.name for p in Path(path).iterdir() if not _is_run_entry(p.name))


def _holds_run_files(path: Path) -> bool:
    """A config.json with jaxft's keys, and at least one more of the files a run writes."""
    try:
        config = read_run_config(path)
    except RunError:
        return False
    from jaxft.config import CONFIG_FIELDS

    ours = {p.name for p in path.iterdir()} & (set(RUN_FILES) | set(RUN_DIRS) | {BEST})
    return {"arch", "strategy", "data"} <= config.keys() <= CONFIG_FIELDS.keys() and len(ours) >= 2


def is_run_dir(path: Path) -> bool:
    """A directory python -m jaxft.train made: a config.json with jaxft's keys, at least one other
    of its files, and nothing else."""
    path = Path(path)
    return path.is_dir() and not foreign_entries(path) and _holds_run_files(path)


def refuse_to_overwrite(path: Path) -> None:
    """Raise unless ``path`` is a jaxft run directory that ``--overwrite`` may empty."""
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        why = f"it holds files jaxft did not write ({shown})"
    elif not _holds_run_files(path):
        why = "it is not a jaxft run directory (no config.json of a jaxft run beside the files a run writes)"
    else:
        return
    raise RunError(f"--overwrite refuses to empty {path}: {why}; choose another --out, or move those files away")


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create ``path`` for a new run; an existing non-empty directory is emptied only when
    ``overwrite`` and it is a jaxft run directory (see :func:`is_run_dir`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a directory")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunError(f"--out {path} already holds files; pass --overwrite to replace them, --resume {path} "
                              f"to continue that run, or choose another --out")
        refuse_to_overwrite(path)
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to --out {path}: {exc.strerror or exc}") from None
    (path / "plots").mkdir(exist_ok=True)
    return path


def check_resumable(path: Path) -> None:
    if not path.is_dir():
        raise RunError(f"--resume {path}: no such directory")
    if not (path / "config.json").is_file() or not (path / "checkpoints").is_dir():
        raise RunError(f"--resume {path} is not a jaxft run directory (expected config.json and checkpoints/)")


def read_run_config(path: Path) -> dict[str, Any]:
    """The saved ``config.json`` of the run in ``path``, as a mapping."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{config_path} cannot be read as JSON ({exc}); it was edited or damaged") from None
    if not isinstance(config, dict):
        raise RunError(f"{config_path} must hold a mapping of settings, not {type(config).__name__}")
    return config
