"""Flax models against real torchvision models: logits, train-mode BatchNorm, gradients, round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from clitools import device_probe
from jaxft.parity import nchw_to_nhwc, rel_l2, torch_reference
from jaxft import ARCHS, create_model, from_torch, to_torch
from jaxft.convert import variables_to_state_dict
from jaxft.models.layers import adaptive_avg_pool, max_pool

LOGIT_TOL = 1e-5
GRAD_TOL = 1e-4
ALL_SIZES = [(224, 224), (197, 231), (32, 32), (64, 64), (250, 250)]
SMALL_ARCHS = ["resnet18", "resnet34", "vgg11", "vgg11_bn"]
# The large archs at one or two sizes keep CI fast; 224 is where they are used.
LARGE_SIZES = {
    "resnet50": [(224, 224), (197, 231)],
    "resnet101": [(64, 64)],
    "resnet152": [(64, 64)],
    "resnext50_32x4d": [(97, 64)],
    "resnext101_32x8d": [(32, 32)],
    "resnext101_64x4d": [(32, 32)],
    "wide_resnet50_2": [(64, 64)],
    "wide_resnet101_2": [(32, 32)],
    "vgg13": [(64, 64)],
    "vgg13_bn": [(64, 64)],
    "vgg16": [(224, 224), (250, 250)],
    "vgg16_bn": [(224, 224)],
    "vgg19": [(64, 64)],
    "vgg19_bn": [(197, 231)],
}
assert set(SMALL_ARCHS) | set(LARGE_SIZES) == set(ARCHS), "every arch needs a parity case"


def _eval_cases():
    for arch in SMALL_ARCHS:
        yield arch, ALL_SIZES
    yield from LARGE_SIZES.items()


@pytest.mark.parametrize("arch,sizes", list(_eval_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_eval_logits_and_round_trip(arch, sizes):
    torch_model = torch_reference(arch, num_classes=10)
    # trained-looking BatchNorm counters: the round trip below shows they are not carried
    state_dict = {k: torch.full_like(v, 7) if k.endswith("num_batches_tracked") else v
                  for k, v in torch_model.state_dict().items()}
    variables = from_torch(arch, state_dict)
    model = create_model(arch, num_classes=10)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    gen = torch.Generator().manual_seed(1)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=gen)
        with torch.no_grad():
            expected = torch_model(x).numpy()
        got = np.asarray(apply(variables, nchw_to_nhwc(x)))
        assert got.shape == expected.shape
        assert rel_l2(got, expected) <= LOGIT_TOL, f"{arch} at {h}x{w}: {rel_l2(got, expected):.2e}"

    # torch -> Flax -> torch is bit-exact, in torchvision's key order, and strict-loadable.
    exported = to_torch(arch, variables)
    assert list(exported) == list(state_dict)
    tracked = 0
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # not carried (DESIGN.md): export writes 0, not 7
            assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
            assert exported[key].item() == 0, key
            tracked += 1
        else:
            assert torch.equal(exported[key], value), key
    assert tracked == sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_model.modules())
    torchvision.models.get_model(arch, weights=None, num_classes=10).load_state_dict(exported, strict=True)


def _train_forward(arch: str, torch_model: torch.nn.Module, x: torch.Tensor, **kwargs):
    """JAX train-mode logits and torch-layout updated state_dict, from torch_model's weights."""
    variables = from_torch(arch, torch_model.state_dict())
    model = create_model(arch, num_classes=5, **kwargs)
    logits, updates = model.apply(variables, nchw_to_nhwc(x), train=True, mutable=["batch_stats"])
    return np.asarray(logits), variables_to_state_dict(model, {"params": variables["params"], **updates})


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_train_mode_forward_and_running_stats(arch):
    kwargs = {"dropout": 0.0} if arch.startswith("vgg") else {}
    torch_model = torch_reference(arch, num_classes=5, **kwargs)
    x = torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    got, updated = _train_forward(arch, torch_model, x, **kwargs)

    torch_model.train()  # batch statistics, momentum 0.1, unbiased running variance
    with torch.no_grad():
        expected = torch_model(x).numpy()
    assert rel_l2(got, expected) <= LOGIT_TOL
    for key, value in torch_model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert rel_l2(updated[key], value.numpy()) <= LOGIT_TOL, key


def test_train_mode_resnet50_is_as_close_to_float64_as_torch():
    """Batch statistics over few values (4 x 2 x 2 at layer4) make a 50-layer train-mode pass
    ill-conditioned: torch's own float32 result is ~2.5e-5 from float64 here. So the reference is
    torch in float64, and JAX must be within 1e-5 of it, or within twice torch float32's own error."""
    torch_model = torch_reference("resnet50", num_classes=5)
    x = torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    got, updated = _train_forward("resnet50", torch_model, x)

    reference64 = torch_model.double().train()
    torch32 = torch_reference("resnet50", num_classes=5).train()
    with torch.no_grad():
        expected = reference64(x.double()).numpy()
        torch_logits = torch32(x).numpy()
    assert rel_l2(got, expected) <= max(LOGIT_TOL, 2 * rel_l2(torch_logits, expected))
    torch32_stats = torch32.state_dict()
    for key, value in reference64.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch_error = rel_l2(torch32_stats[key].numpy(), value.numpy())
            assert rel_l2(updated[key], value.numpy()) <= max(LOGIT_TOL, 2 * torch_error), key


