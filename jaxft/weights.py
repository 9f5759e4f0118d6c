"""Where weights come from: torchvision weights names, checkpoint files, modules, state_dicts.

Resolves a source to a torch state_dict plus the metadata users need (class names and the
preprocessing of that weights version). Files are read with ``torch.load(weights_only=True)``,
with ``jaxft.pth_reader`` (the subset of what that reads, without importing torch) or with
safetensors only: nothing here unpickles arbitrary objects. The only network access is
torchvision's own download of a weights file the user asked for by name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Common wrappers around a state_dict in training checkpoints.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

log = logging.getLogger("jaxft.weights")


class WeightsError(ValueError):
    """A weights source that cannot be read or resolved; the message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """torchvision's evaluation transform: Resize(resize_size), CenterCrop(crop_size), Normalize."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass
class WeightsMeta:
    """What a weights source says about itself."""

    source: str
    categories: Optional[list[str]] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "WeightsMeta":
        pre = data.get("preprocessing") or {}
        pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()})
        return cls(source=data.get("source", "unknown"), categories=data.get("categories"), preprocessing=pre)


def _weights_enum_class(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"torchvision has no pretrained weights for {arch!r}") from exc


def weights_enum(arch: str, name: str):
    """torchvision's weights enum member for ``name``: ``imagenet``/``default``, ``IMAGENET1K_V2``
    or ``ResNet50_Weights.IMAGENET1K_V2``."""
    enum_cls = _weights_enum_class(arch)
    if name.lower() in ("imagenet", "default"):
        return enum_cls.DEFAULT
    member = name.split(".", 1)[1] if name.startswith(enum_cls.__name__ + ".") else name
    if member in enum_cls.__members__:
        return enum_cls[member]
    available = ", ".join(["imagenet"] + list(enum_cls.__members__))
    raise WeightsError(
        f"unknown weights {name!r} for {arch}: not a file and not a torchvision weights name. "
        f"Available: {available}, or a path to a .pth/.safetensors file."
    )


def cached_weights_path(weights) -> Path:
    """Where torchvision caches this weights file (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def download_state_dict(weights) -> Mapping[str, Any]:
    """torchvision's own download and cache, read with ``weights_only=True``."""
    import torch.hub

    target = cached_weights_path(weights)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, progress=True, check_hash=True, weights_only=True, map_location="cpu"
        )
    except OSError as exc:  # URLError, socket and DNS errors are all OSErrors
        raise WeightsError(
            f"could not download {weights} from {weights.url} ({exc}). Offline? Put the file at "
            f"{target} (torchvision's cache; set TORCH_HOME to move it), or pass the file's path "
            f"instead of the weights name (e.g. /path/to/{target.name})."
        ) from exc


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(hasattr(v, "shape") for v in inner.values()):
                return inner
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
    raise WeightsError(
        f"{path} holds a {type(obj).__name__} but no state_dict (a mapping of parameter names to "
        f"tensors). Save one with torch.save(model.state_dict(), path)."
    )


def _unreadable(path: Path, exc: Exception) -> WeightsError:
    # torch's weights_only message advises weights_only=False, wrong advice for garbage bytes:
    # keep only the unpickler's own reason.
    reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(exc))
    detail = reason.group(1) if reason else (str(exc).strip().splitlines() or [""])[0]
    return WeightsError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint "
                        f"at all): {type(exc).__name__}: {detail[:200]}")


def load_checkpoint_file(path: os.PathLike | str) -> Mapping[str, Any]:
    """A state_dict from a ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes): an interrupted download or copy?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{path} is not a readable safetensors file ({exc}); truncated or corrupt?") from exc

    from jaxft.pth_reader import NOT_READ, read_pth

    obj = read_pth(path)  # the common case without importing torch (~1.8 s of a run's start)
    if obj is not NOT_READ:
        return _unwrap(obj, path)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names a class it does not allow one way, a blocked module (os, posix...) another
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if refused:
            raise WeightsError(
                f"{path} contains pickled Python objects beyond tensors ({refused.group(1)}; for example a whole "
                f"nn.Module), "
                f"and loading it could run arbitrary code, so jaxft refuses (torch.load weights_only=True). "
                f"If you trust the file and where it came from, load it in PyTorch yourself and re-save only its "
                f"weights: torch.save(model.state_dict(), 'clean.pth')."
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises anything on garbage bytes
        raise _unreadable(path, exc) from exc
    return _unwrap(obj, path)


def _looks_like_path(source: str) -> bool:
    return os.sep in source or source.endswith(CHECKPOINT_SUFFIXES) or Path(source).exists()


def resolve_state_dict(arch: str, source: Any) -> tuple[Mapping[str, Any], WeightsMeta]:
    """A torch state_dict and its metadata from any supported source (see module doc)."""
    if hasattr(source, "state_dict") and callable(source.state_dict):  # an nn.Module
        return source.state_dict(), WeightsMeta(source=f"nn.Module {type(source).__name__}")
    if isinstance(source, Mapping):
        return source, WeightsMeta(source="state_dict")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if _looks_like_path(text):
            return load_checkpoint_file(text), sidecar_meta(Path(text))
        weights = weights_enum(arch, text)
        meta = WeightsMeta(source=f"torchvision {weights}", categories=list(weights.meta["categories"]),
                           preprocessing=preprocessing_of(weights))
        return download_state_dict(weights), meta
    raise WeightsError(f"cannot read weights from a {type(source).__name__}: pass a weights name, a path, "
                       f"a state_dict or an nn.Module")


SIDECAR_KEYS = ("image_size", "mean", "std", "classes")
SIDECAR_EXAMPLE = ('{"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], '
                   '"classes": ["cat", "dog", ...]}')
_announced: set[str] = set()  # weights files whose assumed preprocessing was already announced


def sidecar_path(path: Path) -> Path:
    """Where a checkpoint file's metadata lives: ``model.pth`` -> ``model.json`` beside it."""
    return Path(path).with_suffix(".json")


