"""python -m benchmarks: jaxft against PyTorch, side by side, one table per section.

    python -m benchmarks [--quick] [--device cpu|gpu] [--dtype float32|bfloat16] [--archs ...]
                         [--strategies ...] [--sizes 224 64] [--batch-size N] [--repeats N]
                         [--no-compile] [--skip-end-to-end] [--write [DOC]]

Sections: train-step throughput, inference throughput, memory, end to end (and its jobs' host
memory). Every ratio is
jaxft's speed over PyTorch's (> 1: jaxft is faster), timed round-robin in one process per row.

--quick is the CI check (resnet18, full and head, 32 px, batch 8, 2 repeats, no
torch.compile, the quick end-to-end run). A full run (no --quick) writes its tables into
docs/benchmarks.md between the generated-block markers, and a plot beside it; --write DOC
writes elsewhere, or writes after --quick too. Exits 1 when a check fails: jaxft and torch
disagree on the same step (loss of the first step from identical weights, logits), the jitted
train step compiled again while timed, or the end-to-end run reports a failure.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import end_to_end, report, steps
from benchmarks.common import in_own_process
from jaxft import runtime

DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
FULL = {"archs": ["resnet18", "resnet50", "vgg16"], "strategies": ["full", "partial:0.8", "head"],
        "sizes": [224, 64], "batch_size": 16, "repeats": 5, "compile": True}
QUICK = {"archs": ["resnet18"], "strategies": ["full", "head"], "sizes": [32], "batch_size": 8, "repeats": 2,
         "compile": False}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small CI run (defaults below in brackets)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="JAX's platform; torch runs on cuda for gpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype: jaxft's model dtype, torch autocast (parameters stay float32)")
    parser.add_argument("--archs", nargs="+", help=f"default {FULL['archs']} [{QUICK['archs']}]")
    parser.add_argument("--strategies", nargs="+", help=f"default {FULL['strategies']} [{QUICK['strategies']}]")
    parser.add_argument("--sizes", nargs="+", type=int, help=f"image sizes, default {FULL['sizes']} [{QUICK['sizes']}]")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']} [{QUICK['batch_size']}]")
    parser.add_argument("--repeats", type=int, help=f"timed repeats, median reported; default {FULL['repeats']} "
                                                    f"[{QUICK['repeats']}]")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                        help="skip torch.compile [skipped]")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip the end-to-end section")
    parser.add_argument("--write", nargs="?", type=Path, const=DEFAULT_DOC, metavar="DOC",
                        help="write the generated block into DOC (default docs/benchmarks.md; a full run always "
                             "writes) and the plot beside it")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.write is None and not args.quick:
        args.write = DEFAULT_DOC
    return args


def train_section(args: argparse.Namespace, setup: steps.Setup,
                  peak: float) -> tuple[report.Section, list[steps.TrainResult], list[str]]:
    results, failures = [], []
    for arch in args.archs:
        for strategy in args.strategies:
            for size in args.sizes:
                print(f"train step: {arch} {strategy} {size}px ...", file=sys.stderr, flush=True)
                result = in_own_process(steps.bench_train, arch, strategy, size, setup,
                                        initializer=runtime.split_cpu)
                if setup.torch_compile:  # in a process of its own: it slowed jaxft's steps in theirs
                    result = steps.with_torch_compile(
                        result, *in_own_process(steps.bench_torch_compile, arch, strategy, size, setup))
                results.append(result)
                failures += steps.train_problems(results[-1], setup)
    section = report.Section(
        "Train step throughput", *steps.train_table(results, setup, peak),
        note=f"Adam, {setup.describe()}. jaxft `Engine.train_step` (BatchNorm policy `torch`) against PyTorch "
             "(`requires_grad=False` freezing, `torch.optim.Adam`), each row in a process of its own; "
             "`torch.compile` in another beside eager torch, its column eager torch's figure here times the "
             "compiled/eager ratio there (in one process it slowed jaxft's steps); GFLOP/s from XLA's cost "
             "analysis of the step, "
             "as a share of the matmul peak above; loss rel diff: the first step from identical weights. Each "
             "step takes its batch from host memory as its training loop does: torch float32 (`ToTensor` + "
             "`Normalize` on the host, `.to(device)`), jaxft uint8 normalised on the device. jaxft devices: one, "
             "except where a `python -m jaxft.train` run would use the CPU as two (`head` steps over at least "
             "200,000 pixels a batch, unless torch's kernels take every convolution on one: docs/engine.md), "
             "each with half the batch.")
    return section, results, failures


def inference_section(args: argparse.Namespace, setup: steps.Setup) -> tuple[report.Section, list[str]]:
    results, failures = [], []
    for arch in args.archs:
        for size in args.sizes:
            print(f"inference: {arch} {size}px ...", file=sys.stderr, flush=True)
            results.append(in_own_process(steps.bench_inference, arch, size, setup, initializer=runtime.split_cpu))
            failures += steps.inference_problems(results[-1], setup)
    section = report.Section("Inference throughput", *steps.inference_table(results, setup),
                             note=f"Eval mode, {setup.describe()}: jitted `model.apply(train=False)` against "
                                  "torch `eval()` under `inference_mode`. jaxft runs as `python -m jaxft.predict` "
                                  "does: uint8 crops normalised on the device, on the devices it would use (both "
                                  "halves of the split CPU over 200,000 pixels a batch, unless torch's kernels "
                                  "take every convolution on one).")
    return section, failures


def memory_section(train: list[steps.TrainResult]) -> report.Section:
    return report.Section(
        "Memory", *steps.memory_table(train),
        note="Optimizer state held by each framework (frozen leaves carry none), and the compiled jaxft step's "
             "argument and temporary buffers from XLA's memory analysis (summed over its devices). Host memory is "
             "per process and only grows, so it says nothing per row here; each end-to-end job's is in its own "
             "table.")


def end_to_end_sections(quick: bool, device: str) -> tuple[list[report.Section], list[str]]:
    print("end to end ...", file=sys.stderr, flush=True)
    return end_to_end.run(quick=quick, device=device)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    date = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    setup = steps.Setup(args.device, args.dtype, args.batch_size, args.repeats, args.compile)
    # Everything that starts a JAX backend runs in a process of its own (common.in_own_process),
    # each row too, with the CPU split as the CLIs split it: this one holds no device while they run.
    machine = in_own_process(steps.machine, setup, initializer=runtime.split_cpu)
    if isinstance(machine, str):
        sys.exit(machine)
    env, peak = machine.environment, machine.peak
    env["matmul peak (jax)"] = f"{peak / 1e9:.1f} GFLOP/s ({args.dtype}, {args.device})"
    env["jaxft CPU devices"] = (f"{machine.cpu_devices}, made by jaxft as its CLIs make them (the train step's "
                                f"devices column: each row's choice)" if machine.cpu_split_by_jaxft
                                else str(machine.cpu_devices))
    env["processes"] = "one for each row, as a user's run has one (benchmarks.common.in_own_process)"
    print(f"{command}\n{date}\n" + "\n".join(f"{key}: {value}" for key, value in env.items()), flush=True)

    train, train_results, failures = train_section(args, setup, peak)
    report.print_section(train)
    inference, inference_failures = inference_section(args, setup)
    report.print_section(inference)
    memory = memory_section(train_results)
    report.print_section(memory)
    sections = [train, inference, memory]
    failures += inference_failures
    if args.skip_end_to_end:
        print("\nend to end: skipped (--skip-end-to-end)")
    else:
        e2e, e2e_failures = end_to_end_sections(args.quick, args.device)
        for section in e2e:
            report.print_section(section)
        sections += e2e
        failures += e2e_failures

    if args.write:
        plot = report.plot_ratios([(f"{r.arch} {r.strategy} {r.size}px", r.vs_eager) for r in train_results],
                                  args.write.with_suffix(".png"),
                                  f"train step, jaxft / eager PyTorch ({setup.describe()})")
        report.write_doc(args.write, report.render_block(command, date, env, sections, failures, plot.name))
        print(f"\nwrote {args.write} and {plot}")
    if failures:
        print("\nFAILED checks:\n" + "\n".join(f"- {failure}" for failure in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
