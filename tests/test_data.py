"""Data sources, image checking, transforms and the grain pipeline, on real images.

The messy folder is built from photographs that ship with scikit-image (astronaut, coffee,
chelsea, camera, logo) plus files damaged on purpose; every skip must be reported.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from jaxft.data import DataError, eval_loader, open_dataset, train_loader, transforms_for
from jaxft.data.folder import scan_folder
from jaxft.data.images import load_rgb
from jaxft.data.pipeline import close_iterator, start_workers
from jaxft.data.split import stratified_split
from jaxft.data.transforms import EvalTransform, TrainTransform, normalize, random_resized_crop_box
from jaxft.weights import Preprocessing

CLASS_IMAGES = {"astronaut": skdata.astronaut, "cat": skdata.chelsea, "coffee": skdata.coffee}
PER_CLASS = 8  # plain crops per class, before the special files


@pytest.fixture(autouse=True)
def jaxft_cache(tmp_path, monkeypatch):
    """A fresh jaxft cache per test: scan verdicts, labels and features never leak between tests."""
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "jaxft_cache"))
    return tmp_path / "jaxft_cache"


def crops(image: np.ndarray, n: int, seed: int, size=(48, 64)) -> list[np.ndarray]:
    """``n`` random crops of a real photograph, resized to ``size`` (h, w): small and non-square."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        ch, cw = rng.integers(h // 3, h), rng.integers(w // 3, w)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(image[top:top + ch, left:left + cw]).resize(size[::-1], Image.BILINEAR)
        out.append(np.asarray(crop))
    return out


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), straight from the PNG spec."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write(path, content: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def make_class_folders(root, classes=CLASS_IMAGES, n=PER_CLASS, seed=0) -> None:
    for i, (name, loader) in enumerate(classes.items()):
        for j, crop in enumerate(crops(loader(), n, seed + i)):
            write(root / name / f"{name}_{j:02d}.jpg", encode(crop, "JPEG", quality=90))


