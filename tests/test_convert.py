"""The converter's strictness, weights sources, metadata, head replacement and the convert CLI."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from jaxft.parity import torch_reference
from jaxft import ConversionError, UnknownArchError, WeightsError, create_model, from_torch, load_pretrained, to_torch
from jaxft.checkpoint import CheckpointError, load_variables, save_variables
from jaxft.pretrained import init_variables
from jaxft.weights import Preprocessing, cached_weights_path, sidecar_meta, weights_enum


@pytest.fixture(scope="module")
def resnet18_state_dict():
    return torch_reference("resnet18", num_classes=10).state_dict()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory, resnet18_state_dict):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18_state_dict, path)
    return path


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxft.convert", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


# --- strict key and shape checks -------------------------------------------------------------

def test_state_dict_from_another_arch_names_the_likely_arch(resnet18_state_dict):
    with pytest.raises(ConversionError) as err:
        from_torch("resnet50", resnet18_state_dict)
    message = str(err.value)
    assert "does not fit resnet50" in message and "missing keys" in message
    assert "looks like a resnet18 state_dict" in message


def test_missing_key_is_named(resnet18_state_dict):
    state_dict = dict(resnet18_state_dict)
    del state_dict["layer3.1.bn2.running_var"]
    with pytest.raises(ConversionError, match=r"1 missing keys: layer3\.1\.bn2\.running_var"):
        from_torch("resnet18", state_dict)


def test_unexpected_key_is_named(resnet18_state_dict):
    state_dict = {**resnet18_state_dict, "layer5.0.conv1.weight": torch.zeros(3, 3, 1, 1)}
    with pytest.raises(ConversionError, match=r"1 unexpected keys: layer5\.0\.conv1\.weight"):
        from_torch("resnet18", state_dict)


def test_wrong_shape_is_named_with_both_shapes(resnet18_state_dict):
    state_dict = {**resnet18_state_dict, "layer2.0.conv2.weight": torch.zeros(128, 128, 5, 5)}
    with pytest.raises(ConversionError, match=r"layer2\.0\.conv2\.weight has shape \(128, 128, 5, 5\), "
                                              r"the model needs \(128, 128, 3, 3\)"):
        from_torch("resnet18", state_dict)


def test_head_size_mismatch_points_to_load_pretrained(resnet18_state_dict):
    model = create_model("resnet18", num_classes=3)
    from jaxft.convert import state_dict_to_variables

    with pytest.raises(ConversionError, match="load_pretrained"):
        state_dict_to_variables(model, resnet18_state_dict, "resnet18")


def test_export_rejects_variables_of_another_model(resnet18_state_dict):
    variables = from_torch("resnet18", resnet18_state_dict)
    del variables["batch_stats"]["layer1_0"]["bn1"]["mean"]
    with pytest.raises(ConversionError, match=r"missing leaves: batch_stats/layer1_0/bn1/mean"):
        to_torch("resnet18", variables)


def test_data_parallel_prefix_is_stripped(resnet18_state_dict):
    wrapped = {f"module.{k}": v for k, v in resnet18_state_dict.items()}
    np.testing.assert_array_equal(from_torch("resnet18", wrapped)["params"]["fc"]["bias"],
                                  resnet18_state_dict["fc.bias"].numpy())


# --- sources -----------------------------------------------------------------------------------

def test_sources_module_state_dict_pth_and_safetensors_agree(tmp_path, resnet18_state_dict, resnet18_file):
    from safetensors.torch import save_file

    module = torchvision.models.resnet18(num_classes=10)
    module.load_state_dict(resnet18_state_dict)
    save_file(dict(resnet18_state_dict), tmp_path / "r18.safetensors")
    reference = from_torch("resnet18", resnet18_state_dict)
    for source in (module, resnet18_file, str(tmp_path / "r18.safetensors")):
        converted = from_torch("resnet18", source)
        assert all(np.array_equal(a, b) for a, b in zip(*map(lambda v: __import__("jax").tree_util.tree_leaves(v),
                                                               (converted, reference))))


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_wrapper_is_unwrapped(tmp_path, resnet18_state_dict, wrapper):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, wrapper: resnet18_state_dict}, path)
    variables = from_torch("resnet18", path)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], resnet18_state_dict["fc.weight"].numpy().T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_is_read_as_float32(tmp_path, resnet18_state_dict, dtype):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet18_state_dict.items()}
    path = tmp_path / "half.pth"
    torch.save(half, path)
    variables = from_torch("resnet18", path)
    leaves = __import__("jax").tree_util.tree_leaves(variables)
    assert {np.asarray(leaf).dtype for leaf in leaves} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], half["fc.weight"].float().numpy().T)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (bytes(range(256)) * 4, "not a readable PyTorch checkpoint"),
])
def test_non_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as err:
        from_torch("resnet18", path)
    # torch's own message advises re-running with `weights_only` set to `False`: wrong for garbage bytes
    assert "weights_only=False" not in str(err.value) and "weights_only" not in str(err.value)


def test_truncated_checkpoint(tmp_path, resnet18_file):
    path = tmp_path / "truncated.pth"
    path.write_bytes(resnet18_file.read_bytes()[: resnet18_file.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint .truncated") as err:
        from_torch("resnet18", path)
    assert "weights_only=False" not in str(err.value) and "weights_only" not in str(err.value)


def test_truncated_safetensors(tmp_path, resnet18_state_dict):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(dict(resnet18_state_dict), full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        from_torch("resnet18", cut)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(WeightsError, match="refuses") as err:
        from_torch("resnet18", path)
    message = str(err.value)
    assert "torchvision.models.resnet.ResNet" in message  # the offending global
    assert "re-save only its weights" in message and ".state_dict()" in message
    evil = tmp_path / "evil.pth"  # a global from a module torch blocks outright
    torch.save({"fc.weight": torch.zeros(1), "payload": _RunsACommand()}, evil)
    with pytest.raises(WeightsError, match=r"refuses") as err:
        from_torch("resnet18", evil)
    assert "posix.system" in str(err.value) or "nt.system" in str(err.value)


class _RunsACommand:
    """What a malicious checkpoint pickles: unpickling it would call os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        from_torch("resnet18", tmp_path / "nope.pth")


