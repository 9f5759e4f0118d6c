"""An offline stand-in for ImageNet weights, trained in PyTorch on real bundled images.

No pretrained weights can be downloaded on an offline machine, so jaxft builds its own
torchvision-format source checkpoint: a torchvision model trained **in PyTorch** on
scikit-learn's digits 0-4 (upscaled). Fine-tuning it on digits 5-9 or on faces is a real,
if small, transfer-learning task. Seeded and run with deterministic algorithms: two builds
with the same seed on one machine wrote byte-identical ``.pth`` files (measured, not asserted by
the tests; the ``.json`` differs in ``train_seconds``).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from jaxft.data.builtin import digits
from jaxft.rundir import atomic_write
from jaxft.runtime import cache_dir
from jaxft.weights import IMAGENET_MEAN, IMAGENET_STD

SOURCE_CLASSES = (0, 1, 2, 3, 4)
SOURCE_ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn")


@dataclass
class SourceRecipe:
    """How the source checkpoint is trained (all of it goes into the file's metadata)."""

    arch: str = "resnet18"
    image_size: int = 32
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


def default_source_path(recipe: SourceRecipe) -> Path:
    return cache_dir() / "sources" / f"{recipe.arch}_digits0-4_{recipe.image_size}px_seed{recipe.seed}.pth"


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w, 3) -> uint8 (N, size, size, 3), PIL bilinear (what torchvision uses)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def normalized_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w, 3) -> float32 NHWC at ``size`` px with ImageNet normalisation: the
    source checkpoint's input, also used to feed it the other digits."""
    x = resize_images(images, size).astype(np.float32) / 255.0
    return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def _tensors(images: np.ndarray, size: int):
    import torch

    return torch.from_numpy(np.ascontiguousarray(normalized_images(images, size).transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def seeded_deterministic_torch(seed: int) -> Iterator[None]:
    """torch seeded with ``seed`` and restricted to deterministic algorithms inside the block
    only: the caller's setting (and warn_only) and RNG states come back after, also on errors."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def train_source_model(recipe: SourceRecipe, log=print):
    """Train ``recipe.arch`` in PyTorch on digits 0-4; returns (model, metadata dict)."""
    import torch
    import torchvision

    with seeded_deterministic_torch(recipe.seed):
        images, labels, names = digits(SOURCE_CLASSES)
        order = np.random.default_rng(recipe.seed).permutation(len(labels))
        n_val = len(labels) // 5
        val_idx, train_idx = order[:n_val], order[n_val:]
        x_train, y_train = _tensors(images[train_idx], recipe.image_size), torch.from_numpy(labels[train_idx])
        x_val, y_val = _tensors(images[val_idx], recipe.image_size), torch.from_numpy(labels[val_idx])

        model = torchvision.models.get_model(recipe.arch, weights=None, num_classes=len(names))
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        steps_per_epoch = -(-len(train_idx) // recipe.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr,
                                                       total_steps=recipe.epochs * steps_per_epoch)
        generator = torch.Generator().manual_seed(recipe.seed)
        start = time.perf_counter()
        for epoch in range(recipe.epochs):
            model.train()
            perm = torch.randperm(len(train_idx), generator=generator)
            for i in range(steps_per_epoch):
                batch = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            model.eval()
            with torch.no_grad():
                val_acc = float((model(x_val).argmax(1) == y_val).float().mean())
            log(f"source {recipe.arch} epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.3f}, "
                f"val accuracy {val_acc:.3f}")
    meta = {
        **asdict(recipe),
        "classes": names,
        "dataset": "sklearn digits, classes 0-4",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "val_accuracy": val_acc,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return model, meta


def build_source_checkpoint(out: Optional[Path] = None, recipe: Optional[SourceRecipe] = None, log=print) -> Path:
    """Train and save a torchvision-format ``.pth`` (+ ``.json`` metadata beside it); atomic."""
    import io

    import torch

    recipe = recipe or SourceRecipe()
    out = Path(out) if out else default_source_path(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, meta = train_source_model(recipe, log)
    buffer = io.BytesIO()  # saving to a buffer keeps the archive's inner name, and so the bytes, fixed
    torch.save(model.state_dict(), buffer)
    # Both files go to a temporary file beside them and are renamed into place, the .json first:
    # readers never see a half-written file, and a .pth that exists has its .json beside it.
    text = json.dumps(meta, indent=2)
    atomic_write(out.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    atomic_write(out, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return out


def ensure_source_checkpoint(recipe: Optional[SourceRecipe] = None, log=print) -> Path:
    """The cached source checkpoint for ``recipe``, built on first use."""
    recipe = recipe or SourceRecipe()
    path = default_source_path(recipe)
    if not path.exists():
        log(f"building the offline source checkpoint {path} (once; PyTorch, about 15 s on two cores)")
        build_source_checkpoint(path, recipe, log)
    return path

