"""PyTorch checkpoint files read without importing torch.

``torch.save`` writes a zip archive: ``<name>/data.pkl``, a pickle whose tensors refer to
storages stored raw beside it (``<name>/data/<key>``). Importing torch only to read one costs
a fine-tuning run ~1.8 s of start-up on two cores, so :func:`read_pth` reads the common case
itself: dicts, lists and plain values holding dense CPU or CUDA tensors of the standard dtypes
(what ``model.state_dict()`` and training checkpoints hold), as numpy arrays.

It reads no more than ``torch.load(weights_only=True)`` would, the way torch's own weights-only
unpickler does: only the pickle opcodes that unpickler knows, globals resolved to stand-ins
defined here (``collections.OrderedDict``, torch's two tensor rebuild functions, its storage
classes) and every other global refused, object state set only on an OrderedDict (a
state_dict's ``_metadata``). A tensor must lie inside its storage and be no larger than it,
and every entry must be stored uncompressed at the size it claims, so a small file cannot make
it read outside its data or allocate more than the file holds. Anything it does not read (an
older non-zip file, TorchScript, another global or opcode, a malformed archive) gives
:data:`NOT_READ`, and the caller hands the file to ``torch.load``, whose rules and messages are
the reference.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import zipfile
from os import PathLike
from typing import Any, Callable

import numpy as np

NOT_READ = object()  # read_pth's answer for a file it leaves to torch.load


def _float32(elements: np.ndarray) -> np.ndarray:
    return elements.astype(np.float32)


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # the top half of a float32's bits


# torch's storage classes: (the dtype of the stored bytes, little-endian as torch writes them,
# and a conversion). Half precision is read as float32: jaxft converts every float parameter to
# float32 anyway, and numpy has no bfloat16.
_STORAGES: dict[str, tuple[np.dtype, Callable[[np.ndarray], np.ndarray] | None]] = {
    "FloatStorage": (np.dtype("<f4"), None), "DoubleStorage": (np.dtype("<f8"), None),
    "HalfStorage": (np.dtype("<f2"), _float32), "BFloat16Storage": (np.dtype("<u2"), _bfloat16_to_float32),
    "LongStorage": (np.dtype("<i8"), None), "IntStorage": (np.dtype("<i4"), None),
    "ShortStorage": (np.dtype("<i2"), None), "CharStorage": (np.dtype("i1"), None),
    "ByteStorage": (np.dtype("u1"), None), "BoolStorage": (np.dtype("?"), None),
}

# The opcodes torch's weights-only unpickler (torch/_weights_only_unpickler.py) executes.
_OPCODES = ("GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 NONE "
            "NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 BINFLOAT "
            "BINUNICODE SHORT_BINSTRING BINPERSID BINGET LONG_BINGET BINPUT LONG_BINPUT LONG1 PROTO STOP").split()


class _Unread(Exception):
    """The file holds something this reader does not read; ``torch.load`` decides."""


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """One storage's elements, flat, in the storage's dtype (what a tensor is a view of)."""

    __slots__ = ("elements",)

    def __init__(self, elements: np.ndarray):
        self.elements = elements


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (possibly strided) view of a storage, copied out."""
    if type(storage) is not _Storage or type(offset) is not int or type(requires_grad) is not bool:
        raise _Unread("tensor arguments")
    elements = storage.elements
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in size + stride)):
        raise _Unread("tensor shape")
    if backward_hooks or metadata:
        raise _Unread("tensor hooks or attributes")  # torch's weights_only refuses hooks too
    # a copy no larger than its storage: an expanded (stride 0) view could be any size
    if offset < 0 or math.prod(size) > elements.size:
        raise _Unread("tensor larger than its storage")
    if 0 in size:
        return np.empty(size, elements.dtype)
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= elements.size:
        raise _Unread("tensor outside its storage")
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if offset == 0 and math.prod(size) == elements.size and stride == contiguous:
        return elements.reshape(size)  # the whole storage in order (a state_dict's tensors): no copy
    view = np.lib.stride_tricks.as_strided(elements[offset:], shape=size,
                                           strides=[s * elements.itemsize for s in stride], writeable=False)
    return np.array(view)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> np.ndarray:
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    if not isinstance(data, np.ndarray) or backward_hooks:
        raise _Unread("parameter")
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


def _stored_entry(archive: zipfile.ZipFile, name: str, size: int | None = None) -> zipfile.ZipInfo:
    """An archive entry, only if stored uncompressed (as torch writes them) and, given ``size``,
    of that many bytes: checked before reading, so a small file cannot inflate into a large one."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _Unread(f"no entry {name}") from None
    if info.compress_type != zipfile.ZIP_STORED or (size is not None and info.file_size != size):
        raise _Unread(f"entry {name}")
    return info


def _read_array(archive: zipfile.ZipFile, name: str, dtype: np.dtype, count: int) -> np.ndarray:
    """A storage's ``count`` elements, read straight into a new (writable) array."""
    array = np.empty(count, dtype)
    target = memoryview(array).cast("B")
    with archive.open(_stored_entry(archive, name, target.nbytes)) as entry:
        done = 0
        while done < target.nbytes:
            got = entry.readinto(target[done:])
            if not got:
                raise _Unread(f"entry {name} ends early")
            done += got
    return array


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (the C one's opcodes cannot be narrowed), limited to torch's
    weights-only opcodes (``dispatch``, set below the class); its memo is a dict, so a large
    memo index costs nothing up front."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(_stored_entry(archive, prefix + "data.pkl"))))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Unread(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):
            raise _Unread("storage reference")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:  # views of one storage share it
            dtype, convert = _STORAGES[storage_type.name]
            elements = _read_array(self.archive, f"{self.prefix}data/{key}", dtype, numel)
            self.storages[key] = _Storage(convert(elements) if convert else elements)
        return self.storages[key]

    def load_build(self) -> None:
        """BUILD sets state on the object below it: here only a state_dict's ``_metadata``."""
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not collections.OrderedDict or type(state) is not dict:
            raise _Unread("object state")
        target.__dict__.update(state)


_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}
_Unpickler.dispatch = {code: _Unpickler.load_build if _OPCODE_NAMES[code] == "BUILD" else load
                       for code, load in pickle._Unpickler.dispatch.items() if _OPCODE_NAMES.get(code) in _OPCODES}


def read_pth(path: str | PathLike) -> Any:
    """What ``torch.load(path, map_location="cpu", weights_only=True)`` returns, with numpy
    arrays for tensors (half precision as float32), or :data:`NOT_READ` where this reader does
    not read the file (see the module doc): then ask ``torch.load``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                return NOT_READ
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = prefix + "byteorder"
            if byteorder in names and archive.read(_stored_entry(archive, byteorder, len(b"little"))) != b"little":
                return NOT_READ
            return _Unpickler(archive, prefix).load()
    except Exception:  # noqa: BLE001 - anything unread or malformed is torch.load's to judge and explain
        return NOT_READ
