"""The run directory: crash-safe writes, the best-model link, and what --overwrite may empty."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxft.checkpoint import load_variables, save_variables
from jaxft.rundir import (RunError, atomic_write, is_run_dir, prepare_run_dir, read_jsonl, replace_best,
                          truncate_jsonl, write_json)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"accuracy": np.float32(0.5), "matrix": np.eye(2, dtype=np.int64)})
    assert json.loads(target.read_text()) == {"accuracy": 0.5, "matrix": [[1, 0], [0, 1]]}

    def crash(tmp):
        tmp.write_text('{"accuracy": 0.')  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert json.loads(target.read_text())["accuracy"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_metrics_with_a_torn_last_line_are_read_and_truncated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-append
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage in the middle is not a crash's
    with pytest.raises(RunError, match=r"metrics.jsonl, line 2, is not valid JSON"):
        read_jsonl(path)


def _variables(value: float) -> dict:
    return {"params": {"fc": {"kernel": np.full((2, 3), value, np.float32)}}}


def test_best_is_a_link_swapped_in_one_rename(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    legacy = run / "best"  # a run written before best became a link: a plain directory
    save_variables(legacy, _variables(0.0), {"arch": "resnet18"})
    (run / "best.7.tmp").mkdir()  # staging left by a kill mid-write
    for value in (1.0, 2.0):
        replace_best(run, lambda directory, v=value: save_variables(directory, _variables(v), {"arch": "resnet18"}))
        assert (run / "best").is_symlink() and not os.path.isabs(os.readlink(run / "best"))
        variables, meta = load_variables(run / "best")
        assert float(variables["params"]["fc"]["kernel"][0, 0]) == value and meta["arch"] == "resnet18"
    assert sorted(p.name for p in run.iterdir()) == ["best", "best.2"]

    def crash(directory):
        save_variables(directory, _variables(3.0), {"arch": "resnet18"})
        raise KeyboardInterrupt  # killed before the link moved

    with pytest.raises(KeyboardInterrupt):
        replace_best(run, crash)
    assert float(load_variables(run / "best")[0]["params"]["fc"]["kernel"][0, 0]) == 2.0
    replace_best(run, lambda directory: save_variables(directory, _variables(4.0), {"arch": "resnet18"}))
    assert sorted(p.name for p in run.iterdir()) == ["best", "best.3"]  # the crash's staging is gone


def _fake_run(path, **extra_files) -> None:
    (path / "checkpoints").mkdir(parents=True)
    write_json(path / "config.json", {"arch": "resnet18", "strategy": "full", "data": "digits:5-9", "epochs": 1})
    (path / "metrics.jsonl").write_text("")
    for name, text in extra_files.items():
        (path / name).write_text(text)


def test_overwrite_empties_only_a_jaxft_run_directory(tmp_path):
    project = tmp_path / "project"  # a user's folder: its own config.json, notes and code
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"name": "my project", "epochs": 3}))
    (project / "notes.md").write_text("precious")
    (project / "checkpoints").mkdir()
    run_like = tmp_path / "run_like"  # a real run's files, plus one of the user's
    _fake_run(run_like, **{"keep.txt": "precious"})
    run = tmp_path / "run"
    _fake_run(run)
    (run / "best.3").mkdir()

    assert not is_run_dir(project) and not is_run_dir(run_like) and is_run_dir(run)
    with pytest.raises(RunError, match=r"refuses to empty .*project: it holds files jaxft did not write \(notes.md\)"):
        prepare_run_dir(project, overwrite=True)
    with pytest.raises(RunError, match=r"refuses to empty .*run_like: .*\(keep.txt\)"):
        prepare_run_dir(run_like, overwrite=True)
    assert (project / "notes.md").read_text() == "precious" and (run_like / "keep.txt").read_text() == "precious"
    assert json.loads((project / "config.json").read_text())["name"] == "my project"
    (project / "notes.md").unlink()  # only a config.json that is not a jaxft config, and an empty folder
    with pytest.raises(RunError, match="not a jaxft run directory"):
        prepare_run_dir(project, overwrite=True)
    with pytest.raises(RunError, match="already holds files; pass --overwrite"):
        prepare_run_dir(run, overwrite=False)
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["plots"]


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    """--keep N: the latest N saves stay, and the best by validation accuracy beside them."""
    from jaxft.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=2)
    accuracies = {10: 0.5, 20: 0.9, 30: 0.7, 40: None, 50: 0.6}  # None: a mid-epoch save
    for step, accuracy in accuracies.items():
        ckpts.save(step, {"w": np.full(3, step, np.float32)}, {"global_step": step}, accuracy)
    assert ckpts.all_steps() == [20, 40, 50]
    state, progress = ckpts.restore(20, {"w": np.zeros(3, np.float32)})
    assert float(state["w"][0]) == 20 and progress == {"global_step": 20}
    ckpts.close()


def test_an_asynchronous_save_writes_the_state_it_was_given_though_the_next_steps_donate_it(tmp_path):
    """The train loop saves asynchronously, then appends to its history and runs steps that
    donate the state's buffers (their results written over them where XLA can): each checkpoint
    still holds the progress and the state of its save, bit for bit, not the later ones."""
    import jax
    import jax.numpy as jnp

    from jaxft.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(tmp_path / "checkpoints")
    assert ckpts.asynchronous
    small = {"b": np.arange(7, dtype=np.float32)}
    progress = {"global_step": 1, "history": [{"epoch": 1, "val_accuracy": 0.5}]}
    ckpts.save(1, small, progress)
    progress["history"].append({"epoch": 2, "val_accuracy": 0.75})  # the loop's next record, at once
    rng = np.random.default_rng(0)
    saved = {"w": rng.standard_normal((4, 2_000_000), dtype=np.float32), "b": rng.standard_normal(7, dtype=np.float32)}
    state = jax.tree.map(jnp.asarray, saved)
    ckpts.save(2, state, {"global_step": 2})
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 3.0 + 1.0, s), donate_argnums=0)
    for _ in range(3):
        state = step(state)
    assert ckpts.progress(1) == {"global_step": 1, "history": [{"epoch": 1, "val_accuracy": 0.5}]}
    restored, restored_progress = ckpts.restore(2, saved)
    assert restored_progress == {"global_step": 2}
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value)
    ckpts.close()


@pytest.mark.parametrize("fmt", ["orbax", "msgpack", "safetensors"])
def test_variables_that_cannot_be_written_are_a_clear_error(tmp_path, fmt):
    """best/ and exported variables on a full disk (a file size limit here): a CheckpointError
    naming the path and the OS error, not the writer's own exception."""
    import resource

    from jaxft.checkpoint import CheckpointError

    variables = {"params": {"w": np.random.default_rng(0).standard_normal(2_000_000, dtype=np.float32)}}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MB: the 8 MB array cannot be written
    try:
        with pytest.raises(CheckpointError, match=r"best\.1\.tmp.* could not be written: .*(File too large|Errno 27)"):
            save_variables(tmp_path / "best.1.tmp", variables, {"arch": "resnet18"}, fmt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_damaged_run_config_is_a_clear_error(tmp_path):
    from jaxft.rundir import read_run_config

    (tmp_path / "config.json").write_text('{"arch": "resnet18",')  # edited by hand and cut short
    with pytest.raises(RunError, match=r"config.json cannot be read as JSON .*edited or damaged"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="must hold a mapping of settings, not list"):
        read_run_config(tmp_path)


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    """A checkpoint whose tree does not fit the state (an older jaxft's optimizer state, say)."""
    from jaxft.checkpoint import CheckpointError, RunCheckpoints

    ckpts = RunCheckpoints(tmp_path / "checkpoints")
    ckpts.save(5, {"w": np.zeros(3, np.float32)}, {"global_step": 5})
    with pytest.raises(CheckpointError, match=r"checkpoint at step 5 in .*checkpoints does not fit this run's "
                                              r"training state"):
        ckpts.restore(5, {"w": np.zeros(3, np.float32), "opt": (np.zeros(2, np.float32),)})
    ckpts.close()
