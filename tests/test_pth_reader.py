"""jaxft.pth_reader: PyTorch checkpoints read without torch give what torch.load gives, and
everything else is left to torch.load (its refusals and messages stay the reference)."""

from __future__ import annotations

import collections
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch

from jaxft import load_pretrained
from jaxft.parity import torch_reference
from jaxft.pth_reader import read_pth


def assert_same_as_torch(ours, theirs, where="checkpoint"):
    """Every container, key and value of torch.load's result, tensors bit for bit (half
    precision as float32, as jaxft converts it)."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        if theirs.dtype in (torch.float16, torch.bfloat16):
            theirs = theirs.float()
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == theirs.numpy().dtype and ours.shape == tuple(theirs.shape), where
        np.testing.assert_array_equal(ours, theirs.numpy(), err_msg=where)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for key in theirs:
            assert_same_as_torch(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_as_torch(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_reads_a_training_checkpoint_as_torch_load_does(tmp_path):
    torch.manual_seed(0)
    state_dict = torch_reference("resnet18", num_classes=10).state_dict()  # num_batches_tracked: int64 scalars
    base = torch.randn(6, 8)
    checkpoint = {
        "state_dict": state_dict,
        "epoch": 3, "best": 0.875, "name": "run", "flags": [True, None], "shape": (2, 3),
        "views": {  # tensors that share one storage, at an offset, strided, transposed
            "base": base, "row": base[2], "column": base[:, 5], "transposed": base.t(), "every_other": base[::2, 1::3],
        },
        "dtypes": {
            "float16": torch.randn(5).half(), "bfloat16": torch.randn(2, 3).bfloat16(),
            "float64": torch.randn(4).double(),
            "int32": torch.arange(7, dtype=torch.int32), "int8": torch.tensor([-3, 4], dtype=torch.int8),
            "uint8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        },
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
        "parameter": torch.nn.Parameter(torch.randn(3)),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    ours = read_pth(path)
    assert ours is not None
    assert_same_as_torch(ours, torch.load(path, map_location="cpu", weights_only=True))
    assert ours["state_dict"]._metadata == state_dict._metadata  # the OrderedDict's attribute, as torch keeps it
    assert isinstance(ours["state_dict"], collections.OrderedDict)


@pytest.fixture
def evil_zip(tmp_path):
    """A torch-format archive whose pickle calls os.system (a file in the checkpoint's place)."""
    marker = tmp_path / "ran"

    class RunsACommand:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import pickle

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"fc.weight": RunsACommand()}, protocol=2))
        archive.writestr("evil/byteorder", "little")
    return path, marker


def test_anything_else_is_left_to_torch_load(tmp_path, evil_zip):
    # a pickled module: a global beyond tensors (torch.load weights_only refuses it, with its message)
    module_file = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), module_file)
    assert read_pth(module_file) is None
    # torch's older, non-zip format: torch.load reads it
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert read_pth(legacy) is None
    # a call to os.system in the pickle: refused, and nothing ran
    path, marker = evil_zip
    assert read_pth(path) is None and not marker.exists()
    # garbage, an empty file, a cut archive
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.randn(1000)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_pth(garbage) is None and read_pth(empty) is None and read_pth(cut) is None


def test_a_tensor_pointing_outside_its_storage_is_not_read(tmp_path):
    """A crafted size/stride must not read memory beyond the storage's bytes."""
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    size = b"K\x06\x85"  # the tensor's size (6,) in the pickle: BININT1 6, TUPLE1
    assert entries[name].count(size) == 1
    entries[name] = entries[name].replace(size, b"K\x40\x85")  # claims 64 elements of a 6-element storage
    crafted = tmp_path / "crafted.pth"
    with zipfile.ZipFile(crafted, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    assert read_pth(path) is not None and read_pth(crafted) is None


def test_pretrained_weights_from_a_pth_match_torch_loads_and_skip_importing_torch(source_checkpoint, tmp_path):
    ours = load_pretrained("resnet18", source_checkpoint, num_classes=5, seed=0)[1]
    loaded = torch.load(source_checkpoint, map_location="cpu", weights_only=True)
    theirs = load_pretrained("resnet18", loaded, num_classes=5, seed=0)[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, theirs)
    legacy = tmp_path / "legacy.pth"  # the torch.load route gives the same variables
    torch.save(loaded, legacy, _use_new_zipfile_serialization=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours,
                           load_pretrained("resnet18", legacy, num_classes=5, seed=0)[1])
    probe = ("import sys\nfrom jaxft import load_pretrained\n"
             f"load_pretrained('resnet18', {str(source_checkpoint)!r}, num_classes=5)\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
