"""The classifier alone, for training a head on cached backbone features."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class LinearHead(nn.Module):
    """A model whose only layer is ``backbone.head_name``: its params subtree is the full
    model's ``params[head_name]``, so a head trained here drops back into the full model.
    Its input is the backbone's ``pre_logits`` features, shape (N, in_features)."""

    in_features: int
    num_classes: int
    head_name: str = "fc"
    dtype: Any = jnp.float32
    frozen_bn: frozenset = frozenset()  # no BatchNorm; kept so the engine treats every model alike

    @property
    def layout_input_shape(self) -> tuple[int, ...]:
        return (1, self.in_features)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name=self.head_name)(x)
        return x.astype(jnp.float32)


def head_for(model: nn.Module, in_features: int) -> LinearHead:
    """The LinearHead matching ``model``'s classifier."""
    return LinearHead(in_features=in_features, num_classes=model.num_classes, head_name=model.head_name,
                      dtype=model.dtype)
