"""Flax models against real torchvision models: logits, train-mode BatchNorm, gradients, round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

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
    """Which stride-1 3x3 layers take the tap route (shapes only): at batch 16 x 224 px vgg16's
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


@pytest.mark.parametrize("hw,kernel,pad,cout", [((4, 4), 3, 1, 16), ((3, 4), 3, 1, 8), ((3, 3), 5, 2, 8)])
def test_strided_conv_input_gradient_by_phases_matches_float64_torch(hw, kernel, pad, cout):
    """Conv's route for strided convolutions over small maps (the input gradient as one stride-1
    convolution per output phase): the forward pass is XLA's convolution bit for bit, the kernel
    gradient XLA's too, and the input gradient is as close to torch float64 as torch float32 is
    (within twice its distance, or 1e-6). Odd maps and a 5x5 kernel."""
    from jaxft.models import layers

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
    assert np.array_equal(np.asarray(y), np.asarray(y_xla))
    assert np.array_equal(np.asarray(p_grad["kernel"]), np.asarray(xla_vjp(jnp.asarray(nchw_to_nhwc(cotangent)))[0]
                                                                   ["kernel"]))
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
