"""Convolution kernel gradients on the CPU by torch's own kernel, called from the jitted step.

On the CPU, XLA's kernel gradient of a kxk convolution is its slowest kernel: on the Intel Xeon
this project measured (jaxlib 0.10), resnet18's 56x56, 64 -> 64 layer at batch 16 takes 101 ms
where this primitive takes 16 ms (13 ms of them torch's ``convolution_backward``, oneDNN), and it
is further from float64 (6e-6 against 3e-7). jaxft depends on torch already (it is the weights'
source and the numerical reference), so ``kernel_grad`` computes a convolution's kernel gradient
with torch's kernel: a JAX primitive whose CPU lowering is a host callback into torch. jaxlib
hands the callback its own copy of each operand (0.1-0.25 ms per MiB measured); ``jax.pure_callback``
copies them again first (about 0.8 ms per MiB in all), which ate most of the gain. Elsewhere (a
GPU; a step partitioned over several devices, where a callback would gather every operand onto
one of them; under ``vmap``) it is XLA's own gradient, and so is its derivative (a JVP rule, for
gradients of gradients). docs/decisions.md says why and what it costs (a step with a
host callback is not kept in JAX's persistent compilation cache).

The lowering uses ``jax._src.callback.emit_python_callback``, an internal of JAX: ``available()``
is False on a JAX release it was not checked against (``CHECKED_JAX``) or where that function is
missing, and where the user turned the route off (``JAXFT_TORCH_KERNELS=0``); the layers then
take the routes they had before.
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

# JAX releases (major, minor) whose internal emit_python_callback this module was checked against
CHECKED_JAX = {(0, 10)}


def _jax_release() -> Optional[tuple[int, int]]:
    try:
        major, minor = version("jax").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - an unreadable version is an unchecked one
        return None


@functools.cache
def _emit_python_callback():
    if _jax_release() not in CHECKED_JAX:
        return None
    try:
        from jax._src.callback import emit_python_callback
    except ImportError:
        return None
    return emit_python_callback


def available() -> bool:
    """Whether ``kernel_grad`` can call torch's kernel: on a checked JAX release, unless the user
    set ``JAXFT_TORCH_KERNELS=0`` (every kernel XLA's, and every step cacheable). Else the layers
    take the routes they had before."""
    return os.environ.get("JAXFT_TORCH_KERNELS", "1") != "0" and _emit_python_callback() is not None


def _xla_kernel_grad(x, g, *, kernel_shape, strides, padding):
    """XLA's own kernel gradient: the lowering off the CPU and where a callback cannot serve."""
    def conv(kernel):
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return jax.vjp(conv, jnp.zeros(kernel_shape, x.dtype))[1](g)[0]


def _writable(a) -> np.ndarray:
    """``a`` as a numpy array torch takes without a warning: jaxlib hands the callback read-only
    arrays that own their data (its copies of the operands), which can simply be marked writable;
    a read-only view of someone else's memory (a JAX array, eagerly) is copied."""
    a = np.asarray(a)
    if not a.flags.writeable:
        if a.flags.owndata:
            a.flags.writeable = True
        else:
            a = a.copy()
    return a


def torch_kernel_grad(x, g, *, kernel_shape, strides, padding) -> np.ndarray:
    """The HWIO kernel gradient of an NHWC convolution with symmetric ``padding`` ((p, p), (q, q))
    by ``torch.ops.aten.convolution_backward``, on views of the numpy arrays (NHWC seen as
    channels-last NCHW, which oneDNN takes as it is). The kernel's values are not needed: torch
    gets an uninitialised tensor of its shape."""
    import torch

    kh, kw, c_in, c_out = kernel_shape
    _, d_kernel, _ = torch.ops.aten.convolution_backward(
        torch.from_numpy(_writable(g)).permute(0, 3, 1, 2), torch.from_numpy(_writable(x)).permute(0, 3, 1, 2),
        torch.empty((c_out, c_in, kh, kw), dtype=torch.float32), None, list(strides), [p[0] for p in padding],
        [1, 1], False, [0, 0], 1, [False, True, False])
    return np.ascontiguousarray(d_kernel.permute(2, 3, 1, 0).numpy())


kernel_grad_p = Primitive("jaxft_conv_kernel_grad")


def _abstract(x, g, *, kernel_shape, strides, padding):
    return jax.core.ShapedArray(kernel_shape, x.dtype)


def _eager(x, g, **params):
    if jax.default_backend() == "cpu" and available():
        return jnp.asarray(torch_kernel_grad(x, g, **params))
    return _xla_kernel_grad(x, g, **params)


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


def _cpu_lowering(ctx, x, g, **params):
    if not available() or _partitioned(ctx):
        return mlir.lower_fun(functools.partial(_xla_kernel_grad, **params), multiple_results=False)(ctx, x, g)

    def callback(x, g):
        return (torch_kernel_grad(x, g, **params),)

    results, _, _ = _emit_python_callback()(ctx, callback, None, [x, g], ctx.avals_in, ctx.avals_out,
                                            has_side_effect=False, returns_token=False)
    return results


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
