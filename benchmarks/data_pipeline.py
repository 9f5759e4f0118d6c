#!/usr/bin/env python
"""Input pipeline throughput against torch's DataLoader, and the head strategy with cached features.

    python benchmarks/data_pipeline.py [--images 300] [--workers 0 2] [--batch-size 32] [--epochs 5]

1. Decoded-and-augmented images/s: jaxft's grain pipeline and ``torch.utils.data.DataLoader``
   over ``torchvision.datasets.ImageFolder``, same folder of real JPEGs (random crops of the
   photographs bundled with scikit-image), same transforms (RandomResizedCrop 224 + flip +
   ToTensor + Normalize), same batch size and worker count. Each run starts a fresh iterator
   and reads ``--loader-epochs`` epochs alone (workers persist across its epochs on both
   sides); the two loaders alternate over the repeats. Images/s excludes the first batch,
   which is reported on its own: the start-up (worker processes, their imports) paid once.
2. The head strategy (frozen resnet18, digits 5-9 at 32 px, deterministic inputs): Engine
   training on images every epoch against training LinearHead on features computed once,
   first run (extraction included) and with the features already cached. The final loss
   column shows the two routes train the same head.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, machine_line, print_table

from jaxft.data import open_dataset, train_loader, transforms_for
from jaxft.data.transforms import TrainTransform
from jaxft.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (about 250-500 px a side) cropped from scikit-image's photographs, one class each."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "ihc": data.immunohistochemistry()}
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = list(photos)[i % len(photos)]
        photo = photos[name]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        scale = rng.uniform(0.8, 1.3)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw])
        crop = crop.resize((int(cw * scale), int(ch * scale)), Image.BILINEAR)
        (root / name).mkdir(parents=True, exist_ok=True)
        crop.save(root / name / f"{i:04d}.jpg", quality=90)


def bench_loaders(root: Path, workers: int, batch_size: int, epochs: int, repeats: int) -> list:
    """One row: steady images/s and first-batch seconds of both loaders, each run alone from a
    fresh iterator for ``epochs`` epochs (round-robin over ``repeats``, medians)."""
    import statistics

    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    # Per-sample work parallelises over samples (processes), not inside tiny tensor ops: torch's
    # DataLoader workers run single-threaded too, and two intra-op threads on two busy cores
    # made in-process torch several times slower.
    torch.set_num_threads(1)
    train = open_dataset(str(root), val_fraction=0.01).train  # (almost) every image
    ours_loader = train_loader(train, TrainTransform(224), batch_size, seed=0, num_epochs=epochs,
                               num_workers=workers)
    torch_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folder = datasets.ImageFolder(str(root), transform=torch_tf)
    index = {path: i for i, (path, _) in enumerate(folder.samples)}
    same_images = torch.utils.data.Subset(folder, [index[str(root / train.store.paths[k])] for k in train.keys])
    torch_loader = torch.utils.data.DataLoader(same_images, batch_size=batch_size, shuffle=True, drop_last=True,
                                               num_workers=workers, persistent_workers=workers > 0)
    steps = ours_loader.steps_per_epoch * epochs
    assert len(torch_loader) * epochs == steps
    timings: dict[str, list[tuple[float, float]]] = {"ours": [], "torch": []}

    def timed(name, batches):
        start = time.perf_counter()
        next(batches)
        first = time.perf_counter() - start
        for _ in range(steps - 1):
            next(batches)
        timings[name].append((first, time.perf_counter() - start - first))

    def run_ours():
        iterator = iter(ours_loader)
        timed("ours", iterator)
        iterator.close()

    def run_torch():
        timed("torch", (batch for _ in range(epochs) for batch in torch_loader))

    interleaved_medians({"ours": run_ours, "torch": run_torch}, repeats, warmup=0)
    images = (steps - 1) * batch_size
    rate = {k: statistics.median(images / rest for _, rest in v) for k, v in timings.items()}
    first = {k: statistics.median(f for f, _ in v) for k, v in timings.items()}
    return [workers, len(train), f"{rate['ours']:.0f}", f"{rate['torch']:.0f}", f"{rate['ours'] / rate['torch']:.2f}",
            f"{first['ours']:.1f}", f"{first['torch']:.1f}"]


def bench_head(epochs: int, batch_size: int, image_size: int, repeats: int) -> list[list]:
    import jax

    from jaxft.features import default_feature_dir, extract_features
    from jaxft.engine import Engine
    from jaxft.freeze import parse_strategy
    from jaxft.models import create_model
    from jaxft.models.head import head_for
    from jaxft.pretrained import init_variables

    splits = open_dataset("digits:5-9")
    _, eval_tf = transforms_for(Preprocessing(), image_size=image_size, augment=False)
    model = create_model("resnet18", num_classes=len(splits.classes))
    variables = jax.device_get(init_variables(model, seed=0, image_size=image_size))
    cache = default_feature_dir()  # under main()'s throwaway $JAXFT_CACHE
    final = {}

    def on_images():
        jax.clear_caches()  # every route compiles what it needs, as a fresh run would
        engine = Engine(model, variables, parse_strategy("head"), total_steps=1)
        for batch in train_loader(splits.train, eval_tf, batch_size, seed=0, num_epochs=epochs):
            metrics = engine.train_step(batch)
        final["images"] = float(metrics["loss_sum"] / metrics["count"])

    def on_features(key: str, fresh: bool):
        def run():
            jax.clear_caches()
            if fresh:
                for old in cache.glob("*.npz"):
                    old.unlink()
            features = extract_features(model, variables, splits.train, eval_tf, batch_size=batch_size,
                                        cache_dir=cache)
            assert features.from_cache != fresh
            head = {"params": {model.head_name: variables["params"][model.head_name]}}
            engine = Engine(head_for(model, features.features.shape[1]), head, parse_strategy("full"), total_steps=1)
            for batch in train_loader(features.as_split("train"), None, batch_size, seed=0, num_epochs=epochs):
                metrics = engine.train_step(batch)
            final[key] = float(metrics["loss_sum"] / metrics["count"])
        return run

    contenders = {"images": on_images, "extract": on_features("extract", True), "cached": on_features("cached", False)}
    medians = interleaved_medians(contenders, repeats)
    labels = {"images": "backbone forward every step (no cache)",
              "extract": "cached features, first run (extract + train)",
              "cached": "cached features, cache hit (load + train)"}
    return [[labels[k], f"{medians[k]:.2f}", f"{medians['images'] / medians[k]:.1f}", f"{final[k]:.4f}"]
            for k in contenders]


def bench_consumption(batch_size: int, repeats: int, archs=("resnet18", "resnet50"),
                      specs=("full", "head")) -> list[list]:
    """How fast the train step eats 224 px images (images/s): what the loader has to keep up with."""
    import numpy as np

    from jaxft import create_model
    from jaxft.engine import Engine
    from jaxft.freeze import parse_strategy
    from jaxft.pretrained import init_variables

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(batch_size, 224, 224, 3)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size)}
    rows = []
    for arch in archs:
        model = create_model(arch, num_classes=10)
        variables = init_variables(model)
        for spec in specs:
            engine = Engine(model, variables, parse_strategy(spec))
            seconds = interleaved_medians({"step": lambda e=engine: e.train_step(batch)}, repeats)["step"]
            rows.append([arch, spec, f"{batch_size / seconds:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="head strategy epochs")
    parser.add_argument("--head-image-size", type=int, default=32)
    args = parser.parse_args()
    # Scan verdicts and features of this run go to a throwaway cache, not the user's.
    with tempfile.TemporaryDirectory(prefix="jaxft_cache_") as cache, \
            tempfile.TemporaryDirectory(prefix="jaxft_jpegs_") as images:
        os.environ["JAXFT_CACHE"] = cache
        make_jpeg_folder(Path(images), args.images)
        # Loaders first: torch forks its workers, which JAX warns against once its backend is up.
        loader_rows = [bench_loaders(Path(images), w, args.batch_size, args.loader_epochs, args.repeats)
                       for w in args.workers]
        head_rows = bench_head(args.epochs, args.batch_size, args.head_image_size, args.repeats)
        consumption_rows = bench_consumption(args.batch_size, args.repeats)
    print(f"# data pipeline; {machine_line()}\n")
    print(f"## decode + RandomResizedCrop 224 + flip + normalize: {args.images} JPEGs, batch {args.batch_size}, "
          f"{args.loader_epochs} epochs per run\n")
    print_table(["workers", "images", "jaxft img/s", "torch img/s", "jaxft/torch", "jaxft 1st batch s",
                 "torch 1st batch s"], loader_rows)
    print(f"\n## head strategy: resnet18 frozen, digits 5-9 at {args.head_image_size}px, {args.epochs} epochs, "
          f"batch {args.batch_size}\n")
    print_table(["route", "seconds", "speed-up", "final loss"], head_rows)
    print(f"\n## what the train step consumes: 224 px, batch {args.batch_size}, Adam, images/s\n")
    print_table(["arch", "strategy", "train step img/s"], consumption_rows)


if __name__ == "__main__":
    main()
