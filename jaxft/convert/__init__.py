"""torchvision state_dict <-> Flax variables, by rule, strictly.

The rule (no per-architecture tables):

* key ``a.0.b.weight`` -> Flax path ``a_0/b/<leaf>``: a numeric key part joins the name
  before it with ``_``;
* ``weight`` of a 4-D conv -> ``kernel`` (OIHW -> HWIO), of a Linear -> ``kernel`` (``.T``),
  of a BatchNorm (1-D) -> ``scale``; ``bias`` -> ``bias``;
* ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``;
  ``num_batches_tracked`` is dropped (torch only reads it when ``momentum=None``);
* a Linear that reads a torch (C, H, W) flatten (VGG's ``classifier.0``) has its input
  rows permuted once, so the Flax model flattens NHWC with no run-time transpose.

Every torch key is used exactly once and every Flax leaf is filled; anything else is a
``ConversionError`` naming the keys. Export is the exact inverse.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft.models import ARCHS, check_arch, create_model

Variables = dict[str, Any]
Leaf = tuple[str, tuple[str, ...]]  # (collection, module path + leaf name)

_TORCH_TO_FLAX_LEAF = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                       "var": "running_var"}
_NUMBERED = re.compile(r"^(.*)_(\d+)$")
_LAYOUT_INPUT = (1, 32, 32, 3)  # every arch accepts 32x32; shapes do not depend on it


class ConversionError(ValueError):
    """A state_dict that does not fit the Flax model, or Flax variables that do not fit torch."""


@functools.lru_cache(maxsize=64)
def model_layout(model: nn.Module) -> "OrderedDict[Leaf, tuple[int, ...]]":
    """Every variable of ``model`` with its shape, in torchvision's state_dict order (read-only).

    Flax creates variables in call order, which mirrors torchvision's ``__init__`` order;
    flattening inside the trace keeps that order (sorted pytrees would not). Cached per module
    configuration (modules hash by their fields): strategies ask for it every epoch.
    """
    order: list[tuple[str, tuple[str, ...]]] = []

    def init():
        shape = getattr(model, "layout_input_shape", _LAYOUT_INPUT)  # LinearHead reads features, not images
        variables = model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
        for collection in ("params", "batch_stats"):
            order.extend((collection, path) for path in traverse_util.flatten_dict(variables.get(collection, {})))
        return variables

    shapes = jax.eval_shape(init)
    layout = OrderedDict()
    for collection, path in order:
        layout[(collection, path)] = tuple(traverse_util.flatten_dict(shapes[collection])[path].shape)
    # torch lists a module's parameters then its buffers: weight, bias, running_mean, running_var.
    module_rank: dict[tuple[str, ...], int] = {}
    for _, path in layout:
        module_rank.setdefault(path[:-1], len(module_rank))
    return OrderedDict(sorted(layout.items(), key=lambda kv: (module_rank[kv[0][1][:-1]], kv[0][0] != "params")))


def torch_key_to_flax(key: str, ndim: int) -> Optional[Leaf]:
    """The Flax leaf a torch key maps to, or None for keys that carry no Flax state."""
    *modules, leaf = key.split(".")
    names: list[str] = []
    for part in modules:
        if part.isdigit() and names:
            names[-1] = f"{names[-1]}_{part}"
        else:
            names.append(part)
    if leaf == "num_batches_tracked":
        return None
    if leaf in _TORCH_TO_FLAX_LEAF:
        collection, name = _TORCH_TO_FLAX_LEAF[leaf]
        return collection, (*names, name)
    if leaf == "weight":
        return "params", (*names, "scale" if ndim == 1 else "kernel")
    if leaf == "bias":
        return "params", (*names, "bias")
    return "params", (*names, leaf)  # unknown leaf name: reported as unexpected


def torch_module_name(module_path: tuple[str, ...]) -> str:
    """``('layer1_0', 'downsample_1')`` -> ``'layer1.0.downsample.1'``."""
    parts = []
    for name in module_path:
        match = _NUMBERED.match(name)
        parts.extend(match.groups() if match else (name,))
    return ".".join(parts)


def flax_leaf_to_torch(path: tuple[str, ...]) -> str:
    """The torch key of a Flax leaf path (inverse of :func:`torch_key_to_flax`)."""
    return f"{torch_module_name(path[:-1])}.{_FLAX_TO_TORCH_LEAF[path[-1]]}"


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:
            value = value.float()  # float16 / bfloat16 checkpoints: numpy has no bfloat16
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any non-array value is a user error
        raise ConversionError(f"state_dict value for {key!r} is not an array ({type(value).__name__})") from exc


def _chw_spec(model: nn.Module, module_path: tuple[str, ...]) -> Optional[tuple[int, int, int]]:
    return getattr(model, "torch_chw_flatten", {}).get("/".join(module_path))


def _torch_to_flax_value(model: nn.Module, path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    chw = _chw_spec(model, path[:-1])
    if chw is not None:
        c, h, w = chw
        return array.reshape(array.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return array.T


def _flax_to_torch_value(model: nn.Module, path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    chw = _chw_spec(model, path[:-1])
    if chw is not None:
        c, h, w = chw
        return array.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(array.shape[1], c * h * w)
    return array.T


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)} {title}: {shown}"


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf, computed from shapes alone (no arrays)."""
    if path[-1] == "kernel" and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if path[-1] == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def guess_arch(state_dict: Mapping[str, Any]) -> list[str]:
    """Archs whose torch keys and shapes match ``state_dict`` (the classifier's size aside)."""
    shapes = {k: tuple(np.shape(v)) for k, v in strip_prefix(state_dict).items() if not k.endswith("num_batches_tracked")}
    matches = []
    for arch in ARCHS:
        model = create_model(arch)
        expected = {flax_leaf_to_torch(p): _torch_shape(p, shape) for (_, p), shape in model_layout(model).items()}
        head = torch_module_name((model.head_name,)) + "."
        if expected.keys() == shapes.keys() and all(
            shapes[k] == shape for k, shape in expected.items() if not k.startswith(head)
        ):
            matches.append(arch)
    return matches


