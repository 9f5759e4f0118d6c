"""Data: sources (folder, TFDS, offline built-ins), transforms and the grain pipeline.

    splits = open_dataset("digits:5-9")                  # or a folder, or "tfds:cats_vs_dogs"
    train_tf, eval_tf = transforms_for(preprocessing, image_size=64)
    train = train_loader(splits.train, train_tf, 64, seed=0, num_epochs=10, num_workers=4)
    for batch in train: engine.train_step(batch)         # {'image': f32 NHWC, 'label': i32}

See docs/data.md for the decisions (split rule, caching, worker determinism).
"""

from jaxft.data.pipeline import Loader, eval_loader, make_loader, train_loader
from jaxft.data.sources import open_dataset
from jaxft.data.split import DataError, DatasetSplits, Split
from jaxft.data.transforms import EvalTransform, TrainTransform, transforms_for

__all__ = [
    "DataError",
    "DatasetSplits",
    "EvalTransform",
    "Loader",
    "Split",
    "TrainTransform",
    "eval_loader",
    "make_loader",
    "open_dataset",
    "train_loader",
    "transforms_for",
]
