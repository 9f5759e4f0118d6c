"""Cached backbone features for the head strategy: when they apply, cache hits and misses,
and a head trained on them takes the same step as the full model with a frozen backbone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxft.data import open_dataset, train_loader, transforms_for
from jaxft.features import AUGMENT_REASON, extract_features, feature_cache_decision
from jaxft.data.pipeline import collate
from jaxft.engine import Engine
from jaxft.freeze import parse_strategy
from jaxft.models import create_model
from jaxft.models.head import head_for
from jaxft.optim import OptimConfig
from jaxft.pretrained import init_variables
from jaxft.weights import Preprocessing

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def model_and_variables():
    model = create_model("resnet18", num_classes=5)
    return model, init_variables(model, seed=0, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def small_split():
    return open_dataset("digits:5-9").train.subset(np.arange(48), "train")


def test_cache_decision_names_the_reason(model_and_variables):
    model, _ = model_and_variables
    head = parse_strategy("head")
    assert feature_cache_decision(model, head, augment=False)[0]
    assert feature_cache_decision(model, head, augment=True) == (False, AUGMENT_REASON)
    assert AUGMENT_REASON == "random augmentation changes every epoch's inputs, so features cannot be reused"
    applies, reason = feature_cache_decision(model, parse_strategy("partial:0.5"), augment=False)
    assert not applies and "trains backbone layers" in reason
    applies, reason = feature_cache_decision(model, head, augment=False, bn_policy="torch")
    assert not applies and "batch statistics" in reason
    applies, reason = feature_cache_decision(create_model("vgg11", num_classes=5), head, augment=False)
    assert not applies and "dropout" in reason
    assert feature_cache_decision(create_model("vgg11", num_classes=5, dropout=0.0), head, augment=False)[0]


def test_cache_hits_and_is_invalidated_by_backbone_changes(model_and_variables, small_split, tmp_path):
    model, variables = model_and_variables
    _, eval_tf = transforms_for(Preprocessing(), image_size=IMAGE_SIZE)
    first = extract_features(model, variables, small_split, eval_tf, batch_size=20, cache_dir=tmp_path)
    assert not first.from_cache and first.features.shape == (48, 512) and first.features.dtype == np.float32
    assert np.array_equal(first.labels, small_split.labels)
    second = extract_features(model, variables, small_split, eval_tf, batch_size=20, cache_dir=tmp_path)
    assert second.from_cache and second.key == first.key and np.array_equal(second.features, first.features)

    # A new classifier does not touch the features: still a hit.
    new_head = jax.tree_util.tree_map(lambda x: x + 1.0, variables["params"]["fc"])
    same = extract_features(model, {**variables, "params": {**variables["params"], "fc": new_head}},
                            small_split, eval_tf, batch_size=20, cache_dir=tmp_path)
    assert same.from_cache

    stats = variables["batch_stats"]
    changed_stats = {**stats, "bn1": {**stats["bn1"], "mean": stats["bn1"]["mean"] + 0.5}}
    changed = extract_features(model, {**variables, "batch_stats": changed_stats}, small_split, eval_tf,
                               batch_size=20, cache_dir=tmp_path)
    assert not changed.from_cache and changed.key != first.key
    assert not np.allclose(changed.features, first.features)

    other_transform = transforms_for(Preprocessing(), image_size=IMAGE_SIZE + 8)[1]
    assert not extract_features(model, variables, small_split, other_transform, batch_size=20,
                                cache_dir=tmp_path).from_cache
    with pytest.raises(ValueError, match="random augmentation"):
        extract_features(model, variables, small_split, transforms_for(Preprocessing(), 32)[0], cache_dir=tmp_path)


def test_head_on_cached_features_steps_like_the_frozen_full_model(model_and_variables, small_split, tmp_path):
    model, variables = model_and_variables
    _, eval_tf = transforms_for(Preprocessing(), image_size=IMAGE_SIZE)
    features = extract_features(model, variables, small_split, eval_tf, batch_size=16, cache_dir=tmp_path)
    optim = OptimConfig("sgd", lr=0.01, momentum=0.0)

    loader = train_loader(features.as_split("train"), None, 16, seed=0, num_epochs=3)
    head = Engine(head_for(model, features.features.shape[1]),
                  {"params": {model.head_name: variables["params"][model.head_name]}}, parse_strategy("full"), optim)
    full = Engine(model, variables, parse_strategy("head"), optim)
    order = loader.dataset[0]  # the same samples, as images, for the full model
    first_ids = [int(np.flatnonzero((features.features == row).all(1))[0]) for row in order["image"]]
    images = collate([(eval_tf(small_split[i][0]), small_split[i][1]) for i in first_ids])
    head_metrics = head.train_step(order)
    full_metrics = full.train_step(images)
    np.testing.assert_allclose(head_metrics["loss_sum"], full_metrics["loss_sum"], rtol=1e-5)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(head.state.params["fc"][name], full.state.params["fc"][name], rtol=1e-4,
                                   atol=1e-6)

    losses = [float(head_metrics["loss_sum"])] + [float(head.train_step(loader.dataset[k])["loss_sum"])
                                                  for k in range(1, len(loader))]
    per_epoch = loader.steps_per_epoch
    assert sum(losses[-per_epoch:]) < sum(losses[:per_epoch])  # the head learns on cached features
