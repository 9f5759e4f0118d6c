"""jaxft.pth_reader: PyTorch checkpoints read without torch give what torch.load gives, and
everything else is left to torch.load (its refusals and messages stay the reference)."""

from __future__ import annotations

import collections
import pickle
import subprocess
import sys
import warnings
import zipfile

import jax
import numpy as np
import pytest
import torch

from jaxft import load_pretrained
from jaxft.parity import torch_reference
from jaxft.pth_reader import NOT_READ, read_pth


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
    assert ours is not NOT_READ
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

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"fc.weight": RunsACommand()}, protocol=2))
        archive.writestr("evil/byteorder", "little")
    return path, marker


def test_anything_else_is_left_to_torch_load(tmp_path, evil_zip):
    # a pickled module: a global beyond tensors (torch.load weights_only refuses it, with its message)
    module_file = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), module_file)
    assert read_pth(module_file) is NOT_READ
    # torch's older, non-zip format: torch.load reads it
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert read_pth(legacy) is NOT_READ
    # a call to os.system in the pickle: refused, and nothing ran
    path, marker = evil_zip
    assert read_pth(path) is NOT_READ and not marker.exists()
    # garbage, an empty file, a cut archive
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.randn(1000)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_pth(garbage) is NOT_READ and read_pth(empty) is NOT_READ and read_pth(cut) is NOT_READ


def rewritten(tmp_path, source, name, edit=None, pickle_bytes=None, compress=zipfile.ZIP_STORED):
    """``source``'s archive with its data.pkl edited (``edit(bytes)``) or replaced, and every
    entry written with ``compress``."""
    with zipfile.ZipFile(source) as archive:
        entries = {entry: archive.read(entry) for entry in archive.namelist()}
    pkl = next(entry for entry in entries if entry.endswith("/data.pkl"))
    entries[pkl] = pickle_bytes if pickle_bytes is not None else edit(entries[pkl])
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return path


def test_crafted_files_cannot_reach_beyond_their_data(tmp_path):
    """Sizes, strides, compression and memo indexes a crafted file could use to read outside its
    data or to allocate far more than it holds are refused."""
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    assert read_pth(path) is not NOT_READ and read_pth(rewritten(tmp_path, path, "same.pth", bytes)) is not NOT_READ

    def claim(size: bytes, stride: bytes):
        def edit(data: bytes) -> bytes:
            shape = b"K\x06\x85q\x08K\x01\x85"  # the pickle's size (6,) and stride (1,): BININT1, TUPLE1
            assert data.count(shape) == 1
            return data.replace(shape, b"K" + size + b"\x85q\x08K" + stride + b"\x85")
        return edit

    # 64 elements of a 6-element storage; 2 elements 10 apart in it; 200 elements at stride 0 (a
    # view torch would keep, a copy here)
    assert read_pth(rewritten(tmp_path, path, "long.pth", claim(b"\x40", b"\x01"))) is NOT_READ
    assert read_pth(rewritten(tmp_path, path, "strided.pth", claim(b"\x02", b"\x0a"))) is NOT_READ
    assert read_pth(rewritten(tmp_path, path, "inside.pth", claim(b"\x02", b"\x05")))["w"].tolist() == [0, 5]
    assert read_pth(rewritten(tmp_path, path, "expanded.pth", claim(b"\xc8", b"\x00"))) is NOT_READ
    # entries compressed (torch stores them): a small file could inflate into a large one
    assert read_pth(rewritten(tmp_path, path, "deflated.pth", bytes, compress=zipfile.ZIP_DEFLATED)) is NOT_READ
    # a memo index of 2**30 (LONG_BINPUT): no memory reserved for it, and it reads as torch would
    memo = rewritten(tmp_path, path, "memo.pth", lambda d: d.replace(b"q\x08", b"r\x00\x00\x00\x40", 1))
    assert_same_as_torch(read_pth(memo), torch.load(memo, weights_only=True))


def test_only_torchs_weights_only_opcodes_and_state_are_read(tmp_path):
    """Opcodes outside torch's weights-only set (a protocol-4 pickle, which torch refuses) are
    not read; BUILD sets state on an OrderedDict only, so a file cannot change the reader's own
    stand-ins for the files read after it."""
    path = tmp_path / "protocol4.pth"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    with pytest.raises(pickle.UnpicklingError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of the protocol before it refuses
        torch.load(path, weights_only=True)
    assert read_pth(path) is NOT_READ
    good = tmp_path / "good.pth"
    torch.save({"w": torch.tensor([1.5, -2.0])}, good)
    # GLOBAL torch.FloatStorage, {"name": "IntStorage"}, BUILD: would make later floats read as ints
    attack = (b"\x80\x02ctorch\nFloatStorage\nq\x00}q\x01X\x04\x00\x00\x00nameq\x02"
              b"X\n\x00\x00\x00IntStorageq\x03sb.")
    assert read_pth(rewritten(tmp_path, good, "build.pth", pickle_bytes=attack)) is NOT_READ
    assert read_pth(good)["w"].tolist() == [1.5, -2.0]


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
