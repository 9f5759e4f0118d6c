"""python -m jaxft: the same as python -m jaxft.train."""

import sys

from jaxft.train import main

sys.exit(main())
