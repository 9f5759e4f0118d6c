"""python -m jaxft.predict: top-k classes with names for images, from pretrained weights or a run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

EXAMPLES = """\
examples:
  python -m jaxft.predict cat.jpg dog.png --arch resnet50 --weights imagenet
  python -m jaxft.predict digit.png --checkpoint runs/resnet18-digits_5-9-full --top-k 3
"""


RUN_KEYS = ("arch", "num_classes", "classes", "image_size", "resize_size", "mean", "std")


class PredictError(ValueError):
    """Images or a model that cannot be used; the message says which."""


@dataclass
class Classifier:
    """A model ready to predict: ``classes`` holds the names that come with the weights, or None
    (then results show class indices and ``note`` says why)."""

    model: Any
    variables: dict
    classes: Optional[list[str]]
    transform: Any
    note: str = ""


def load_classifier(arch: Optional[str], weights: Optional[str], checkpoint: Optional[str]) -> Classifier:
    """The model, variables, class names and EvalTransform of a run directory or of weights.

    Class names are only ever the weights' own: torchvision's categories for a weights name, the
    sidecar's ``classes`` for a file, the run's classes for a run directory. Random weights and
    files without names get class indices."""
    from jaxft.data.transforms import EvalTransform, transforms_for

    if checkpoint:
        from jaxft.checkpoint import load_variables
        from jaxft.models import create_model

        run = Path(checkpoint)
        if not (run / "model.json").is_file() or not (run / "best").is_dir():
            raise PredictError(f"--checkpoint {run} is not a finished jaxft run directory (expected model.json and "
                               f"best/)")
        info = _run_info(run / "model.json")
        if arch and arch != info["arch"]:
            raise PredictError(f"--arch {arch} does not match the run's arch {info['arch']}")
        variables, _ = load_variables(run / "best")
        transform = EvalTransform(info["resize_size"], info["image_size"], tuple(info["mean"]), tuple(info["std"]))
        classes = _checked_names(info["classes"], info["num_classes"], f"'classes' in {run / 'model.json'}")
        return Classifier(create_model(info["arch"], num_classes=info["num_classes"]), variables, classes, transform)
    if not arch:
        raise PredictError("--arch is required with --weights (e.g. --arch resnet50 --weights imagenet)")
    from jaxft.pretrained import NO_WEIGHTS, load_pretrained
    from jaxft.weights import sidecar_path

    weights = weights or "imagenet"
    untrained = weights.lower() in NO_WEIGHTS
    model, variables, info = load_pretrained(arch, None if untrained else weights)
    transform = transforms_for(info.meta.preprocessing, augment=False)[1]
    if untrained:
        note = (f"--weights {weights}: {arch} is untrained (random initialisation), so its predictions mean "
                f"nothing and its classes have no names; showing class indices")
        return Classifier(model, variables, None, transform, note)
    if not Path(weights).is_file():  # a torchvision weights name: its own categories
        return Classifier(model, variables, info.categories, transform)
    sidecar = sidecar_path(Path(weights))  # a file's names are its sidecar's 'classes', or none
    classes = _checked_names(info.categories, info.num_classes, f"'classes' in {sidecar}")
    note = "" if classes else (f"no class names come with {weights} (a 'classes' list in {sidecar} would name "
                               f"them); showing class indices")
    return Classifier(model, variables, classes, transform, note)


def _run_info(path: Path) -> dict[str, Any]:
    """A run's model.json, with every key predict needs."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PredictError(f"{path} is not readable JSON ({exc}); was the run directory edited?") from None
    missing = [key for key in RUN_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise PredictError(f"{path} lacks {', '.join(missing)}, which python -m jaxft.train writes; was it edited, "
                           f"or written by an older version? Retrain or restore the file")
    return info


def _checked_names(names: Optional[list[str]], num_classes: int, where: str) -> Optional[list[str]]:
    if names is not None and len(names) != num_classes:
        raise PredictError(f"{where} lists {len(names)} class names but the model has {num_classes} classes; "
                           f"fix the list or remove it")
    return names


def predict(model, variables, transform, images: Iterable[np.ndarray], batch_size: int = 32,
            devices: Optional[Sequence[Any]] = None) -> np.ndarray:
    """Softmax probabilities (N, classes) for uint8 RGB images.

    The images go through the model ``batch_size`` at a time, each batch split over ``devices``
    (default: the first device). Every batch has one shape (the last is padded; fewer images
    than ``batch_size`` make one batch of their own number), so one compilation serves a whole
    list. ``images`` is read as the batches need it, so a long list of files holds one batch in
    memory, and the next batch is cropped on the host while the device runs the last. Crops
    cross to the device as uint8 and are normalised there, as in training (on the CPU split in
    two, vgg16's forward pass at 224 px took 4.8 s from float32 batches and 3.0 s from uint8)."""
    import collections
    import itertools

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxft.data.transforms import unnormalized
    from jaxft.engine import data_mesh, model_input, replicate

    if batch_size < 1:
        raise PredictError(f"a batch size of {batch_size}: it must be 1 or more")
    devices = list(devices or jax.devices()[:1])
    mesh = data_mesh(devices)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    variables = replicate(variables, mesh)
    normalization = (tuple(transform.mean), tuple(transform.std))
    probabilities_of = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, model_input(x, normalization),
                                                                       train=False)))
    crop = unnormalized(transform)
    images = iter(images)
    shape, results = 0, []
    queued: collections.deque = collections.deque()  # (probabilities on the device, rows that are images)
    while chunk := [crop(image) for image in itertools.islice(images, batch_size)]:
        if not shape:  # the first batch fixes the shape: a multiple of the device count
            shape = -(-len(chunk) // len(devices)) * len(devices)
        batch = np.zeros((shape, *chunk[0].shape), chunk[0].dtype)
        batch[:len(chunk)] = chunk
        queued.append((probabilities_of(variables, jax.device_put(batch, rows)), len(chunk)))
        if len(queued) > 2:  # the host stays a batch ahead of the device, not a whole list
            probabilities, count = queued.popleft()
            results.append(np.asarray(probabilities)[:count])
    results += [np.asarray(probabilities)[:count] for probabilities, count in queued]
    if not results:
        raise PredictError("no images to predict")
    return np.concatenate(results)


def read_images(paths: Sequence[str]) -> Iterator[np.ndarray]:
    """Each file as a uint8 RGB array, read when it is needed; a file that is not an image
    stops with its name."""
    from jaxft.data.images import load_rgb

    for path in paths:
        try:
            yield load_rgb(path)
        except (OSError, ValueError) as exc:
            raise PredictError(f"cannot read image {path}: {exc}") from None


def top_k(probabilities: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` most probable (class index, probability) pairs per row."""
    order = np.argsort(-probabilities, axis=-1)[:, :k]
    return [[(int(i), float(row[i])) for i in idx] for row, idx in zip(probabilities, order)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jaxft.train import user_errors

    parser = argparse.ArgumentParser(prog="python -m jaxft.predict", epilog=EXAMPLES,
                                     description="Top-k classes, with names and probabilities, for image files.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--arch", help="architecture (required with --weights)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="imagenet, an enum name (IMAGENET1K_V2), a .pth/.safetensors file (class "
                                           "names from its .json sidecar) or none (untrained: class indices)")
    source.add_argument("--checkpoint", help="a run directory of python -m jaxft.train (uses its best model)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: it must be 1 or more")
    from jaxft import runtime

    runtime.split_cpu_for_command(argv)  # before anything starts a backend
    try:
        classifier = load_classifier(args.arch, args.weights, args.checkpoint)
        if classifier.note:
            print(f"note: {classifier.note}", file=sys.stderr)
        # batches over enough pixels are split over the CPU's two halves, as train's eval passes
        devices = runtime.run_devices(trains_backbone=False, batch_size=min(args.batch_size, len(args.images)),
                                      image_size=classifier.transform.crop_size, model=classifier.model)
        if runtime.cpu_split_in_use(devices):
            print(f"note: each batch split over {len(devices)} CPU devices (JAXFT_XLA_DEFAULTS=0 keeps one)",
                  file=sys.stderr)
        probabilities = predict(classifier.model, classifier.variables, classifier.transform,
                                read_images(args.images), args.batch_size, devices)
    except (PredictError, *user_errors()) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    results = top_k(probabilities, max(1, args.top_k))
    names = classifier.classes
    if args.json:  # "class" is the name, or null when the weights name no classes
        print(json.dumps([{"image": p, "top_k": [{"class": names[i] if names else None, "index": i, "probability": q}
                                                  for i, q in r]} for p, r in zip(args.images, results)], indent=2))
    else:
        for path, result in zip(args.images, results):
            print(path)
            for i, probability in result:
                print(f"  {probability:7.2%}  {names[i] if names else f'class {i}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
