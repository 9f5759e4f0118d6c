"""torchvision-shaped Flax models: one registry from arch name to constructor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models.resnet import RESNET_CONFIGS, ResNet, create_resnet
from jaxft.models.vgg import VGG_ARCHS, VGG, create_vgg

ARCHS: tuple[str, ...] = tuple(RESNET_CONFIGS) + tuple(
    name for base in VGG_ARCHS for name in (base, f"{base}_bn")
)


class UnknownArchError(ValueError):
    """An architecture name jaxft does not implement."""


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(arch, ARCHS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownArchError(f"unknown arch {arch!r}.{hint} Supported: {', '.join(ARCHS)}.")
    return arch


def create_model(arch: str, num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> nn.Module:
    """A Flax module mirroring ``torchvision.models.<arch>(num_classes=...)``; NHWC input.

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    Extra keyword arguments reach the module (``dropout`` for VGG, ``frozen_bn``).
    """
    check_arch(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    build = create_resnet if arch in RESNET_CONFIGS else create_vgg
    return build(arch, num_classes=num_classes, dtype=dtype, **kwargs)


__all__ = ["ARCHS", "ResNet", "VGG", "UnknownArchError", "check_arch", "create_model"]
