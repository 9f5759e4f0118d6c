"""Offline built-in datasets: real images that ship inside installed packages.

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), 10 classes.
* ``lfw``: scikit-image's ``lfw_subset``, 200 grey 25x25 crops: 100 faces, 100 non-faces.

Images come back as uint8 RGB arrays (N, H, W, 3) at their native size; transforms resize.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

BUILTINS = ("digits", "lfw")


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def digits(classes: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 (N, 8, 8, 3), labels, class_names)``; ``classes`` keeps a subset, relabelled 0..k-1."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    labels = data.target.astype(np.int64)
    names = [str(d) for d in range(10)]
    if classes is not None:
        classes = list(classes)
        keep = np.isin(labels, classes)
        images, labels = images[keep], np.searchsorted(classes, labels[keep])
        names = [str(c) for c in classes]
    return _grey_to_rgb(images), labels, names


def lfw() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 (200, 25, 25, 3), labels, ['face', 'not_face'])``, scikit-image's order."""
    from skimage.data import lfw_subset
    from skimage.util import img_as_ubyte

    images = img_as_ubyte(lfw_subset())  # float64 in [0, 1] in current scikit-image
    labels = np.array([0] * 100 + [1] * 100, np.int64)  # lfw_subset: 100 faces, then 100 non-faces
    return _grey_to_rgb(images), labels, ["face", "not_face"]