def test_unknown_arch_suggests_close_names():
    with pytest.raises(UnknownArchError, match="Did you mean resnet18"):
        create_model("resnet19")


def test_unknown_weights_name_lists_the_available_ones():
    with pytest.raises(WeightsError, match=r"IMAGENET1K_V1, IMAGENET1K_V2"):
        weights_enum("resnet50", "IMAGENET1K_V9")


def test_weights_metadata_comes_from_torchvision():
    weights = weights_enum("resnet50", "imagenet")
    assert weights.name == "IMAGENET1K_V2"
    assert weights_enum("resnet50", "ResNet50_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    from jaxft.weights import preprocessing_of

    pre = preprocessing_of(weights)
    assert (pre.resize_size, pre.crop_size) == (232, 224)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.interpolation == "bilinear"
    assert len(weights.meta["categories"]) == 1000


def test_imagenet_offline_says_where_to_put_the_file(offline_torch_home):
    with pytest.raises(WeightsError) as err:
        from_torch("resnet18", "imagenet")
    expected = cached_weights_path(weights_enum("resnet18", "imagenet"))
    assert str(offline_torch_home) in str(expected)
    assert f"Put the file at {expected}" in str(err.value)


def test_cached_imagenet_file_is_used_without_network(offline_torch_home):
    """A file placed where the offline message says is what the weights name then loads."""
    weights = weights_enum("resnet18", "imagenet")
    target = cached_weights_path(weights)
    target.parent.mkdir(parents=True)
    state_dict = torch_reference("resnet18").state_dict()
    torch.save(state_dict, target)
    model, variables, info = load_pretrained("resnet18", "imagenet")
    assert info.num_classes == 1000 and info.categories[:2] == ["tench", "goldfish"]
    assert info.meta.preprocessing.crop_size == 224 and info.replaced_keys == []
    np.testing.assert_array_equal(to_torch("resnet18", variables)["layer4.1.conv2.weight"],
                                  state_dict["layer4.1.conv2.weight"])


def test_weights_file_without_sidecar_says_what_is_assumed_once(tmp_path, resnet18_state_dict, caplog):
    path = tmp_path / "mine.pth"
    torch.save(resnet18_state_dict, path)
    with caplog.at_level(logging.WARNING, logger="jaxft.weights"):
        _, _, info = load_pretrained("resnet18", path, num_classes=3)
        load_pretrained("resnet18", path, num_classes=3)
    [line] = [r.getMessage() for r in caplog.records if r.name == "jaxft.weights"]  # once, one line
    assert "\n" not in line
    for needle in (str(path), f"no metadata sidecar {tmp_path / 'mine.json'} was found", "resize 256, center crop 224",
                   "mean [0.485, 0.456, 0.406]", "std [0.229, 0.224, 0.225]", f"write {tmp_path / 'mine.json'} as JSON",
                   '"image_size": 224', '"classes": ['):
        assert needle in line, needle
    assert info.meta.preprocessing == Preprocessing()


@pytest.mark.parametrize("sidecar, said", [
    ({"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "classes": list("abcdefghij")}, None),
    ({"classes": list("abcdefghij")}, "has no image_size, mean, std"),
    ({"image_size": 64}, "has no mean, std, so ImageNet preprocessing is assumed (mean [0.485"),
    ("{not json", "is not readable JSON"),
    ({"epochs": 3}, "is not a JSON object with any of the keys image_size, mean, std, classes"),
])
def test_sidecar_keys_are_used_and_what_is_missing_is_said(tmp_path, resnet18_file, caplog, sidecar, said):
    path = tmp_path / "mine.pth"
    path.write_bytes(resnet18_file.read_bytes())
    path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    with caplog.at_level(logging.WARNING, logger="jaxft.weights"):
        meta = sidecar_meta(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxft.weights"]
    assert lines == [] if said is None else (len(lines) == 1 and said in lines[0]), lines
    if isinstance(sidecar, dict):
        assert meta.categories == sidecar.get("classes")
        size = sidecar.get("image_size")
        assert (meta.preprocessing.resize_size, meta.preprocessing.crop_size) == ((size, size) if size else (256, 224))
        assert meta.preprocessing.mean == tuple(sidecar.get("mean", Preprocessing().mean))


@pytest.mark.parametrize("sidecar, key", [
    ({"image_size": "224"}, "'image_size' must be a positive whole number"),
    ({"image_size": 32, "std": [1, 1, 0]}, "'std' must be a list of 3 positive numbers"),
    ({"mean": [0.5, 0.5]}, "'mean' must be a list of 3 numbers"),
    ({"classes": "cat,dog"}, "'classes' must be a non-empty list of class names"),
])
def test_bad_sidecar_values_are_errors_naming_the_key(tmp_path, resnet18_file, sidecar, key):
    path = tmp_path / "mine.pth"
    path.write_bytes(resnet18_file.read_bytes())
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(WeightsError, match=re.escape(f"{path.with_suffix('.json')}: {key}")):
        load_pretrained("resnet18", path)


def test_source_checkpoint_files_are_written_atomically_with_fixed_bytes(tmp_path, monkeypatch):
    """The write path of build_source_checkpoint, with training stubbed out (a real build takes
    ~15 s): .pth and .json in place, no temporary files left, and the .pth's bytes do not depend
    on its file name (torch.save into a file would embed it)."""
    from jaxft import source_checkpoint

    model = torch.nn.Linear(3, 2)
    meta = {"arch": "stub", "classes": ["0", "1"]}
    monkeypatch.setattr(source_checkpoint, "train_source_model", lambda recipe, log: (model, meta))
    paths = [source_checkpoint.build_source_checkpoint(tmp_path / name / "src.pth")
             for name in ("a", "b")]
    paths.append(source_checkpoint.build_source_checkpoint(tmp_path / "a" / "other_name.pth"))
    for path in paths:
        assert json.loads(path.with_suffix(".json").read_text()) == meta
        loaded = torch.load(path, weights_only=True)
        assert loaded.keys() == model.state_dict().keys() and torch.equal(loaded["weight"], model.weight)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["other_name.json", "other_name.pth",
                                                                 "src.json", "src.pth"]
    assert len({path.read_bytes() for path in paths}) == 1


# --- a pretrained backbone for a new task ------------------------------------------------------

@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("vgg11", "classifier.6")])
def test_new_head_replaces_only_the_classifier(tmp_path, arch, head):
    source = torch_reference(arch).state_dict()
    path = tmp_path / f"{arch}.pth"
    torch.save(source, path)
    model, variables, info = load_pretrained(arch, path, num_classes=7, seed=1)
    assert info.replaced_keys == [f"{head}.weight", f"{head}.bias"]
    assert model.num_classes == 7 and info.categories is None
    exported = to_torch(arch, variables)
    for key, value in source.items():
        if not key.startswith(head + ".") and not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], value), key
    weight, bias = exported[f"{head}.weight"].numpy(), exported[f"{head}.bias"].numpy()
    assert weight.shape == (7, source[f"{head}.weight"].shape[1])
    fan_in = weight.shape[1]
    if arch == "resnet18":  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(weight).max() <= bound and np.abs(bias).max() <= bound
        assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    else:  # torchvision VGG: N(0, 0.01) weights, zero bias
        assert weight.std() == pytest.approx(0.01, rel=0.05) and not bias.any()
    # only the head is initialised, and it is the head the whole model's init draws for the seed
    whole = init_variables(model, seed=1)["params"][model.head_name]
    for name in ("kernel", "bias"):
        assert np.array_equal(variables["params"][model.head_name][name], whole[name]), name


