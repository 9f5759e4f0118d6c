"""python -m jaxft.predict: top-k classes with names for images, from pretrained weights or a run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

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


def predict(model, variables, transform, images: Sequence[np.ndarray]) -> np.ndarray:
    """Softmax probabilities (N, classes) for uint8 RGB images."""
    import jax

    batch = np.stack([transform(image) for image in images])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)
    return np.asarray(jax.nn.softmax(logits))


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
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    from jaxft.data.images import load_rgb

    try:
        classifier = load_classifier(args.arch, args.weights, args.checkpoint)
        if classifier.note:
            print(f"note: {classifier.note}", file=sys.stderr)
        images = []
        for path in args.images:
            try:
                images.append(load_rgb(path))
            except (OSError, ValueError) as exc:
                raise PredictError(f"cannot read image {path}: {exc}") from None
        probabilities = predict(classifier.model, classifier.variables, classifier.transform, images)
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
