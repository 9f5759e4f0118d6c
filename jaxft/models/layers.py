"""The few layers whose PyTorch semantics Flax does not provide.

* ``BatchNorm``: torch's running-variance rule (the running variance is updated with the
  *unbiased* batch variance while the batch is normalised with the biased one), torch's
  momentum convention, and a per-layer switch to normalise with running statistics while
  training (the ``running`` policy for frozen layers).
* ``adaptive_avg_pool``: ``nn.AdaptiveAvgPool2d`` for any input size, bins included.
* ``max_pool``: ``nn.MaxPool2d`` with torch's gradient rule, and a backward pass XLA:CPU runs
  several times faster than the one JAX derives for ``reduce_window``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxft.models import host_conv

Dtype = Any

# Matches torch.nn.BatchNorm2d defaults.
BN_EPS = 1e-5
BN_TORCH_MOMENTUM = 0.1


class BatchNorm(nn.Module):
    """BatchNorm2d over the last (channel) axis of an NHWC tensor, with torch semantics.

    A layer whose path (``layer1_0/bn1``) is in ``frozen_paths`` normalises with its
    running statistics and leaves them untouched even when ``train=True``: the
    ``running`` policy for frozen layers. Statistics are always computed in float32.
    """

    epsilon: float = BN_EPS
    momentum: float = BN_TORCH_MOMENTUM  # torch convention: weight of the *new* batch
    dtype: Dtype = jnp.float32
    frozen_paths: frozenset = frozenset()
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """``mask`` (N,) marks real samples of a batch padded to the device count: batch
        statistics then cover real samples only, so padding never changes the result."""
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

        x32 = x.astype(jnp.float32)
        if train and "/".join(self.path) not in self.frozen_paths:
            if mask is None:
                axes = tuple(range(x.ndim - 1))
                mean = jnp.mean(x32, axis=axes)
                var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # biased, used to normalise
                count = math.prod(x.shape[:-1])
            else:
                count = jnp.sum(mask.astype(jnp.float32)) * math.prod(x.shape[1:-1])
                mean, var = _masked_moments(x32, mask.astype(jnp.float32), count)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value

        inv = scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        y = x32 * inv + (bias - mean * inv)
        return y.astype(self.dtype)


@jax.custom_vjp
def _masked_moments(x: jnp.ndarray, weight: jnp.ndarray, count: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The per-channel mean and biased variance (two passes) of the NHWC ``x`` over the samples
    whose ``weight`` (N,) is 1, ``count`` the number of their cells (sum(weight) * H * W).

    A batch is padded (some weights 0) only at an epoch's last step or where it does not divide
    over the devices; on the CPU every other step takes the branch without weights, whose
    reductions read ``x`` alone. Multiplying by the weights inside the reductions made XLA:CPU
    write the mask out at each activation's shape as the reductions' operand and keep ``x - mean``
    as well (the stem's 16x112x112x64 at 224 px: 16 + 15 ms a step; docs/benchmarks.md). Other
    backends keep the weighted reductions: a conditional there may read its predicate on the
    host, once per BatchNorm. The gradient is written out, so no branch is differentiated:
    d/dx = weight * (g_mean + 2 g_var (x - mean)) / count (the variance's path through the mean
    is zero since the weighted deviations sum to zero, which holds for that ``count``);
    ``weight`` and ``count`` are data, their cotangents zero. A custom VJP is reverse mode only:
    ``jax.jvp`` through a train-mode BatchNorm with a mask is refused (nothing in jaxft
    differentiates forward)."""
    return _masked_moments_forward(x, weight, count)[0]


