"""python -m jaxft.convert: torchvision weights <-> Flax variables, from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

EXAMPLES = """\
examples:
  # torchvision's ImageNet weights (downloaded and cached by torchvision) -> an orbax checkpoint
  python -m jaxft.convert imagenet --arch resnet50 --out resnet50_flax

  # a local torchvision checkpoint -> a single msgpack file
  python -m jaxft.convert ~/resnet18.pth --arch resnet18 --out resnet18.msgpack

  # back to PyTorch: a .pth that torchvision.models.resnet18(num_classes=N) loads with strict=True
  python -m jaxft.convert --to-torch resnet18.msgpack --out resnet18_back.pth

  # a fine-tuned run (its best model) -> torchvision
  python -m jaxft.convert --to-torch runs/resnet18-digits_5-9-full --out finetuned.pth

SOURCE is 'imagenet' (the arch's DEFAULT weights), a weights enum name such as IMAGENET1K_V2,
or a .pth/.pt/.safetensors file holding a torchvision state_dict. Files are read with
torch.load(weights_only=True) only. Output format follows --out's suffix (.msgpack,
.safetensors, otherwise an orbax directory) unless --format says otherwise.
"""


def build_parser() -> argparse.ArgumentParser:
    from jaxft.checkpoint import FORMATS
    from jaxft.models import ARCHS

    parser = argparse.ArgumentParser(
        prog="python -m jaxft.convert",
        description="Convert torchvision ResNet/VGG weights to Flax variables, or Flax variables back to a "
                    "torchvision .pth.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="weights name or checkpoint file (torch -> Flax), or a jaxft checkpoint "
                                       "with --to-torch")
    parser.add_argument("--arch", choices=ARCHS, metavar="ARCH",
                        help=f"model architecture (torch -> Flax); one of: {', '.join(ARCHS)}")
    parser.add_argument("--to-torch", action="store_true", help="convert a jaxft checkpoint back to a torch .pth")
    parser.add_argument("--out", type=Path, help="output path (default: derived from the source name)")
    parser.add_argument("--format", choices=FORMATS, help="output format for torch -> Flax (default: from --out)")
    parser.add_argument("--num-classes", type=int,
                        help="classes of the new head; a different count than the checkpoint's replaces the head")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing JAX and torch logits on a random batch after converting")
    return parser


def _describe(arch: str, num_classes: int, params: int, categories: Optional[list]) -> str:
    names = ""
    if categories:
        shown = ", ".join(categories[:3])
        names = f": {shown}, ..." if len(categories) > 3 else f": {shown}"
    return f"{arch}, {params:,} parameters, {num_classes} classes{names}"


def _check_logits(arch: str, variables, state_dict) -> float:
    """Relative L2 error between the JAX model and torchvision on one random 64x64 batch."""
    import numpy as np
    import torch
    import torchvision

    from jaxft.models import create_model

    num_classes = int(np.shape(variables["params"][create_model(arch).head_name]["kernel"])[-1])
    torch_model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).eval()
    torch_model.load_state_dict(state_dict, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    got = np.asarray(create_model(arch, num_classes=num_classes).apply(variables, x.permute(0, 2, 3, 1).numpy()))
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``; checked before any work is done."""
    from jaxft.checkpoint import is_variables_dir

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if out.is_dir() and not is_variables_dir(out):
        raise FileExistsError(f"--overwrite refuses to delete {out}: it is a directory but not a jaxft orbax "
                              f"checkpoint (only 'variables', 'meta' and orbax's own files)")
    if not out.parent.is_dir():
        raise FileExistsError(f"the folder of --out {out} does not exist; create {out.parent} first")


def _clear(out: Path) -> None:
    """Remove the old output once the new one is ready to be written (nothing is lost on failure)."""
    if out.exists():
        import shutil

        shutil.rmtree(out) if out.is_dir() else out.unlink()


def torch_to_flax(args: argparse.Namespace) -> str:
    from jaxft.checkpoint import save_variables
    from jaxft.convert import to_torch
    from jaxft.pretrained import load_pretrained

    if not args.arch:
        raise ValueError("--arch is required to convert torch weights (e.g. --arch resnet50)")
    stem = Path(args.source).stem if Path(args.source).suffix else args.source.lower()
    out = args.out or Path(f"{args.arch}_{stem}_flax")
    _check_out(out, args.overwrite)
    model, variables, info = load_pretrained(args.arch, args.source, num_classes=args.num_classes)
    meta = {"arch": args.arch, "num_classes": info.num_classes, "weights": info.meta.to_json()}
    _clear(out)
    written = save_variables(out, variables, meta, args.format)
    lines = [f"converted {_describe(args.arch, info.num_classes, info.param_count, info.categories)}",
             f"  from {info.meta.source}", f"  to   {written}"]
    if info.replaced_keys:
        lines.append(f"  new head (freshly initialised): {', '.join(info.replaced_keys)}")
    if args.check:
        error = _check_logits(args.arch, variables, to_torch(args.arch, variables))
        lines.append(f"  check: JAX vs torchvision logits, relative L2 error {error:.1e}")
    return "\n".join(lines)


def flax_to_torch(args: argparse.Namespace) -> str:
    import torch

    from jaxft.checkpoint import load_variables
    from jaxft.convert import count_params, to_torch
    from jaxft.models import check_arch

    source = Path(args.source)
    if (source / "model.json").is_file() and (source / "best").is_dir():  # a python -m jaxft.train run
        source = source / "best"
    variables, meta = load_variables(source)
    arch = check_arch(meta.get("arch", ""))
    out = args.out or Path(f"{Path(args.source).name}.pth")
    _check_out(out, args.overwrite)
    state_dict = to_torch(arch, variables)
    _clear(out)
    torch.save(state_dict, out)
    num_classes = int(meta.get("num_classes") or 0)
    categories = meta.get("classes") or (meta.get("weights") or {}).get("categories")
    lines = [f"exported {_describe(arch, num_classes, count_params(variables), categories)}",
             f"  from {Path(args.source).resolve()}", f"  to   {out.resolve()}",
             f"  load with: torchvision.models.{arch}(num_classes={num_classes}).load_state_dict("
             f"torch.load('{out}', weights_only=True))"]
    if args.check:
        error = _check_logits(arch, variables, torch.load(out, weights_only=True))
        lines.append(f"  check: torchvision (strict=True) vs JAX logits, relative L2 error {error:.1e}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jaxft.checkpoint import CheckpointError
    from jaxft.convert import ConversionError
    from jaxft.weights import WeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(flax_to_torch(args) if args.to_torch else torch_to_flax(args))
    except (ConversionError, WeightsError, CheckpointError, FileExistsError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
