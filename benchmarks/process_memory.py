"""Run a command and measure its host memory: the process's own peak and its process tree's.

A training job is more than its main process: both frameworks' loaders run worker
processes (torch forks them, grain spawns them, each importing what the main module
imports). So two figures:

* the main process's peak resident set: the kernel's high-water mark (``VmHWM`` in
  ``/proc/<pid>/status``), which only grows, read at every sample, so all that can be
  missed is growth in the last interval before the process exits. (Not ``ru_maxrss`` from
  ``os.wait4``: a child started by fork or vfork and exec inherits its parent's resident set
  at the fork as its high-water mark, here the parent's JAX and torch.)
* the peak, over the same samples every ``interval`` seconds, of the proportional set size (PSS)
  summed over the process and all its descendants. PSS divides each shared page among the
  processes that map it, so forked workers sharing their parent's pages, and batches in
  shared memory, are counted once, not once per process. Sampled, so a spike shorter than
  the interval can be missed.

Sampling reads the target's memory summaries four times a second (4.7 ms a sample measured on
a process holding JAX: about 2% of a core), which both frameworks' jobs pay alike.

Both read ``/proc`` (Linux; ``smaps_rollup`` since 4.14) and are None where it cannot be read.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PROC = Path("/proc")


@dataclass
class Watched:
    returncode: int
    wall_seconds: float
    peak_rss_mib: float | None  # the main process's high-water mark
    peak_tree_pss_mib: float | None  # the main process and its descendants, sampled


def _children(pid: int) -> list[int]:
    children = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:  # the process ended
        return children
    for task in tasks:
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # this thread ended between listing and reading
            pass
    return children


def _tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def _field_kib(path: Path, name: str) -> int | None:
    """The ``name:  N kB`` line of a /proc file, or None if it cannot be read (or the process ended)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _pss_kib(pid: int) -> int | None:
    return _field_kib(PROC / str(pid) / "smaps_rollup", "Pss")


def high_water_mib(pid: int) -> float | None:
    """The peak resident set of ``pid`` so far, in MiB."""
    kib = _field_kib(PROC / str(pid) / "status", "VmHWM")
    return None if kib is None else kib / 1024


def tree_pss_mib(pid: int) -> float | None:
    """PSS of ``pid`` and its descendants now, in MiB; None if ``pid``'s own cannot be read."""
    tree = _tree(pid)
    own = _pss_kib(tree[0])
    if own is None:
        return None
    return (own + sum(_pss_kib(child) or 0 for child in tree[1:])) / 1024  # a child may end mid-read


def run_watched(cmd: Sequence[str], stdout: IO, env: dict, interval: float = 0.25) -> Watched:
    """Run ``cmd`` to completion (stderr joined to ``stdout``), sampling its memory."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=stdout, stderr=subprocess.STDOUT, env=env)
    peak_rss = peak_pss = None
    try:
        while True:
            rss, pss = high_water_mib(proc.pid), tree_pss_mib(proc.pid)
            peak_rss = rss if rss is not None else peak_rss  # None once the process has ended
            if pss is not None:
                peak_pss = max(peak_pss or 0.0, pss)
            try:
                proc.wait(timeout=interval)  # returns as soon as it exits: the wall time stays exact
                break
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Watched(proc.returncode, time.perf_counter() - start, peak_rss, peak_pss)
