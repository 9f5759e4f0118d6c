"""Image folders in torchvision's ImageFolder layout, checked once and cached.

Layouts (classes are sub-folder names, sorted; images may sit in nested folders):

* ``root/train/<class>/...`` with ``root/val/`` (or ``valid/``, ``validation/``) and
  ``root/test/`` when present; without a val folder, val is carved from train.
* ``root/<class>/...``: val is carved from all images; there is no test split.

Every image file is decoded once (:func:`jaxft.data.images.check_image`); corrupt,
truncated, empty and non-image files are skipped with a warning each and a summary. The
verdicts are cached in ``<jaxft cache dir>/folder_scans/`` (never inside the dataset, which
may be read-only or shared), keyed by each file's relative path, size and modification
time, so a second run re-checks only new or changed files. Hidden files and folders
(``.*``, ``__MACOSX``) are ignored silently; files without an image extension and stray
files outside class folders are reported and ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import PIL
from PIL import Image

from jaxft.data.images import IMAGE_EXTENSIONS, check_image, load_rgb
from jaxft.data.split import DataError, DatasetSplits, Split, carve_val

log = logging.getLogger("jaxft.data")

TRAIN_DIR = "train"
VAL_DIRS = ("val", "valid", "validation")
TEST_DIR = "test"
_CACHE_VERSION = 1
_SHOWN = 10  # names listed in one summary warning before "... and N more"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _some(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


@dataclass
class FolderScan:
    """Every non-hidden file under ``root``, sorted into usable images and the rest."""

    root: Path
    images: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative path -> (size, mtime_ns)
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> why it is unusable
    ignored: list[str] = field(default_factory=list)  # no image extension
    rechecked: int = 0  # files decoded this time (the rest came from the cache)


def scan_cache_path(root: Path) -> Path:
    from jaxft.runtime import cache_dir

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "folder_scans" / f"{key}.json"


def _cache_validity() -> dict:
    # A verdict depends on the decoder and on the bomb limit as much as on the file.
    return {"version": _CACHE_VERSION, "pillow": PIL.__version__, "max_image_pixels": Image.MAX_IMAGE_PIXELS}


def _load_verdicts(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("validity") != _cache_validity():
        return {}
    return data.get("files", {})


def _save_verdicts(path: Path, root: Path, files: dict[str, list]) -> None:
    """Atomic write (a crash leaves the old cache, never half a file); failure only costs a re-check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump({"validity": _cache_validity(), "root": str(root.resolve()), "files": files}, tmp)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.warning("could not write the folder scan cache %s (%s); the next run will check every image again",
                    path, exc)


def _walk(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str], list[str]]:
    """(image-extension files with (size, mtime_ns), unreadable ones with why, other files).

    Symlinks are followed, as torchvision does, but no directory (by device and inode) is
    entered twice: a link back to a parent folder, or a second link to a folder already
    walked, is reported once and not followed, so a cycle cannot make the walk endless."""
    candidates: dict[str, tuple[int, int]] = {}
    unreadable: dict[str, str] = {}
    others: list[str] = []
    seen = {_dir_id(root)}
    repeated: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not _hidden(d)):
            identity = _dir_id(Path(dirpath, name))
            if identity is not None and identity in seen:
                repeated.append(os.path.relpath(os.path.join(dirpath, name), root))
                continue
            seen.add(identity)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if _hidden(name):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                others.append(rel)
                continue
            try:
                stat = os.stat(full)
            except OSError as exc:  # a broken symlink, a permission problem
                unreadable[rel] = f"cannot be read ({exc.strerror})"
                continue
            candidates[rel] = (stat.st_size, stat.st_mtime_ns)
    if repeated:
        log.warning("%s: not following %d symlinked folder(s) that lead to a folder already scanned (a link cycle or "
                    "a second link to the same folder), so their images count once: %s", root, len(repeated),
                    _some(repeated))
    return candidates, unreadable, others


