"""Convolution gradients on the CPU by torch's own kernels, called from inside the jitted step.

On the CPU, XLA's kernel gradient of a kxk convolution is its slowest kernel: on the Intel Xeon
this project measured (jaxlib 0.10), resnet18's 56x56, 64 -> 64 layer at batch 16 takes 95-114 ms
where torch's ``convolution_backward`` (oneDNN) takes 13 ms, and it is further from float64 (6e-6
against 3e-7). jaxft depends on torch already (it is the weights' source and the numerical
reference), so ``conv_grad`` computes a convolution's input or kernel gradient with torch's kernel:
a JAX primitive whose CPU lowering is a host callback into torch, on the arrays XLA holds, without
copying them (``jax.pure_callback`` copies every operand first, about 0.6 ms per MiB, which ate
most of the gain). Elsewhere (a GPU; a step partitioned over several devices, where a callback
would gather every operand onto one of them) it lowers to XLA's own gradient. docs/decisions.md
says why and what it costs (a step with a host callback is not kept in JAX's persistent
compilation cache).

The lowering uses ``jax._src.callback.emit_python_callback``, an internal of JAX: ``available()``
is False on a JAX release it was not checked against (``CHECKED_JAX``) or where that function is
missing, and the layers then take XLA's own route.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir

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
    """Whether ``conv_grad`` can call torch's kernels on this JAX (else it is XLA's gradient)."""
    return _emit_python_callback() is not None


def _xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _xla_grad(x, kernel, g, *, strides, padding, wrt):
    """XLA's own gradient: the reference route and the lowering off the CPU."""
    if wrt == "input":
        return jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)[1](g)[0]
    return jax.vjp(lambda k: _xla_conv(x, k, strides, padding), kernel)[1](g)[0]


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


def torch_grad(x, kernel, g, *, strides, padding, wrt):
    """The input (``wrt="input"``) or kernel gradient of an NHWC x HWIO convolution with symmetric
    ``padding`` ((p, p), (q, q)), by ``torch.ops.aten.convolution_backward`` on views of the numpy
    arrays (NHWC seen as channels-last NCHW, which oneDNN takes as it is)."""
    import torch

    x_t = torch.from_numpy(_writable(x)).permute(0, 3, 1, 2)
    g_t = torch.from_numpy(_writable(g)).permute(0, 3, 1, 2)
    kernel_t = torch.from_numpy(_writable(kernel)).permute(3, 2, 0, 1)
    want_input = wrt == "input"
    d_input, d_kernel, _ = torch.ops.aten.convolution_backward(
        g_t, x_t, kernel_t, None, list(strides), [p[0] for p in padding], [1, 1], False, [0, 0], 1,
        [want_input, not want_input, False])
    if want_input:
        return np.ascontiguousarray(d_input.permute(0, 2, 3, 1).numpy())
    return np.ascontiguousarray(d_kernel.permute(2, 3, 1, 0).numpy())


conv_grad_p = Primitive("jaxft_conv_grad")


def _abstract(x, kernel, g, *, strides, padding, wrt):
    like = x if wrt == "input" else kernel
    return jax.core.ShapedArray(like.shape, like.dtype)


def _eager(x, kernel, g, *, strides, padding, wrt):
    if jax.default_backend() == "cpu" and available():
        return jnp.asarray(torch_grad(x, kernel, g, strides=strides, padding=padding, wrt=wrt))
    return _xla_grad(x, kernel, g, strides=strides, padding=padding, wrt=wrt)


def _partitioned(ctx) -> bool:
    """Whether the step is partitioned over several devices (a callback would run on one)."""
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    return getattr(mesh, "size", 1) > 1 or getattr(ctx.module_context.axis_context, "num_devices", 1) > 1


def _cpu_lowering(ctx, x, kernel, g, *, strides, padding, wrt):
    if not available() or _partitioned(ctx):
        return mlir.lower_fun(functools.partial(_xla_grad, strides=strides, padding=padding, wrt=wrt),
                              multiple_results=False)(ctx, x, kernel, g)

    def callback(x, kernel, g):
        return (torch_grad(x, kernel, g, strides=strides, padding=padding, wrt=wrt),)

    results, _, _ = _emit_python_callback()(ctx, callback, None, [x, kernel, g], ctx.avals_in, ctx.avals_out,
                                            has_side_effect=False, returns_token=False)
    return results


conv_grad_p.def_abstract_eval(_abstract)
conv_grad_p.def_impl(_eager)
mlir.register_lowering(conv_grad_p, mlir.lower_fun(_xla_grad, multiple_results=False))
mlir.register_lowering(conv_grad_p, _cpu_lowering, platform="cpu")


def conv_grad(x, kernel, g, *, strides, padding, wrt):
    return conv_grad_p.bind(x, kernel, g, strides=tuple(strides), padding=tuple(map(tuple, padding)), wrt=wrt)
