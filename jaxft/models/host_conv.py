"""Convolutions on the CPU by torch's own kernels, called from the jitted step.

On the CPU, XLA's kxk convolutions are slower than torch's (oneDNN) on this project's 2-core
machines: its kernel gradient most of all (resnet18's 56x56, 64 -> 64 layer at batch 16: 102 ms
against torch's 14 ms, and further from float64, 6e-6 against 3e-7), and its forward pass and
input gradient because YNNPACK runs 64-channel convolutions on one core (24 against 12 ms, 25
against 20 ms). jaxft depends on torch already (it is the weights' source and the numerical
reference), so ``conv``, ``input_grad`` and ``kernel_grad`` compute a convolution, its input
gradient and its kernel gradient with torch's kernels: JAX primitives whose CPU lowering is an XLA
FFI custom call (``python_ffi.py``) whose handler runs torch on XLA's own buffers, uncopied
(the forward pass and stride-1 input gradients write into XLA's result buffer too). The
step names its targets, so it stays in JAX's persistent compilation cache. Elsewhere (a GPU; a
step partitioned over several devices, where the call would gather every operand onto each;
under ``vmap``) each is XLA's own operation, and so are their derivatives (JVP rules, for
gradients of gradients). docs/decisions.md says why.

The handlers read XLA's FFI structures as jaxlib's ``c_api.h`` lays them out: ``available()`` is
False on a JAX release that header was not checked for (``CHECKED_JAX``), and where the user
turned the route off (``JAXFT_TORCH_KERNELS=0``); the layers then take the routes they had before.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import version
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxft.models import python_ffi

# JAX releases (major, minor) whose jaxlib's FFI structures (c_api.h) python_ffi.py was checked against
CHECKED_JAX = {(0, 10)}
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _jax_release() -> Optional[tuple[int, int]]:
    try:
        major, minor = version("jax").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - an unreadable version is an unchecked one
        return None


def available() -> bool:
    """Whether the primitives here can call torch's kernels: on a checked JAX release, unless the
    user set ``JAXFT_TORCH_KERNELS=0`` (every kernel XLA's). Else the layers take the routes they
    had before."""
    return os.environ.get("JAXFT_TORCH_KERNELS", "1") != "0" and _registered()


def output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
    """The NHWC shape of ``conv(x, kernel)`` (HWIO kernel, padding ((top, bottom), (left, right)))."""
    n, h, w, _ = x_shape
    kh, kw, _, c_out = kernel_shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    return n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, c_out


# XLA's own operations, each giving a result of shape ``out_shape``: the lowering off the CPU and
# wherever torch cannot serve, and the derivatives

def _xla_conv(x, kernel, *, out_shape, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS)


def _xla_input_grad(g, kernel, *, out_shape, strides, padding):
    conv = functools.partial(_xla_conv, kernel=kernel, out_shape=g.shape, strides=strides, padding=padding)
    return jax.vjp(conv, jnp.zeros(out_shape, g.dtype))[1](g)[0]


def _xla_kernel_grad(x, g, *, out_shape, strides, padding):
    conv = functools.partial(_xla_conv, x, out_shape=g.shape, strides=strides, padding=padding)
    return jax.vjp(conv, jnp.zeros(out_shape, x.dtype))[1](g)[0]


# torch's kernels, writing into ``out``. NHWC arrays are seen as channels-last NCHW tensors and HWIO
# kernels as OIHW ones, which oneDNN takes as they are; padding is symmetric ((p, p), (q, q)).

def _nchw(a):
    import torch

    return torch.from_numpy(a).permute(0, 3, 1, 2)


def _oihw(kernel):
    import torch

    return torch.from_numpy(kernel).permute(3, 2, 0, 1)


def _backward(g, x, kernel, strides, padding, mask):
    import torch

    return torch.ops.aten.convolution_backward(g, x, kernel, None, list(strides), [p[0] for p in padding], [1, 1],
                                               False, [0, 0], 1, mask)


def torch_conv(x: np.ndarray, kernel: np.ndarray, out: np.ndarray, *, strides, padding) -> None:
    """``out`` = the NHWC convolution of ``x`` with the HWIO ``kernel``, by oneDNN (``_conv_into``)."""
    _conv_into(out, x, _oihw(kernel), strides, [p[0] for p in padding])


def torch_input_grad(g: np.ndarray, kernel: np.ndarray, out: np.ndarray, *, strides, padding) -> None:
    """``out`` = the input gradient (NHWC) for the output gradient ``g``. With stride 1 it is the
    convolution of ``g`` with the kernel flipped and its channels swapped, padded k-1-p
    (``_conv_into``: the same bits as oneDNN's backward-data kernel, measured, and without its
    result's copy); else ``torch.ops.aten.convolution_backward``, whose only use of the input is
    its shape, which ``out`` gives."""
    import torch

    (kh, kw), pads = kernel.shape[:2], [p[0] for p in padding]
    flipped_pads = [kh - 1 - pads[0], kw - 1 - pads[1]]
    if tuple(strides) == (1, 1) and min(flipped_pads) >= 0:
        flipped = torch.from_numpy(kernel).flip(0, 1).permute(2, 3, 0, 1)  # HWIO -> (I, O, H, W), flipped
        _conv_into(out, g, flipped, (1, 1), flipped_pads)
        return
    d_input, _, _ = _backward(_nchw(g), _nchw(out), _oihw(kernel), strides, padding, [True, False, False])
    _nchw(out).copy_(d_input)


def _conv_into(out: np.ndarray, x: np.ndarray, kernel, strides, pads: list[int]) -> None:
    """``out`` = the NHWC convolution of ``x`` with the OIHW tensor ``kernel``, written by oneDNN
    into ``out`` itself: its fused ``out += conv(x)`` (``mkldnn._convolution_pointwise_``, which
    torch.compile's CPU backend emits) over ``out`` zeroed. ``aten.convolution`` would return a
    new tensor to be copied into ``out``: for the ResNet stem at 224 px, batch 16 (a 51 MB result)
    115 against 20 ms, the difference the page faults of a fresh result and the copy. Where that
    operation is missing (torch built without oneDNN), the copy."""
    import torch

    result = _nchw(out)
    fused = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None) if torch.backends.mkldnn.is_available() else None
    if fused is None:
        result.copy_(torch.ops.aten.convolution(_nchw(x), kernel, None, list(strides), pads, [1, 1], False, [0, 0], 1))
        return
    result.zero_()
    fused.binary(result, _nchw(x), kernel, None, pads, list(strides), [1, 1], 1, "add", None, None, [], None)


def torch_kernel_grad(x: np.ndarray, g: np.ndarray, out: np.ndarray, *, strides, padding) -> None:
    """``out`` = the HWIO kernel gradient for the input ``x`` and output gradient ``g``, by
    ``torch.ops.aten.convolution_backward``; the kernel's values are not needed, only its shape,
    which ``out`` gives."""
    _, d_kernel, _ = _backward(_nchw(g), _nchw(x), _oihw(out), strides, padding, [False, True, False])
    _oihw(out).copy_(d_kernel)


def _partitioned(ctx) -> bool:
    """Whether the step is partitioned over several devices (a custom call would run on each with
    every operand gathered)."""
    context = ctx.module_context.axis_context
    return getattr(getattr(context, "mesh", None), "size", 1) > 1 or getattr(context, "num_devices", 1) > 1


class _TorchOp:
    """A JAX primitive of two operands and a result of shape ``out_shape``, computed by the torch
    kernel ``torch_name`` (a function of this module, looked up at each call) on the CPU, and by
    ``xla`` elsewhere and for its derivatives."""

    def __init__(self, name: str, torch_name: str, xla: Callable):
        self.primitive, self.target, self.torch_name, self.xla = Primitive(name), f"jaxft_torch_{name}", torch_name, xla
        p = self.primitive
        p.def_abstract_eval(self._abstract)
        p.def_impl(self._eager)
        batching.primitive_batchers[p] = self._batched
        ad.primitive_jvps[p] = self._jvp
        mlir.register_lowering(p, mlir.lower_fun(self.xla, multiple_results=False))
        mlir.register_lowering(p, self._cpu_lowering, platform="cpu")

    def _abstract(self, a, b, *, out_shape, **params):
        return jax.core.ShapedArray(out_shape, a.dtype)

    def _torch(self, inputs, outputs, strides, padding) -> None:
        globals()[self.torch_name](*inputs, *outputs, strides=strides, padding=padding)

    def _eager(self, a, b, **params):
        if jax.default_backend() == "cpu" and available():
            out = np.empty(params["out_shape"], np.dtype(a.dtype))
            # torch reads the operands and does not write them; numpy views of JAX arrays are read-only
            self._torch([np.array(a), np.array(b)], [out], params["strides"], params["padding"])
            return jnp.asarray(out)
        return self.xla(a, b, **params)

    def _batched(self, args, dims, **params):
        """Under ``vmap`` (per-example gradients, say), XLA's operation for each."""
        return jax.vmap(functools.partial(self.xla, **params), in_axes=dims)(*args), 0

    def _jvp(self, primals, tangents, **params):
        """Each operation is bilinear in its operands; its derivative is XLA's (gradients of gradients)."""
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        _, tangent = jax.jvp(functools.partial(self.xla, **params), tuple(primals), tangents)
        return self.primitive.bind(*primals, **params), tangent

    def _handle(self, inputs, outputs, attributes) -> None:
        sh, sw, ph, pw = (int(v) for v in attributes["geometry"])
        self._torch(inputs, outputs, (sh, sw), ((ph, ph), (pw, pw)))

    def _cpu_lowering(self, ctx, a, b, **params):
        if not available() or _partitioned(ctx):
            return mlir.lower_fun(functools.partial(self.xla, **params), multiple_results=False)(ctx, a, b)
        strides, padding = params["strides"], params["padding"]
        geometry = np.array([*strides, padding[0][0], padding[1][0]], np.int64)
        return jax.ffi.ffi_lowering(self.target)(ctx, a, b, geometry=geometry)

    def bind(self, a, b, *, out_shape, strides, padding):
        return self.primitive.bind(a, b, out_shape=tuple(out_shape), strides=tuple(strides),
                                   padding=tuple(map(tuple, padding)))


_CONV = _TorchOp("conv", "torch_conv", _xla_conv)
_INPUT_GRAD = _TorchOp("conv_input_grad", "torch_input_grad", _xla_input_grad)
_KERNEL_GRAD = _TorchOp("conv_kernel_grad", "torch_kernel_grad", _xla_kernel_grad)
TARGETS = tuple(op.target for op in (_CONV, _INPUT_GRAD, _KERNEL_GRAD))


@functools.cache
def _registered() -> bool:
    """Whether torch's kernels are registered as FFI targets (on a checked JAX release)."""
    if _jax_release() not in CHECKED_JAX:
        return False
    for op in (_CONV, _INPUT_GRAD, _KERNEL_GRAD):
        python_ffi.register_cpu_target(op.target, op._handle)
    return True


def conv(x, kernel, *, strides, padding):
    """``conv(x, kernel)`` (NHWC, HWIO, symmetric padding): torch's kernel on the CPU where
    ``available()``, else XLA's."""
    return _CONV.bind(x, kernel, out_shape=output_shape(x.shape, kernel.shape, strides, padding), strides=strides,
                      padding=padding)


def input_grad(g, kernel, *, input_shape, strides, padding):
    """The input gradient of ``conv(x, kernel)`` for the output gradient ``g``."""
    return _INPUT_GRAD.bind(g, kernel, out_shape=input_shape, strides=strides, padding=padding)


def kernel_grad(x, g, *, kernel_shape, strides, padding):
    """The kernel gradient of ``conv(x, kernel)`` for the output gradient ``g``."""
    return _KERNEL_GRAD.bind(x, g, out_shape=kernel_shape, strides=strides, padding=padding)