SKIPPED = {  # relative path -> a word the warning must contain
    "cat/broken.jpg": "corrupt",
    "coffee/truncated.png": "truncated",
    "coffee/empty.jpg": "empty",
    "coffee/text.jpg": "not an image",
}


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory):
    """Real images in ImageFolder layout, with every kind of trouble a real folder has."""
    root = tmp_path_factory.mktemp("messy")
    make_class_folders(root)
    cat, coffee, astronaut = skdata.chelsea()[:120, :180], skdata.coffee()[:100, :160], skdata.astronaut()
    rotated = Image.fromarray(cat[:40, :60])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "cat" / "exif_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(cat).convert("CMYK").save(root / "cat" / "cmyk.jpg", quality=95)
    write(root / "cat" / "nested" / "deeper" / "nested.jpg", encode(cat[::2, ::2], "JPEG"))
    good_jpeg = encode(cat, "JPEG")
    write(root / "cat" / "broken.jpg", good_jpeg[:200] + bytes(range(256)) * 2 + good_jpeg[712:])
    Image.fromarray(skdata.logo()).save(root / "coffee" / "rgba.png")  # RGBA
    Image.fromarray(coffee).convert("P").save(root / "coffee" / "palette.png")
    gradient = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(gradient).save(root / "coffee" / "gray16.png")  # mode I;16
    write(root / "coffee" / "rgb16.png", png_rgb16(coffee[:48, :64].astype(np.uint16) * 257))
    png = encode(coffee, "PNG")
    write(root / "coffee" / "truncated.png", png[: len(png) // 2])
    write(root / "coffee" / "empty.jpg", b"")
    write(root / "coffee" / "text.jpg", "this is a text file named .jpg\n")
    Image.fromarray(skdata.camera()[::8, ::8]).save(root / "astronaut" / "grey.png")  # mode L
    huge = Image.fromarray(astronaut).resize((6000, 4000), Image.BILINEAR)  # 24 MP, under PIL's bomb limit
    huge.save(root / "astronaut" / "huge.jpg", quality=80)
    write(root / "astronaut" / "notes.md", "# not an image\n")
    write(root / "astronaut" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "astronaut" / "._astronaut_00.jpg", b"AppleDouble junk")
    write(root / "astronaut" / ".thumbnails" / "t.jpg", b"junk")
    write(root / ".git" / "objects" / "x.jpg", b"junk")
    (root / "empty_class").mkdir()
    write(root / "empty_class" / ".DS_Store", b"junk")
    write(root / "README.txt", "dataset notes\n")
    write(root / "stray.jpg", encode(cat[:32, :32], "JPEG"))
    return root


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --- sources -------------------------------------------------------------------------------------

def test_messy_folder_skips_and_reports_every_problem(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        splits = open_dataset(str(messy_folder))
    text = warnings_text(caplog)
    for rel, word in SKIPPED.items():
        line = next((line for line in text.splitlines() if rel.split("/")[1] in line and "skipping" in line), None)
        assert line is not None and word in line, (rel, text)
        assert str(messy_folder / rel) in line  # the warning names the file
    assert f"skipped {len(SKIPPED)} unusable image file(s)" in text
    assert "empty_class" in text and "notes.md" in text and "README.txt" in text and "stray.jpg" in text
    assert ".DS_Store" not in text and ".thumbnails" not in text and "._astronaut" not in text and ".git" not in text

    assert splits.classes == ("astronaut", "cat", "coffee")
    expected = {"astronaut": PER_CLASS + 2, "cat": PER_CLASS + 3, "coffee": PER_CLASS + 4}
    total = {c: splits.train.class_counts()[c] + splits.val.class_counts()[c] for c in splits.classes}
    assert total == expected
    assert splits.test is None
    for split in (splits.train, splits.val):
        for i in range(len(split)):
            image, label = split[i]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert 0 <= label < 3


def test_image_modes_are_converted_properly(messy_folder):
    rotated = load_rgb(messy_folder / "cat" / "exif_rotated.jpg")
    assert rotated.shape == (60, 40, 3)  # stored 40x60, EXIF says rotate: displayed 60 high
    cat = skdata.chelsea()[:120, :180].astype(np.float32)
    assert np.abs(load_rgb(messy_folder / "cat" / "cmyk.jpg").astype(np.float32) - cat).mean() < 8
    grey16 = load_rgb(messy_folder / "coffee" / "gray16.png")
    assert grey16.shape == (48, 64, 3) and grey16[0, 0, 0] == 0 and grey16[-1, -1, 0] == 255
    assert 120 < grey16.mean() < 135  # a full-range ramp, not PIL's clipped-to-white conversion
    rgb16 = load_rgb(messy_folder / "coffee" / "rgb16.png")
    assert np.abs(rgb16.astype(int) - skdata.coffee()[:48, :64]).max() <= 1
    assert load_rgb(messy_folder / "coffee" / "rgba.png").shape == skdata.logo().shape[:2] + (3,)
    assert load_rgb(messy_folder / "coffee" / "palette.png").shape == (100, 160, 3)
    grey = load_rgb(messy_folder / "astronaut" / "grey.png")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    huge = load_rgb(messy_folder / "astronaut" / "huge.jpg")
    assert huge.shape == (4000, 6000, 3)
    _, evaluation = transforms_for(Preprocessing(), image_size=32)
    assert evaluation(huge).shape == (32, 32, 3)


def test_images_over_the_bomb_limit_are_skipped_with_the_fix(messy_folder, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)  # huge.jpg is 24 MP: over twice the limit
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        splits = open_dataset(str(messy_folder))
    line = next(line for line in warnings_text(caplog).splitlines() if "huge.jpg" in line)
    assert "MAX_IMAGE_PIXELS" in line
    assert splits.train.class_counts()["astronaut"] + splits.val.class_counts()["astronaut"] == PER_CLASS + 1


def test_scan_is_cached_and_survives_an_unwritable_cache(messy_folder, tmp_path, monkeypatch, caplog):
    start = time.perf_counter()
    first = scan_folder(messy_folder)
    first_s = time.perf_counter() - start
    assert first.rechecked == len(first.images) + len(SKIPPED)
    start = time.perf_counter()
    second = scan_folder(messy_folder)
    second_s = time.perf_counter() - start
    assert second.rechecked == 0 and second.images == first.images and second.skipped == first.skipped
    assert second_s < first_s

    changed = messy_folder / "cat" / "cat_00.jpg"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert scan_folder(messy_folder).rechecked == 1

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("JAXFT_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        splits = open_dataset(str(messy_folder))
    assert len(splits.train) + len(splits.val) == len(first.images) - 1  # minus stray.jpg
    assert "could not write the folder scan cache" in warnings_text(caplog)


def test_split_is_seeded_stratified_and_stable(messy_folder):
    a, b = open_dataset(str(messy_folder), seed=0), open_dataset(str(messy_folder), seed=0)
    assert np.array_equal(a.val.keys, b.val.keys) and np.array_equal(a.train.keys, b.train.keys)
    other = open_dataset(str(messy_folder), seed=1)
    assert not np.array_equal(a.val.keys, other.val.keys)
    for name, count in a.val.class_counts().items():
        total = count + a.train.class_counts()[name]
        assert count == round(0.2 * total)
    assert set(a.train.keys).isdisjoint(a.val.keys)
    half = open_dataset(str(messy_folder), val_fraction=0.5)
    assert len(half.val) > len(a.val)

    # Adding samples moves at most one existing sample per class between train and val.
    labels = np.repeat([0, 1], 50)
    keys = [f"c{label}/img_{i}.jpg" for i, label in enumerate(labels)]
    _, val = stratified_split(labels, keys, 0.2, seed=0)
    more_labels = np.concatenate([labels, [0, 1]])
    _, more_val = stratified_split(more_labels, keys + ["c0/new.jpg", "c1/new.jpg"], 0.2, seed=0)
    assert len(set(val) - set(more_val)) <= 2


@pytest.mark.parametrize("val_fraction", [0.01, 0.2, 0.99])
def test_split_holds_out_at_least_one_but_never_a_whole_class(val_fraction):
    """A class of two gives val one sample even when val_fraction rounds to 0; no class, of any
    size, goes to val whole; a class of one stays in train."""
    sizes = {0: 1, 1: 2, 2: 3, 3: 10}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    train, val = stratified_split(labels, [f"k{i}" for i in range(len(labels))], val_fraction, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    for c, n in sizes.items():
        n_val = int((labels[val] == c).sum())
        expected = 0 if n == 1 else min(max(round(val_fraction * n), 1), n - 1)
        assert n_val == expected, (c, n, n_val)
        assert (labels[train] == c).sum() >= 1  # never all of a class
    assert (labels[val] == 1).sum() == 1  # the class of two: exactly one held out, at any fraction


def test_train_val_test_folders(tmp_path):
    make_class_folders(tmp_path / "train")
    make_class_folders(tmp_path / "val", n=2, seed=10)
    make_class_folders(tmp_path / "test", n=3, seed=20)
    splits = open_dataset(str(tmp_path))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3 * PER_CLASS, 6, 9)
    assert splits.test.class_counts() == {"astronaut": 3, "cat": 3, "coffee": 3}

    only_train = tmp_path / "no_val"
    make_class_folders(only_train / "train")
    make_class_folders(only_train / "test", n=2)
    carved = open_dataset(str(only_train))
    assert len(carved.val) == 3 * round(0.2 * PER_CLASS) and len(carved.test) == 6

    make_class_folders(tmp_path / "test", classes={"dog": skdata.chelsea}, n=1)
    with pytest.raises(DataError, match=r"test.*dog.*training images"):
        open_dataset(str(tmp_path))


def test_folder_store_carries_the_bomb_limit_into_worker_processes(messy_folder, monkeypatch):
    """grain's spawned workers unpickle the split with PIL's default limit in force; the store
    sets the limit the scan ran under (what the worker's unpickling does, in this process)."""
    import pickle

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000_000)
    splits = open_dataset(str(messy_folder))
    payload = pickle.dumps(splits.train)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # a worker's own, different limit
    pickle.loads(payload)
    assert Image.MAX_IMAGE_PIXELS == 200_000_000


@pytest.mark.parametrize("case, match", [
    ("one_class", r"only class 'cat'.*at least two classes"),
    ("missing", r"does not exist"),
    ("no_images", r"no usable images found"),
    ("a_file", r"is a file, not a folder"),
])
def test_bad_folders_get_clear_errors(tmp_path, case, match):
    target = tmp_path / case
    if case == "one_class":
        make_class_folders(target, classes={"cat": skdata.chelsea}, n=3)
    elif case == "no_images":
        write(target / "cat" / "readme.txt", "no images here")
    elif case == "a_file":
        write(target, "not a folder")
    with pytest.raises(DataError, match=match) as info:
        open_dataset(str(target))
    assert str(target) in str(info.value)


def test_symlink_cycles_are_walked_once(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root, n=2)
    make_class_folders(tmp_path / "elsewhere", classes={"dog": skdata.chelsea}, n=2)
    os.symlink(tmp_path / "elsewhere" / "dog", root / "dog")  # a linked class folder is still followed
    os.symlink("..", root / "cat" / "loop")  # two links back to the root: 2**40 paths if followed blindly
    os.symlink("..", root / "coffee" / "up")
    (root / "coffee" / "deeper").mkdir()
    os.symlink(root / "cat", root / "coffee" / "deeper" / "cat_again")  # a second link to a walked folder
    # in a subprocess with a timeout: an endless walk must fail the test, not hang it
    code = ("import json, sys; from jaxft.data.folder import scan_folder; "
            "print(json.dumps(sorted(scan_folder(sys.argv[1]).images)))")
    result = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sorted(f"{c}/{c}_{j:02d}.jpg" for c in (*CLASS_IMAGES, "dog") for j in range(2))
    assert json.loads(result.stdout) == expected
    [note] = [line for line in result.stderr.splitlines() if "symlinked folder" in line]
    assert "3 symlinked folder(s)" in note and "cat/loop" in note and "coffee/up" in note
    assert "coffee/deeper/cat_again" in note and str(root) in note


def test_builtin_specs():
    digits = open_dataset("digits:5-9")
    assert digits.classes == ("5", "6", "7", "8", "9") and digits.test is None
    image, label = digits.train[0]
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and 0 <= label < 5
    assert sum(digits.train.class_counts().values()) + len(digits.val) == 896  # digits 5-9 in scikit-learn
    again = open_dataset("digits:5-9")
    assert np.array_equal(digits.val.keys, again.val.keys)
    assert open_dataset("digits:0,2,4").classes == ("0", "2", "4")
    lfw = open_dataset("lfw")
    assert lfw.classes == ("face", "not_face") and len(lfw.train) + len(lfw.val) == 200
    assert lfw.val.class_counts() == {"face": 20, "not_face": 20}
    for spec, match in [("digits:9-5", "not a digit or a range"), ("digits:5", "at least two classes"),
                        ("imagenette", "unknown dataset 'imagenette'"), ("lfw:1", "unknown built-in")]:
        with pytest.raises(DataError, match=match):
            open_dataset(spec)


# --- transforms ----------------------------------------------------------------------------------

def _real_images() -> dict[str, np.ndarray]:
    digit = open_dataset("digits").train[0][0]
    return {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea(),
            "rocket": skdata.rocket(), "camera": np.repeat(skdata.camera()[..., None], 3, -1)[:301, :97],
            "digit_8x8": digit}


@pytest.mark.parametrize("resize, crop", [(256, 224), (73, 64), (37, 32), (24, 40)])
def test_eval_transform_matches_torchvision(resize, crop):
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(resize), T.CenterCrop(crop)])
    normalized = T.Compose([reference, T.ToTensor(), T.Normalize(Preprocessing.mean, Preprocessing.std)])
    ours = EvalTransform(resize, crop)
    for name, image in _real_images().items():
        expected = np.asarray(reference(Image.fromarray(image)))
        got = ours.crop(image)
        assert got.shape == expected.shape == (crop, crop, 3), name
        assert got.dtype == expected.dtype == np.uint8, name
        assert np.array_equal(got, expected), name  # bit-identical, not within a grey level
        tensor = normalized(Image.fromarray(image))
        np.testing.assert_allclose(ours(image), tensor.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_random_resized_crop_follows_torchvision():
    import torch
    from torchvision import transforms as T

    height, width = skdata.chelsea().shape[:2]
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_box(height, width, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.02
    assert abs(np.log(ours[:, 3] / ours[:, 2]).mean() - np.log(theirs[:, 3] / theirs[:, 2]).mean()) < 0.03
    # No random box fits a 10x400 strip: both fall back to the same central crop.
    strip = torch.zeros(3, 10, 400)
    assert random_resized_crop_box(10, 400, rng, (0.08, 1.0), (3 / 4, 4 / 3)) == \
        tuple(T.RandomResizedCrop.get_params(strip, [0.08, 1.0], [3 / 4, 4 / 3]))


def test_train_transform_is_seeded():
    image = skdata.coffee()
    transform = TrainTransform(size=48)
    a = transform(image, np.random.default_rng((0, 1, 7)))
    assert a.shape == (48, 48, 3) and a.dtype == np.float32
    assert np.array_equal(a, transform(image, np.random.default_rng((0, 1, 7))))
    assert not np.array_equal(a, transform(image, np.random.default_rng((0, 2, 7))))
    flips = [TrainTransform(size=48, scale=(1.0, 1.0), ratio=(1.5, 1.5))(image, np.random.default_rng(s))
             for s in range(8)]
    assert any(np.array_equal(f, flips[0][:, ::-1]) for f in flips[1:])  # same crop, flipped
    np.testing.assert_allclose(normalize(np.full((1, 1, 3), 255, np.uint8), (0.5,) * 3, (0.5,) * 3), 1.0)


def test_transforms_for_overrides_sizes():
    train, evaluation = transforms_for(Preprocessing(), image_size=64)
    assert (train.size, evaluation.resize_size, evaluation.crop_size) == (64, 73, 64)
    same, evaluation = transforms_for(Preprocessing(), augment=False)
    assert same is evaluation and (evaluation.resize_size, evaluation.crop_size) == (256, 224)


# --- pipeline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_splits():
    return open_dataset("digits:5-9")


def small_transforms():
    return transforms_for(Preprocessing(), image_size=16)


def test_batches_shuffle_per_epoch_and_keep_eval_samples(digits_splits):
    train_tf, eval_tf = small_transforms()
    train = digits_splits.train
    loader = train_loader(train, train_tf, 64, seed=3, num_epochs=2, drop_remainder=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * loader.steps_per_epoch
    first = batches[0]
    assert first["image"].shape == (64, 16, 16, 3) and first["image"].dtype == np.float32
    assert first["label"].dtype == np.int32
    per_epoch = loader.steps_per_epoch
    epoch_labels = [np.concatenate([b["label"] for b in batches[e * per_epoch:(e + 1) * per_epoch]]) for e in (0, 1)]
    for labels in epoch_labels:  # every sample once per epoch, and no batch straddles epochs
        assert np.array_equal(np.sort(labels), np.sort(train.labels))
    assert not np.array_equal(epoch_labels[0], epoch_labels[1])  # reshuffled
    assert loader.epoch_of(per_epoch) == 1
    other_seed = next(iter(train_loader(train, train_tf, 64, seed=4)))
    assert not np.array_equal(other_seed["image"], first["image"])

    dropped = train_loader(train, train_tf, 64, seed=3)
    assert dropped.steps_per_epoch == len(train) // 64
    assert all(len(b["label"]) == 64 for b in dropped)

    # evaluation keeps every sample once; its last batch is padded to the full size (one shape
    # for the eval step), with masked copies of the batch's first sample
    evaluation = list(eval_loader(digits_splits.val, eval_tf, 64))
    remainder = len(digits_splits.val) % 64
    assert remainder and all(b["image"].shape[0] == len(b["label"]) == len(b["mask"]) == 64 for b in evaluation)
    assert np.array_equal(evaluation[-1]["mask"], np.arange(64) < remainder)
    assert all(b["mask"].all() for b in evaluation[:-1])
    real = np.concatenate([b["label"][b["mask"] > 0] for b in evaluation])
    assert np.array_equal(real, digits_splits.val.labels)
    last = evaluation[-1]
    assert np.array_equal(last["image"][remainder:], np.repeat(last["image"][:1], 64 - remainder, axis=0))

    with pytest.raises(DataError, match="fewer than one batch"):
        train_loader(train, train_tf, len(train) + 1)


def test_seed_s_epoch_1_does_not_replay_seed_s_plus_1_epoch_0():
    """grain reshuffles epoch e with (shuffle seed + e), so unhashed seeds would make seed s's
    epoch 1 the same order as seed s+1's epoch 0; the pipeline hashes the seed first."""
    import grain

    from jaxft.data.split import ArrayStore, Split

    n = 50
    raw = grain.MapDataset.range(n).shuffle(seed=7).repeat(2)
    assert [raw[n + i] for i in range(n)] == [grain.MapDataset.range(n).shuffle(seed=8)[i] for i in range(n)]

    split = Split(ArrayStore(np.zeros((n, 1, 1, 3), np.uint8)), np.arange(n), np.arange(n), ("a", "b"))
    order = lambda seed, epoch: train_loader(split, None, n, seed=seed, num_epochs=2).dataset[epoch]["label"]  # noqa: E731
    for s in range(5):
        assert sorted(order(s, 1).tolist()) == list(range(n))
        assert not np.array_equal(order(s, 1), order(s + 1, 0)), s
        assert not np.array_equal(order(s, 0), order(s, 1)), s


def test_iterator_resumes_exactly(digits_splits):
    train_tf, _ = small_transforms()
    loader = train_loader(digits_splits.train, train_tf, 32, seed=0, num_epochs=2)
    iterator = iter(loader)
    for _ in range(loader.steps_per_epoch - 2):  # stop just before an epoch boundary
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(loader)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        assert np.array_equal(want["image"], got["image"]) and np.array_equal(want["label"], got["label"])


def test_worker_processes_give_the_same_batches_and_resume(digits_splits):
    train_tf, _ = small_transforms()
    split = digits_splits.train.subset(np.arange(200), "train")
    in_process = train_loader(split, train_tf, 32, seed=0, num_epochs=2)
    workers = train_loader(split, train_tf, 32, seed=0, num_epochs=2, num_workers=2)
    iterator = iter(workers)
    got = [next(iterator) for _ in range(5)]
    state = iterator.get_state()
    rest = list(iterator)
    iterator.close()
    for k, batch in enumerate(got + rest):
        assert np.array_equal(batch["image"], in_process.dataset[k]["image"]), k
    assert len(got) + len(rest) == len(in_process)
    resumed = iter(workers)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(3)]
    resumed.close()
    for want, batch in zip(rest, again):
        assert np.array_equal(want["image"], batch["image"])

    one_worker = iter(train_loader(split, train_tf, 32, seed=0, num_epochs=2, num_workers=1))
    one = list(one_worker)
    one_worker.close()
    assert len(one) == len(in_process)
    for k, batch in enumerate(one):
        assert np.array_equal(batch["image"], in_process.dataset[k]["image"]), k
        assert np.array_equal(batch["label"], in_process.dataset[k]["label"]), k


def test_workers_start_before_the_first_batch_and_from_a_resumed_position(digits_splits):
    """jaxft.train starts its loader's workers before its first val pass (start_workers), after
    restoring the iterator's position when it resumes; they must produce the batches they would
    have produced anyway."""
    import multiprocessing

    train_tf, _ = small_transforms()
    split = digits_splits.train.subset(np.arange(200), "train")
    in_process = train_loader(split, train_tf, 32, seed=0, num_epochs=2)
    workers = train_loader(split, train_tf, 32, seed=0, num_epochs=2, num_workers=2)
    def grain_workers() -> int:
        return sum(child.name.startswith("grain-") for child in multiprocessing.active_children())

    before = grain_workers()
    iterator = iter(workers)
    try:
        assert grain_workers() == before  # grain alone starts them at the first batches
        start_workers(iterator)
        deadline = time.monotonic() + 120  # grain starts them from background threads
        while grain_workers() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grain_workers() == before + 2  # both, before any batch was asked for
        got = [next(iterator) for _ in range(3)]
        state = iterator.get_state()
    finally:
        close_iterator(iterator)
    resumed = iter(workers)
    try:
        resumed.set_state(state)
        start_workers(resumed)
        rest = list(resumed)
    finally:
        close_iterator(resumed)
    assert len(got) + len(rest) == len(in_process)
    for k, batch in enumerate(got + rest):
        assert np.array_equal(batch["image"], in_process.dataset[k]["image"]), k
        assert np.array_equal(batch["label"], in_process.dataset[k]["label"]), k


SHARED_BATCHES_SCRIPT = """
import sys

from jaxft.data.pipeline import close_iterator, train_loader
from jaxft.data.sources import open_builtin

if __name__ == "__main__":
    split = open_builtin("digits:5-9", val_fraction=0.2, seed=0).train
    iterator = iter(train_loader(split, None, 32, num_epochs=2, num_workers=2))
    print("batches", sum(1 for _ in iterator))
    if sys.argv[1] == "release":  # as jaxft.train and feature extraction do when their loop ends
        close_iterator(iterator)
    else:  # grain's own close alone
        iterator.close()
"""


def test_worker_batches_leave_no_shared_memory_behind(tmp_path):
    """Workers hand batches over in shared memory; a run that ends must unlink all of it, or
    multiprocessing's resource tracker warns of leaked shared_memory objects at exit (it did,
    after every jaxft.train run with workers). The control, grain's own close alone, shows the
    warning."""
    script = tmp_path / "loader.py"
    script.write_text(SHARED_BATCHES_SCRIPT)
    runs = {how: subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=300)
            for how in ("release", "control")}
    for how, done in runs.items():
        assert done.returncode == 0 and "batches 44" in done.stdout, (how, done.stderr[-2000:])
    assert "leaked shared_memory" not in runs["release"].stderr, runs["release"].stderr[-2000:]
    assert "leaked shared_memory" in runs["control"].stderr, (
        "grain no longer leaves shared memory to the exit: close_iterator's collection may be unneeded now")
