"""Shared test helpers: torch references with non-default BatchNorm state, error metrics."""

from __future__ import annotations

import os

# Tests compare against torch on the CPU; keep both libraries to the two cores CI has.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def rel_l2(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-default BN statistics and affine parameters: defaults hide mapping bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model


def torch_reference(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return randomize_batchnorm(torchvision.models.get_model(arch, weights=None, **kwargs), seed).eval()


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, so weights names must be downloaded (and fail offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"
