"""The grain input pipeline: shuffle, decode, transform and batch a split, in worker processes.

The pipeline is a ``grain.MapDataset`` of whole batches, random access by global batch
number ``k``: batch ``k mod steps`` of epoch ``k div steps``, its samples taken from the
epoch's order (``range(n) -> shuffle``), loaded, transformed and collated. Every batch is a
pure function of (seed, epoch, position), so

* each epoch is reshuffled (grain's shuffle folds the epoch into its seed) and batches
  never straddle two epochs;
* augmentation draws from ``np.random.default_rng((seed, epoch, sample index))``, so the
  images do not depend on the worker count, on which worker built them, or on which
  process of a multi-host job loads them;
* each process loads only its own rows of every batch (``BatchShare``), padded as one
  process pads the whole batch;
* the iterator's ``get_state()`` / ``set_state()`` (grain's, JSON-serialisable, what
  ``grain.checkpoint.CheckpointHandler`` saves) resumes at exactly the next batch.

Training drops the last partial batch of each epoch by default: a smaller batch would
compile the train step a second time and give BatchNorm a noisy small-batch estimate, and
reshuffling means a different remainder is left out each epoch. Evaluation keeps every
sample; its last batch is padded to the full batch size with masked copies (mask 0), so the
eval step is compiled for one shape, not two.
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


@dataclass(frozen=True)
class BatchShare:
    """Which rows of every global batch this process loads.

    A global batch of ``size`` samples is padded with masked samples to a multiple of
    ``multiple`` (the number of devices it is split over) and cut into ``count`` equal blocks
    of consecutive rows, one per process; this process loads block ``index``. One process
    (``count=1``) loads the whole padded batch. Every process pads the same way, so the
    batch the devices see is the same however many processes load it."""

    multiple: int = 1
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.multiple % self.count or not 0 <= self.index < self.count:
            raise ValueError(f"{self}: every process needs the same number of devices, and 0 <= index < count")

    def rows(self, size: int) -> tuple[int, int]:
        """(first, end) rows of this process's block of a global batch of ``size`` samples,
        counted in the padded batch: rows from ``size`` on are padding."""
        per_process = -(-size // self.multiple) * self.multiple // self.count
        return self.index * per_process, (self.index + 1) * per_process

    def every_device_real(self, real: int, size: int) -> bool:
        """Whether a batch of ``size`` rows, ``real`` of them samples, gives every device (hence
        every process) at least one real row: the last device's rows start before the padding."""
        per_device = -(-size // self.multiple)
        return (self.multiple - 1) * per_device < real


@dataclass(frozen=True, eq=False)
class _LoadBatch:
    """grain ``map``: global batch number -> this process's rows of that batch (see BatchShare).

    Batch ``k`` holds the samples at positions ``epoch * n + start ..`` of the (reshuffled every
    epoch) order; only this process's rows are read, decoded and transformed."""

    split: Split
    transform: Optional[Transform]
    seed: int
    order: Optional[grain.MapDataset]  # shuffled sample indices, epoch-aware (None: in order)
    batch_size: int
    steps_per_epoch: int
    share: BatchShare
    pad_last: bool = False  # pad a smaller last batch to batch_size (masked), see __call__

    def load(self, position: int) -> tuple[np.ndarray, int]:
        n = len(self.split)
        index = self.order[position] if self.order is not None else position % n
        image, label = self.split[index]
        if self.transform is None:
            return image, label
        rng = np.random.default_rng((self.seed, position // n, index)) if self.transform.random else None
        return self.transform(image, rng), label

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        n = len(self.split)
        epoch, j = divmod(k, self.steps_per_epoch)
        start = j * self.batch_size
        size = min(self.batch_size, n - start)  # real samples; rows from size on are padding
        # pad_last: the whole batch size, for one compiled shape, unless a device would get padding
        # only: a process of a multi-host job would then decode a sample not its own. (Decided by
        # devices, not processes, so 2 processes x 1 device pad as 1 process x 2 devices do.)
        full = self.pad_last and self.share.every_device_real(size, self.batch_size)
        first, end = self.share.rows(self.batch_size if full else size)
        real = range(first, min(end, size))
        # a block of padding only (a small last batch over many processes) still needs a sample's shape
        samples = [self.load(epoch * n + start + r) for r in (real or range(1))]
        batch = collate(samples)
        batch["mask"] = np.ones(len(batch["label"]), np.float32) if real else np.zeros(1, np.float32)
        pad = (end - first) - len(batch["label"])
        if pad:
            batch = {key: np.concatenate([value, np.repeat(value[:1], pad, axis=0)]) for key, value in batch.items()}
            batch["mask"][len(real):] = 0.0
        return batch


def close_iterator(iterator: grain.DatasetIterator) -> None:
    """Close a loader's iterator (its worker processes and grain's threads) and free the shared
    memory of the batches its workers handed over, waiting until it is freed.

    grain unlinks a batch's shared memory when its array is collected, on a background thread;
    arrays caught in reference cycles inside grain's iterators wait for the garbage collector.
    Left to the interpreter's exit, a few are never unlinked, and multiprocessing's resource
    tracker reported them as leaked at the end of every run with workers."""
    import gc

    from grain.multiprocessing import SharedMemoryArray

    iterator.close()
    gc.collect()
    deleter = getattr(SharedMemoryArray, "_del_thread_pool", None)  # grain 0.2: one thread, in order
    if deleter is not None:
        deleter.apply(int)  # returns once every deletion queued before it has run


def start_workers(iterator: grain.DatasetIterator) -> None:
    """Start a loader's worker processes now rather than at the first batch (without workers,
    grain's threads start loading the first batches). A worker is a spawned process that
    imports jaxft before its first batch (~1 s each on two cores), and grain starts each one only
    when the batches reach its turn, so without this the first steps of a run waited for them
    one after another. Call it after any ``set_state``: the workers start from the iterator's
    position."""
    # grain 0.2.18's mp_prefetch creates its per-worker iterators lazily, and get_state() is what
    # creates them before the first batch (tests/test_data.py checks that both workers start)
    iterator.get_state()
    iterator.start_prefetch()


def _owned(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(value) for key, value in batch.items()}


def collate(samples: Sequence[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    """A list of (array, label) -> ``{'image': (N, ...), 'label': int32 (N,)}``; the loader adds
    ``'mask'`` (0 for padding): what the engine takes."""
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
                prefetch: int = 2, share: BatchShare = BatchShare(), pad_last: bool = False) -> Loader:
    """The batches of ``split``. ``transform(image, rng)`` maps one sample (``transform.random``
    says whether it needs an rng; None passes samples through, e.g. cached features).
    ``pad_last``: a smaller last batch (kept when not ``drop_remainder``) is padded to
    ``batch_size`` with masked samples.

    ``num_workers`` processes (0: in this process) each build whole batches with
    ``num_threads`` threads, ``prefetch`` batches ahead. ``share``: the rows of each global
    batch this process loads, padded for the devices (the whole batch by default)."""
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
    order = grain.MapDataset.range(n).shuffle(seed=_shuffle_seed(seed)) if shuffle else None
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    batches = grain.MapDataset.range(steps * num_epochs).map(
        _LoadBatch(split, transform, seed, order, batch_size, steps, share, pad_last))
    return Loader(batches, steps, num_epochs, num_workers, num_threads, prefetch)


def train_loader(split: Split, transform: Optional[Transform], batch_size: int, *, seed: int = 0, num_epochs: int = 1,
                 drop_remainder: bool = True, num_workers: int = 0, num_threads: int = 1,
                 prefetch: int = 2, share: BatchShare = BatchShare()) -> Loader:
    """Shuffled, reshuffled every epoch, augmented per (seed, epoch, sample); see the module doc."""
    return make_loader(split, transform, batch_size, shuffle=True, seed=seed, num_epochs=num_epochs,
                       drop_remainder=drop_remainder, num_workers=num_workers, num_threads=num_threads,
                       prefetch=prefetch, share=share)


def eval_loader(split: Split, transform: Optional[Transform], batch_size: int, *, num_workers: int = 0,
                num_threads: int = 1, prefetch: int = 2, share: BatchShare = BatchShare()) -> Loader:
    """One pass in order, every sample kept; the last batch is padded to ``batch_size`` with
    masked samples (``mask`` 0), so every batch has one shape and the eval step compiles once
    (unless a device would get padding only)."""
    return make_loader(split, transform, batch_size, shuffle=False, num_workers=num_workers,
                       num_threads=num_threads, prefetch=prefetch, share=share, pad_last=True)
