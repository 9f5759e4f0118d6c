"""Shared fixtures. Comparison helpers live in jaxft.parity (tools use them too)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)  # CI has two cores; torch would otherwise oversubscribe under xdist


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, so weights names must be downloaded (and fail offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture
def torch_kernel_calls(monkeypatch):
    """Every call of torch's convolution kernels (jaxft/models/host_conv.py) during the test, in
    order, as (operation, result shape), the operation one of "conv", "input_grad", "kernel_grad":
    proof that the route ran, eagerly or from a compiled step."""
    from jaxft.models import host_conv

    calls = []

    def recorder(operation):
        kernel = getattr(host_conv, f"torch_{operation}")

        def recorded(a, b, out, **kwargs):
            calls.append((operation, out.shape))
            return kernel(a, b, out, **kwargs)

        return recorded

    for operation in ("conv", "input_grad", "kernel_grad"):
        monkeypatch.setattr(host_conv, f"torch_{operation}", recorder(operation))
    return calls


@pytest.fixture(scope="session")
def jaxft_cache(tmp_path_factory):
    """A JAXFT_CACHE shared by this run's xdist workers (and the CLIs they start)."""
    return tmp_path_factory.getbasetemp().parent / "jaxft_cache"


@pytest.fixture(scope="session")
def source_checkpoint(jaxft_cache):
    """The offline source checkpoint (resnet18 trained in PyTorch on digits 0-4), built once
    per test run where `--weights source` looks for it, shared by xdist workers through a lock."""
    from filelock import FileLock

    from jaxft.source_checkpoint import SourceRecipe, build_source_checkpoint, default_source_path

    recipe = SourceRecipe()
    os.environ["JAXFT_CACHE"] = str(jaxft_cache)
    path = default_source_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            build_source_checkpoint(path, recipe, log=lambda *_: None)
    return path


@pytest.fixture
def env(source_checkpoint, jaxft_cache, tmp_path):
    """The environment of a CLI a test starts: the test run's source checkpoint cache, no torch
    downloads."""
    return {**os.environ, "JAXFT_CACHE": str(jaxft_cache), "TORCH_HOME": str(tmp_path / "torch_home"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


@pytest.fixture(scope="session")
def digits_5_9():
    """Digits 5-9 upscaled to 32 px and normalised like the source checkpoint: (x NHWC, y)."""
    from jaxft.data.builtin import digits
    from jaxft.source_checkpoint import normalized_images

    images, labels, _ = digits(range(5, 10))
    return normalized_images(images, 32), labels
