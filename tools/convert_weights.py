#!/usr/bin/env python
"""Convert torchvision weights to Flax variables and back: a thin wrapper of `python -m jaxft.convert`."""

import sys

from jaxft.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