# Train mode runs at 128 px: with fewer values per batch statistic (64 px leaves 2x2 maps at
# layer4) BatchNorm-bias gradients are sums that nearly cancel, and torch float32 and JAX each
# stray up to 1e-3 from a float64 reference on some of them (measured; see docs/parity.md).
@pytest.mark.parametrize("arch,train,size", [("resnet18", True, 128), ("resnet18", False, 64), ("vgg11", False, 64)])
def test_gradients_match_torch_for_every_parameter(arch, train, size):
    torch_model = torch_reference(arch, num_classes=6)
    torch_model.train(train)
    variables = from_torch(arch, torch_model.state_dict())
    model = create_model(arch, num_classes=6)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, size, size, generator=gen)
    y = torch.randint(0, 6, (4,), generator=gen)

    torch.nn.functional.cross_entropy(torch_model(x), y).backward()

    def loss_fn(params):
        logits = model.apply({**variables, "params": params}, nchw_to_nhwc(x),
                             train=train, mutable=["batch_stats"] if train else False)
        logits = logits[0] if train else logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y.numpy())[:, None], 1))

    grads = jax.grad(loss_fn)(variables["params"])
    grads_torch_layout = variables_to_state_dict(model, {**variables, "params": grads})
    checked = 0
    for name, param in torch_model.named_parameters():
        assert rel_l2(grads_torch_layout[name], param.grad.numpy()) <= GRAD_TOL, name
        checked += 1
    assert checked == len(list(torch_model.parameters()))


@pytest.mark.parametrize("size", [(7, 7), (1, 1), (3, 5), (13, 8), (14, 14), (32, 31)])
def test_adaptive_avg_pool_matches_torch(size):
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (7, 7)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(adaptive_avg_pool(jnp.asarray(nchw_to_nhwc(x)), (7, 7)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    torch_model = torch_reference("resnet18", num_classes=10)
    variables = from_torch("resnet18", torch_model.state_dict())
    model = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    got = model.apply(variables, nchw_to_nhwc(x), train=False)
    assert got.dtype == jnp.float32  # logits come back in float32 for the loss
    assert rel_l2(got, expected) < 5e-2  # bfloat16 has an 8-bit mantissa
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("hw,kernel,stride", [((1, 1), 3, 1), ((1, 1), 3, 2), ((2, 2), 3, 1), ((2, 3), 3, 2),
                                              ((2, 2), 1, 1), ((5, 4), 3, 1), ((4, 4), 3, 2), ((5, 3), 3, 2)])
def test_conv_shortcuts_for_tiny_maps_match_torch(hw, kernel, stride):
    """The centre-tap and patches routes (tiny maps on CPU) compute torch's convolution."""
    from jaxft.models.layers import Conv

    pad = kernel // 2
    x = torch.randn(2, 8, *hw, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(16, 8, kernel, kernel, generator=torch.Generator().manual_seed(7))
    expected = torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad).permute(0, 2, 3, 1).numpy()
    conv = Conv(16, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)), use_bias=False)
    got = conv.apply({"params": {"kernel": weight.permute(2, 3, 1, 0).numpy()}}, nchw_to_nhwc(x))
    assert got.shape == expected.shape
    assert rel_l2(got, expected) <= 1e-6
    # and the gradients with respect to the input (strided routes: XLA's own is a dilated
    # convolution) and to the kernel
    x.requires_grad_(True)
    weight.requires_grad_(True)
    cotangent = torch.randn(expected.shape[0], 16, *expected.shape[1:3], generator=torch.Generator().manual_seed(8))
    (torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad) * cotangent).sum().backward()
    _, vjp = jax.vjp(lambda v, k: conv.apply({"params": {"kernel": k}}, v),
                     jnp.asarray(nchw_to_nhwc(x.detach())), jnp.asarray(weight.detach().permute(2, 3, 1, 0).numpy()))
    grad, kernel_grad = vjp(jnp.asarray(nchw_to_nhwc(cotangent)))
    assert rel_l2(grad, nchw_to_nhwc(x.grad)) <= 1e-6
    assert rel_l2(kernel_grad, weight.grad.permute(2, 3, 1, 0).numpy()) <= 1e-6


