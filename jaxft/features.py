"""Backbone features computed once per split, so the ``head`` strategy trains on arrays.

With a frozen backbone and deterministic inputs, every epoch would push the same images
through the same backbone; computing ``model.apply(variables, x, train=False,
pre_logits=True)`` once and training :class:`jaxft.models.head.LinearHead` on the result
gives the same training for a fraction of the work. :func:`feature_cache_decision` says
when that holds. Features are cached as ``.npz`` under ``<jaxft cache dir>/features/``,
keyed by everything that changes them: the backbone's variables (the classifier's own
parameters excluded: they do not touch the features), the model's configuration, the
transform and the split's data fingerprint.

Running the backbone is model work, done here beside the engine (the data floor only loads
images). In a multi-host job every process loads and decodes only its rows of each batch,
the backbone runs over the devices of all processes, and every process gets the features of
the whole split: the head then trains on global batches as any other model does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxft.data.pipeline import Transform, close_iterator, eval_loader
from jaxft.data.split import ArrayStore, Split
from jaxft.distributed import any_process, batch_share
from jaxft.engine import data_mesh, pad_batch, replicate, shard_batch
from jaxft.freeze import Strategy

log = logging.getLogger("jaxft.data")

AUGMENT_REASON = "random augmentation changes every epoch's inputs, so features cannot be reused"


def feature_cache_decision(model: nn.Module, strategy: Strategy, *, augment: bool,
                           bn_policy: str = "running") -> tuple[bool, str]:
    """(whether cached features train the same head as the full model would, and why)."""
    if strategy.spec != "head":
        return False, f"strategy {strategy.spec} trains backbone layers, so their features change every step"
    if augment:
        return False, AUGMENT_REASON
    if bn_policy != "running":
        return False, (f"BatchNorm policy {bn_policy!r} normalises with batch statistics while training, so a "
                       f"sample's features depend on the rest of its batch")
    if getattr(model, "dropout", 0.0):
        return False, (f"the model applies dropout ({model.dropout}) to the features its classifier reads, so "
                       f"training features are random; build it with dropout=0 to cache them")
    return True, "the backbone is frozen and the inputs are deterministic: features are computed once per split"


def _tree_digest(digest: Any, tree: Mapping[str, Any]) -> None:
    for path, leaf in sorted(traverse_util.flatten_dict(dict(tree), sep="/").items()):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{path}:{array.dtype}:{array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).data)


def feature_key(model: nn.Module, variables: Mapping[str, Any], transform: Transform, split: Split) -> str:
    """A digest of everything the features of ``split`` depend on (see the module doc)."""
    digest = hashlib.sha256(f"{repr(model)}\n{repr(transform)}\n{split.fingerprint()}\n".encode())
    for collection, tree in sorted(variables.items()):
        digest.update(f"[{collection}]\n".encode())
        _tree_digest(digest, {k: v for k, v in tree.items() if k != model.head_name})
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Features:
    """Backbone features of one split: float32 (N, F) and int32 labels."""

    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    key: str
    from_cache: bool

    def as_split(self, name: str) -> Split:
        """The features as a :class:`Split`, for ``train_loader(split, None, ...)``."""
        return Split(ArrayStore(self.features), np.arange(len(self.labels)), self.labels.astype(np.int64),
                     self.classes, name)


def default_feature_dir() -> Path:
    from jaxft.runtime import cache_dir

    return cache_dir() / "features"


def _save(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
            np.savez(tmp, features=features, labels=labels)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.warning("could not cache features at %s (%s); they will be computed again next time", path, exc)


@functools.lru_cache(maxsize=8)
def _pre_logits_fn(model: nn.Module, mesh: jax.sharding.Mesh):
    # One jitted function per model and mesh (modules hash by configuration), so train, val and
    # test splits share its compilation. The features of the whole batch come back on every device.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda variables, batch: (model.apply(variables, batch["image"], train=False, pre_logits=True),
                                             batch["label"], batch["mask"]), out_shardings=replicated)


def _load_cached(path: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    try:
        with np.load(path) as cached:
            return cached["features"], cached["labels"]
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: compute


def extract_features(model: nn.Module, variables: Mapping[str, Any], split: Split, transform: Transform, *,
                     batch_size: int = 64, cache_dir: Optional[Path] = None, num_workers: int = 0,
                     mesh: Optional[jax.sharding.Mesh] = None) -> Features:
    """``pre_logits`` features of every sample of ``split``, from the cache when present.

    ``transform`` must be deterministic (an evaluation transform). Batches are split over
    ``mesh`` (every device by default) and every one is padded to ``batch_size``, so the
    jitted backbone compiles once. In a multi-host job the cache is used only when every
    process finds it (the processes compute together or not at all), and every process writes
    it: caches are per host (on a cache shared by them, each replaces the file with the same one)."""
    if transform.random:
        raise ValueError(f"features can only be cached for a deterministic transform: {AUGMENT_REASON}")
    key = feature_key(model, variables, transform, split)
    path = (cache_dir or default_feature_dir()) / f"{key}.npz"
    cached = _load_cached(path)
    if not any_process(cached is None):
        return Features(*cached, split.classes, key, from_cache=True)

    mesh = mesh or data_mesh()
    share = batch_share(mesh)
    forward = _pre_logits_fn(model, mesh)
    on_mesh = replicate(variables, mesh)
    block = -(-batch_size // share.multiple) * share.multiple // share.count  # this process's rows of a batch
    chunks, labels = [], []
    batches = iter(eval_loader(split, transform, block * share.count, num_workers=num_workers, share=share))
    try:
        for batch in batches:
            # the last, smaller batch padded too: each process's block ends in its padding, and the
            # blocks follow each other in the order of the split
            padded, _ = pad_batch(batch, block)
            features, batch_labels, mask = (np.asarray(x) for x in forward(on_mesh, shard_batch(padded, mesh)))
            chunks.append(features[mask > 0])
            labels.append(batch_labels[mask > 0])
    finally:
        close_iterator(batches)
    features, labels = np.concatenate(chunks).astype(np.float32), np.concatenate(labels).astype(np.int32)
    _save(path, features, labels)
    return Features(features, labels, split.classes, key, from_cache=False)
