"""`python -m benchmarks --quick` is the CI check that jaxft and PyTorch compute the same step;
the doc writer replaces only its generated block."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a package of the checkout, not of the installed jaxft: import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import process_memory, report, steps

BEGIN, END = report.BEGIN, report.END


def table_rows(output: str, title: str) -> list[dict[str, str]]:
    """The rows of the markdown table printed under ``### title``, as header -> cell."""
    table = []
    for line in output.split(f"### {title}", 1)[1].splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    headers, rows = cells[0], cells[2:]  # cells[1] is the |---| rule
    return [dict(zip(headers, row, strict=True)) for row in rows]


def test_quick_benchmark_agrees_with_torch_and_compiles_once(env):
    outputs = [ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.png"]
    before = [path.read_bytes() if path.exists() else None for path in outputs]
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, env=env, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout, "Train step throughput")
    full = next(row for row in rows if (row["arch"], row["strategy"]) == ("resnet18", "full"))
    for column in ("jaxft/eager", "jaxft/best torch"):
        assert float(full[column]) > 0, column
    assert float(full["loss rel diff"]) <= 1e-4
    for row in rows:
        warm, timed = row["compilations (warm -> timed)"].split(" -> ")
        assert warm == timed == "1", row
    assert "### Inference throughput" in result.stdout and "### Memory" in result.stdout
    (memory,) = table_rows(result.stdout, "End to end: host memory")
    for column in ("jaxft process peak MiB", "torch process peak MiB", "jaxft with workers MiB",
                   "torch with workers MiB"):
        assert 100 < float(memory[column].replace(",", "")) < 20_000, (column, memory)  # a Python runtime and a model
    assert [path.read_bytes() if path.exists() else None for path in outputs] == before  # --quick writes no doc


PROSE_BEFORE = "# Benchmarks\n\nHand-written introduction.\n\n"
PROSE_AFTER = "\n\n## Notes\n\nWhy the numbers are what they are.\n"


def test_doc_writer_replaces_only_the_generated_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"{PROSE_BEFORE}{BEGIN}\nold table\n{END}{PROSE_AFTER}")
    report.write_doc(doc, "| new | table |")
    assert doc.read_text() == f"{PROSE_BEFORE}{BEGIN}\n| new | table |\n{END}{PROSE_AFTER}"
    report.write_doc(doc, "| newer |")  # again: still exactly one block, the prose untouched
    assert doc.read_text() == f"{PROSE_BEFORE}{BEGIN}\n| newer |\n{END}{PROSE_AFTER}"


def test_doc_writer_inserts_the_markers_after_the_title():
    updated = report.replace_generated_block(f"{PROSE_BEFORE}Body.\n", "block")
    assert updated == f"# Benchmarks\n\n{BEGIN}\nblock\n{END}\n\nHand-written introduction.\n\nBody.\n"
    assert report.replace_generated_block("No title.\n", "block") == f"{BEGIN}\nblock\n{END}\n\nNo title.\n"


def test_doc_writer_refuses_a_lone_marker():
    with pytest.raises(ValueError, match="only one of the markers"):
        report.replace_generated_block(f"{PROSE_BEFORE}{BEGIN}\nno end{PROSE_AFTER}", "block")


def test_ratio_plot_is_a_png(tmp_path):
    path = report.plot_ratios([("resnet18 full 32px", 0.7), ("resnet18 head 32px", 1.3)], tmp_path / "ratios.png", "t")
    assert path.read_bytes().startswith(b"\x89PNG")


# A parent holding 300 MiB that starts a child holding 200 MiB, both for a second; each touches
# its pages (bytes of a repeated pattern), so they are resident, not just reserved.
HOLDER = """
import subprocess, sys, time
held = bytes(range(256)) * (4 * int(sys.argv[1]) * 1024)
if len(sys.argv) > 2:
    subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[3]], check=True)
else:
    time.sleep(1.0)
"""


def test_process_memory_sees_the_process_peak_and_its_children(tmp_path):
    with open(tmp_path / "out.log", "w") as out:
        watched = process_memory.run_watched([sys.executable, "-c", HOLDER, "300", HOLDER, "200"], out,
                                             dict(os.environ), interval=0.05)
    assert watched.returncode == 0
    # the parent's high-water mark: its 300 MiB and an interpreter (~10 MiB), not the child's 200
    assert 300 <= watched.peak_rss_mib < 400, watched
    # parent and child were resident together while the child slept
    assert 500 <= watched.peak_tree_pss_mib < 650, watched


def test_process_memory_reports_a_failing_command(tmp_path):
    with open(tmp_path / "out.log", "w") as out:
        watched = process_memory.run_watched([sys.executable, "-c", "import sys; print('no'); sys.exit(3)"], out,
                                             dict(os.environ))
    assert watched.returncode == 3 and (tmp_path / "out.log").read_text() == "no\n"


def test_a_disagreeing_or_recompiling_step_is_a_failure():
    setup = steps.Setup("cpu", "float32", batch_size=8, repeats=2, torch_compile=False)
    result = steps.TrainResult(
        arch="resnet18", strategy="full", size=32, seconds={"jaxft": 1.0, "torch eager": 1.0}, compile_failure=None,
        jax_loss=2.3026, torch_loss=2.3029, flops=1e9, jax_state_bytes=0, torch_state_bytes=0, argument_bytes=None,
        temp_bytes=None, compilations=(1, 2))
    problems = steps.train_problems(result, setup)
    assert len(problems) == 2
    assert "first-step loss" in problems[0] and "compiled again" in problems[1]
    assert steps.train_problems(replace(result, torch_loss=2.30261, compilations=(1, 1)), setup) == []
