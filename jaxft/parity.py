"""Helpers to compare jaxft models with torchvision: used by the tests and tools/parity_report.py."""

from __future__ import annotations

import numpy as np


def rel_l2(got, expected) -> float:
    """Relative L2 error ||got - expected|| / ||expected||, in float64."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def randomize_batchnorm(model, seed: int = 0):
    """Non-default BN statistics and affine parameters on a torch model: defaults hide mapping bugs."""
    import torch

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


def torch_reference(arch: str, seed: int = 0, **kwargs):
    """A torchvision model in eval mode with seeded weights and randomised BatchNorm state."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return randomize_batchnorm(torchvision.models.get_model(arch, weights=None, **kwargs), seed).eval()


def freeze_like(torch_model, model, labels) -> list:
    """``requires_grad=False`` on the torch parameters jaxft's ``labels`` freeze (matched in
    ``model.parameters()`` order), as the PyTorch recipes freeze; returns the trainable ones."""
    from flax import traverse_util

    from jaxft.freeze import FROZEN, torch_order

    flat = traverse_util.flatten_dict(dict(labels))
    params = list(torch_model.parameters())
    for param, path in zip(params, torch_order(model), strict=True):
        param.requires_grad_(flat[path] != FROZEN)
    return [p for p in params if p.requires_grad]


def nchw_to_nhwc(x) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def torch_adam_trajectory(arch: str, state: dict, model, labels, batches, lr: float, dtype, bn_policy: str = "torch"):
    """The PyTorch side of an Adam trajectory held against jaxft's: a torchvision ``arch`` from
    ``state`` in ``dtype``, frozen like jaxft's ``labels`` (``requires_grad=False``; with the
    ``running`` policy, frozen BatchNorm modules in ``eval()``), trained with ``torch.optim.Adam``
    on ``batches`` of NHWC arrays. Returns (loss per step, final state_dict as float64 arrays)."""
    import torch
    import torchvision

    net = torchvision.models.get_model(arch, num_classes=model.num_classes)
    net.load_state_dict(state)
    net = net.to(dtype).train()
    trainable = freeze_like(net, model, labels)
    if bn_policy == "running":
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.requires_grad:
                module.eval()
    losses = torch_train_loop(net, torch.optim.Adam(trainable, lr=lr), batches, dtype)
    return losses, {k: v.detach().double().numpy() for k, v in net.state_dict().items()}


def torch_train_loop(net, optimizer, batches, dtype, scheduler=None) -> np.ndarray:
    """The plain PyTorch loop the recipes write: cross-entropy on each (NHWC images, labels) batch,
    backward, optimizer step (and scheduler step). Returns the loss of every step."""
    import torch

    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)),
                                                 torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return np.array(losses)
