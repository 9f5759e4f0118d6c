"""XLA FFI targets on the CPU whose handler is a Python function, through ctypes.

``jax.ffi.ffi_call`` puts a custom call into the compiled step that XLA resolves by name, so a
step that calls one is kept in JAX's persistent compilation cache like any other (a step with a
Python host callback is not), and its handler sees XLA's own buffers (a host callback gets
copies). jaxlib registers FFI handlers as C function pointers; ``ctypes`` makes one of a Python
function, which takes the GIL when XLA calls it from its threads. The structures below are the
prefixes of those in jaxlib's ``xla/ffi/api/c_api.h`` (``jax.ffi.include_dir()``) that a handler
reads: each call checks the sizes XLA reports for them, and returns an error naming the mismatch
rather than reading past them.
"""

from __future__ import annotations

import ctypes as c
from typing import Any, Callable

import jax
import numpy as np


class _ExtensionBase(c.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", c.c_size_t), ("type", c.c_int), ("next", c.POINTER(_ExtensionBase))]
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata


class _Buffer(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("dtype", c.c_int),
                ("data", c.c_void_p), ("rank", c.c_int64), ("dims", c.POINTER(c.c_int64))]


class _Buffers(c.Structure):  # XLA_FFI_Args and XLA_FFI_Rets, which have the same layout
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("size", c.c_int64),
                ("types", c.POINTER(c.c_int)), ("items", c.POINTER(c.POINTER(_Buffer)))]


class _ByteSpan(c.Structure):
    _fields_ = [("ptr", c.POINTER(c.c_char)), ("len", c.c_size_t)]


class _Array(c.Structure):
    _fields_ = [("dtype", c.c_int), ("size", c.c_size_t), ("data", c.c_void_p)]


class _Attrs(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("size", c.c_int64),
                ("types", c.POINTER(c.c_int)), ("names", c.POINTER(c.POINTER(_ByteSpan))),
                ("attrs", c.POINTER(c.c_void_p))]


_ARRAY_ATTR = 1  # XLA_FFI_AttrType_ARRAY


class _ApiVersion(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("major", c.c_int),
                ("minor", c.c_int)]


class _Metadata(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("api_version", _ApiVersion), ("traits", c.c_uint32)]


class _MetadataExtension(c.Structure):
    _fields_ = [("base", _ExtensionBase), ("metadata", c.POINTER(_Metadata))]


class _ErrorCreateArgs(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("message", c.c_char_p),
                ("errc", c.c_int)]


_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL


class _Api(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", c.c_void_p),
                ("error_create", c.CFUNCTYPE(c.c_void_p, c.POINTER(_ErrorCreateArgs)))]


class _CallFrame(c.Structure):
    _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.POINTER(_ExtensionBase)),
                ("api", c.POINTER(_Api)), ("ctx", c.c_void_p), ("stage", c.c_int), ("args", _Buffers),
                ("rets", _Buffers), ("attrs", _Attrs)]


# The struct sizes c_api.h gives these structures (XLA_FFI_DEFINE_STRUCT_TRAITS: up to the named field)
_CALL_FRAME_SIZE = _CallFrame.attrs.offset + c.sizeof(_Attrs)
_BUFFER_SIZE = c.sizeof(_Buffer)
_DTYPES = {11: np.float32, 12: np.float64}  # XLA_FFI_DataType_F32, _F64: what the handlers here take
# The FFI API version the handlers declare to XLA: the checked c_api.h's major (XLA_FFI_API_MAJOR 0)
# and an older minor of it (the header is at 0.3), which jaxlib 0.10 accepts
_API_VERSION = (0, 1)

# Kernel = Callable[[inputs, outputs, attributes], None]: numpy views of XLA's buffers, the outputs to
# be written in place; attributes are int64 arrays by name.
Kernel = Callable[[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]], None]
_handlers: dict[str, Any] = {}  # what XLA holds pointers to must outlive every compiled step


def _view(buffer: _Buffer) -> np.ndarray:
    if buffer.struct_size != _BUFFER_SIZE:
        raise RuntimeError(f"XLA FFI buffer of {buffer.struct_size} bytes, {_BUFFER_SIZE} expected")
    if buffer.dtype not in _DTYPES:
        raise TypeError(f"XLA FFI buffer of data type {buffer.dtype}, not one of {sorted(_DTYPES)}")
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    dtype = np.dtype(_DTYPES[buffer.dtype])
    if not int(np.prod(shape)):
        return np.empty(shape, dtype)
    pointer = c.cast(buffer.data, c.POINTER(np.ctypeslib.as_ctypes_type(dtype)))
    return np.ctypeslib.as_array(pointer, shape=shape)


def _attributes(attrs: _Attrs) -> dict[str, np.ndarray]:
    found = {}
    for i in range(attrs.size):
        name = attrs.names[i].contents
        name = c.string_at(name.ptr, name.len).decode()
        if attrs.types[i] != _ARRAY_ATTR:
            raise TypeError(f"attribute {name!r}: only int64 arrays are read here")
        array = c.cast(attrs.attrs[i], c.POINTER(_Array)).contents
        found[name] = np.ctypeslib.as_array(c.cast(array.data, c.POINTER(c.c_int64)), shape=(array.size,)).copy()
    return found


def _declare_version(frame: _CallFrame) -> bool:
    """Answer XLA's metadata query (made once, at registration); whether this call was one."""
    extension = frame.extension_start
    while extension:
        if extension.contents.type == _METADATA_EXTENSION:
            metadata = c.cast(extension, c.POINTER(_MetadataExtension)).contents.metadata.contents
            metadata.api_version.major, metadata.api_version.minor = _API_VERSION
            metadata.traits = 0
            return True
        extension = extension.contents.next
    return False


def _handler(name: str, kernel: Kernel):
    def handle(frame_pointer):
        frame = frame_pointer.contents
        try:
            if _declare_version(frame):
                return None
            if frame.struct_size != _CALL_FRAME_SIZE:
                raise RuntimeError(f"XLA FFI call frame of {frame.struct_size} bytes, {_CALL_FRAME_SIZE} "
                                   f"expected: this jaxlib is not the one {__name__} was checked against")
            inputs = [_view(frame.args.items[i].contents) for i in range(frame.args.size)]
            outputs = [_view(frame.rets.items[i].contents) for i in range(frame.rets.size)]
            kernel(inputs, outputs, _attributes(frame.attrs))
            return None
        except BaseException as error:  # noqa: BLE001 - no Python exception may cross into XLA's C frames
            message = f"{name}: {type(error).__name__}: {error}".encode()
            args = _ErrorCreateArgs(c.sizeof(_ErrorCreateArgs), None, message, _INTERNAL)
            return frame.api.contents.error_create(c.byref(args))

    return c.CFUNCTYPE(c.c_void_p, c.POINTER(_CallFrame))(handle)


def register_cpu_target(name: str, kernel: Kernel) -> None:
    """Register ``kernel`` as the CPU FFI target ``name`` (once; later calls are no-ops), for
    ``jax.ffi.ffi_call(name, ...)`` and ``jax.ffi.ffi_lowering(name)``."""
    if name in _handlers:
        return
    handler = _handler(name, kernel)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(c.cast(handler, c.c_void_p).value), platform="cpu")
    _handlers[name] = handler
