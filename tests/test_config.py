"""Training configuration: files, flags, types and ranges; every mistake names the key."""

from __future__ import annotations

import re

import pytest

from jaxft.config import (CHANGEABLE_ON_RESUME, ConfigError, build_config, config_for_resume, config_to_dict,
                          load_config_file)


def test_file_values_are_typed_and_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 16\nlr: 1\nepochs: '3'\naugment: false\n")
    cfg = build_config(load_config_file(path), {"lr": 0.5}, str(path))
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.augment) == (16, 0.5, 3, False)
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("values,match", [
    ({"learning_rate": 0.1}, "unknown key.*'learning_rate'"),
    ({"epoch": 2}, "did you mean 'epochs'"),
    ({"epochs": "five"}, "epochs must be int"),
    ({"epochs": 2.5}, "epochs must be int"),
    ({"weights": None}, "weights needs a value"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"val_split": 1.0}, r"--val-split must be in \(0, 1\)"),
    ({"val_split": 0.0}, r"--val-split must be in \(0, 1\), got 0.0: it is the fraction"),
    ({"label_smoothing": 1.5}, "--label-smoothing"),
    ({"layer_decay": -0.5}, r"--layer-decay must be in \(0, 1\]"),
    ({"warmup_epochs": -1}, "--warmup-epochs"),
    ({"lr_mult": "layer4_(=0.1"}, "invalid regular expression"),
    ({"lr_mult": "fc/.*"}, "PATTERN=MULTIPLIER"),
    ({"arch": "resnet19"}, "Did you mean resnet18"),
])
def test_bad_values_name_the_key(values, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        build_config(values, {})


def test_unreadable_config_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad_yaml)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


def test_augmentation_defaults_off_for_tiny_builtins():
    assert build_config({"data": "digits:5-9"}, {}).augmentation() is False
    assert build_config({"data": "lfw"}, {}).augmentation() is False
    assert build_config({"data": "tfds:cats_vs_dogs"}, {}).augmentation() is True
    assert build_config({"data": "digits", "augment": True}, {}).augmentation() is True


def test_resume_takes_only_the_settings_that_can_change_mid_run(tmp_path):
    saved = config_to_dict(build_config({"epochs": 3, "lr": 0.01, "out": "runs/x"}, {}))
    cfg, changes = config_for_resume(saved, {}, {"lr": 0.001, "epochs": 5, "clip_grad": 1.0},
                                     "config.json")
    assert (cfg.lr, cfg.epochs, cfg.clip_grad) == (0.001, 5, 1.0)
    assert changes == {"lr": (0.01, 0.001), "epochs": (3, 5), "clip_grad": (None, 1.0)}
    same, none = config_for_resume(saved, {}, {"lr": 0.01, "batch_size": saved["batch_size"]}, "config.json")
    assert none == {} and config_to_dict(same) == saved  # restating the run's own values changes nothing
    path = tmp_path / "more.yaml"
    path.write_text("epochs: 4\n")
    assert config_for_resume(saved, load_config_file(path), {}, str(path))[1] == {"epochs": (3, 4)}
    for flags, needle in (({"batch_size": 64}, "cannot change --batch-size 64 (the run has 32)"),
                          ({"strategy": "head", "seed": 1}, "cannot change --strategy head (the run has full), "
                                                            "--seed 1 (the run has 0)"),
                          ({"out": "elsewhere"}, "cannot change --out elsewhere")):
        with pytest.raises(ConfigError, match=re.escape(needle) + ".*--resume may change: .*--lr, --clip-grad"):
            config_for_resume(saved, {}, flags, "config.json")
    older = {k: v for k, v in saved.items() if k != "label_smoothing"}  # written before that setting existed
    assert config_for_resume(older, {}, {"lr": 0.01}, "config.json")[1] == {}
    assert set(CHANGEABLE_ON_RESUME) == {"data_dir", "epochs", "lr", "clip_grad", "workers", "save_every", "keep",
                                         "log_every", "tensorboard", "wandb", "wandb_group"}
