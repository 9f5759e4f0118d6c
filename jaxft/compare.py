"""python -m jaxft.compare: several freeze strategies on one dataset, same budget, one table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_STRATEGIES = ("head", "partial:0.8", "full", "body", "scratch")
COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jaxft import runtime
    from jaxft.config import add_config_flags, build_config, config_to_dict, load_config_file
    from jaxft.freeze import parse_strategy
    from jaxft.report import write_comparison
    from jaxft.rundir import RunError, is_run_dir, prepare_run_dir, write_json
    from jaxft.train import StopRequested, crop_size_of, train, user_errors

    parser = argparse.ArgumentParser(
        prog="python -m jaxft.compare",
        description="Run several strategies with the same data, weights, optimizer and epochs, and tabulate best "
                    "validation accuracy, train time, trainable parameters and optimizer memory, as the PyTorch "
                    "transfer-learning recipes do. 'scratch' is --weights none with full training.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--config", help="YAML or JSON file with training flags")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    runtime.split_cpu_for_command(argv)  # before anything starts a backend
    flags = {k: v for k, v in vars(args).items() if k not in ("strategies", "config", "overwrite")}
    try:
        base = build_config(load_config_file(args.config) if args.config else {}, flags, args.config or "flags")
        for name in args.strategies:  # every spec checked before hours of training start
            if name != "scratch":
                parse_strategy(name)
        out = Path(base.out or f"runs/compare-{base.arch}-{base.data.replace(':', '_').replace('/', '_')}")
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file, not a directory")
        if out.exists() and any(out.iterdir()):
            if not args.overwrite:
                raise RunError(f"--out {out} already holds files; pass --overwrite or choose another --out")
            # --overwrite replaces an earlier comparison: its table files and its strategies' run directories
            foreign = sorted(p.name for p in out.iterdir()
                             if p.name not in COMPARISON_FILES and not is_run_dir(p))
            if foreign:
                raise RunError(f"--overwrite refuses to write into {out}: it holds files that are not an earlier "
                               f"comparison's ({', '.join(foreign[:5])}); choose another --out")
        # Every strategy sees the same images: scratch (no weights) would otherwise fall back to
        # ImageNet's 224 px while the others use their weights' size.
        image_size = base.image_size or crop_size_of(base)
        rows = []
        for name in args.strategies:
            spec, weights = ("full", "none") if name == "scratch" else (name, base.weights)
            cfg = build_config({**base.__dict__, "strategy": spec, "weights": weights, "image_size": image_size,
                                "out": str(out / name.replace(":", "_")),
                                "wandb_group": base.wandb_group or (out.name if base.wandb else None)}, {})
            run_dir = prepare_run_dir(Path(cfg.out), overwrite=True)
            write_json(run_dir / "config.json", config_to_dict(cfg))
            print(f"== {name} -> {run_dir}")
            try:
                summary = train(cfg, run_dir, quiet=True, log=lambda *_: None)
            except FloatingPointError as exc:  # a diverging run is a result too: keep the table
                print(f"   failed: {exc}")
                rows.append([name, "nan", "-", "-", "-", "-"])
                continue
            rows.append([name, f"{100 * summary['val']['accuracy']:.1f}", summary["best_epoch"],
                         f"{summary['train_seconds']:.1f}", f"{summary['parameters']['trainable']:,}",
                         f"{summary['optimizer_state_bytes'] / 2**20:.2f}"])
            print(f"   best val accuracy {rows[-1][1]}% (epoch {rows[-1][2]}), {rows[-1][3]} s")
        headers = ["strategy", "best val acc %", "best epoch", "train s", "trainable params", "optimizer state MiB"]
        files = write_comparison(headers, rows, out, value_column="best val acc %")
    except StopRequested:
        print("interrupted: the current strategy's run is checkpointed; no table written", file=sys.stderr)
        return 130
    except user_errors() as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text())
    print(f"saved {files['markdown']}, {files['csv']} and {files['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