def strip_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` / DDP add to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return state_dict


def state_dict_to_variables(model: nn.Module, state_dict: Mapping[str, Any], arch: str = "",
                            as_loaded: Optional[Mapping[str, Any]] = None) -> Variables:
    """Map a torchvision state_dict onto ``model``'s variables; strict on keys and shapes.

    ``as_loaded``: the state_dict as the user gave it, before a new head was put in, so that
    a mismatch is diagnosed (which arch it looks like) on the user's own keys."""
    state_dict = strip_prefix(state_dict)
    layout = model_layout(model)
    filled: dict[Leaf, np.ndarray] = {}
    seen: set[Leaf] = set()
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        array = _to_numpy(value, key)
        target = torch_key_to_flax(key, array.ndim)
        if target is None:
            continue
        if target not in layout or target in seen:
            unexpected.append(key)
            continue
        seen.add(target)
        needed = _torch_shape(target[1], layout[target])
        if tuple(array.shape) != needed:
            mismatched.append(f"{key} has shape {tuple(array.shape)}, the model needs {needed}")
            continue
        filled[target] = np.ascontiguousarray(_torch_to_flax_value(model, target[1], array), dtype=np.float32)
    missing = [flax_leaf_to_torch(path) for leaf in layout if leaf not in seen for path in (leaf[1],)]

    if unexpected or missing or mismatched:
        name = arch or type(model).__name__
        problems = [f"the state_dict does not fit {name}"]
        if missing:
            problems.append(_listing("missing keys", missing))
        if unexpected:
            problems.append(_listing("unexpected keys", unexpected))
        if mismatched:
            problems.append(_listing("shape mismatches", mismatched, limit=4))
        guesses = [a for a in guess_arch(as_loaded or state_dict) if a != arch] if (missing or unexpected) else []
        if guesses:
            problems.append(f"it looks like a {' or '.join(guesses)} state_dict: pass that arch instead")
        elif mismatched and not (missing or unexpected):
            problems.append("if only the classifier differs, use load_pretrained(..., num_classes=N) "
                            "to replace the head")
        raise ConversionError("; ".join(problems) + ".")

    variables: dict[str, dict] = {}
    for (collection, path), array in filled.items():
        # device_put, not jnp.asarray: the latter compiles a small jit per distinct shape (0.2 s
        # for resnet18's 17 shapes on the CPU), a copy needs none
        variables.setdefault(collection, {})[path] = jax.device_put(array)
    return {c: traverse_util.unflatten_dict(flat) for c, flat in variables.items()}


def variables_to_state_dict(model: nn.Module, variables: Variables) -> "OrderedDict[str, np.ndarray]":
    """The exact inverse of :func:`state_dict_to_variables`, in torchvision's key order.

    BatchNorm layers get ``num_batches_tracked = 0`` so ``load_state_dict(strict=True)`` accepts
    the result; torch reads it only when ``momentum=None``, which torchvision never uses.
    """
    layout = model_layout(model)
    flat = {c: traverse_util.flatten_dict(dict(variables.get(c, {}))) for c in ("params", "batch_stats")}
    present = {(c, p) for c, leaves in flat.items() for p in leaves}
    missing = [f"{c}/{'/'.join(p)}" for c, p in layout if (c, p) not in present]
    unexpected = [f"{c}/{'/'.join(p)}" for c, p in sorted(present - set(layout))]
    mismatched = [f"{c}/{'/'.join(p)} has shape {tuple(np.shape(flat[c][p]))}, the model needs {shape}"
                  for (c, p), shape in layout.items() if (c, p) in present and tuple(np.shape(flat[c][p])) != shape]
    if missing or unexpected or mismatched:
        problems = ["the Flax variables do not fit the model"]
        for title, items in (("missing leaves", missing), ("unexpected leaves", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                problems.append(_listing(title, items))
        raise ConversionError("; ".join(problems) + ".")

    state_dict: OrderedDict[str, np.ndarray] = OrderedDict()
    for collection, path in layout:
        state_dict[flax_leaf_to_torch(path)] = _torch_value(model, path, flat[collection][path])
        if path[-1] == "var":  # running_var is a BatchNorm's last buffer in torch's order
            state_dict[f"{torch_module_name(path[:-1])}.num_batches_tracked"] = np.zeros((), np.int64)
    return state_dict


def _torch_value(model: nn.Module, path: tuple[str, ...], value: Any) -> np.ndarray:
    """A Flax leaf as torch stores it: float32, torch's layout, and a fresh, writable copy
    (torch.from_numpy shares memory and warns on read-only arrays)."""
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    return np.array(_flax_to_torch_value(model, path, array), order="C")


def head_state_dict(model: nn.Module, head_params: Mapping[str, Any]) -> "OrderedDict[str, np.ndarray]":
    """The torch entries (``fc.weight``, ``fc.bias``) of ``params[model.head_name]``, as
    :func:`variables_to_state_dict` writes them."""
    return OrderedDict((flax_leaf_to_torch((model.head_name, name)),
                        _torch_value(model, (model.head_name, name), head_params[name])) for name in ("kernel", "bias"))


def infer_num_classes(arch: str, state_dict: Mapping[str, Any]) -> Optional[int]:
    """The classifier's output size in a torchvision state_dict, if its head key is there."""
    head = create_model(check_arch(arch)).head_name
    key = flax_leaf_to_torch((head, "kernel"))
    state_dict = strip_prefix(state_dict)
    return int(np.shape(state_dict[key])[0]) if key in state_dict else None


def from_torch(arch: str, source: Any, num_classes: Optional[int] = None, **model_kwargs: Any) -> Variables:
    """Flax ``{'params', 'batch_stats'}`` for ``arch`` from a torch source.

    ``source``: an ``nn.Module``, a state_dict, a ``.pth`` / ``.safetensors`` path, or a
    torchvision weights name (``"imagenet"``, ``"IMAGENET1K_V2"``). ``num_classes`` defaults
    to the checkpoint's own head size.
    """
    from jaxft.weights import resolve_state_dict

    state_dict, _ = resolve_state_dict(check_arch(arch), source)
    if num_classes is None:
        num_classes = infer_num_classes(arch, state_dict) or 1000
    return state_dict_to_variables(create_model(arch, num_classes=num_classes, **model_kwargs), state_dict, arch)


def to_torch(arch: str, variables: Variables, as_tensors: bool = True) -> "OrderedDict[str, Any]":
    """A torchvision state_dict for ``arch`` that ``load_state_dict(strict=True)`` accepts."""
    head = create_model(check_arch(arch)).head_name
    try:
        num_classes = int(np.shape(variables["params"][head]["kernel"])[-1])
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"the Flax variables have no classifier params/{head}/kernel for {arch}") from exc
    state_dict = variables_to_state_dict(create_model(arch, num_classes=num_classes), variables)
    if not as_tensors:
        return state_dict
    import torch

    return OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())


def count_params(variables: Variables, collections: Iterable[str] = ("params",)) -> int:
    return sum(int(np.prod(np.shape(x))) for c in collections for x in jax.tree_util.tree_leaves(variables.get(c, {})))
