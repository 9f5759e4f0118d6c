"""Decoding image files to uint8 RGB arrays, and checking that a file decodes at all.

One decode path serves both, so a file that passes the check also loads at training time.
Conversions: EXIF orientation is applied (``ImageOps.exif_transpose``; torchvision's
``ImageFolder`` loader does not); 16-bit greyscale is scaled to 8 bits (PIL's own
``convert('RGB')`` clips it to white); every other mode (L, P, LA, RGBA, CMYK, YCbCr, 1)
goes through ``convert('RGB')`` as in torchvision, so alpha is dropped, not composited.
Images above PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 MP by
default) are refused; raise that limit before opening a dataset to accept them.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# torchvision.datasets.folder.IMG_EXTENSIONS, so the same files count as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Leading bytes of the formats above, to tell a damaged image from a file that never was one.
_SIGNATURES = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"RIFF": "WebP", b"P5": "PGM", b"P6": "PPM"}


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey: 65535 -> 255 (PIL's convert('RGB') would clip everything above 255)
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_rgb(path: os.PathLike | str, draft: bool) -> Image.Image:
    """Open, decode fully, honour EXIF orientation, convert to RGB. ``draft`` lets libjpeg
    decode at 1/8 scale: it still reads every byte (truncation is caught) at a third of the cost."""
    with warnings.catch_warnings():
        # Below 2x the limit PIL only warns; the image is accepted, so the warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if draft and image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))


def load_rgb(path: os.PathLike | str) -> np.ndarray:
    """The image at ``path`` as a uint8 (H, W, 3) RGB array."""
    return np.asarray(_open_rgb(path, draft=False))


def _signature(path: os.PathLike | str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)


def check_image(path: os.PathLike | str, size: Optional[int] = None) -> Optional[str]:
    """None when ``path`` decodes to an RGB image, else why not, in words for a warning."""
    if size is None:
        size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes)"
    try:
        _open_rgb(path, draft=True)
    except Image.DecompressionBombError as exc:
        return (f"{exc} Raise PIL.Image.MAX_IMAGE_PIXELS before opening the dataset if you trust the file, "
                f"or shrink it")
    except Image.UnidentifiedImageError:
        kind = _signature(path)
        if kind:
            return f"corrupt: starts like a {kind} file but its header cannot be parsed"
        return "not an image: its bytes match no image format (a different file type with an image extension?)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's decoders raise all of these
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
    return None
