"""Timing helpers shared by the benchmarks: side-by-side, interleaved, median of repeats.

The machine is shared and noisy, so contenders are timed alternately in one process and
reported as ratios; absolute numbers are for orientation only.

Imports only the standard library at module level, so the scripts beside it can still
``from common import ...`` when run as files, and the package imports it as
``benchmarks.common``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def interleaved_medians(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, run round-robin so load drifts hit all alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def in_own_process(fn: Callable[..., T], *args: object, initializer: Callable[[], object] | None = None) -> T:
    """``fn(*args)`` run in a fresh interpreter (spawned: it inherits the environment and nothing
    else), its result returned here; ``initializer`` runs there first.

    The benchmark gives each row a process of its own, as a user's run has. Rows that shared one
    process moved each other: after rows with ``torch.compile``, jaxft's vgg16 ``partial:0.8`` step
    at 64 px took 1.3-1.6x as long as in a fresh process, its 390k page faults a step costing twice
    the kernel time, while torch's step moved by 5% (docs/benchmarks.md)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=initializer) as pool:
        return pool.submit(fn, *args).result()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (printed and returned, so docs can paste it verbatim)."""
    from jaxft.report import markdown_table

    table = markdown_table(headers, rows)
    print(table)
    return table


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is empty or just the ISA on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first GPU JAX can see, or None."""
    import jax

    try:
        return jax.devices("gpu")[0].device_kind
    except RuntimeError:  # no GPU backend in this jaxlib, or no GPU
        return None


def environment() -> dict[str, str]:
    """What a reader needs to reproduce or discount a number: machine, versions, XLA flags."""
    from importlib.metadata import version

    import torch

    import jaxft  # noqa: F401 - importing it sets the XLA flags jaxft runs with (jaxft.runtime)

    gpu = gpu_name()
    machine = f"{cpu_model()}, {os.cpu_count()} CPU cores" + (f", GPU {gpu}" if gpu else ", no GPU")
    packages = ("jax", "jaxlib", "flax", "optax", "torch", "torchvision")
    return {
        "machine": machine,
        "versions": ", ".join(f"{name} {version(name)}" for name in packages),
        "torch threads": str(torch.get_num_threads()),
        # Other processes skew the ratios (torch's OpenMP threads suffer most from oversubscribed
        # cores), so the reader should know how busy the machine was.
        "load average at start": f"{os.getloadavg()[0]:.1f} (1 min, {os.cpu_count()} cores)",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS") or "(not set)",
    }


def machine_line() -> str:
    """One line for a script's table header."""
    env = environment()
    return f"{env['machine']}; {env['versions']}; torch threads {env['torch threads']}"