def test_random_init_when_no_weights():
    model, variables, info = load_pretrained("resnet18", None, num_classes=4)
    assert info.meta.source == "random init" and info.num_classes == 4 and info.replaced_keys == []
    assert info.param_count == sum(p.numel() for p in torchvision.models.resnet18(num_classes=4).parameters())


# --- variables files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ckpt_dir", "vars.msgpack", "vars.safetensors"])
def test_variables_files_round_trip(tmp_path, resnet18_state_dict, name):
    variables = from_torch("resnet18", resnet18_state_dict)
    save_variables(tmp_path / name, variables, {"arch": "resnet18", "num_classes": 10})
    restored, meta = load_variables(tmp_path / name)
    assert meta["arch"] == "resnet18" and meta["format"] == "jaxft-variables"
    flat = lambda v: __import__("flax").traverse_util.flatten_dict(v)  # noqa: E731
    assert flat(restored).keys() == flat(variables).keys()
    assert all(np.array_equal(flat(restored)[k], flat(variables)[k]) for k in flat(variables))


def test_loading_a_non_jaxft_file_is_a_clear_error(tmp_path, resnet18_file):
    with pytest.raises(CheckpointError, match="not a jaxft"):
        load_variables(tmp_path)
    (tmp_path / "x.msgpack").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_variables(tmp_path / "x.msgpack")