@pytest.mark.parametrize("hw,kernel,bias", [((9, 7), 3, True), ((12, 12), 3, False), ((8, 10), 5, True)])
def test_conv_kernel_gradient_as_tap_matmuls_matches_float64_torch(monkeypatch, hw, kernel, bias):
    """Conv's route for large maps (kernel gradient as k*k matmuls, taken from
    TAP_KERNEL_GRAD_MIN_BYTES up; lowered here so that a small map takes it): the forward pass is
    XLA's convolution bit for bit, and the input, kernel and bias gradients are as close to torch
    float64 as torch float32 is (within twice its distance, or 1e-6)."""
    from jaxft.models import layers

    pad = kernel // 2
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 8, *hw, generator=gen)
    weight = torch.randn(16, 8, kernel, kernel, generator=gen)
    b = torch.randn(16, generator=gen)
    cotangent = torch.randn(3, 16, *hw, generator=gen)

    def torch_grads(dtype):
        xt, wt, bt = (t.to(dtype).requires_grad_(True) for t in (x, weight, b))
        y = torch.nn.functional.conv2d(xt, wt, bt if bias else None, padding=pad)
        (y * cotangent.to(dtype)).sum().backward()
        grads = [nchw_to_nhwc(xt.grad), wt.grad.permute(2, 3, 1, 0).numpy()] + ([bt.grad.numpy()] if bias else [])
        return nchw_to_nhwc(y.detach()), [np.asarray(g, np.float64) for g in grads]

    conv = layers.Conv(16, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=bias)
    params = {"kernel": jnp.asarray(weight.permute(2, 3, 1, 0).numpy())} | ({"bias": jnp.asarray(b.numpy())} if bias else {})
    args = (params, jnp.asarray(nchw_to_nhwc(x)))

    def grads():
        y, vjp = jax.vjp(lambda p, v: conv.apply({"params": p}, v), *args)
        p_grad, x_grad = vjp(jnp.asarray(nchw_to_nhwc(cotangent)))
        return y, [x_grad, p_grad["kernel"]] + ([p_grad["bias"]] if bias else [])

    # the tap route is where torch's kernel cannot be called (host_conv.available() False)
    monkeypatch.setenv("JAXFT_TORCH_KERNELS", "0")
    y_xla, _ = grads()
    monkeypatch.setattr(layers, "TAP_KERNEL_GRAD_MIN_BYTES", 0)
    monkeypatch.setattr(layers, "TAP_KERNEL_GRAD_MIN_FEATURES", 1)
    assert layers._use_tap_kernel_grad(args[1], 16, (kernel, kernel), (1, 1), conv.padding, 1)
    y, got = grads()
    assert np.array_equal(np.asarray(y), np.asarray(y_xla))
    _, expected = torch_grads(torch.float64)
    _, torch32 = torch_grads(torch.float32)
    for g, e, t in zip(got, expected, torch32):
        assert rel_l2(np.asarray(g, np.float64), e) <= max(1e-6, 2 * rel_l2(t, e))


def test_kernel_gradient_tap_route_takes_vgg_layers_and_no_resnet_layer_at_224_px():
    """Which stride-1 3x3 layers take the tap route where torch's kernel cannot be called (shapes
    only): at batch 16 x 224 px vgg16's
    layers of 128 channels and up over maps from 24 MiB, and its 224x224x64 `features_2` (docs/benchmarks.md: faster on
    both CPUs measured); not its first layer (3 input channels, 9 MiB), no ResNet layer at batch 16,
    and not ResNet's 56x56x64 layers up to batch 128 (slower as matmuls on the AMD CPU)."""
    from jaxft.models import layers

    def takes_route(batch: int, size: int, c_in: int, c_out: int) -> bool:
        x = jax.ShapeDtypeStruct((batch, size, size, c_in), jnp.float32)
        return layers._use_tap_kernel_grad(x, c_out, (3, 3), (1, 1), ((1, 1), (1, 1)), 1)

    assert takes_route(16, 224, 64, 64)  # vgg16 features_2
    assert takes_route(16, 112, 64, 128) and takes_route(16, 112, 128, 128) and takes_route(16, 56, 256, 256)
    assert not takes_route(16, 224, 3, 64)  # features_0
    assert not takes_route(8, 224, 64, 64)  # 98 MiB: below the bar for 64 channels
    for batch in (16, 64, 128):  # resnet18/34 layer1 and resnet50's 3x3 layer1 convolutions
        assert not takes_route(batch, 56, 64, 64)
    assert not takes_route(16, 28, 128, 128) and not takes_route(16, 14, 256, 256)


def calls_back(fn, *args) -> bool:
    """Whether ``fn``, jitted for ``args``, calls torch's kernels (their FFI targets) from its step."""
    from jaxft.models import host_conv

    text = jax.jit(fn).lower(*args).as_text()
    return any(target in text for target in host_conv.TARGETS)


@pytest.mark.parametrize("hw,c_in,kernel,stride,bias", [((12, 12), 8, (3, 3), (1, 1), True),
                                                       ((13, 11), 8, (3, 3), (2, 2), False),
                                                       ((20, 18), 3, (7, 7), (2, 2), False),
                                                       ((10, 10), 8, (5, 5), (1, 1), True),
                                                       ((13, 17), 8, (3, 5), (2, 1), False),
                                                       ((9, 14), 8, (3, 5), (1, 1), True)])
