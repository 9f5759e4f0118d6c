"""torchvision's ResNet family (v1.5) as Flax linen modules, NHWC.

Submodule names mirror torchvision's state_dict keys by one rule: a numeric key part is
joined to the name before it (``layer1.0.conv1`` -> ``layer1_0/conv1``,
``downsample.1`` -> ``downsample_1``). Padding is explicit and symmetric everywhere.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models.layers import BatchNorm, Conv, max_pool

# torchvision init: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convolutions,
# and nn.Linear's default for the classifier (uniform in +-1/sqrt(fan_in), weight and bias).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def linear_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


class ResidualBlock(nn.Module):
    """What every torchvision residual block is configured with; ``conv``/``norm`` are the
    layer constructors with the model's defaults bound."""

    planes: int
    stride: int
    downsample: bool
    conv: Any
    norm: Any
    groups: int = 1
    base_width: int = 64


class BasicBlock(ResidualBlock):
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        identity = x
        out = self.conv(self.planes, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train, mask))
        out = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(out)
        out = self.norm(name="bn2")(out, train, mask)
        if self.downsample:
            identity = self.conv(self.planes, (1, 1), (self.stride, self.stride), name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity, train, mask)
        return nn.relu(out + identity)


class Bottleneck(ResidualBlock):
    """torchvision's Bottleneck: the stride sits on the 3x3 conv (ResNet v1.5)."""

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        identity = x
        out = nn.relu(self.norm(name="bn1")(self.conv(width, (1, 1), name="conv1")(x), train, mask))
        out = self.conv(
            width, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)),
            feature_group_count=self.groups, name="conv2",
        )(out)
        out = nn.relu(self.norm(name="bn2")(out, train, mask))
        out = self.norm(name="bn3")(self.conv(self.planes * self.expansion, (1, 1), name="conv3")(out), train, mask)
        if self.downsample:
            identity = self.conv(self.planes * self.expansion, (1, 1), (self.stride, self.stride), name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity, train, mask)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet. ``frozen_bn`` names BatchNorm layers (Flax paths such as
    ``layer1_0/bn1``) that normalise with running statistics even when ``train=True``."""

    block: Any
    layers: Sequence[int]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32
    frozen_bn: frozenset = frozenset()

    head_name = "fc"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None,
                 pre_logits: bool = False) -> jnp.ndarray:
        """Logits for NHWC ``x``; ``mask`` (N,) marks real samples in a padded training batch;
        ``pre_logits`` returns the pooled features the classifier reads instead."""
        conv = partial(Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init)
        norm = partial(BatchNorm, dtype=self.dtype, frozen_paths=self.frozen_bn)
        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, train, mask))
        x = max_pool(x, 3, 2, 1)

        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            for i in range(blocks):
                stride = 2 if (i == 0 and stage > 1) else 1
                x = self.block(
                    planes=planes,
                    stride=stride,
                    downsample=i == 0 and (stride != 1 or inplanes != planes * self.block.expansion),
                    conv=conv,
                    norm=norm,
                    groups=self.groups,
                    base_width=self.width_per_group,
                    name=f"layer{stage}_{i}",
                )(x, train, mask)
                inplanes = planes * self.block.expansion

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        if pre_logits:
            return x
        fan_in = x.shape[-1]
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=linear_kernel_init, bias_init=linear_bias_init(fan_in), name=self.head_name,
        )(x.astype(self.dtype))
        return x.astype(jnp.float32)


# name -> (block, layers, groups, width_per_group), as in torchvision.models.resnet
RESNET_CONFIGS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": (Bottleneck, (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
}


def create_resnet(arch: str, **kwargs) -> ResNet:
    block, layers, groups, width = RESNET_CONFIGS[arch]
    return ResNet(block=block, layers=layers, groups=groups, width_per_group=width, **kwargs)
