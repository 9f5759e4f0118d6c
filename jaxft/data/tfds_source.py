"""TensorFlow Datasets by name, read with ``tfds.data_source`` (random access, no TensorFlow).

``tfds.data_source`` reads the ArrayRecord files of a prepared dataset; preparing one
(downloading and converting) needs TensorFlow, once, on any machine. Splits: ``train``;
``validation`` when the dataset has one, else val is carved from train with the same
seeded stratified rule as folders; ``test`` when present. Split names come from the
dataset's metadata (``builder.info.splits``); when that is unknown, only ``train`` is used.
The first ``Image`` feature is the input and the first ``ClassLabel`` the target; greyscale
becomes RGB by repeating the channel, an alpha channel is dropped.

Stratifying needs every label; reading them decodes each example once, so the labels are
cached in ``<jaxft cache dir>/tfds_labels/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Optional

import numpy as np

from jaxft.data.split import DataError, DatasetSplits, Split, carve_val

log = logging.getLogger("jaxft.data")

def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError("tfds:NAME datasets need tensorflow-datasets: pip install 'jaxft[tfds]'") from exc
    return tfds


def _default_data_dir() -> str:
    from tensorflow_datasets.core import constants

    return os.fspath(constants.get_default_data_dir())


def prepare_command(name: str, data_dir: Optional[str]) -> str:
    """The commands that prepare ``name`` in the ArrayRecord format ``tfds.data_source`` reads."""
    target = data_dir or _default_data_dir()
    return (f"pip install tensorflow tensorflow-datasets && "
            f"tfds build {name} --data_dir={target} --file_format=array_record\n"
            f"  or: python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{target}', "
            f"file_format='array_record').download_and_prepare()\"")


class TfdsStore:
    """One TFDS split's data source; picklable (tfds data sources reopen their files)."""

    def __init__(self, source: Any, image_key: str, identity: str):
        self.source = source
        self.image_key = image_key
        self.identity = identity

    def image(self, key: int) -> np.ndarray:
        image = np.asarray(self.source[key][self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        return image[..., :3]  # RGBA: drop alpha, as folders do

    def fingerprint(self) -> str:
        return self.identity


def _feature_keys(features: Any, tfds: Any, name: str) -> tuple[str, str]:
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    label_keys = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not image_keys or not label_keys:
        found = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
        raise DataError(f"tfds:{name} is not an image classification dataset jaxft can read: it needs an Image "
                        f"and a ClassLabel feature, and has {found}")
    if np.dtype(features[image_keys[0]].np_dtype) != np.uint8:
        raise DataError(f"tfds:{name}: image feature {image_keys[0]!r} is {features[image_keys[0]].np_dtype}, "
                        f"jaxft reads 8-bit images only")
    return image_keys[0], label_keys[0]


def _labels(source: Any, label_key: str, identity: str) -> np.ndarray:
    """Every label of a split, from the cache or by one pass over the split."""
    from jaxft.runtime import cache_dir

    path = cache_dir() / "tfds_labels" / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.npy"
    try:
        labels = np.load(path)
        if len(labels) == len(source):
            return labels
    except (OSError, ValueError):
        pass
    n = len(source)
    log.info("reading the %d labels of %s once (cached in %s)", n, identity, path)
    labels = np.array([int(source[i][label_key]) for i in range(n)], np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, labels)
    except OSError as exc:
        log.warning("could not cache TFDS labels at %s (%s); they will be read again next time", path, exc)
    return labels


def open_tfds(name: str, data_dir: Optional[str] = None, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Splits of the prepared TFDS dataset ``name`` (``'cats_vs_dogs'``, ``'mnist:3.0.1'``)."""
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise DataError(f"tfds:{name}: TensorFlow Datasets has no dataset of that name; see "
                        f"https://www.tensorflow.org/datasets/catalog/overview for names") from exc
    info = builder.info
    image_key, label_key = _feature_keys(info.features, tfds, name)
    classes = tuple(info.features[label_key].names)
    known = set(info.splits)
    if not known:
        log.info("tfds:%s: split names unknown (no dataset_info.json); using 'train' only", name)
    wanted = {"train": "train", "val": "validation", "test": "test"}
    wanted = {role: split for role, split in wanted.items() if split in known or role == "train"}
    try:
        sources = tfds.data_source(name, split=list(wanted.values()), data_dir=data_dir, download=False)
    except Exception as exc:  # noqa: BLE001 - tfds raises assorted types for "not prepared" / wrong format
        where = data_dir or _default_data_dir()
        if builder.is_prepared():
            problem = (f"is prepared in {where} but not in the ArrayRecord format tfds.data_source reads "
                       f"({type(exc).__name__}: {exc}). Prepare it again with --file_format=array_record")
        else:
            problem = f"is not prepared in {where} (jaxft never downloads at training time)"
        raise DataError(f"tfds:{name} {problem}. Prepare it once with:\n  {prepare_command(name, data_dir)}\n"
                        f"then pass the same data_dir") from exc

    splits = {}
    for (role, split), source in zip(wanted.items(), sources):
        identity = f"tfds:{info.full_name}:{split}:{os.path.abspath(data_dir or _default_data_dir())}:{len(source)}"
        labels = _labels(source, label_key, identity)
        store = TfdsStore(source, image_key, identity)
        splits[role] = Split(store, np.arange(len(source)), labels, classes, role)
    if "val" not in splits:
        train = splits["train"]
        splits["train"], splits["val"] = carve_val(train, val_fraction, seed, train.keys.tolist())
    return DatasetSplits(splits["train"], splits["val"], splits.get("test"), classes, f"tfds:{name}")
