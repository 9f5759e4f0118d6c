"""What a run writes for people: metrics.jsonl, summary.json, plots, comparison tables."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxft.rundir import atomic_write


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, Optional[float]]:
    totals = matrix.sum(axis=1)
    return {name: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(classes)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    """A PNG written atomically (a kill mid-write leaves the previous plot), then the figure closed."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        _pyplot().close(fig)


def plot_curves(epochs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    x = [e["epoch"] for e in epochs]
    for split, style in (("train", "-o"), ("val", "-s")):
        if any(f"{split}_loss" in e for e in epochs):
            ax_loss.plot(x, [e.get(f"{split}_loss", math.nan) for e in epochs], style, label=split)
            ax_acc.plot(x, [e.get(f"{split}_accuracy", math.nan) for e in epochs], style, label=split)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "confusion matrix") -> Path:
    plt = _pyplot()
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def write_comparison(headers: Sequence[str], rows: Sequence[Sequence[Any]], out_dir: Path,
                     value_column: str) -> dict[str, Path]:
    """comparison.md, comparison.csv and a bar plot of ``value_column`` per row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = atomic_write(out_dir / "comparison.md", lambda tmp: tmp.write_text(markdown_table(headers, rows) + "\n"))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)

    csv_path = atomic_write(out_dir / "comparison.csv", write_csv)
    plt = _pyplot()
    col = list(headers).index(value_column)
    names, values = [str(r[0]) for r in rows], [float(r[col]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    ax.bar(names, values, color="tab:blue")
    ax.set_ylabel(value_column)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    plot = _save_figure(fig, out_dir / "comparison.png")
    return {"markdown": md, "csv": csv_path, "plot": plot}