def test_conv_by_torchs_kernels_matches_float64_torch(monkeypatch, torch_kernel_calls, hw, c_in, kernel, stride, bias):
    """Conv's route on the CPU (the convolution and both its gradients by torch's kernels through
    FFI custom calls, host_conv.py), jitted and not: the route is taken (its targets are in the
    step, and each of torch's three kernels runs once), and the output, the input gradient and the
    kernel and bias gradients are as close to torch float64 as torch float32 is (within twice its
    distance, or 1e-6). Odd and strided maps, the ResNet stem's 7x7/2 over 3 channels, a 5x5, and
    a 3x5 kernel with strides (2, 1) over a non-square map (height and width kept apart). The
    route's floor (TORCH_CONV_MIN_BYTES) is lowered so that these small maps take it."""
    from jaxft.models import host_conv, layers

    monkeypatch.setattr(layers, "TORCH_CONV_MIN_BYTES", 0)
    pad = (kernel[0] // 2, kernel[1] // 2)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, c_in, *hw, generator=gen)
    weight = torch.randn(16, c_in, *kernel, generator=gen)
    b = torch.randn(16, generator=gen)
    cotangent = torch.randn(*torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad).shape, generator=gen)

    def torch_results(dtype):
        xt, wt, bt = (t.to(dtype).requires_grad_(True) for t in (x, weight, b))
        y = torch.nn.functional.conv2d(xt, wt, bt if bias else None, stride=stride, padding=pad)
        y.backward(cotangent.to(dtype))
        results = [nchw_to_nhwc(y.detach()), nchw_to_nhwc(xt.grad), wt.grad.permute(2, 3, 1, 0).numpy()]
        return [np.asarray(r, np.float64) for r in results + ([bt.grad.numpy()] if bias else [])]

    conv = layers.Conv(16, kernel, stride, ((pad[0],) * 2, (pad[1],) * 2), use_bias=bias)
    params = {"kernel": jnp.asarray(weight.permute(2, 3, 1, 0).numpy())}
    params |= {"bias": jnp.asarray(b.numpy())} if bias else {}
    x_nhwc, g = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(nchw_to_nhwc(cotangent))
    assert host_conv.available() and layers._use_torch_conv(x_nhwc, 16, kernel, stride, conv.padding, 1)

    def step(p, v):
        y, vjp = jax.vjp(lambda p, v: conv.apply({"params": p}, v), p, v)
        return y, *vjp(g)

    assert calls_back(step, params, x_nhwc)  # torch's kernels, not XLA's
    expected, torch32 = torch_results(torch.float64), torch_results(torch.float32)
    kernels = {("conv", g.shape), ("input_grad", x_nhwc.shape), ("kernel_grad", params["kernel"].shape)}
    for run in (step, jax.jit(step)):
        torch_kernel_calls.clear()
        y, p_grad, x_grad = jax.block_until_ready(run(params, x_nhwc))  # the step's calls have run
        assert len(torch_kernel_calls) == 3 and set(torch_kernel_calls) == kernels  # eagerly too
        got = [y, x_grad, p_grad["kernel"]] + ([p_grad["bias"]] if bias else [])
        for r, e, t in zip(got, expected, torch32):
            assert rel_l2(np.asarray(r, np.float64), e) <= max(1e-6, 2 * rel_l2(t, e))


@pytest.mark.parametrize("stride", [1, 2])
def test_torchs_kernels_write_into_the_result_buffer_and_copy_where_torch_has_no_onednn(monkeypatch, stride):
    """host_conv's forward pass and input gradient as the handlers run them, into a result buffer
    that holds garbage (XLA's buffers are not zeroed): written by oneDNN in place (its fused
    ``out += conv`` over ``out`` zeroed; the input gradient with stride 1 as the convolution of
    the flipped kernel) on this build, and copied from ``aten.convolution`` where torch has no
    oneDNN; both give the bits of torch's own convolution and its backward-data kernel."""
    from jaxft.models import host_conv

    assert torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
    rng = np.random.default_rng(3)
    x, kernel = rng.standard_normal((4, 15, 13, 16), np.float32), rng.standard_normal((3, 5, 16, 24), np.float32)
    strides, padding = (stride, stride), ((1, 1), (2, 2))
    y_shape = host_conv.output_shape(x.shape, kernel.shape, strides, padding)
    g = rng.standard_normal(y_shape, np.float32)
    torch_kernel, nchw = torch.from_numpy(kernel).permute(3, 2, 0, 1), lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    expected_y = torch.ops.aten.convolution(nchw(x), torch_kernel, None, list(strides), [1, 2], [1, 1], False,
                                            [0, 0], 1).permute(0, 2, 3, 1).numpy()
    expected_dx = torch.ops.aten.convolution_backward(nchw(g), nchw(x), torch_kernel, None, list(strides), [1, 2],
                                                      [1, 1], False, [0, 0], 1, [True, False, False])
    expected_dx = expected_dx[0].permute(0, 2, 3, 1).numpy()

    def results():
        y, dx = np.full(y_shape, np.nan, np.float32), np.full(x.shape, 7.0, np.float32)
        host_conv.torch_conv(x, kernel, y, strides=strides, padding=padding)
        host_conv.torch_input_grad(g, kernel, dx, strides=strides, padding=padding)
        return y, dx

    for onednn in (True, False):
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda onednn=onednn: onednn)
        y, dx = results()
        np.testing.assert_array_equal(y, expected_y)
        np.testing.assert_array_equal(dx, expected_dx)


