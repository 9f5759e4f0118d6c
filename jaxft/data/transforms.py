"""torchvision's classification transforms on numpy/PIL, with explicit randomness.

* training: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` +
  ``RandomHorizontalFlip()``, then ``ToTensor`` + ``Normalize``;
* evaluation: ``Resize(resize_size)`` (shorter side) + ``CenterCrop(crop_size)``, then
  ``ToTensor`` + ``Normalize``.

Resizing is PIL's, which is what torchvision does on PIL images (bilinear with antialias),
so the evaluation transform is bit-identical to torchvision's Resize + CenterCrop (the tests
assert equal uint8 crops). Randomness comes from
the ``np.random.Generator`` passed in (the pipeline seeds one per sample), never from global
state. Outputs are float32 (H, W, 3): NHWC, as the models take them; with ``normalized=False``
the uint8 image before ``ToTensor`` + ``Normalize``, which the train step normalises on the
device (a quarter of the bytes cross to it, and the workers skip the arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import numpy as np
from PIL import Image

from jaxft.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _pil_filter(interpolation: str) -> int:
    try:
        return _PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(_PIL_FILTERS)}") from None


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 HWC -> float32 ``(x / 255 - mean) / std`` (``ToTensor`` then ``Normalize``).

    Computed in place as ``x * (1 / (255 std)) - mean / std``, within 1e-6 of torchvision's
    order of operations, over rows of W*3 values: broadcasting against a last axis of 3 runs
    numpy's inner loop three elements at a time, seven times slower."""
    height, width, _ = image.shape
    std64 = np.asarray(std, np.float64)
    x = image.astype(np.float32)  # a fresh C-contiguous copy, so the reshape below is a view
    rows = x.reshape(height, -1)
    rows *= np.tile((1.0 / (255.0 * std64)).astype(np.float32), width)
    rows -= np.tile((np.asarray(mean, np.float64) / std64).astype(np.float32), width)
    return x


def resize_shorter(image: Image.Image, size: int, resample: int) -> Image.Image:
    """``transforms.Resize(size)``: shorter side to ``size``, longer side truncated as torchvision does."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return image.resize((size, new_long) if w <= h else (new_long, size), resample)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """``transforms.CenterCrop(size)``, including its zero padding of images smaller than ``size``."""
    h, w = image.shape[:2]
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params``: (top, left, h, w), with torchvision's ten tries and
    its central-crop fallback."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainTransform:
    """Random crop-and-resize, random flip, normalize; ``random`` tells the pipeline to pass an rng."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    normalized: bool = True
    random: ClassVar[bool] = True

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator]) -> np.ndarray:
        top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
        crop = Image.fromarray(image[top:top + h, left:left + w])
        out = crop.resize((self.size, self.size), _pil_filter(self.interpolation))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)  # flipped in PIL, not as a numpy view: stays contiguous
        out = np.asarray(out)
        return normalize(out, self.mean, self.std) if self.normalized else out


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, center-crop, normalize: deterministic."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    normalized: bool = True
    random: ClassVar[bool] = False

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The uint8 image after Resize + CenterCrop (before normalizing)."""
        resized = resize_shorter(Image.fromarray(image), self.resize_size, _pil_filter(self.interpolation))
        return center_crop(np.asarray(resized), self.crop_size)

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        crop = self.crop(image)
        return normalize(crop, self.mean, self.std) if self.normalized else np.ascontiguousarray(crop)


def unnormalized(transform: TrainTransform | EvalTransform) -> TrainTransform | EvalTransform:
    """The same transform, stopping at the uint8 image: for a train step that normalises on
    the device (``Engine(normalization=(mean, std))``)."""
    return replace(transform, normalized=False)


def transforms_for(pre: Preprocessing, image_size: Optional[int] = None,
                   augment: bool = True) -> tuple[TrainTransform | EvalTransform, EvalTransform]:
    """(training, evaluation) transforms for a weights version's preprocessing.

    ``image_size`` overrides the crop size (small sizes for fast runs) and scales the resize
    size by torchvision's ratio (256/224). ``augment=False`` trains on the evaluation
    transform, which lets a frozen backbone's features be cached."""
    crop = image_size or pre.crop_size
    resize = pre.resize_size if image_size is None else int(round(image_size * pre.resize_size / pre.crop_size))
    evaluation = EvalTransform(resize, crop, tuple(pre.mean), tuple(pre.std), pre.interpolation)
    if not augment:
        return evaluation, evaluation
    return TrainTransform(crop, mean=tuple(pre.mean), std=tuple(pre.std), interpolation=pre.interpolation), evaluation
