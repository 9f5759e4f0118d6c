#!/usr/bin/env python
"""Build the offline source checkpoint: a torchvision model trained in PyTorch on digits 0-4.

It stands in for ImageNet weights where none can be downloaded. The result is a plain
torchvision state_dict (.pth) with a .json of how it was made beside it.
"""

import argparse
import sys
from pathlib import Path

from jaxft.source_checkpoint import SOURCE_ARCHS, SourceRecipe, build_source_checkpoint, default_source_path


def main() -> int:
    defaults = SourceRecipe()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=defaults.arch, choices=SOURCE_ARCHS,
                        help="torchvision architecture")
    parser.add_argument("--out", type=Path, help="output .pth (default: the jaxft cache, where jaxft.train looks)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="digits are upscaled to this")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    recipe = SourceRecipe(arch=args.arch, image_size=args.image_size, epochs=args.epochs, seed=args.seed)
    out = build_source_checkpoint(args.out or default_source_path(recipe), recipe)
    print(f"wrote {out} (metadata: {out.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
