"""Convolution kernel gradients on the CPU by torch's own kernel, called from the jitted step.

On the CPU, XLA's kernel gradient of a kxk convolution is its slowest kernel: on the Intel Xeon
this project measured (jaxlib 0.10), resnet18's 56x56, 64 -> 64 layer at batch 16 takes 101 ms
where this primitive takes 13 ms (torch's ``convolution_backward``, oneDNN), and it is further
from float64 (6e-6 against 3e-7). jaxft depends on torch already (it is the weights' source and
the numerical reference), so ``kernel_grad`` computes a convolution's kernel gradient with torch's
kernel: a JAX primitive whose CPU lowering is an XLA FFI custom call (``python_ffi.py``) whose
handler runs torch on XLA's own buffers, uncopied. The step names its target, so it stays in
JAX's persistent compilation cache. Elsewhere (a GPU; a step partitioned over several devices,
where the call would gather every operand onto each; under ``vmap``) it is XLA's own gradient,
and so is its derivative (a JVP rule, for gradients of gradients). docs/decisions.md says why.

The handler reads XLA's FFI structures as jaxlib's ``c_api.h`` lays them out: ``available()`` is
False on a JAX release that header was not checked for (``CHECKED_JAX``), and where the user
turned the route off (``JAXFT_TORCH_KERNELS=0``); the layers then take the routes they had before.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import version
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxft.models import python_ffi

# JAX releases (major, minor) whose jaxlib's FFI structures (c_api.h) python_ffi.py was checked against
CHECKED_JAX = {(0, 10)}
TARGET = "jaxft_torch_conv_kernel_grad"


def _jax_release() -> Optional[tuple[int, int]]:
    try:
        major, minor = version("jax").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - an unreadable version is an unchecked one
        return None


@functools.cache
def _registered() -> bool:
    """Whether torch's kernel is registered as the FFI target ``TARGET`` (on a checked JAX)."""
    if _jax_release() not in CHECKED_JAX:
        return False
    python_ffi.register_cpu_target(TARGET, _ffi_kernel)
    return True


def available() -> bool:
    """Whether ``kernel_grad`` can call torch's kernel: on a checked JAX release, unless the user
    set ``JAXFT_TORCH_KERNELS=0`` (every kernel XLA's). Else the layers take the routes they had
    before."""
    return os.environ.get("JAXFT_TORCH_KERNELS", "1") != "0" and _registered()


def _xla_kernel_grad(x, g, *, kernel_shape, strides, padding):
    """XLA's own kernel gradient: the lowering off the CPU and where torch cannot serve."""
    def conv(kernel):
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return jax.vjp(conv, jnp.zeros(kernel_shape, x.dtype))[1](g)[0]


def torch_kernel_grad(x: np.ndarray, g: np.ndarray, out: np.ndarray, *, strides, padding) -> None:
    """Write into ``out`` (HWIO) the kernel gradient of an NHWC convolution with symmetric
    ``padding`` ((p, p), (q, q)) by ``torch.ops.aten.convolution_backward``, on views of the arrays
    (NHWC seen as channels-last NCHW, which oneDNN takes as it is). The kernel's values are not
    needed: torch gets an uninitialised tensor of its shape."""
    import torch

    kh, kw, c_in, c_out = out.shape
    _, d_kernel, _ = torch.ops.aten.convolution_backward(
        torch.from_numpy(g).permute(0, 3, 1, 2), torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.empty((c_out, c_in, kh, kw), dtype=torch.from_numpy(out).dtype), None, list(strides),
        [p[0] for p in padding], [1, 1], False, [0, 0], 1, [False, True, False])
    torch.from_numpy(out).copy_(d_kernel.permute(2, 3, 1, 0))


def _ffi_kernel(inputs, outputs, attributes) -> None:
    """The FFI target's handler: (x, g) -> the kernel gradient, geometry as (sh, sw, ph, pw)."""
    sh, sw, ph, pw = (int(v) for v in attributes["geometry"])
    torch_kernel_grad(*inputs, *outputs, strides=(sh, sw), padding=((ph, ph), (pw, pw)))


kernel_grad_p = Primitive("jaxft_conv_kernel_grad")


def _abstract(x, g, *, kernel_shape, strides, padding):
    return jax.core.ShapedArray(kernel_shape, x.dtype)


def _eager(x, g, *, kernel_shape, strides, padding):
    if jax.default_backend() == "cpu" and available():
        out = np.empty(kernel_shape, np.dtype(x.dtype))
        # torch reads the operands and does not write them; numpy views of JAX arrays are read-only
        x, g = (np.array(a) for a in (x, g))
        torch_kernel_grad(x, g, out, strides=strides, padding=padding)
        return jnp.asarray(out)
    return _xla_kernel_grad(x, g, kernel_shape=kernel_shape, strides=strides, padding=padding)


def _batched(args, dims, **params):
    """Under ``vmap`` (per-example gradients, say), XLA's gradient for each."""
    return jax.vmap(functools.partial(_xla_kernel_grad, **params), in_axes=dims)(*args), 0


def _jvp(primals, tangents, **params):
    """The kernel gradient is bilinear in (x, g); its derivative is XLA's (gradients of gradients)."""
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    _, tangent = jax.jvp(functools.partial(_xla_kernel_grad, **params), tuple(primals), tangents)
    return kernel_grad_p.bind(*primals, **params), tangent


def _partitioned(ctx) -> bool:
    """Whether the step is partitioned over several devices (a callback would run on one)."""
    context = ctx.module_context.axis_context
    return getattr(getattr(context, "mesh", None), "size", 1) > 1 or getattr(context, "num_devices", 1) > 1


def _cpu_lowering(ctx, x, g, *, kernel_shape, strides, padding):
    if not available() or _partitioned(ctx):
        xla = functools.partial(_xla_kernel_grad, kernel_shape=kernel_shape, strides=strides, padding=padding)
        return mlir.lower_fun(xla, multiple_results=False)(ctx, x, g)
    geometry = np.array([*strides, padding[0][0], padding[1][0]], np.int64)
    return jax.ffi.ffi_lowering(TARGET)(ctx, x, g, geometry=geometry)


kernel_grad_p.def_abstract_eval(_abstract)
kernel_grad_p.def_impl(_eager)
batching.primitive_batchers[kernel_grad_p] = _batched
ad.primitive_jvps[kernel_grad_p] = _jvp
mlir.register_lowering(kernel_grad_p, mlir.lower_fun(_xla_kernel_grad, multiple_results=False))
mlir.register_lowering(kernel_grad_p, _cpu_lowering, platform="cpu")


def kernel_grad(x, g, *, kernel_shape, strides, padding):
    """The kernel gradient of ``conv(x, kernel)`` (NHWC, HWIO, symmetric padding) for the output
    gradient ``g``: torch's kernel on the CPU where ``available()``, else XLA's."""
    return kernel_grad_p.bind(x, g, kernel_shape=tuple(kernel_shape), strides=tuple(strides),
                              padding=tuple(map(tuple, padding)))