def _per_sample(weight: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """The (N,) sample weights shaped to broadcast over an N... activation of ``ndim`` axes."""
    return weight.reshape((-1,) + (1,) * (ndim - 1))


def _moments_of_every_sample(x, weight, count):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.sum(x, axis=axes) / count
    return mean, jnp.sum(jnp.square(x - mean), axis=axes) / count


def _moments_of_real_samples(x, weight, count):
    axes = tuple(range(x.ndim - 1))
    w = _per_sample(weight, x.ndim)
    mean = jnp.sum(x * w, axis=axes) / count
    return mean, jnp.sum(jnp.square(x - mean) * w, axis=axes) / count


def _masked_moments_forward(x, weight, count):
    if jax.default_backend() == "cpu":
        mean, var = jax.lax.cond(jnp.all(weight > 0), _moments_of_every_sample, _moments_of_real_samples,
                                 x, weight, count)
    else:
        mean, var = _moments_of_real_samples(x, weight, count)
    return (mean, var), (x, weight, count, mean)


def _masked_moments_backward(residuals, grads):
    x, weight, count, mean = residuals
    g_mean, g_var = grads
    g_x = _per_sample(weight, x.ndim) * (g_mean + 2.0 * g_var * (x - mean)) / count
    return g_x, jnp.zeros_like(weight), jnp.zeros_like(count)


_masked_moments.defvjp(_masked_moments_forward, _masked_moments_backward)


def _bin_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Row i averages input cells floor(i*in/out) .. ceil((i+1)*in/out) - 1, as torch does."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """``nn.AdaptiveAvgPool2d(output_size)`` for NHWC input of any spatial size.

    Written as two small averaging matrices so bins that overlap or repeat (inputs
    smaller than the output) are handled exactly like torch; identity sizes are skipped.
    """
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # equal, disjoint bins: a plain reshape-mean
        n, _, _, c = x.shape
        return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
    mh = jnp.asarray(_bin_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_bin_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", mh, x, mw)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
    """``nn.MaxPool2d(window, stride, padding)`` on NHWC, padding with -inf, floor mode.

    The forward pass is ``reduce_window``'s; the backward pass works on the window's
    ``window**2`` strided views of the input. The gradient follows torch: each output's gradient
    goes to the *first* maximal input of its window in row-major order (ties are common after a
    ReLU and in low-precision inputs). JAX's own gradient of ``reduce_window`` packs values with
    their indices and scatters them: on the CPU that took 256 ms for resnet's stem pool at 224 px
    (batch 16, forward and backward), against 85 ms for torch's and 71 ms for this one, which
    is elementwise work on strided views (docs/benchmarks.md has the figures)."""
    return _max_pool(x, window, stride, padding)


def _pool_views(x: jnp.ndarray, window: int, stride: int, padding: int) -> tuple[jnp.ndarray, list]:
    """The -inf-padded input and its window**2 strided views, each one output map in size,
    in row-major order of the window's taps."""
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    n, hp, wp, c = padded.shape
    oh, ow = (hp - window) // stride + 1, (wp - window) // stride + 1
    views = [lax.slice(padded, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                       (1, stride, stride, 1)) for i in range(window) for j in range(window)]
    return padded, views


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    # the forward pass is reduce_window's: twice as fast on the CPU as the maximum of the views
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)


def _max_pool_forward(x, window, stride, padding):
    y = _max_pool(x, window, stride, padding)
    return y, (x, y)