def test_torch_kernel_route_takes_large_layers_and_is_left_where_it_cannot_run(monkeypatch):
    """Which layers take torch's kernels (shapes only): kxk layers with at least 10 MiB of input and
    output maps, of up to 256 channels whatever their map, wider ones over maps of at least 10x10
    cells. At batch 16 that is every kxk layer of resnet18 and vgg16 at 224 px but resnet's 14x14
    and 7x7 ones, and vgg16's at 64 px down to its 32x32 maps; not the main job's 32 px step nor the
    64 px end-to-end jobs (batch 32), whose processes then need not import torch; 512 channels over
    a 9x9 map at no batch (torch's kernels are no faster there; layers.py has the figures). Not a
    1x1 kernel, asymmetric padding, bfloat16 or grouped convolutions, not with
    ``JAXFT_TORCH_KERNELS=0``, and not on a JAX release host_conv.py was not checked against."""
    from jaxft.models import host_conv, layers

    def takes_route(size, c_in=64, c_out=64, kernel=3, stride=1, batch=16, padding=None, dtype=jnp.float32,
                    groups=1) -> bool:
        x = jax.ShapeDtypeStruct((batch, size, size, c_in), dtype)
        padding = padding or ((kernel // 2,) * 2,) * 2
        return layers._use_torch_conv(x, c_out, (kernel, kernel), (stride, stride), padding, groups)

    stem = {"c_in": 3, "kernel": 7, "stride": 2}
    assert takes_route(224, **stem) and takes_route(56) and takes_route(56, c_out=128, stride=2)  # resnet18
    assert takes_route(28, 128, 128) and not takes_route(14, 256, 256) and not takes_route(7, 512, 512)
    vgg16 = ((224, 64), (112, 128), (56, 256), (28, 512), (14, 512))
    assert all(takes_route(size, c, c) for size, c in vgg16)
    assert takes_route(64, 64, 64) and takes_route(32, 128, 128) and not takes_route(16, 256, 256)  # at 64 px
    assert not takes_route(32, batch=32, **stem) and not takes_route(64, batch=32, **stem)
    assert not takes_route(16, batch=32) and not takes_route(8, 128, 128, batch=32)
    assert takes_route(8, 256, 256, batch=128) and takes_route(14, 256, 256, batch=32)  # any map up to 256
    assert takes_route(10, 512, 512, batch=32) and not takes_route(9, 512, 512, batch=512)  # 10x10 cells above
    assert not takes_route(56, kernel=1) and not takes_route(56, padding=((0, 1), (0, 1)))
    assert not takes_route(56, dtype=jnp.bfloat16) and not takes_route(56, groups=2)
    monkeypatch.setenv("JAXFT_TORCH_KERNELS", "0")  # the user's way to keep every kernel XLA's
    assert not host_conv.available() and not takes_route(56)
    monkeypatch.delenv("JAXFT_TORCH_KERNELS")
    monkeypatch.setattr(host_conv, "_jax_release", lambda: (0, 4))
    host_conv._registered.cache_clear()
    try:
        assert not host_conv.available() and not takes_route(56)
    finally:
        monkeypatch.undo()
        host_conv._registered.cache_clear()
    assert host_conv.available()


def test_torch_kernel_route_under_vmap_is_xlas_gradient_per_example(monkeypatch):
    """Per-example kernel gradients (``vmap`` over a routed Conv's gradient) are XLA's, one per
    example, and equal the route's gradient of each example alone up to float32 rounding."""
    from jaxft.models import layers

    monkeypatch.setattr(layers, "TORCH_CONV_MIN_BYTES", 0)
    conv = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    x = jax.random.normal(jax.random.key(0), (3, 1, 12, 12, 4))
    params = conv.init(jax.random.key(1), x[0])["params"]
    grad = jax.grad(lambda p, v: (conv.apply({"params": p}, v) ** 2).sum())
    per_example = jax.jit(jax.vmap(grad, in_axes=(None, 0)))
    assert not calls_back(per_example, params, x) and calls_back(grad, params, x[0])
    got = per_example(params, x)["kernel"]
    for i in range(3):
        assert rel_l2(got[i], grad(params, x[i])["kernel"]) <= 1e-6


def test_torch_kernel_route_has_gradients_of_gradients(monkeypatch):
    """The gradient of a routed Conv's gradient (a gradient penalty, say): the primitive's
    derivative is XLA's, and the result equals the unrouted convolution's up to float32 rounding."""
    from jaxft.models import layers

    monkeypatch.setattr(layers, "TORCH_CONV_MIN_BYTES", 0)
    conv = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 4))
    params = conv.init(jax.random.key(1), x)["params"]

    def penalty(p, v):
        g = jax.grad(lambda p: (conv.apply({"params": p}, v) ** 3).sum())(p)
        return (g["kernel"] ** 2).sum()

    results = {}
    for route in ("1", "0"):
        monkeypatch.setenv("JAXFT_TORCH_KERNELS", route)
        second = jax.jit(jax.grad(penalty, argnums=(0, 1)))
        assert calls_back(second, params, x) == (route == "1")
        results[route] = second(params, x)
    (routed_p, routed_x), (xla_p, xla_x) = results["1"], results["0"]
    assert rel_l2(routed_p["kernel"], xla_p["kernel"]) <= 1e-6 and rel_l2(routed_x, xla_x) <= 1e-6