# --- the CLI -----------------------------------------------------------------------------------

def _checked_error(stdout: str, what: str) -> float:
    """The relative L2 error of the CLI's one logit-check line comparing ``what``."""
    [error] = re.findall(rf"check: {re.escape(what)}, relative L2 error (\S+)$", stdout, re.MULTILINE)
    return float(error)


def test_cli_round_trip_to_torch_loads_strictly_and_matches(tmp_path, resnet18_file, resnet18_state_dict):
    out = tmp_path / "r18.msgpack"
    result = run_cli(resnet18_file, "--arch", "resnet18", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "resnet18, 11,181,642 parameters, 10 classes" in result.stdout
    assert _checked_error(result.stdout, "JAX vs torchvision logits") <= 1e-5  # measured ~3e-7

    back = tmp_path / "back.pth"
    result = run_cli("--to-torch", out, "--out", back)
    assert result.returncode == 0, result.stderr
    assert _checked_error(result.stdout, "torchvision (strict=True) vs JAX logits") <= 1e-5
    exported = torch.load(back, weights_only=True)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(exported, strict=True)
    for key, value in resnet18_state_dict.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], value), key

    # the output exists now: a second run refuses to overwrite it
    result = run_cli(resnet18_file, "--arch", "resnet18", "--out", out)
    assert result.returncode == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr


def _assert_clean_cli_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # exactly one error line, and it says it all (argparse's usage lines and the sidecar warning
    # may come before it, but no second line of the error)
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("python -m jaxft.convert: error: "), result.stderr
    for needle in needles:
        assert needle in line, result.stderr


def test_cli_errors_are_one_clear_line(tmp_path, resnet18_file, offline_torch_home):
    import os

    env = {**os.environ, "TORCH_HOME": str(offline_torch_home)}
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(resnet18_file.read_bytes()[:5000])
    pickled = tmp_path / "module.pth"
    torch.save(torchvision.models.resnet18(), pickled)
    _assert_clean_cli_error(run_cli("imagenet", "--arch", "resnet18", "--out", tmp_path / "o", env=env),
                            "could not download", "Put the file at", str(offline_torch_home))
    _assert_clean_cli_error(run_cli(truncated, "--arch", "resnet18", "--out", tmp_path / "o"), "cut.pth")
    _assert_clean_cli_error(run_cli(pickled, "--arch", "resnet18", "--out", tmp_path / "o"), "refuses",
                            "torchvision.models.resnet.ResNet", "re-save")
    _assert_clean_cli_error(run_cli(resnet18_file, "--arch", "vgg11", "--out", tmp_path / "o"), "does not fit vgg11")
    _assert_clean_cli_error(run_cli(resnet18_file, "--arch", "resnet19"), "invalid choice: 'resnet19'")
    _assert_clean_cli_error(run_cli("IMAGENET1K_V7", "--arch", "resnet18"), "unknown weights 'IMAGENET1K_V7'")
    _assert_clean_cli_error(run_cli("--to-torch", resnet18_file), "not a jaxft")
    _assert_clean_cli_error(run_cli(resnet18_file, "--arch", "resnet18", "--out", tmp_path / "no" / "x.msgpack"),
                            "does not exist")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _assert_clean_cli_error(run_cli(resnet18_file, "--arch", "resnet18", "--out", tmp_path / "mine", "--overwrite"),
                            "not a jaxft orbax checkpoint")
    (tmp_path / "mine" / "meta").mkdir()  # a user's folder that happens to hold a 'meta' folder too
    _assert_clean_cli_error(run_cli(resnet18_file, "--arch", "resnet18", "--out", tmp_path / "mine", "--overwrite"),
                            "not a jaxft orbax checkpoint")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "mine" / "meta").is_dir()
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli_help_explains_sources_and_directions():
    result = subprocess.run([sys.executable, "tools/convert_weights.py", "--help"], capture_output=True, text=True,
                            cwd=__import__("pathlib").Path(__file__).parent.parent)
    assert result.returncode == 0
    for needle in ("imagenet", "IMAGENET1K_V2", "--to-torch", "strict=True", "weights_only=True"):
        assert needle in result.stdout
