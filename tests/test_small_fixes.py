"""Small fixes with no better home: predict's class names (CLI, on a real photograph), the missing
weights sidecar as printed by the CLIs, the source checkpoint build leaving torch's global
settings alone, and the freeze description of partly trainable blocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import clitools

IMAGENET_NAMES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def cli(module: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    """The CLI with a cache and torch home of its own (no source checkpoint, no downloads)."""
    env = {**os.environ, "JAXFT_CACHE": str(tmp_path / "jaxft_cache"), "TORCH_HOME": str(tmp_path / "torch_home")}
    return clitools.cli(module, *args, env=env, timeout=300)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """scikit-image's astronaut, a real photograph, as a small PNG."""
    from PIL import Image
    from skimage import data as skdata

    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    Image.fromarray(skdata.astronaut()).resize((64, 64), Image.BILINEAR).save(path)
    return path


def save_resnet18(path: Path, num_classes: int, sidecar: dict | None = None) -> Path:
    torch.save(torchvision.models.resnet18(num_classes=num_classes).state_dict(), path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def sidecar_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "sidecar" in line and "ImageNet preprocessing" in line]


# --- predict: class names only where the weights bring them ----------------------------------------

def test_predict_untrained_model_shows_class_indices(photo, tmp_path):
    result = cli("jaxft.predict", photo, "--arch", "resnet18", "--weights", "none", "--top-k", "3", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 3 and all(re.fullmatch(r"\s+\d+\.\d\d%  class \d+", row) for row in rows), result.stdout
    assert not any(name in result.stdout for name in IMAGENET_NAMES)
    assert "untrained" in result.stderr and "Traceback" not in result.stderr


def test_predict_file_without_metadata_gets_no_imagenet_names(photo, tmp_path):
    weights = save_resnet18(tmp_path / "mine.pth", 1000)  # ImageNet-shaped, but nothing says it is ImageNet
    result = cli("jaxft.predict", photo, "--arch", "resnet18", "--weights", weights, "--top-k", "2", "--json",
                 tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    top = json.loads(result.stdout)[0]["top_k"]
    assert [row["class"] for row in top] == [None, None] and all(isinstance(row["index"], int) for row in top)
    [line] = sidecar_lines(result.stderr)  # said once, on one line
    assert str(weights) in line and str(tmp_path / "mine.json") in line
    assert "showing class indices" in result.stderr and "Traceback" not in result.stderr


def test_train_says_once_that_the_weights_file_has_no_sidecar(tmp_path):
    weights = save_resnet18(tmp_path / "mine.pth", 10)
    # a strategy that fails right after the weights are loaded: the run stops before training
    result = cli("jaxft.train", "--data", "digits:5-9", "--weights", weights, "--strategy", "regex:nomatch=trainable",
                 "--out", tmp_path / "run", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = sidecar_lines(result.stderr)
    for needle in (str(weights), f"no metadata sidecar {tmp_path / 'mine.json'}", "resize 256, center crop 224",
                   "mean [0.485, 0.456, 0.406]", "std [0.229, 0.224, 0.225]", '"image_size"'):
        assert needle in line


def test_predict_names_come_from_the_sidecar_and_must_fit(photo, tmp_path, capsys):
    from jaxft.predict import main

    weights = save_resnet18(tmp_path / "three.pth", 3, {"image_size": 32, "classes": ["ant", "bee", "cow"]})
    assert main([str(photo), "--arch", "resnet18", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert sorted(line.split()[-1] for line in out.splitlines()[1:]) == ["ant", "bee", "cow"]

    weights.with_suffix(".json").write_text(json.dumps({"image_size": 32, "classes": ["ant", "bee"]}))
    assert main([str(photo), "--arch", "resnet18", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"'classes' in {weights.with_suffix('.json')} lists 2 class names but the model has 3 classes" in err


def test_predict_checks_a_run_directory_model_json(photo, tmp_path, capsys):
    from jaxft.checkpoint import save_variables
    from jaxft.models import create_model
    from jaxft.predict import main
    from jaxft.pretrained import init_variables

    run = tmp_path / "run"
    run.mkdir()
    save_variables(run / "best", init_variables(create_model("resnet18", num_classes=2)),
                   {"arch": "resnet18", "num_classes": 2})
    info = {"arch": "resnet18", "num_classes": 2, "classes": ["cat", "dog", "emu"], "image_size": 32,
            "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    (run / "model.json").write_text(json.dumps(info))
    assert main([str(photo), "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"'classes' in {run / 'model.json'} lists 3 class names but the model has 2 classes" in err

    (run / "model.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("mean", "std")}))
    assert main([str(photo), "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'model.json'} lacks mean, std" in err and err.count("\n") == 1


@clitools.TWO_CORES
def test_predict_many_images_in_batches_on_the_split_cpu_gives_torchs_probabilities(tmp_path):
    """Five real photographs of different sizes in batches of 4 (the last padded) at 224 px: over
    the split's threshold, so each batch runs half on each of the CPU's two devices; every class's
    probability is torch's for the same weights and transform."""
    from PIL import Image
    from skimage import data as skdata

    from jaxft.data.images import load_rgb
    from jaxft.data.transforms import EvalTransform

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    paths = []
    for i, image in enumerate(photos):
        paths.append(tmp_path / f"photo{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(image).save(paths[-1])
    names = [f"class{i}" for i in range(10)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = save_resnet18(tmp_path / "ten.pth", 10, {"classes": names})
    env = {**os.environ, "JAXFT_CACHE": str(tmp_path / "jaxft_cache"), "TORCH_HOME": str(tmp_path / "torch_home"),
           "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # no device count of the user's: jaxft chooses
    result = clitools.cli("jaxft.predict", *paths, "--arch", "resnet18", "--weights", weights, "--batch-size", "4",
                          "--top-k", "10", "--json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each batch split over 2 CPU devices" in result.stderr, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [str(path) for path in paths]
    ours = np.array([[top["probability"] for top in sorted(row["top_k"], key=lambda t: t["index"])] for row in rows])

    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    transform = EvalTransform()  # the sidecar names no preprocessing: ImageNet's
    batch = torch.from_numpy(np.stack([transform(load_rgb(path)) for path in paths])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        theirs = torch.softmax(model(batch), -1).numpy()
    apart = np.abs(theirs[:, None] - theirs[None]).sum(-1)  # every image its own probabilities: a swapped
    assert apart[~np.eye(len(paths), dtype=bool)].min() > 0.02  # image or row would show (measured 0.047)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


# --- the source checkpoint build is scoped ----------------------------------------------------------

@pytest.fixture
def torch_global_state():
    """Whatever a test does to torch's process-wide settings is undone after it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.random.get_rng_state()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.random.set_rng_state(rng)


@pytest.mark.parametrize("before", [(False, False), (True, True)], ids=["off", "warn_only"])
def test_source_build_leaves_torch_settings_and_rng_as_they_were(tmp_path, monkeypatch, torch_global_state, before):
    import jaxft.source_checkpoint as source
    from jaxft.data.builtin import digits

    images, labels, names = digits(source.SOURCE_CLASSES)
    monkeypatch.setattr(source, "digits", lambda classes: (images[:60], labels[:60], names))  # one step, not 15 s
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.manual_seed(1234)
    rng = torch.random.get_rng_state()
    path = source.build_source_checkpoint(tmp_path / "src.pth", source.SourceRecipe(epochs=1, image_size=16),
                                          log=lambda *_: None)
    assert path.is_file() and json.loads(path.with_suffix(".json").read_text())["classes"] == names
    after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert after == before
    assert torch.equal(torch.random.get_rng_state(), rng)

    def fail(classes):
        assert torch.are_deterministic_algorithms_enabled()  # inside the build: deterministic
        raise RuntimeError("data went missing")

    monkeypatch.setattr(source, "digits", fail)
    with pytest.raises(RuntimeError, match="data went missing"):
        source.build_source_checkpoint(tmp_path / "again.pth", source.SourceRecipe(epochs=1), log=lambda *_: None)
    after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert after == before and torch.equal(torch.random.get_rng_state(), rng)


# --- freeze.describe tells partly trainable blocks apart ------------------------------------------

def test_describe_partial_names_what_trains_inside_a_split_block():
    from flax import traverse_util

    from jaxft.freeze import FROZEN, describe, parse_strategy
    from jaxft.models import create_model
    from jaxft.pretrained import init_variables

    model = create_model("resnet18", num_classes=5)
    params = init_variables(model)["params"]
    strategy = parse_strategy("partial:0.8")
    labels = strategy.labels(model, params)
    text = describe(labels, params, strategy)

    flat = traverse_util.flatten_dict(labels)
    trains = {path[0] for path, label in flat.items() if label != FROZEN}
    whole = sorted(m for m in trains if all(label != FROZEN for p, label in flat.items() if p[0] == m))
    assert whole == ["fc", "layer4_1"]
    frozen_in_block = {p[1] for p, label in flat.items() if p[0] == "layer4_0" and label == FROZEN}
    assert frozen_in_block == {"conv1", "bn1", "conv2"}
    assert "  trains: fc, layer4_1\n" in text
    assert text.endswith("  partly: layer4_0 (bn2, downsample_0, downsample_1 trainable; conv1, bn1, conv2 frozen)")
    assert "frozen         49 tensors     6,322,752 params ( 56.56%)" in text
    assert "trainable      13 tensors     4,856,325 params ( 43.44%)" in text
