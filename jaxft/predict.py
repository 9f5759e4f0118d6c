"""python -m jaxft.predict: top-k classes with names for images, from pretrained weights or a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

EXAMPLES = """\
examples:
  python -m jaxft.predict cat.jpg dog.png --arch resnet50 --weights imagenet
  python -m jaxft.predict digit.png --checkpoint runs/resnet18-digits_5-9-full --top-k 3
"""


class PredictError(ValueError):
    """Images or a model that cannot be used; the message says which."""


def load_classifier(arch: Optional[str], weights: Optional[str], checkpoint: Optional[str]):
    """(model, variables, class names, EvalTransform) from a run directory or pretrained weights."""
    from jaxft.data.transforms import EvalTransform, transforms_for

    if checkpoint:
        from jaxft.checkpoint import load_variables
        from jaxft.models import create_model

        run = Path(checkpoint)
        if not (run / "model.json").is_file() or not (run / "best").is_dir():
            raise PredictError(f"--checkpoint {run} is not a finished jaxft run directory (expected model.json and "
                               f"best/)")
        info = json.loads((run / "model.json").read_text())
        if arch and arch != info["arch"]:
            raise PredictError(f"--arch {arch} does not match the run's arch {info['arch']}")
        variables, _ = load_variables(run / "best")
        transform = EvalTransform(info["resize_size"], info["image_size"], tuple(info["mean"]), tuple(info["std"]))
        return create_model(info["arch"], num_classes=info["num_classes"]), variables, info["classes"], transform
    if not arch:
        raise PredictError("--arch is required with --weights (e.g. --arch resnet50 --weights imagenet)")
    from jaxft.pretrained import load_pretrained

    model, variables, info = load_pretrained(arch, weights or "imagenet")
    classes = info.categories or [str(i) for i in range(info.num_classes)]
    return model, variables, classes, transforms_for(info.meta.preprocessing, augment=False)[1]


def predict(model, variables, transform, images: Sequence[np.ndarray]) -> np.ndarray:
    """Softmax probabilities (N, classes) for uint8 RGB images."""
    import jax

    batch = np.stack([transform(image) for image in images])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)
    return np.asarray(jax.nn.softmax(logits))


def top_k(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probabilities, axis=-1)[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probabilities, order)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jaxft.train import user_errors

    parser = argparse.ArgumentParser(prog="python -m jaxft.predict", epilog=EXAMPLES,
                                     description="Top-k classes, with names and probabilities, for image files.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--arch", help="architecture (required with --weights)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="imagenet, an enum name (IMAGENET1K_V2) or a .pth/.safetensors file")
    source.add_argument("--checkpoint", help="a run directory of python -m jaxft.train (uses its best model)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    from jaxft.data.images import load_rgb

    try:
        model, variables, classes, transform = load_classifier(args.arch, args.weights, args.checkpoint)
        images = []
        for path in args.images:
            try:
                images.append(load_rgb(path))
            except (OSError, ValueError) as exc:
                raise PredictError(f"cannot read image {path}: {exc}") from None
        results = top_k(predict(model, variables, transform, images), classes, max(1, args.top_k))
    except (PredictError, *user_errors()) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": p, "top_k": [{"class": c, "probability": q} for c, q in r]}
                          for p, r in zip(args.images, results)], indent=2))
    else:
        for path, result in zip(args.images, results):
            print(path)
            for name, probability in result:
                print(f"  {probability:7.2%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
