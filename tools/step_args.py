"""The command line the step tools share (profile_step, step_ab, xla_flag_sweep): which train
step to run. Each tool adds its own options to the parser this returns."""

from __future__ import annotations

import argparse


def step_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    return parser