def _dir_id(path: Path) -> Optional[tuple[int, int]]:
    """A directory's identity whatever the path to it: (device, inode) of its real target;
    None when it cannot be read (os.walk then skips it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def scan_folder(root: os.PathLike | str, workers: Optional[int] = None) -> FolderScan:
    """Find and check every image under ``root``; reuses cached verdicts of unchanged files.

    Decoding runs in ``workers`` threads (default: one per CPU); PIL releases the GIL while
    decoding, so threads scale."""
    root = Path(root)
    candidates, unreadable, others = _walk(root)
    cache_path = scan_cache_path(root)
    cached = _load_verdicts(cache_path)
    verdicts: dict[str, Optional[str]] = {}
    todo = []
    for rel, (size, mtime) in candidates.items():
        entry = cached.get(rel)
        if entry is not None and entry[0] == size and entry[1] == mtime:
            verdicts[rel] = entry[2]
        else:
            todo.append(rel)
    if todo:
        log.info("checking %d new or changed image files under %s (verdicts are cached for the next run)",
                 len(todo), root)
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            results = pool.map(lambda rel: check_image(root / rel, candidates[rel][0]), todo)
            verdicts.update(zip(todo, results))
        _save_verdicts(cache_path, root, {rel: [*candidates[rel], verdicts[rel]] for rel in candidates})
    scan = FolderScan(root, rechecked=len(todo), ignored=others)
    for rel in candidates:
        if verdicts[rel] is None:
            scan.images[rel] = candidates[rel]
        else:
            scan.skipped[rel] = verdicts[rel]
    scan.skipped.update(unreadable)
    return scan


def _report(scan: FolderScan) -> None:
    """One warning per skipped file, then a summary: a user must learn about every lost sample."""
    for rel, why in sorted(scan.skipped.items()):
        log.warning("skipping %s: %s", scan.root / rel, why)
    if scan.ignored:
        log.warning("ignoring %d file(s) under %s without an image extension (%s): %s", len(scan.ignored),
                    scan.root, "/".join(IMAGE_EXTENSIONS), _some(scan.ignored))
    if scan.skipped:
        log.warning("%s: skipped %d unusable image file(s) of %d; %d usable. Fix or delete them to silence this.",
                    scan.root, len(scan.skipped), len(scan.skipped) + len(scan.images), len(scan.images))


class FileStore:
    """Images on disk by relative path, decoded on access (in grain's worker processes)."""

    def __init__(self, root: Path, paths: list[str], sizes_and_times: list[tuple[int, int]]):
        self.root = str(root)
        self.paths = paths
        digest = hashlib.sha256(str(root.resolve()).encode())
        for path, (size, mtime) in zip(paths, sizes_and_times):
            digest.update(f"{path}\0{size}\0{mtime}\n".encode())
        self._fingerprint = digest.hexdigest()
        self.max_image_pixels = Image.MAX_IMAGE_PIXELS

    def image(self, key: int) -> np.ndarray:
        return load_rgb(os.path.join(self.root, self.paths[key]))

    def fingerprint(self) -> str:
        return self._fingerprint

    def __setstate__(self, state: dict) -> None:
        # Worker processes start with PIL's default bomb limit; adopt the one the scan accepted
        # files under, or an image the scan passed could fail to load there.
        self.__dict__.update(state)
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name))


def _by_class(scan: FolderScan, prefix: str) -> dict[str, list[str]]:
    """Usable images under ``prefix`` (``''`` or ``'train/'``) grouped by their class folder."""
    groups: dict[str, list[str]] = {}
    for rel in sorted(scan.images):
        parts = Path(rel[len(prefix):]).parts if rel.startswith(prefix) else ()
        if len(parts) >= 2:
            groups.setdefault(parts[0], []).append(rel)
    return groups


def open_folder(root: os.PathLike | str, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Train/val(/test) splits of an ImageFolder-layout folder (see the module doc)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; pass a folder of class sub-folders "
                        f"(root/cat/*.jpg, root/dog/*.jpg), digits, lfw or tfds:NAME")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; extract archives first and pass the folder that "
                        f"holds one sub-folder per class")
    if (root / TRAIN_DIR).is_dir():
        val_dir = next((d for d in VAL_DIRS if (root / d).is_dir()), None)
        split_dirs = {"train": TRAIN_DIR, "val": val_dir, "test": TEST_DIR if (root / TEST_DIR).is_dir() else None}
        prefixes = {name: f"{d}/" for name, d in split_dirs.items() if d}
    else:
        prefixes = {"train": ""}

    scan = scan_folder(root)
    _report(scan)
    groups = {name: _by_class(scan, prefix) for name, prefix in prefixes.items()}
    train_root = root / prefixes["train"]
    folders = _class_dirs(train_root)
    classes = tuple(c for c in folders if c in groups["train"])
    empty = [c for c in folders if c not in classes]
    if empty:
        log.warning("class folder(s) with no usable images under %s, left out of the classes: %s",
                    train_root, _some(empty))
    if not classes:
        raise DataError(f"no usable images found in {train_root}: expected one sub-folder per class holding "
                        f"images ({'/'.join(IMAGE_EXTENSIONS)}), e.g. {train_root / 'cat' / '001.jpg'}")
    for name, by_class in groups.items():
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{root / prefixes[name]} has images of class(es) {', '.join(unknown)} without usable "
                            f"training images in {train_root}; add training images or remove those folders")

    used = {rel for by_class in groups.values() for rels in by_class.values() for rel in rels}
    stray = sorted(set(scan.images) - used)
    if stray:
        log.warning("ignoring %d image(s) outside %s under %s: %s", len(stray),
                    " ".join(f"{p}<class>/" for p in prefixes.values()), root, _some(stray))
    paths = sorted(used)
    store = FileStore(root, paths, [scan.images[p] for p in paths])
    index = {p: i for i, p in enumerate(paths)}
    splits = {}
    for name, by_class in groups.items():
        members = [(rel, label) for label, c in enumerate(classes) for rel in by_class.get(c, [])]
        keys = np.array([index[rel] for rel, _ in members], np.int64)
        labels = np.array([label for _, label in members], np.int64)
        splits[name] = Split(store, keys, labels, classes, name)
    if "val" not in splits:
        train = splits["train"]
        splits["train"], splits["val"] = carve_val(train, val_fraction, seed, [paths[k] for k in train.keys])
    return DatasetSplits(splits["train"], splits["val"], splits.get("test"), classes, str(root))