def test_an_error_inside_torchs_kernel_reaches_python_and_the_next_step_runs(monkeypatch):
    """An exception raised inside a handler (python_ffi.py) cannot cross XLA's C frames: it comes
    back as the step's error, naming the target and the exception, and the process goes on."""
    from jaxft.models import host_conv, layers

    monkeypatch.setattr(layers, "TORCH_CONV_MIN_BYTES", 0)
    conv = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    x = jnp.ones((2, 12, 12, 4))
    variables = conv.init(jax.random.key(0), x)
    step = jax.jit(lambda v, x: conv.apply(v, x))
    expected = jax.block_until_ready(step(variables, x))  # run before torch_conv breaks: calls are asynchronous

    def broken(*args, **kwargs):
        raise ValueError("a shape torch refused")

    monkeypatch.setattr(host_conv, "torch_conv", broken)
    with pytest.raises(Exception, match="jaxft_torch_conv: ValueError: a shape torch refused"):
        jax.block_until_ready(step(variables, x))
    monkeypatch.undo()
    assert np.array_equal(np.asarray(step(variables, x)), np.asarray(expected))


CACHED_ROUTE_PROBE = """
import json, jax, numpy as np
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name.rsplit("/", 1)[-1]))
from jaxft.models import host_conv, layers
layers.TORCH_CONV_MIN_BYTES = 0
calls = []
kernel_grad = host_conv.torch_kernel_grad
host_conv.torch_kernel_grad = lambda x, g, out, **kw: (calls.append(out.shape), kernel_grad(x, g, out, **kw))[1]
conv = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
x = jax.random.normal(jax.random.key(0), (4, 12, 12, 8))
params = conv.init(jax.random.key(1), x)["params"]
def routed_grad(p, v):
    return jax.grad(lambda p: (conv.apply({"params": p}, v) ** 2).sum())(p)
step = jax.jit(routed_grad)
routed = any(t in step.lower(params, x).as_text() for t in host_conv.TARGETS)
kernel = np.asarray(step(params, x)["kernel"])
print(json.dumps({"routed": routed, "hits": events.count("cache_hits"), "misses": events.count("cache_misses"),
                  "calls": len(calls), "kernel": kernel.ravel().tolist()}))
"""


