"""Timing helpers shared by the benchmarks: side-by-side, interleaved, median of repeats.

The machine is shared and noisy, so contenders are timed alternately in one process and
reported as ratios; absolute numbers are for orientation only.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Sequence


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


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (printed and returned, so docs can paste it verbatim)."""
    from jaxft.report import markdown_table

    table = markdown_table(headers, rows)
    print(table)
    return table


def machine_line() -> str:
    import os

    import jax
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
