"""torchvision's VGG family (11/13/16/19, with and without BatchNorm) as Flax linen modules.

Module names mirror torchvision's indices (``features.3`` -> ``features_3``,
``classifier.6`` -> ``classifier_6``), so the converter maps keys by rule.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxft.models.layers import BatchNorm, Conv, adaptive_avg_pool, max_pool

# torchvision VGG init: kaiming_normal_(fan_out, relu) convs with zero bias,
# normal(0, 0.01) linears with zero bias.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.normal(0.01)

POOL = "M"
# tuples: modules hash by their fields (jit and layout caches key on them)
VGG_CONFIGS: dict[str, tuple[Union[int, str], ...]] = {
    "A": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "B": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "D": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "E": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
          512, 512, 512, 512, POOL),
}
VGG_ARCHS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

POOLED_SIZE = (7, 7)


class VGG(nn.Module):
    """torchvision.models.VGG. The classifier is Linear-ReLU-Dropout twice, then Linear:
    no ReLU after the last Linear."""

    cfg: Sequence[Union[int, str]]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32
    frozen_bn: frozenset = frozenset()

    head_name = "classifier_6"
    # The first Linear sees torch's (C, H, W) flattening; the converter permutes its
    # input rows once so the NHWC flatten here needs no transpose at run time.
    torch_chw_flatten = {"classifier_0": (512,) + POOLED_SIZE}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None,
                 pre_logits: bool = False) -> jnp.ndarray:
        """Logits for NHWC ``x``; ``mask`` (N,) marks real samples in a padded training batch;
        ``pre_logits`` returns the 4096 features the last Linear reads instead."""
        conv = partial(Conv, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                       bias_init=nn.initializers.zeros)
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=linear_init,
                        bias_init=nn.initializers.zeros)
        x = x.astype(self.dtype)
        index = 0  # torchvision's position in nn.Sequential `features`
        for v in self.cfg:
            if v == POOL:
                x = max_pool(x, 2, 2)
                index += 1
                continue
            x = conv(int(v), (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x)
            if self.batch_norm:
                x = BatchNorm(dtype=self.dtype, frozen_paths=self.frozen_bn, name=f"features_{index + 1}")(x, train, mask)
                index += 1
            x = nn.relu(x)
            index += 2

        x = adaptive_avg_pool(x, POOLED_SIZE)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(4096, name="classifier_0")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(dense(4096, name="classifier_3")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if pre_logits:
            return x.astype(jnp.float32)
        x = dense(self.num_classes, name=self.head_name)(x)
        return x.astype(jnp.float32)


def create_vgg(arch: str, **kwargs) -> VGG:
    batch_norm = arch.endswith("_bn")
    return VGG(cfg=VGG_CONFIGS[VGG_ARCHS[arch.removesuffix("_bn")]], batch_norm=batch_norm, **kwargs)
