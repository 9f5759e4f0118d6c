"""TFDS sources under ``tfds.testing.mock_data``: random access without TensorFlow.

The mock generates examples from the real dataset's feature spec (fashion_mnist: 28x28x1
grey, cats_vs_dogs: variable-size RGB), through the same ``tfds.data_source`` call jaxft
makes, and needs no TensorFlow. Without metadata the mock knows no split names; one test
writes real ``dataset_info.json`` metadata so the ``test`` split is found as in a prepared
dataset.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxft.data import DataError, eval_loader, open_dataset, train_loader, transforms_for  # noqa: E402
from jaxft.weights import Preprocessing  # noqa: E402


@pytest.fixture(autouse=True)
def jaxft_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "jaxft_cache"))


def test_fashion_mnist_grey_becomes_rgb_without_tensorflow():
    with tfds.testing.mock_data(num_examples=60):
        splits = open_dataset("tfds:fashion_mnist", seed=0)
        image, label = splits.train[0]
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
        assert splits.classes[:2] == ("T-shirt/top", "Trouser") and len(splits.classes) == 10
        assert len(splits.train) + len(splits.val) == 60 and splits.test is None
        assert set(splits.train.keys).isdisjoint(splits.val.keys)
        train_tf, eval_tf = transforms_for(Preprocessing(), image_size=16)
        batch = next(iter(train_loader(splits.train, train_tf, 8, seed=0)))
        assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].dtype == np.int32
        again = open_dataset("tfds:fashion_mnist", seed=0)  # labels now come from the cache
        assert np.array_equal(again.val.keys, splits.val.keys)
    assert "tensorflow" not in sys.modules


def test_cats_vs_dogs_rgb_of_any_size():
    with tfds.testing.mock_data(num_examples=30):
        splits = open_dataset("tfds:cats_vs_dogs")
        assert splits.classes == ("cat", "dog")
        shapes = {splits.train[i][0].shape for i in range(len(splits.train))}
        assert len(shapes) > 1 and all(s[2] == 3 for s in shapes)  # variable-size photographs
        counts = {k: splits.train.class_counts()[k] + splits.val.class_counts()[k] for k in splits.classes}
        for name, count in splits.val.class_counts().items():
            assert count == round(0.2 * counts[name])  # stratified
        _, eval_tf = transforms_for(Preprocessing(), image_size=24)
        batches = list(eval_loader(splits.val, eval_tf, 4))
        assert sum(int(b["mask"].sum()) for b in batches) == len(splits.val)
        assert {len(b["label"]) for b in batches} == {4}  # the last batch padded (masked) to the full size
    assert "tensorflow" not in sys.modules


def test_test_split_found_from_metadata(tmp_path):
    builder = tfds.builder("fashion_mnist", data_dir=tmp_path)
    info = builder.info
    info.set_file_format("array_record", override=True)
    info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
        for name, n in (("train", 40), ("test", 40))]))
    version_dir = tmp_path / "fashion_mnist" / str(info.version)
    version_dir.mkdir(parents=True)
    info.write_to_directory(version_dir)
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
        splits = open_dataset("tfds:fashion_mnist")
        assert splits.test is not None and len(splits.test) == 40
        assert len(splits.train) + len(splits.val) == 40
    assert "tensorflow" not in sys.modules


def test_unprepared_and_unknown_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DataError) as info:
        open_dataset("tfds:fashion_mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert f"tfds build fashion_mnist --data_dir={tmp_path} --file_format=array_record" in message
    with pytest.raises(DataError, match="no dataset of that name"):
        open_dataset("tfds:fashon_mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="needs a dataset name"):
        open_dataset("tfds:")
    assert "tensorflow" not in sys.modules
