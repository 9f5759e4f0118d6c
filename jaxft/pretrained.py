"""A pretrained torchvision checkpoint, ready for a new task: same arch, new head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.convert import count_params, head_state_dict, infer_num_classes, state_dict_to_variables, strip_prefix
from jaxft.models import check_arch, create_model
from jaxft.weights import WeightsMeta, resolve_state_dict

NO_WEIGHTS = (None, "none", "random", "scratch")


@dataclass
class PretrainedInfo:
    """What ``load_pretrained`` did: where weights came from and which keys it replaced."""

    arch: str
    num_classes: int
    meta: WeightsMeta
    replaced_keys: list[str] = field(default_factory=list)
    param_count: int = 0

    @property
    def categories(self) -> Optional[list[str]]:
        return self.meta.categories


def init_variables(model: nn.Module, seed: int = 0, image_size: int = 32) -> dict[str, Any]:
    """Fresh variables initialised the way torchvision initialises the same model."""
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3), jnp.float32))


def init_head(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """The classifier's params (``params[model.head_name]``) exactly as :func:`init_variables`
    draws them: Flax gives every layer its own random stream, derived from its path, so the
    head's values do not depend on the rest. Only the head is computed: the rest of the jitted
    init, unused, is dropped by XLA (the whole init of resnet18 or vgg16 draws every weight)."""
    image = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, image)["params"][model.head_name])(jax.random.key(seed))


def load_pretrained(
    arch: str,
    weights: Any = "imagenet",
    num_classes: Optional[int] = None,
    seed: int = 0,
    new_head: Optional[bool] = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any], PretrainedInfo]:
    """Model, variables and info for fine-tuning ``arch`` on ``num_classes`` classes.

    The backbone comes from ``weights`` (see :func:`jaxft.weights.resolve_state_dict`;
    ``None``/``"none"`` means random init). When ``num_classes`` differs from the checkpoint's,
    the classifier is freshly initialised like torchvision does and ``info.replaced_keys``
    names the torch keys that were replaced. ``new_head=True`` replaces it even when the
    class count matches (a new task with as many classes as the source's).
    """
    check_arch(arch)
    if weights in NO_WEIGHTS:
        model = create_model(arch, num_classes=num_classes or 1000, **model_kwargs)
        variables = init_variables(model, seed)
        meta = WeightsMeta(source="random init")  # no weights, no class names
        return model, variables, PretrainedInfo(arch, model.num_classes, meta, [], count_params(variables))

    state_dict, meta = resolve_state_dict(arch, weights)
    state_dict = strip_prefix(state_dict)
    source_classes = infer_num_classes(arch, state_dict)
    num_classes = num_classes or source_classes or 1000
    model = create_model(arch, num_classes=num_classes, **model_kwargs)
    replaced: list[str] = []
    as_loaded = state_dict
    if new_head if new_head is not None else (source_classes is not None and source_classes != num_classes):
        fresh = head_state_dict(model, init_head(model, seed))
        replaced = list(fresh)
        state_dict = {**state_dict, **fresh}
        meta.categories = None  # the new head's classes are the dataset's, not the checkpoint's
    # (a file without class names keeps none: 1000 outputs are not proof that they are ImageNet's)
    variables = state_dict_to_variables(model, state_dict, arch, as_loaded)
    return model, variables, PretrainedInfo(arch, num_classes, meta, replaced, count_params(variables))
