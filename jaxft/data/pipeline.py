"""The grain input pipeline: shuffle, decode, transform and batch a split, in worker processes.

The pipeline is a ``grain.MapDataset`` of whole batches, random access by global batch
number: ``range(n) -> shuffle -> (epoch, sample) -> load + transform -> batch -> repeat``.
Every batch is a pure function of (seed, epoch, position), so

* each epoch is reshuffled (grain's shuffle folds the epoch into its seed) and batches
  never straddle two epochs;
* augmentation draws from ``np.random.default_rng((seed, epoch, sample index))``, so the
  images do not depend on the worker count or on which worker built them;
* the iterator's ``get_state()`` / ``set_state()`` (grain's, JSON-serialisable, what
  ``grain.checkpoint.CheckpointHandler`` saves) resumes at exactly the next batch.

Training drops the last partial batch of each epoch by default: a smaller batch would
compile the train step a second time and give BatchNorm a noisy small-batch estimate, and
reshuffling means a different remainder is left out each epoch. Evaluation keeps every
sample; its last batch may be smaller.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol, Sequence

import grain
import numpy as np

from jaxft.data.split import DataError, Split


class Transform(Protocol):
    """Maps one sample; ``random`` says whether it needs a seeded ``rng`` (else it gets None)."""

    random: ClassVar[bool]

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator]) -> np.ndarray: ...


def _shuffle_seed(seed: int) -> int:
    # grain reshuffles epoch e with (shuffle seed + e); hashing keeps seed s, epoch 1 from
    # replaying seed s+1, epoch 0.
    return int.from_bytes(hashlib.blake2b(f"shuffle:{seed}".encode(), digest_size=4).digest(), "big")


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18 reads an absl flag when starting workers with JAX imported, which fails unless
    absl parsed the command line (google/grain#1355, fixed after 0.2.18). Marking flags parsed
    makes every flag read its default; a later ``absl.app.run`` still parses ``argv``."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclass(frozen=True, eq=False)
class _LoadSample:
    """grain ``map_with_index`` transform: global position and sample index -> (array, label)."""

    split: Split
    transform: Optional[Transform]
    seed: int

    def __call__(self, position: int, index: int) -> tuple[np.ndarray, int]:
        image, label = self.split[index]
        if self.transform is None:
            return image, label
        epoch = position // len(self.split)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.transform.random else None
        return self.transform(image, rng), label


def _owned(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(value) for key, value in batch.items()}


def collate(samples: Sequence[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    """A list of (array, label) -> ``{'image': (N, ...), 'label': int32 (N,)}``, what the engine takes."""
    return {"image": np.stack([s[0] for s in samples]), "label": np.array([s[1] for s in samples], np.int32)}


@dataclass(frozen=True, eq=False)
class Loader:
    """Batches of one split for ``num_epochs`` epochs. ``iter(loader)`` is a grain iterator
    (``get_state``/``set_state``); ``loader.dataset[k]`` is batch ``k``, computed directly."""

    dataset: grain.MapDataset
    steps_per_epoch: int
    num_epochs: int
    num_workers: int = 0
    num_threads: int = 1
    prefetch: int = 2

    def __len__(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def epoch_of(self, step: int) -> int:
        """The epoch that global batch ``step`` belongs to."""
        return step // self.steps_per_epoch

    def __iter__(self) -> grain.DatasetIterator:
        # grain keeps at most prefetch_buffer_size threads busy
        read = grain.ReadOptions(num_threads=self.num_threads,
                                 prefetch_buffer_size=max(self.prefetch, self.num_threads))
        batches = self.dataset.to_iter_dataset(read)
        if self.num_workers:
            _allow_unparsed_absl_flags()
            workers = grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=self.prefetch)
            # Workers hand batches over in shared memory, released only when the array is
            # collected (and leaked if it is still referenced at exit); a copy frees it at once.
            batches = batches.mp_prefetch(workers).map(_owned)
        return iter(batches)


def make_loader(split: Split, transform: Optional[Transform], batch_size: int, *, shuffle: bool, seed: int = 0,
                num_epochs: int = 1, drop_remainder: bool = False, num_workers: int = 0, num_threads: int = 1,
                prefetch: int = 2) -> Loader:
    """The batches of ``split``. ``transform(image, rng)`` maps one sample (``transform.random``
    says whether it needs an rng; None passes samples through, e.g. cached features).

    ``num_workers`` processes (0: in this process) each build whole batches with
    ``num_threads`` threads, ``prefetch`` batches ahead."""
    n = len(split)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if num_epochs < 1:
        raise DataError(f"num_epochs must be at least 1, got {num_epochs}")
    if n == 0:
        raise DataError(f"the {split.name or 'given'} split is empty: nothing to load")
    if drop_remainder and n < batch_size:
        raise DataError(f"the {split.name} split has {n} samples, fewer than one batch of {batch_size}, and the last "
                        f"partial batch is dropped in training: lower the batch size to {n} or less")
    samples = grain.MapDataset.range(n)
    if shuffle:
        samples = samples.shuffle(seed=_shuffle_seed(seed))
    batches = samples.map_with_index(_LoadSample(split, transform, seed)).batch(
        batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    steps = len(batches)
    return Loader(batches.repeat(num_epochs), steps, num_epochs, num_workers, num_threads, prefetch)


def train_loader(split: Split, transform: Optional[Transform], batch_size: int, *, seed: int = 0, num_epochs: int = 1,
                 drop_remainder: bool = True, num_workers: int = 0, num_threads: int = 1,
                 prefetch: int = 2) -> Loader:
    """Shuffled, reshuffled every epoch, augmented per (seed, epoch, sample); see the module doc."""
    return make_loader(split, transform, batch_size, shuffle=True, seed=seed, num_epochs=num_epochs,
                       drop_remainder=drop_remainder, num_workers=num_workers, num_threads=num_threads,
                       prefetch=prefetch)


def eval_loader(split: Split, transform: Optional[Transform], batch_size: int, *, num_workers: int = 0,
                num_threads: int = 1, prefetch: int = 2) -> Loader:
    """One pass in order, every sample kept (the last batch may be smaller)."""
    return make_loader(split, transform, batch_size, shuffle=False, num_workers=num_workers,
                       num_threads=num_threads, prefetch=prefetch)