def test_a_step_through_torchs_kernel_is_kept_in_the_persistent_compilation_cache(tmp_path):
    """The route is a custom call XLA resolves by name (host_conv.TARGETS), not a Python callback,
    so JAX writes the routed step to its persistent compilation cache. A second process loads it
    from there, and the loaded step calls torch's kernel and computes the same gradient."""
    env = {"JAXFT_CACHE": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = device_probe(CACHED_ROUTE_PROBE, **env)
    assert first["routed"] and first["calls"] == 1 and first["hits"] == 0
    assert list((tmp_path / "xla").glob("jit_routed_grad-*"))  # the routed step was written
    second = device_probe(CACHED_ROUTE_PROBE, **env)
    # every compilation of the second process, the routed step's included, was loaded
    assert second["routed"] and second["calls"] == 1 and second["hits"] >= 1 and second["misses"] == 0
    assert second["kernel"] == first["kernel"]


PARTITIONED_PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxft.models import host_conv, layers
layers.TORCH_CONV_MIN_BYTES = 0
conv = layers.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
x = jax.random.normal(jax.random.key(0), (4, 12, 12, 8))
params = conv.init(jax.random.key(1), x)["params"]
loss = jax.jit(jax.grad(lambda p, v: (conv.apply({"params": p}, v) ** 2).sum()))
one = loss(params, x)
split = jax.device_put(x, NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data")))
text = loss.lower(params, split).as_text()
two = loss(params, split)
print(json.dumps({"devices": len(jax.devices()), "callback": any(t in text for t in host_conv.TARGETS),
                  "single_callback": any(t in loss.lower(params, x).as_text() for t in host_conv.TARGETS),
                  "rel": float(jnp.linalg.norm(two["kernel"] - one["kernel"]) / jnp.linalg.norm(one["kernel"]))}))
"""


def test_torch_kernel_route_gives_way_to_xla_on_a_step_split_over_devices():
    """A step partitioned over several CPU devices would gather every operand of torch's custom
    calls onto each of them: there the primitives lower to XLA's own operations (the same kernel
    gradient within float32 rounding), and on one device to the custom calls."""
    found = device_probe(PARTITIONED_PROBE, timeout=300, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert found["devices"] == 2 and found["single_callback"] and not found["callback"]
    assert found["rel"] <= 1e-5


@pytest.mark.parametrize("torch_kernels", ["1", "0"])
@pytest.mark.parametrize("hw,kernel,pad,cout", [((4, 4), 3, 1, 16), ((3, 4), 3, 1, 8), ((3, 3), 5, 2, 8)])
def test_strided_conv_input_gradient_by_phases_matches_float64_torch(hw, kernel, pad, cout, torch_kernels, monkeypatch,
                                                                     torch_kernel_calls):
    """Conv's route for strided convolutions over small maps (the input gradient as one stride-1
    convolution per output phase), under torch's kernels (forced onto these small maps: the
    convolution and its kernel gradient torch's, the input gradient still by phases) or with every
    kernel XLA's (``JAXFT_TORCH_KERNELS=0``: the forward pass and kernel gradient XLA's bit for
    bit): the input gradient is the same bits either way, and as close to torch float64 as torch
    float32 is (within twice its distance, or 1e-6). Odd maps and a 5x5 kernel."""
    from jaxft.models import layers

    monkeypatch.setenv("JAXFT_TORCH_KERNELS", torch_kernels)
    monkeypatch.setattr(layers, "TORCH_CONV_MIN_BYTES", 0)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 8, *hw, generator=gen)
    weight = torch.randn(cout, 8, kernel, kernel, generator=gen)

    def torch_grads(dtype):
        xt, wt = (t.to(dtype).requires_grad_(True) for t in (x, weight))
        y = torch.nn.functional.conv2d(xt, wt, stride=2, padding=pad)
        y.backward(cotangent.to(dtype))
        return [np.asarray(nchw_to_nhwc(xt.grad), np.float64), wt.grad.permute(2, 3, 1, 0).numpy().astype(np.float64)]

    cotangent = torch.randn(*torch.nn.functional.conv2d(x, weight, stride=2, padding=pad).shape, generator=gen)
    conv = layers.Conv(cout, (kernel, kernel), strides=(2, 2), padding=((pad, pad), (pad, pad)), use_bias=False)
    params = {"kernel": jnp.asarray(weight.permute(2, 3, 1, 0).numpy())}
    x_nhwc = jnp.asarray(nchw_to_nhwc(x))
    assert layers._use_phase_input_grad(x_nhwc, (kernel, kernel), (2, 2), conv.padding, 1)
    y, vjp = jax.vjp(lambda p, v: conv.apply({"params": p}, v), params, x_nhwc)
    p_grad, x_grad = vjp(jnp.asarray(nchw_to_nhwc(cotangent)))
    xla = lambda p, v: jax.lax.conv_general_dilated(v, p["kernel"], (2, 2), conv.padding,  # noqa: E731
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y_xla, xla_vjp = jax.vjp(xla, params, x_nhwc)
    if torch_kernels == "1":
        assert sorted(op for op, _ in torch_kernel_calls) == ["conv", "kernel_grad"]
    else:
        assert not torch_kernel_calls and np.array_equal(np.asarray(y), np.asarray(y_xla))
        assert np.array_equal(np.asarray(p_grad["kernel"]),
                              np.asarray(xla_vjp(jnp.asarray(nchw_to_nhwc(cotangent)))[0]["kernel"]))
    phases = layers._phase_input_grad(x_nhwc.shape, params["kernel"], jnp.asarray(nchw_to_nhwc(cotangent)), (2, 2),
                                      conv.padding)
    assert np.array_equal(np.asarray(x_grad), np.asarray(phases))
    expected, torch32 = torch_grads(torch.float64), torch_grads(torch.float32)
    for got, e, t in zip((x_grad, p_grad["kernel"]), expected, torch32):
        assert rel_l2(np.asarray(got, np.float64), e) <= max(1e-6, 2 * rel_l2(t, e))


@pytest.mark.parametrize("hw,stride", [((7, 7), 1), ((8, 8), 1), ((7, 5), 1), ((1, 1), 1), ((8, 8), 2),
                                       ((7, 5), 2), ((1, 1), 2), ((56, 56), 2)])
def test_pointwise_conv_as_matmul_matches_float64_torch(hw, stride):
    """Conv's route for unpadded 1x1 convolutions (a matmul over the strided map's pixels, which
    resnet50's bottleneck convolutions and every ResNet downsample take): the output, input
    gradient and kernel gradient are as close to torch float64 as torch float32 is (within twice
    its distance, or 1e-6), on odd, even and 1x1 maps, stride 1 and 2; at stride 2 the pixels no
    output reads get exactly zero gradient."""
    from jaxft.models import layers

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 48, *hw, generator=gen)
    weight = torch.randn(40, 48, 1, 1, generator=gen)
    cotangent = torch.randn(*torch.nn.functional.conv2d(x, weight, stride=stride).shape, generator=gen)

    def torch_results(dtype):
        xt, wt = (t.to(dtype).requires_grad_(True) for t in (x, weight))
        y = torch.nn.functional.conv2d(xt, wt, stride=stride)
        y.backward(cotangent.to(dtype))
        return [np.asarray(nchw_to_nhwc(r), np.float64) for r in (y.detach(), xt.grad)] + [
            wt.grad.permute(2, 3, 1, 0).numpy().astype(np.float64)]

    conv = layers.Conv(40, (1, 1), strides=(stride, stride), use_bias=False)
    assert layers._use_pointwise_matmul(conv.kernel_size, conv.padding, 1)
    params = {"kernel": jnp.asarray(weight.permute(2, 3, 1, 0).numpy())}
    y, vjp = jax.vjp(lambda p, v: conv.apply({"params": p}, v), params, jnp.asarray(nchw_to_nhwc(x)))
    p_grad, x_grad = vjp(jnp.asarray(nchw_to_nhwc(cotangent)))
    expected, torch32 = torch_results(torch.float64), torch_results(torch.float32)
    for got, e, t in zip((y, x_grad, p_grad["kernel"]), expected, torch32):
        assert got.shape == e.shape
        assert rel_l2(np.asarray(got, np.float64), e) <= max(1e-6, 2 * rel_l2(t, e))
    unread = np.ones(x_grad.shape, bool)
    unread[:, ::stride, ::stride, :] = False
    assert not np.asarray(x_grad)[unread].any()  # pixels no output reads get exactly no gradient


@pytest.mark.parametrize("window,stride,padding,hw", [(3, 2, 1, (9, 11)), (3, 2, 1, (8, 8)), (2, 2, 0, (7, 10)),
                                                      (3, 1, 1, (5, 6))])
def test_max_pool_matches_torch_values_and_gradient_rule(window, stride, padding, hw):
    """resnet's stem pool (3/2/1) and VGG's (2/2/0), odd and even maps, on integers so that
    windows hold ties: values equal, and every gradient lands where torch's does (on the first
    maximal input of its window), bit for bit. The output cotangent is distinct per cell, so a
    gradient sent to the wrong input shows."""
    x = np.round(np.random.default_rng(1).normal(size=(2, *hw, 3)) * 2).astype(np.float32)
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    torch_y = torch.nn.functional.max_pool2d(torch_x, window, stride, padding)
    cotangent = torch.arange(torch_y.numel(), dtype=torch.float32).reshape(torch_y.shape) + 1
    (torch_y * cotangent).sum().backward()

    y, vjp = jax.vjp(lambda v: max_pool(v, window, stride, padding), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(nchw_to_nhwc(cotangent)))
    assert np.array_equal(np.asarray(y), nchw_to_nhwc(torch_y.detach()))
    assert np.array_equal(np.asarray(grad), nchw_to_nhwc(torch_x.grad))
    assert (np.asarray(grad) == 0).mean() > 0.3  # ties were there to resolve: many inputs get nothing


@pytest.mark.parametrize("padding_rows", [0, 3])
def test_batchnorm_over_the_real_rows_of_a_padded_batch_matches_float64_torch(padding_rows, monkeypatch):
    """Train-mode BatchNorm on a batch whose last rows are padding (mask 0, filled with large
    values; the loss gives their outputs no cotangent): the output of the real rows, the gradients
    of the input, scale and bias, and the running statistics are torch's BatchNorm2d on the real
    rows alone (within twice torch float32's distance from float64, or 1e-6), and the padding
    rows get exactly no gradient. On the CPU, a batch without padding takes the branch that reads
    no mask and a padded one the other (`layers._masked_moments`): the branch that must not run
    is replaced by one that returns NaN."""
    from jaxft.models import layers
    from jaxft.models.layers import BatchNorm

    def poisoned(x, weight, count):
        nan = jnp.full(x.shape[-1:], jnp.nan, x.dtype)
        return nan, nan

    monkeypatch.setattr(layers, "_moments_of_real_samples" if padding_rows == 0 else "_moments_of_every_sample",
                        poisoned)

    rng = np.random.default_rng(7)
    real = 6
    x = (rng.normal(size=(real + padding_rows, 5, 7, 4)) * 3 + 2).astype(np.float32)
    x[real:] = 1e3  # padding must change nothing
    mask = (np.arange(len(x)) < real).astype(np.float32)
    scale, bias = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    cotangent[real:] = 0  # the loss is masked: padding rows' outputs reach it with weight 0

    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.asarray(x), train=True, mask=jnp.asarray(mask))
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}

    def forward(p, v):
        return bn.apply({"params": p, "batch_stats": variables["batch_stats"]}, v, train=True,
                        mask=jnp.asarray(mask), mutable=["batch_stats"])

    (y, updated), vjp = jax.vjp(forward, params, jnp.asarray(x))
    p_grad, x_grad = vjp((jnp.asarray(cotangent), jax.tree.map(jnp.zeros_like, updated)))

    def torch_results(dtype):
        layer = torch.nn.BatchNorm2d(4).to(dtype).train()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(scale))
            layer.bias.copy_(torch.from_numpy(bias))
        xt = torch.from_numpy(x[:real]).permute(0, 3, 1, 2).to(dtype).requires_grad_(True)
        out = layer(xt)
        out.backward(torch.from_numpy(cotangent[:real]).permute(0, 3, 1, 2).to(dtype))
        return [np.asarray(r, np.float64) for r in (
            nchw_to_nhwc(out.detach()), nchw_to_nhwc(xt.grad), layer.weight.grad.numpy(), layer.bias.grad.numpy(),
            layer.running_mean.numpy(), layer.running_var.numpy())]

    got = [np.asarray(y)[:real], np.asarray(x_grad)[:real], p_grad["scale"], p_grad["bias"],
           updated["batch_stats"]["mean"], updated["batch_stats"]["var"]]
    expected, torch32 = torch_results(torch.float64), torch_results(torch.float32)
    for name, g, e, t in zip(("y", "x grad", "scale grad", "bias grad", "running mean", "running var"),
                             got, expected, torch32):
        assert rel_l2(np.asarray(g, np.float64), e) <= max(1e-6, 2 * rel_l2(t, e)), name
    assert not np.asarray(x_grad)[real:].any()
