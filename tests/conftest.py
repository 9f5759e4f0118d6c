"""Shared fixtures. Comparison helpers live in jaxft.parity (tools use them too)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)  # CI has two cores; torch would otherwise oversubscribe under xdist


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, so weights names must be downloaded (and fail offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"
