"""PyTorch checkpoint files read without importing torch.

``torch.save`` writes a zip archive: ``<name>/data.pkl``, a pickle whose tensors refer to
storages stored raw beside it (``<name>/data/<key>``). Importing torch only to read one costs
a fine-tuning run ~1.8 s of start-up on two cores, so :func:`read_pth` reads the common case
itself: dicts, lists and plain values holding dense CPU or CUDA tensors of the standard dtypes
(what ``model.state_dict()`` and training checkpoints hold), as numpy arrays.

It unpickles no more than ``torch.load(weights_only=True)`` would: its unpickler resolves four
kinds of global (``collections.OrderedDict``, torch's two tensor rebuild functions and its
storage classes), each to a stand-in defined here, and refuses every other one. Anything it
does not read (an older non-zip file, TorchScript, another global, a big-endian or malformed
archive) makes it return ``None``, and the caller hands the file to ``torch.load``, whose rules
and messages are the reference.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from os import PathLike
from typing import Any, Optional

import numpy as np

# torch's storage classes; half-precision storages are read as float32 (jaxft converts every
# float parameter to float32 anyway, and numpy has no bfloat16)
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Unread(Exception):
    """The file holds something this reader does not read; ``torch.load`` decides."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """One storage's elements, as a flat numpy array in the storage's own dtype."""

    def __init__(self, elements: np.ndarray):
        self.elements = elements


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    # a bfloat16 is the top half of a float32's bits
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (possibly strided) view of a storage, copied out."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or not isinstance(requires_grad, bool):
        raise _Unread("tensor arguments")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in size + stride)):
        raise _Unread("tensor shape")
    if backward_hooks or metadata:
        raise _Unread("tensor hooks or attributes")  # torch's weights_only refuses hooks too
    elements = storage.elements
    if 0 in size:
        return np.empty(size, elements.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= elements.size:
        raise _Unread("tensor outside its storage")
    view = np.lib.stride_tricks.as_strided(elements[offset:], shape=size,
                                           strides=[s * elements.itemsize for s in stride], writeable=False)
    return np.array(view)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> np.ndarray:
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    if not isinstance(data, np.ndarray) or backward_hooks:
        raise _Unread("parameter")
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Unread(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Unread("storage reference")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:  # views of one storage share it
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise _Unread(f"storage {key}") from None
            dtype = _STORAGE_DTYPES[storage_type.name]
            itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            if len(raw) != numel * itemsize:
                raise _Unread(f"storage {key} size")
            if dtype == "bfloat16":
                elements = _bfloat16_to_float32(np.frombuffer(raw, np.uint16))
            else:
                elements = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))  # torch writes little-endian
                if dtype == np.float16:
                    elements = elements.astype(np.float32)
            self.storages[key] = _Storage(elements)
        return self.storages[key]


def read_pth(path: str | PathLike) -> Optional[Any]:
    """What ``torch.load(path, map_location="cpu", weights_only=True)`` returns, with numpy
    arrays for tensors (half precision as float32), or None where this reader does not read the
    file (see the module doc): then ask ``torch.load``."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                return None
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
                return None
            return _Unpickler(archive, prefix).load()
    except Exception:  # noqa: BLE001 - anything unread or malformed is torch.load's to judge and explain
        return None
