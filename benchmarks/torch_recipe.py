#!/usr/bin/env python
"""The PyTorch transfer-learning tutorial recipe, as the tutorials write it.

    python -m benchmarks.torch_recipe --data ROOT --weights SOURCE.pth --strategy head \\
        [--epochs 5] [--batch-size 32] [--lr 1e-3] [--image-size 224] [--out metrics.json]

ROOT holds ``train/<class>/*.png`` and ``val/<class>/*.png`` (torchvision's ImageFolder
layout). The backbone comes from a torchvision-format ``.pth``; the classifier is replaced
by a new ``nn.Linear`` for the dataset's classes, freezing is ``requires_grad=False``, the
optimizer is plain Adam over the trainable parameters and the loop is the tutorial's
``train_model``: per epoch a train phase (``model.train()``) and a val phase
(``model.eval()``), printing loss, accuracy and elapsed time.

This file imports torch and torchvision only (no jaxft, no JAX), so that run as its own
process (``benchmarks.end_to_end`` does) its threads, memory and start-up time are PyTorch's
alone. The few things jaxft must decide for both frameworks come in as arguments: the
resize size of the val transform, the new head's initial values and, for ``partial:F``,
the names of the tensors to freeze.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_loaders(root: Path, size: int, resize: int, batch_size: int, workers: int):
    """The tutorial's ImageFolder datasets and DataLoaders (train shuffled, val in order)."""
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]),
        "val": transforms.Compose([
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]),
    }
    image_datasets = {phase: datasets.ImageFolder(root / phase, data_transforms[phase]) for phase in ("train", "val")}
    loaders = {phase: torch.utils.data.DataLoader(image_datasets[phase], batch_size=batch_size,
                                                  shuffle=phase == "train", num_workers=workers)
               for phase in ("train", "val")}
    return loaders, image_datasets["train"].classes


def build_model(arch: str, weights: Path, num_classes: int, strategy: str, init_head: Path | None,
                freeze_names: list[str]) -> nn.Module:
    """Source weights, the strategy's tensors frozen, a new classifier (trainable)."""
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    # built with the checkpoint's own class count (its fc.bias length), so loading is strict
    model = torchvision.models.get_model(arch, weights=None, num_classes=state_dict["fc.bias"].shape[0])
    model.load_state_dict(state_dict)
    if strategy == "head":  # "ConvNet as fixed feature extractor": freeze everything, then swap fc
        for param in model.parameters():
            param.requires_grad = False
    elif strategy.startswith("partial:"):
        frozen = set(freeze_names)
        unknown = frozen - {name for name, _ in model.named_parameters()}
        if not frozen or unknown:
            raise SystemExit(f"--strategy {strategy} needs --freeze with this model's parameter names "
                             f"(unknown: {sorted(unknown)[:3]})")
        for name, param in model.named_parameters():
            param.requires_grad = name not in frozen
    elif strategy != "full":
        raise SystemExit(f"--strategy {strategy}: this recipe knows head, partial:F and full")
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # new modules have requires_grad=True
    if init_head is not None:  # the other framework's initial head, so both start from the same weights
        model.fc.load_state_dict(torch.load(init_head, map_location="cpu", weights_only=True))
    return model


def run_phase(model: nn.Module, loader, phase: str, optimizer, criterion, device: torch.device) -> tuple[float, float]:
    """One pass of the tutorial's inner loop over ``loader``: (mean loss, accuracy)."""
    model.train() if phase == "train" else model.eval()
    running_loss, running_corrects, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        with torch.set_grad_enabled(phase == "train"):
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            if phase == "train":
                loss.backward()
                optimizer.step()
        running_loss += loss.item() * inputs.size(0)
        running_corrects += int((outputs.argmax(1) == labels).sum())
        seen += inputs.size(0)
    return running_loss / seen, running_corrects / seen


def train_model(model: nn.Module, loaders: dict, optimizer, epochs: int, device: torch.device, log=print) -> list[dict]:
    """The tutorial's loop; one record per epoch (losses, accuracies, seconds, wall-clock time).

    Record 0 is a val pass before training, which the tutorial does not do: it shows that
    this recipe and jaxft start from the same model and evaluate the same images."""
    criterion = nn.CrossEntropyLoss()
    val_loss, val_acc = run_phase(model, loaders["val"], "val", optimizer, criterion, device)
    history = [{"epoch": 0, "val_loss": val_loss, "val_accuracy": val_acc}]
    log(f"before training: val loss {val_loss:.4f} acc {val_acc:.4f}")
    since = time.perf_counter()
    for epoch in range(epochs):
        epoch_start, record = time.perf_counter(), {"epoch": epoch + 1}
        for phase in ("train", "val"):
            record[f"{phase}_loss"], record[f"{phase}_accuracy"] = run_phase(model, loaders[phase], phase, optimizer,
                                                                             criterion, device)
        record["epoch_seconds"] = round(time.perf_counter() - epoch_start, 2)
        record["time"] = round(time.time(), 3)  # wall clock, so a parent can measure from process start
        history.append(record)
        log(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | "
            f"{time.perf_counter() - since:.1f}s elapsed")
    best = max(history[1:], key=lambda r: r["val_accuracy"])
    log(f"training complete in {time.perf_counter() - since:.1f}s; best val acc {best['val_accuracy']:.4f} "
        f"(epoch {best['epoch']})")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--weights", type=Path, required=True, help="torchvision-format .pth of the source model")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--strategy", default="full", help="head, partial:F (with --freeze) or full")
    parser.add_argument("--freeze", type=Path, help="JSON list of parameter names to freeze (partial:F)")
    parser.add_argument("--init-head", type=Path, help="fc state_dict (.pth) to start the new head from")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, help="val Resize size (default: image size * 256 / 224)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the per-epoch records here as JSON")
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # seeds the new head (without --init-head), shuffling and augmentation
    device = torch.device(args.device)
    resize = args.resize or int(args.image_size * 256 / 224)
    loaders, classes = data_loaders(args.data, args.image_size, resize, args.batch_size, args.workers)
    freeze_names = json.loads(args.freeze.read_text()) if args.freeze else []
    model = build_model(args.arch, args.weights, len(classes), args.strategy, args.init_head, freeze_names).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{args.arch} {args.strategy}: {len(trainable)} trainable tensors, "
          f"{sum(p.numel() for p in trainable):,} trainable parameters; {len(classes)} classes; "
          f"{torch.get_num_threads()} threads", flush=True)
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    history = train_model(model, loaders, optimizer, args.epochs, device, log=lambda line: print(line, flush=True))
    if args.out:
        args.out.write_text(json.dumps({"history": history, "trainable_params": sum(p.numel() for p in trainable)},
                                       indent=1))


if __name__ == "__main__":
    main()
