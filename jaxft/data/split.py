"""What every source returns: random-access splits of (image, label), and the seeded split rule.

A :class:`Split` is a store (arrays in memory, files on disk, a TFDS data source) plus the
keys and labels of the samples it holds, so taking a subset copies no images. Splits pickle
cheaply, which grain's worker processes need.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be opened or used as asked; the message names what and what to do."""


class ImageStore(Protocol):
    """Random access to the images of one source, by integer key."""

    def image(self, key: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""

    def fingerprint(self) -> str:
        """Changes whenever the stored images may have changed (feeds cache keys)."""


@dataclass(frozen=True, eq=False)
class ArrayStore:
    """Images already decoded in memory: a uint8 (N, H, W, 3) array."""

    images: np.ndarray

    def image(self, key: int) -> np.ndarray:
        return self.images[key]

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).data).hexdigest()


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``split[i] -> (uint8 (H, W, 3) RGB array, int label)``."""

    store: ImageStore
    keys: np.ndarray  # store keys of this split's samples, in order
    labels: np.ndarray  # int64 label of each sample
    classes: tuple[str, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.store.image(int(self.keys[index])), int(self.labels[index])

    def class_counts(self) -> dict[str, int]:
        """Samples per class, every class listed (0 when absent)."""
        counts = Counter(self.labels.tolist())
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def subset(self, indices: Sequence[int] | np.ndarray, name: str) -> "Split":
        indices = np.asarray(indices, np.int64)
        return Split(self.store, self.keys[indices], self.labels[indices], self.classes, name)

    def fingerprint(self) -> str:
        """A digest of the store's content and of which samples, with which labels, this split holds."""
        digest = hashlib.sha256(self.store.fingerprint().encode())
        digest.update(np.asarray(self.keys, np.int64).tobytes())
        digest.update(np.asarray(self.labels, np.int64).tobytes())
        digest.update("\0".join(self.classes).encode())
        return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """What :func:`jaxft.data.open_dataset` returns; ``test`` is None when the source has none."""

    train: Split
    val: Split
    test: Optional[Split]
    classes: tuple[str, ...]
    spec: str

    def summary(self) -> str:
        """One line per split with per-class counts, for logs."""
        lines = [f"{self.spec}: {len(self.classes)} classes"]
        for split in (self.train, self.val, self.test):
            if split is not None:
                counts = ", ".join(f"{k}={v}" for k, v in split.class_counts().items())
                lines.append(f"  {split.name}: {len(split)} ({counts})")
        return "\n".join(lines)


def stratified_split(labels: np.ndarray, keys: Sequence[object], val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: in every class, the ``round(val_fraction * n)`` samples whose
    ``blake2b(seed, key)`` is smallest go to val (at least one when the class has two or more,
    never the last one).

    Hashing each sample's key (a relative path, an index) rather than permuting the class
    keeps the split stable across runs and machines, and adding or removing files moves at
    most a sample or two per class."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = np.asarray(labels)
    order = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
                      for key in keys], dtype=np.uint64)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = len(members)
        n_val = min(max(round(val_fraction * n), 1), n - 1) if n > 1 else 0
        val.extend(members[np.argsort(order[members], kind="stable")[:n_val]])
    val_mask = np.zeros(len(labels), bool)
    val_mask[np.asarray(val, np.int64)] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def carve_val(train: Split, val_fraction: float, seed: int, sample_keys: Sequence[object]) -> tuple[Split, Split]:
    """Split ``train`` into (train, val) with :func:`stratified_split` over ``sample_keys``."""
    train_idx, val_idx = stratified_split(train.labels, sample_keys, val_fraction, seed)
    return train.subset(train_idx, "train"), train.subset(val_idx, "val")


def check_trainable(splits: DatasetSplits, hint: str = "") -> DatasetSplits:
    """Refuse datasets no classifier can be trained on, saying why (``hint``: what to do instead)."""
    if len(splits.classes) < 2:
        found = f"only class {splits.classes[0]!r}" if splits.classes else "no classes"
        raise DataError(f"{splits.spec}: found {found}; classification needs at least two classes{hint}")
    if len(splits.train) == 0:
        raise DataError(f"{splits.spec}: the training split is empty")
    if len(splits.val) == 0:
        raise DataError(f"{splits.spec}: the validation split is empty; a class needs at least two samples "
                        f"before one can be held out for validation")
    return splits