def sidecar_meta(path: Path) -> WeightsMeta:
    """Metadata for a checkpoint file from its sidecar ``<file stem>.json`` (jaxft's source
    checkpoints write one; keys image_size, mean, std, classes, all optional). Whatever the
    sidecar does not give is ImageNet's, and a warning says so once per file and process."""
    meta = WeightsMeta(source=str(path.resolve()))
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        _announce_assumed(path, f"no metadata sidecar {sidecar} was found", ("image_size", "mean", "std"))
        return meta
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        _announce_assumed(path, f"its sidecar {sidecar} is not readable JSON ({exc}) and is ignored",
                          ("image_size", "mean", "std"))
        return meta
    if not isinstance(info, dict) or not any(key in info for key in SIDECAR_KEYS):
        _announce_assumed(path, f"its sidecar {sidecar} is not a JSON object with any of the keys "
                                f"{', '.join(SIDECAR_KEYS)} and is ignored", ("image_size", "mean", "std"))
        return meta
    default = Preprocessing()
    size = _sidecar_value(sidecar, info, "image_size", "a positive whole number of pixels",
                          lambda v: _number(v) and v > 0 and (isinstance(v, int) or v.is_integer()))
    mean = _sidecar_value(sidecar, info, "mean", "a list of 3 numbers (one per RGB channel)",
                          lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v)))
    std = _sidecar_value(sidecar, info, "std", "a list of 3 positive numbers (one per RGB channel)",
                         lambda v: isinstance(v, list) and len(v) == 3 and all(_number(x) and x > 0 for x in v))
    classes = _sidecar_value(sidecar, info, "classes", "a non-empty list of class names (strings)",
                             lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v))
    size = int(size) if size else None
    meta.preprocessing = Preprocessing(resize_size=size or default.resize_size, crop_size=size or default.crop_size,
                                       mean=tuple(map(float, mean)) if mean else default.mean,
                                       std=tuple(map(float, std)) if std else default.std)
    meta.categories = classes
    missing = tuple(key for key in ("image_size", "mean", "std") if key not in info)
    if missing:
        _announce_assumed(path, f"its sidecar {sidecar} has no {', '.join(missing)}", missing)
    return meta


def _sidecar_value(sidecar: Path, info: Mapping[str, Any], key: str, what: str, valid) -> Any:
    """``info[key]`` (None when absent); a present but invalid value is an error naming the key."""
    value = info.get(key)
    if key in info and not valid(value):
        raise WeightsError(f"{sidecar}: {key!r} must be {what}, not {json.dumps(value)[:80]}; fix it or delete "
                           f"the key (ImageNet's value is used then)")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _announce_assumed(path: Path, why: str, keys: Sequence[str]) -> None:
    """One warning line per weights file: why metadata is missing, what is assumed, how to supply it."""
    if str(path.resolve()) in _announced:
        return
    _announced.add(str(path.resolve()))
    default = Preprocessing()
    assumed = {"image_size": f"resize {default.resize_size}, center crop {default.crop_size}",
               "mean": f"mean {list(default.mean)}", "std": f"std {list(default.std)}"}
    log.warning("weights file %s: %s, so ImageNet preprocessing is assumed (%s). If these weights expect other "
                "input, write %s as JSON, e.g. %s (image_size is the resize and crop size; every key optional).",
                path, why, ", ".join(assumed[key] for key in keys), sidecar_path(path), SIDECAR_EXAMPLE)


def preprocessing_of(weights) -> Preprocessing:
    """The evaluation preprocessing torchvision attaches to a weights version."""
    t = weights.transforms()
    return Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        interpolation=t.interpolation.value,
    )