def _max_pool_backward(window, stride, padding, residuals, g):
    x, y = residuals
    padded, views = _pool_views(x, window, stride, padding)
    _, hp, wp, _ = padded.shape
    oh, ow = y.shape[1:3]
    grad = jnp.zeros(padded.shape, g.dtype)
    taken = jnp.zeros(y.shape, bool)
    for tap, view in enumerate(views):
        i, j = divmod(tap, window)
        first = (view == y) & ~taken
        taken = taken | first
        # scatter back to the tap's strided positions: pad with stride-1 zeros between cells
        grad = grad + lax.pad(jnp.where(first, g, 0), jnp.zeros((), g.dtype),
                              ((0, 0, 0), (i, hp - i - (oh - 1) * stride - 1, stride - 1),
                               (j, wp - j - (ow - 1) * stride - 1, stride - 1), (0, 0, 0)))
    h, w = x.shape[1:3]
    return (grad[:, padding:padding + h, padding:padding + w, :],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


class Conv(nn.Module):
    """``nn.Conv`` (same ``kernel``/``bias`` params, HWIO) with routes around XLA:CPU's slow
    paths (each measured and parity-tested; docs/benchmarks.md):

    * an unpadded 1x1 convolution is a matmul over the (strided) map's pixels
      (``_pointwise_matmul``): on the CPU about twice as fast as XLA's convolution, gradients
      included;
    * a 1x1 map under a "same"-padded kxk kernel only meets the centre tap: one matmul;
    * XLA:CPU has a performance cliff for kxk convolutions (k > 1) over 2x2..2x3 maps
      (what layer4 sees at 64 px): 3-30x slower than the same product as patches @ kernel,
      so on CPU those maps take the matmul route;
    * a kxk convolution of up to 256 channels, or over a map of at least 10x10 cells, with at
      least 10 MiB of input and output maps, by torch's CPU kernels, forward pass and gradients,
      called from the step (``_conv_by_torch``, ``host_conv.py``); where that route is not
      available, the kernel gradient of a stride-1 kxk convolution over a large map as k*k
      matmuls (``_conv_tap_kernel_grad``);
    * the input gradient of a strided kxk convolution over a map of at most 4x4 as one
      stride-1 convolution per output phase (``_conv_phase_input_grad``).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = ((0, 0), (0, 0))
    use_bias: bool = True
    feature_group_count: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, in_features // self.feature_group_count, self.features),
                            self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        dims = ("NHWC", "HWIO", "NHWC")
        by_torch = False
        if _use_pointwise_matmul(self.kernel_size, self.padding, self.feature_group_count):
            y = _pointwise_matmul(x, kernel, tuple(self.strides))
        elif _center_tap_only(x.shape, self.kernel_size, self.padding, self.feature_group_count):
            # a 1x1 map padded by k//2: every other tap multiplies zeros; one matmul does it
            kh, kw = self.kernel_size
            y = x @ kernel[kh // 2, kw // 2]
        elif _use_patches(x.shape, self.kernel_size, self.padding, self.feature_group_count):
            y = _patches(x, self.kernel_size, self.strides, self.padding) @ kernel.reshape(-1, self.features)
        elif _use_torch_conv(x, self.features, self.kernel_size, self.strides, self.padding,
                             self.feature_group_count):
            y = _conv_by_torch(x, kernel, tuple(self.strides), tuple(map(tuple, self.padding)))
            by_torch = True
        elif _use_tap_kernel_grad(x, self.features, self.kernel_size, self.strides, self.padding,
                                  self.feature_group_count):
            y = _conv_tap_kernel_grad(x, kernel, tuple(map(tuple, self.padding)))
        elif _use_phase_input_grad(x, self.kernel_size, self.strides, self.padding, self.feature_group_count):
            y = _conv_phase_input_grad(x, kernel, tuple(self.strides), tuple(map(tuple, self.padding)))
        else:
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding, dimension_numbers=dims,
                                             feature_group_count=self.feature_group_count)
        routes = getattr(_traced_routes, "routes", None)
        if routes is not None and max(self.kernel_size) > 1:
            routes.append(by_torch)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


# While `forward_convolutions_by_torch` traces a model on this thread (`.routes`): for each kxk
# convolution, whether torch's kernels take it
_traced_routes = threading.local()


def forward_convolutions_by_torch(model: nn.Module, batch_size: int, image_size: int) -> bool:
    """Whether torch's kernels (``_conv_by_torch``) take every kxk convolution of ``model``'s
    forward pass over a float32 batch of ``batch_size`` RGB images of ``image_size`` px on one
    CPU device. Read from a trace of ``model.init`` (shapes only: nothing is computed)."""
    if not host_conv.available():
        return False
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    with _tracing_routes() as routes:
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return bool(routes) and all(routes)


@contextlib.contextmanager
def _tracing_routes():
    outer = getattr(_traced_routes, "routes", None)
    _traced_routes.routes = routes = []
    try:
        yield routes
    finally:
        _traced_routes.routes = outer


def _use_pointwise_matmul(kernel_size: tuple[int, int], padding: Any, groups: int) -> bool:
    return (jax.default_backend() == "cpu" and tuple(kernel_size) == (1, 1) and groups == 1
            and not isinstance(padding, str) and tuple(map(tuple, padding)) == ((0, 0), (0, 0)))


def _pointwise_matmul(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int]) -> jnp.ndarray:
    """An unpadded 1x1 convolution (NHWC, HWIO) as one matmul: the strided map's pixels as rows of
    an (N*H*W, C_in) matrix, times the kernel as (C_in, C_out). Its gradients are matmuls too (the
    kernel's contracts over every pixel; the input's is scattered back onto every stride-th
    pixel), and need no layout change in NHWC."""
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]  # an unpadded 1x1 kernel reads only every stride-th pixel
    n, h, w, cin = x.shape
    return (x.reshape(-1, cin) @ kernel.reshape(cin, -1)).reshape(n, h, w, -1)


def _center_tap_only(shape: tuple[int, ...], kernel_size: tuple[int, int], padding: Any, groups: int) -> bool:
    _, h, w, _ = shape
    kh, kw = kernel_size
    return (h, w) == (1, 1) and groups == 1 and tuple(map(tuple, padding)) == ((kh // 2,) * 2, (kw // 2,) * 2)


def _patches(x: jnp.ndarray, kernel_size: tuple[int, int], strides: tuple[int, int], padding: Any) -> jnp.ndarray:
    """The kxk patches of the NHWC map ``x``: the padded map's k*k shifted (strided) views,
    concatenated along the channels, so that their features are ordered (kh, kw, c_in) as an HWIO
    kernel reshaped to (kh*kw*c_in, c_out) is, and the kernel is used as stored.
    (``lax.conv_general_dilated_patches`` orders them (c_in, kh, kw), which cost a transposed copy
    of the kernel every step, and builds them with a one-hot convolution, 3.5 ms each for
    resnet18's layer4 at batch 32 x 64 px: the `head` step 84 -> 61 ms, docs/benchmarks.md.)"""
    kh, kw = kernel_size
    sh, sw = strides
    _, out_h, out_w, _ = host_conv.output_shape(x.shape, (kh, kw, 0, 0), strides, padding)
    padded = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    views = [padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    return jnp.concatenate(views, axis=-1)


def _use_patches(shape: tuple[int, ...], kernel_size: tuple[int, int], padding: Any, groups: int) -> bool:
    """A kxk convolution over a 2..6-cell map, on the CPU. (Also routing strided convolutions
    *onto* such a map, 4x4 -> 2x2, was 3x faster for their fwd+bwd but moved an Adam trajectory
    through BatchNorm 4.6 ulps from float64, past tests/test_bn_parity.py's bound: not taken,
    docs/benchmarks.md.)"""
    _, h, w, _ = shape
    if isinstance(padding, str) or min(p for pair in padding for p in pair) < 0:
        return False  # `_patches` pads with jnp.pad: explicit, non-negative padding only
    fits = min(host_conv.output_shape(shape, (*kernel_size, 0, 0), (1, 1), padding)[1:3]) >= 1  # any stride
    return jax.default_backend() == "cpu" and groups == 1 and max(kernel_size) > 1 and fits and 2 <= h * w <= 6


# XLA:CPU's kxk convolutions against torch's through host_conv.py's FFI targets, each jitted alone
# on the Intel Xeon (ms, XLA / torch; batch 16 unless said). Kernel gradients: 56x56, 64 -> 64
# 102 / 14; 28x28, 128 -> 128 54 / 13; the ResNet stem at 224 px 132 / 18, at 64 px batch 32 22 / 6,
# at 32 px batch 32 2.9 / 1.0; 16x16, 64 -> 64 at batch 32 11.9 / 2.8; 14x14, 256 -> 256 21.7 / 13.6;
# 8x8, 256 -> 256 at batch 32 15.2 / 9.6; 4x4, 256 -> 256 at batch 32 5.0 / 3.7. Forward passes and
# input gradients (YNN runs 64-channel ones on one core): 56x56, 64 -> 64 24 / 12 and 25 / 20; the
# stem 47 / 39 (no input gradient); 56x56, 64 -> 128 / 2 16 / 8 and 12 / 8; 28x28, 128 -> 128 and
# 14x14, 256 -> 256 13 / 12 both; vgg16's 224x224, 64 -> 64 349 / 297 and 346 / 294. But torch's
# kernels are no faster for 512 channels over small maps: kernel gradients over 10x10 37.3 / 37.6,
# 7x7 21.8 / 24.7, 4x4 at batch 32 14.3 / 23.3 (20x20: 245 / 109). So every map for layers of up to
# 256 channels, and wider layers over maps of at least 10x10 cells (docs/benchmarks.md).
TORCH_CONV_MAX_CHANNELS_ANY_MAP = 256
TORCH_CONV_MIN_CELLS = 100
# and at least this much input map and output: below it a whole step gains little in the training
# loop (resnet18 `full` at 64 px, batch 32, stem 9.5 MiB and 16x16x64 layers 4 MiB: the end-to-end
# job's epochs 39.1 / 37.6 s with XLA's kernels against 43.0 / 38.5 s with torch's kernel gradients),
# and a process whose steps call torch imports it (about 470 MiB resident for torch's CUDA build):
# the README's main job (32 px) and the 64 px end-to-end jobs stay off the route and do not import
# torch.
TORCH_CONV_MIN_BYTES = 10 * 2**20


def _use_torch_conv(x: jnp.ndarray, features: int, kernel_size: tuple[int, int], strides: tuple[int, int],
                    padding: Any, groups: int) -> bool:
    if (jax.default_backend() != "cpu" or not host_conv.available() or x.dtype != jnp.float32 or groups != 1
            or max(kernel_size) == 1 or isinstance(padding, str)):
        return False
    pads = tuple(map(tuple, padding))
    if any(low != high for low, high in pads):
        return False  # torch's convolution pads both sides alike
    _, h, w, c_in = x.shape
    y_shape = host_conv.output_shape(x.shape, (*kernel_size, c_in, features), strides, pads)
    if (x.size + math.prod(y_shape)) * x.dtype.itemsize < TORCH_CONV_MIN_BYTES:
        return False
    return max(c_in, features) <= TORCH_CONV_MAX_CHANNELS_ANY_MAP or h * w >= TORCH_CONV_MIN_CELLS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_by_torch(x, kernel, strides, padding):
    """A convolution (NHWC, HWIO) by torch's CPU kernels (``host_conv``): the forward pass, the
    input gradient (by phases where ``_use_phase_input_grad`` says so) and the kernel gradient."""
    return host_conv.conv(x, kernel, strides=strides, padding=padding)


def _conv_by_torch_forward(x, kernel, strides, padding):
    return host_conv.conv(x, kernel, strides=strides, padding=padding), (x, kernel)


def _conv_by_torch_backward(strides, padding, residuals, g):
    x, kernel = residuals
    if _use_phase_input_grad(x, kernel.shape[:2], strides, padding, 1):
        dx = _phase_input_grad(x.shape, kernel, g, strides, padding)  # a strided one over a small map
    else:
        dx = host_conv.input_grad(g, kernel, input_shape=x.shape, strides=strides, padding=padding)
    return dx, host_conv.kernel_grad(x, g, kernel_shape=kernel.shape, strides=strides, padding=padding)


_conv_by_torch.defvjp(_conv_by_torch_forward, _conv_by_torch_backward)


# Where the torch route is not taken (JAXFT_TORCH_KERNELS=0, a JAX release host_conv.py was not
# checked against, asymmetric padding):
# XLA:CPU (jaxlib 0.10) runs convolutions as YNNPACK fusions by default, and its kernel gradient of
# a stride-1 kxk convolution over large maps is 2-4x slower than the same sums as k*k matmuls (the
# input map's shifted views against the output gradient, contracted over N*H*W), e.g. vgg16's
# 112x112, 128 -> 128 layer at batch 16: 2.6 s against 0.74 s, and also 10x further from float64
# (5.8e-6 against 5.1e-7). Measured on the project's 2-core AMD EPYC: the matmuls win from about
# 24 MiB of input map with >= 128 output channels, and lose on smaller maps (resnet's 56x56x64: 56
# vs 166 ms), so the route is taken only there (docs/benchmarks.md).
TAP_KERNEL_GRAD_MIN_BYTES = 24 * 2**20
TAP_KERNEL_GRAD_MIN_FEATURES = 128
# Narrower layers only over maps this large (vgg16's 224x224x64 `features_2` at batch 16, 196 MiB):
# there the matmuls won on both CPUs measured, AMD EPYC 1.8 -> 1.4 s and Intel Xeon 3.3 -> 1.6 s,
# where over resnet's 56x56x64 maps at batch 16 they lose on the AMD (56 -> 166 ms) and win a little
# on the Intel (114 -> 99 ms)
TAP_KERNEL_GRAD_ANY_FEATURES_MIN_BYTES = 128 * 2**20


def _use_tap_kernel_grad(x: jnp.ndarray, features: int, kernel_size: tuple[int, int], strides: tuple[int, int],
                         padding: Any, groups: int) -> bool:
    nbytes = x.size * x.dtype.itemsize
    large = ((features >= TAP_KERNEL_GRAD_MIN_FEATURES and nbytes >= TAP_KERNEL_GRAD_MIN_BYTES)
             or nbytes >= TAP_KERNEL_GRAD_ANY_FEATURES_MIN_BYTES)
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and groups == 1 and max(kernel_size) > 1
            and tuple(strides) == (1, 1) and not isinstance(padding, str) and large)


def _strided_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple, padding: tuple) -> jnp.ndarray:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_stride1(x: jnp.ndarray, kernel: jnp.ndarray, padding: tuple) -> jnp.ndarray:
    return _strided_conv(x, kernel, (1, 1), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_tap_kernel_grad(x, kernel, padding):
    """A stride-1 convolution (NHWC, HWIO) whose kernel gradient is k*k matmuls: tap (i, j) of the
    gradient is the padded input's view shifted by (i, j), as an (N*H*W, C_in) matrix, transposed
    against the output gradient as (N*H*W, C_out). The forward pass and the input gradient are
    XLA's own convolutions."""
    return _conv_stride1(x, kernel, padding)


def _conv_tap_kernel_grad_forward(x, kernel, padding):
    return _conv_stride1(x, kernel, padding), (x, kernel)


def _conv_tap_kernel_grad_backward(padding, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _conv_stride1(x, kernel, padding), x)
    (dx,) = input_vjp(g)
    kh, kw, cin, cout = kernel.shape
    n, oh, ow, _ = g.shape
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    g2 = g.reshape(-1, cout)

    def tap(index):
        view = lax.dynamic_slice(padded, (0, index // kw, index % kw, 0), (n, oh, ow, cin))
        return lax.dot_general(view.reshape(-1, cin), g2, (((0,), (0,)), ((), ())),
                               precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    # One tap after another (lax.map), not k*k independent matmuls: XLA copied every shifted view
    # first, all alive at once (vgg16's 224x224x64 layer at batch 16: 1,768 MiB of temporaries
    # against 396 MiB in a loop), and the loop was faster too (1.62 -> 1.33 s), bit for bit the same
    taps = lax.map(tap, jnp.arange(kh * kw))
    return dx, taps.reshape(kernel.shape).astype(kernel.dtype)


_conv_tap_kernel_grad.defvjp(_conv_tap_kernel_grad_forward, _conv_tap_kernel_grad_backward)


# XLA:CPU (jaxlib 0.10) computes the input gradient of a strided convolution as a convolution with
# input dilation, which YNN does not take for small maps: Eigen's fallback then took 142 ms for
# resnet50's layer4.0.conv2 at 64 px (4x4x512 -> 2x2x512, batch 16), 31% of the partial:0.8 step.
# The same gradient as one stride-1 convolution per output phase took 2.8 ms (docs/benchmarks.md).
# Measured fast in XLA from 8x8 maps up, so the route is taken for maps of at most 4x4.
PHASE_INPUT_GRAD_MAX_CELLS = 16


def _use_phase_input_grad(x: jnp.ndarray, kernel_size: tuple[int, int], strides: tuple[int, int], padding: Any,
                          groups: int) -> bool:
    _, h, w, _ = x.shape
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and groups == 1 and max(kernel_size) > 1
            and max(strides) > 1 and not isinstance(padding, str) and h * w <= PHASE_INPUT_GRAD_MAX_CELLS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_phase_input_grad(x, kernel, strides, padding):
    """A strided convolution (NHWC, HWIO) whose input gradient is one stride-1 convolution per
    output phase: input row ``s*j + p`` receives the output gradient's rows ``j - d`` through
    the kernel taps ``k = s*d + p + pad`` (a correlation with those taps reversed and their
    channels swapped). The forward pass and the kernel gradient are XLA's own."""
    return _strided_conv(x, kernel, strides, padding)


def _conv_phase_input_grad_forward(x, kernel, strides, padding):
    return _strided_conv(x, kernel, strides, padding), (x, kernel)


def _phase_taps(size: int, out_size: int, kernel: int, stride: int, pad: int, phase: int):
    """For input positions ``stride*j + phase``: the taps that reach them (ascending) and the
    padding of the output gradient that lines them up as a stride-1 correlation."""
    taps = [k for k in range(kernel) if (k - pad - phase) % stride == 0]
    if not taps:
        return taps, None
    shifts = [(k - pad - phase) // stride for k in taps]
    rows = -(-(size - phase) // stride)
    return taps, (max(shifts), rows - out_size - min(shifts))


def _conv_phase_input_grad_backward(strides, padding, residuals, g):
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda k: _strided_conv(x, k, strides, padding), kernel)
    (dkernel,) = kernel_vjp(g)
    return _phase_input_grad(x.shape, kernel, g, strides, padding), dkernel


def _phase_input_grad(x_shape: tuple[int, ...], kernel, g, strides, padding):
    """The input gradient of a strided convolution as one stride-1 convolution per output phase."""
    _, h, w, _ = x_shape
    (sh, sw), ((ph, _), (pw, _)) = strides, padding
    dx = jnp.zeros(x_shape, g.dtype)
    for p in range(sh):
        rows, row_pad = _phase_taps(h, g.shape[1], kernel.shape[0], sh, ph, p)
        for q in range(sw):
            cols, col_pad = _phase_taps(w, g.shape[2], kernel.shape[1], sw, pw, q)
            if row_pad is None or col_pad is None or p >= h or q >= w:
                continue  # no tap reaches this phase: its gradient is zero
            taps = kernel[np.ix_(rows, cols)][::-1, ::-1].swapaxes(2, 3)
            dx = dx.at[:, p::sh, q::sw, :].set(_conv_stride1(g, taps, (row_pad, col_pad)))
    return dx


_conv_phase_input_grad.defvjp(_conv_phase_input_grad_forward, _conv_phase_input_grad_backward)
