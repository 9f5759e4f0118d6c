"""One entry point from a dataset spec to train/val/test splits.

Specs:

* ``digits`` / ``digits:5-9`` / ``digits:0,2,4``: scikit-learn's digits, optionally a
  class subset relabelled 0..k-1 (class names stay the digits, ``'5'``..``'9'``).
* ``lfw``: scikit-image's ``lfw_subset`` (face / not_face).
* ``tfds:NAME``: a prepared TensorFlow Datasets dataset (:mod:`jaxft.data.tfds_source`).
* anything else: a folder in ImageFolder layout (:mod:`jaxft.data.folder`); a folder named
  like a built-in is written with its path (``./digits``).

Built-ins have no test split; val is carved from all samples with the seeded stratified
rule of :func:`jaxft.data.split.stratified_split` (keys: the sample's index in the
package's own order), so ``digits`` with seed 0 splits the same way on every machine.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from jaxft.data import builtin
from jaxft.data.folder import open_folder
from jaxft.data.split import ArrayStore, DataError, DatasetSplits, Split, carve_val, check_trainable
from jaxft.data.tfds_source import open_tfds

TFDS_PREFIX = "tfds:"


def parse_digit_classes(arg: str) -> list[int]:
    """``'5-9'`` -> [5, 6, 7, 8, 9]; ``'0,2,4'`` -> [0, 2, 4]; ranges and lists may mix."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in arg.split(","))):
        match = re.fullmatch(r"(\d)(?:-(\d))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise DataError(f"digits:{arg}: {part!r} is not a digit or a range such as 5-9")
        lo = int(match.group(1))
        classes.extend(range(lo, int(match.group(2) or lo) + 1))
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"digits:{arg}: list each digit once, e.g. digits:5-9 or digits:0,2,4")
    return sorted(classes)


def open_builtin(spec: str, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """``digits[:CLASSES]`` or ``lfw`` as splits (see the module doc)."""
    name, _, arg = spec.partition(":")
    if name == "digits":
        images, labels, names = builtin.digits(parse_digit_classes(arg) if arg else None)
    elif name == "lfw" and not arg:
        images, labels, names = builtin.lfw()
    else:
        raise DataError(f"unknown built-in dataset {spec!r}; choose digits, digits:5-9 (a class subset) or lfw")
    store = ArrayStore(images)
    everything = Split(store, np.arange(len(labels)), labels, tuple(names), "all")
    train, val = carve_val(everything, val_fraction, seed, everything.keys.tolist())
    return DatasetSplits(train, val, None, tuple(names), spec)


def open_dataset(spec: str, *, data_dir: Optional[str] = None, val_fraction: float = 0.2,
                 seed: int = 0) -> DatasetSplits:
    """Train/val/test splits for ``spec`` (see the module doc), checked to be trainable.

    ``data_dir``: where TFDS datasets are prepared (TFDS's default otherwise).
    ``val_fraction`` and ``seed`` only matter where val is carved from train."""
    spec = spec.strip()
    if spec.startswith(TFDS_PREFIX):
        name = spec[len(TFDS_PREFIX):]
        if not name:
            raise DataError("tfds: needs a dataset name, e.g. tfds:cats_vs_dogs")
        return check_trainable(open_tfds(name, data_dir, val_fraction, seed))
    if spec.partition(":")[0] in builtin.BUILTINS:  # a folder of that name: write ./digits
        return check_trainable(open_builtin(spec, val_fraction, seed))
    if not os.path.exists(os.path.expanduser(spec)) and not re.search(r"[/\\~.]", spec):
        raise DataError(f"unknown dataset {spec!r}: not an existing folder, not a built-in "
                        f"({', '.join(builtin.BUILTINS)}, digits:5-9) and not tfds:NAME")
    return check_trainable(open_folder(spec, val_fraction, seed),
                           hint=f" (one sub-folder per class, e.g. {spec}/cat/ and {spec}/dog/)")
