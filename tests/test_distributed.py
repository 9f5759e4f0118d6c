"""Multi-host training on JAX's distributed runtime, with real processes on this machine.

Two processes with one CPU device each (a coordinator on 127.0.0.1, Gloo collectives) train
as one process with two devices does, and as one process with one device does up to float32
reduction order. Each process decodes only its rows of every batch (tests/count_decodes.py
counts the decodes), a SIGKILL of one process stops the other with a clear message, and both
relaunched with --resume finish as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clitools import assert_same_result, cli, logged_steps, saved_steps
from jaxft.data.pipeline import BatchShare, train_loader
from jaxft.distributed import Cluster, DistributedError, cluster_from_env, join_cluster

COUNT_DECODES = Path(__file__).with_name("count_decodes.py")
TRAIN_SIZE, BATCH = 150, 15  # 10 steps per epoch; a batch of 15 does not divide over 2 devices
VAL_PER_CLASS = {5: 16, 6: 16, 7: 15, 8: 15, 9: 15}  # 77: batches of 64 and 13, the last uneven too
ARGS = ("--image-size", 32, "--epochs", 2, "--batch-size", BATCH, "--lr", 1e-4, "--workers", 0, "--quiet",
        "--log-every", 1)
HEARTBEAT = 20  # JAXFT_HEARTBEAT_TIMEOUT in these tests: the longest a survivor may take to notice


# --- the cluster environment (no processes started) -----------------------------------------------

def test_the_environment_names_a_job_only_when_a_launcher_started_several_processes():
    manual = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert cluster_from_env(manual) == Cluster(4, 2, "10.0.0.1:1234", "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                                                      "JAX_PROCESS_ID")
    indexed_job = {**manual, "JOB_COMPLETION_INDEX": "3"}
    del indexed_job["JAX_PROCESS_ID"]
    assert cluster_from_env(indexed_job).process_id == 3  # a Kubernetes indexed Job's own index
    srun = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_ID": "77"}
    assert cluster_from_env(srun) == Cluster(8, 5, None, "SLURM_STEP_NUM_TASKS, SLURM_PROCID")
    mpirun = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert cluster_from_env(mpirun) == Cluster(2, 1, None, "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK")
    tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "0"}
    assert cluster_from_env(tpu).num_processes == 4
    # a batch script or a shell inside an allocation: the allocation's task count is no job
    assert cluster_from_env({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0"}) is None
    assert cluster_from_env({}) is None
    # one process named: a single-host run, nothing to join
    assert join_cluster(None, {**srun, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is False
    assert join_cluster(False, manual) is False


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not set"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not a whole number"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 is not in 0 .. 1"),
])
def test_an_incomplete_manual_start_is_one_line_naming_what_to_set(environ, message, env, tmp_path):
    with pytest.raises(DistributedError, match=message):
        join_cluster(None, environ)
    # the command says it before anything is written: no traceback, no run directory
    out = tmp_path / "run"
    result = cli("jaxft.train", "--data", "digits", "--out", out, env={**env, **environ}, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_process_blocks_of_every_batch_make_up_the_batch_one_process_loads(digits_5_9_split):
    """The rows each process loads, put side by side, are the padded batch of one process:
    the same samples, the same augmentation, the same masks, in every epoch."""
    from jaxft.data.transforms import transforms_for, unnormalized
    from jaxft.weights import Preprocessing

    augment, _ = transforms_for(Preprocessing(), 32, True)
    augment = unnormalized(augment)
    for devices, processes in ((2, 2), (4, 2), (6, 3)):
        def loader(share):
            return train_loader(digits_5_9_split, augment, BATCH, seed=3, num_epochs=2, drop_remainder=False,
                                share=share)

        whole = loader(BatchShare(devices))
        blocks = [loader(BatchShare(devices, index, processes)) for index in range(processes)]
        last = len(digits_5_9_split) % BATCH  # 717 samples: 47 batches of 15 and one of 12
        for k in range(len(whole)):
            expected = whole.dataset[k]
            got = [b.dataset[k] for b in blocks]
            assert len({len(g["label"]) for g in got}) == 1, "every process must pass the same shape"
            joined = {key: np.concatenate([g[key] for g in got]) for key in expected}
            assert np.array_equal(joined["mask"], expected["mask"]), (devices, k)
            real = expected["mask"] > 0  # padding rows copy a sample of their own block: masked, never read
            for key in ("image", "label"):
                assert np.array_equal(joined[key][real], expected[key][real]), (devices, k, key)
            size = last if k % whole.steps_per_epoch == whole.steps_per_epoch - 1 else BATCH
            assert len(expected["label"]) == -(-size // devices) * devices and real.sum() == size


@pytest.fixture(scope="module")
def digits_5_9_split():
    from jaxft.data.sources import open_dataset

    return open_dataset("digits:5-9").train


# --- real processes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """Real 8x8 digit scans from scikit-learn as PNG files: train/ (30 per class) and val/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits_folder")
    for label, val_count in VAL_PER_CLASS.items():
        indices = np.flatnonzero(digits.target == label)
        for split, chosen in (("train", indices[:30]), ("val", indices[30:30 + val_count])):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in chosen:
                Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def base_env(source_checkpoint, jaxft_cache, tmp_path_factory) -> dict:
    return {**os.environ, "JAXFT_CACHE": str(jaxft_cache), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "TORCH_HOME": str(tmp_path_factory.mktemp("torch_home")), "JAXFT_HEARTBEAT_TIMEOUT": str(HEARTBEAT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_cache(base_env: dict, folder: Path) -> dict:
    """A cache of its own (features computed afresh, so their decodes count), sharing the test
    run's source checkpoint and compiled steps."""
    shared = Path(base_env["JAXFT_CACHE"])
    folder.mkdir(parents=True)
    for name in ("sources", "xla"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(shared / name)
    return {**base_env, "JAXFT_CACHE": str(folder)}


def start(processes: int, devices: int, args, env: dict, decodes: Path) -> list[subprocess.Popen]:
    """``processes`` copies of the command, each with ``devices`` CPU devices, joined as one job as a
    cluster would start them (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each
    process's decodes go to ``decodes.<process>``, its output to ``decodes.<process>.out``/``.err``."""
    cluster = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": str(processes)}
    procs = []
    for process in range(processes):
        job = {**cluster, "JAX_PROCESS_ID": str(process)} if processes > 1 else {}
        with open(f"{decodes}.{process}.out", "w") as out, open(f"{decodes}.{process}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(COUNT_DECODES), str(decodes), *map(str, args)],
                                          env={**env, **job, "JAX_NUM_CPU_DEVICES": str(devices)},
                                          stdout=out, stderr=err))
        procs[-1].output = Path(f"{decodes}.{process}")
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process, once it ended."""
    return [(p.wait(timeout=timeout), Path(f"{p.output}.err").read_text()) for p in procs]


def train_as(processes: int, devices: int, args, env: dict, out: Path) -> Path:
    decodes = out.with_name(f"{out.name}.decodes")
    for code, stderr in finish(start(processes, devices, [*args, "--out", out], env, decodes)):
        assert code == 0, stderr[-3000:]
    return out


def epochs(run: Path) -> list[dict]:
    """The epoch records of metrics.jsonl, without their wall-clock times."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "epoch_seconds")} for r in records
            if r.get("event") == "epoch"]


def final_params(run: Path) -> dict:
    """The latest checkpoint's parameters as numpy arrays, whatever devices saved them."""
    import jax
    import orbax.checkpoint as ocp
    from flax import traverse_util

    path = (run / "checkpoints" / str(saved_steps(run)[-1]) / "state").resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        like = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), tree)
        state = checkpointer.restore(path, like)
    return traverse_util.flatten_dict(state["params"], sep="/")


def decode_log(run: Path) -> dict[int, list[str]]:
    """The images each process decoded: {process index: paths, in order}."""
    logs = [p for p in run.parent.glob(f"{run.name}.decodes.*") if p.suffix[1:].isdigit()]
    return {int(p.suffix[1:]): p.read_text().splitlines() for p in logs}


@pytest.fixture(scope="module")
def runs(digits_folder, base_env, tmp_path_factory) -> dict[str, Path]:
    """One training per (strategy, processes x devices), as the tests compare them."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for strategy in ("full", "head"):
        # head: augmentation off, so the backbone's features are computed once (the feature cache)
        augment = ["--no-augment"] if strategy == "head" else []
        args = ["--data", digits_folder, "--strategy", strategy, *ARGS, *augment]
        for processes, devices in ((2, 1), (1, 2), (1, 1)):
            name = f"{strategy}-{processes}x{devices}"
            done[name] = train_as(processes, devices, args, _own_cache(base_env, root / f"{name}.cache"), root / name)
    return done


def _relative_l2(a: dict, b: dict) -> float:
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    return (num / sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in a)) ** 0.5


@pytest.mark.parametrize("strategy", ["full", "head"])
def test_two_processes_train_as_one_process_with_two_devices_and_as_one_device(runs, strategy):
    two_processes, two_devices, one_device = (runs[f"{strategy}-{shape}"] for shape in ("2x1", "1x2", "1x1"))
    summary = json.loads((two_processes / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 2)
    if strategy == "head":
        assert summary["feature_cache"]["used"], summary["feature_cache"]
    assert summary["val"]["samples"] == sum(VAL_PER_CLASS.values())  # every sample once, none twice
    # process 0 alone prints the log (process 1's output is Gloo's own connection line)
    printed = [Path(f"{two_processes}.decodes.{process}.out").read_text() for process in (0, 1)]
    assert "run directory:" in printed[0] and "epoch 2/2:" in printed[0] and "done:" in printed[0]
    assert not any(word in printed[1] for word in ("run directory", "epoch", "done")), printed[1]

    # The same compiled program over the same two device blocks, and an all-reduce of two terms
    # (the same in either order): 2 processes x 1 device are 1 process x 2 devices, bit for bit.
    assert epochs(two_processes) == epochs(two_devices)
    params = final_params(two_processes)
    assert all(np.array_equal(params[k], v) for k, v in final_params(two_devices).items())
    assert json.loads((two_devices / "summary.json").read_text())["val"]["confusion_matrix"] == \
        summary["val"]["confusion_matrix"]

    # One device sums the batch in another order: float32 reduction noise, which 20 Adam steps
    # carry into the parameters. The noise is heavy-tailed over seeds: `full`, seeds 0-9, two
    # builds of the tiny-map patches (docs/benchmarks.md, "the tiny-map patches, again"): 17 of
    # 20 draws <= 5.4e-6 in the losses and <= 3.7e-6 in the parameters, three 1.0-2.5e-4 and
    # 4-10e-5. The bounds are 4-5x the worst draw. A padding row counted as a sample (the mask's
    # padding set to 1, seeds 0 and 1) moved the losses 3.8-5.8e-2 and the parameters 2.5-2.8e-3.
    for got, expected in zip(epochs(two_processes), epochs(one_device), strict=True):
        for key in ("train_loss", "val_loss"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-3), (got["epoch"], key)
        for key, samples in (("train_accuracy", TRAIN_SIZE), ("val_accuracy", sum(VAL_PER_CLASS.values()))):
            if key in expected:  # a prediction at a near tie may flip: at most one sample
                assert abs(got[key] - expected[key]) <= 1 / samples + 1e-12, (got["epoch"], key)
    assert _relative_l2(params, final_params(one_device)) < 5e-4


@pytest.mark.parametrize("strategy", ["full", "head"])
def test_each_process_decodes_only_its_rows_of_every_batch(runs, strategy):
    per_process = decode_log(runs[f"{strategy}-2x1"])
    single = decode_log(runs[f"{strategy}-1x1"])[0]
    assert sorted(per_process) == [0, 1]
    # together the two processes decode exactly what one process decodes, each about half
    assert Counter(per_process[0]) + Counter(per_process[1]) == Counter(single)
    for paths in per_process.values():
        assert 0.45 * len(single) <= len(paths) <= 0.55 * len(single), (len(paths), len(single))
    # one process with two devices still decodes everything once
    assert Counter(decode_log(runs[f"{strategy}-1x2"])[0]) == Counter(single)
    if strategy == "head":  # features once: every image of train and val decoded exactly once
        assert Counter(single) == Counter({path: 1 for path in set(single)})
        assert len(single) == TRAIN_SIZE + sum(VAL_PER_CLASS.values())


STEPS_PER_EPOCH = TRAIN_SIZE // BATCH


def start_into_the_second_epoch(digits_folder: Path, base_env: dict,
                                tmp_path: Path) -> tuple[Path, dict, list[subprocess.Popen]]:
    """Two processes training `full` into ``tmp_path/run`` with a cache of their own: (the run,
    their environment, the processes), once they are a few steps past the first epoch's checkpoint."""
    run = tmp_path / "run"
    env = _own_cache(base_env, tmp_path / "cache")
    procs = start(2, 1, ["--data", digits_folder, "--strategy", "full", *ARGS, "--out", run], env,
                  run.with_name("decodes"))
    deadline = time.time() + 300
    while not any(step > STEPS_PER_EPOCH + 2 for step in logged_steps(run)):
        assert all(p.poll() is None for p in procs), finish(procs)
        assert time.time() < deadline, "the moment to interrupt never came"
        time.sleep(0.01)
    return run, env, procs


def resume_both_and_compare(run: Path, env: dict, stopped_at: int, expected: Path) -> None:
    """Relaunch both processes with --resume: they continue from ``stopped_at`` once and end as
    the uninterrupted run ``expected``, bit for bit."""
    for code, stderr in finish(start(2, 1, ["--resume", run, "--quiet"], env, run.with_name("resumed"))):
        assert code == 0, stderr[-3000:]
    resumes = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [stopped_at]
    assert_same_result(json.loads((run / "summary.json").read_text()),
                       json.loads((expected / "summary.json").read_text()))
    assert all(np.array_equal(final_params(run)[k], v) for k, v in final_params(expected).items())


def test_sigkill_of_one_process_stops_the_other_and_both_resume_to_the_uninterrupted_result(
        runs, digits_folder, base_env, tmp_path):
    run, env, procs = start_into_the_second_epoch(digits_folder, base_env, tmp_path)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor_code, survivor_err = finish(procs[:1], timeout=HEARTBEAT + 60)[0]
    waited = time.time() - killed_at
    assert procs[1].wait() == -signal.SIGKILL
    assert survivor_code == 4, survivor_err[-3000:]
    assert waited < HEARTBEAT, waited  # at its next collective, not after the heartbeat timeout
    assert "process 0 of 2: lost contact with the other processes of this job" in survivor_err
    assert f"--resume {run}" in survivor_err and "Traceback" not in survivor_err
    assert not (run / "summary.json").exists() and saved_steps(run)[-1] == STEPS_PER_EPOCH
    resume_both_and_compare(run, env, STEPS_PER_EPOCH, runs["full-2x1"])


def test_sigterm_on_one_process_stops_both_at_the_same_step_and_both_resume_to_the_uninterrupted_result(
        runs, digits_folder, base_env, tmp_path):
    run, env, procs = start_into_the_second_epoch(digits_folder, base_env, tmp_path)
    # what a scheduler sends before it kills; here to process 1 alone: process 0 learns of it at
    # the next step the two collect, and both checkpoint that step
    procs[1].send_signal(signal.SIGTERM)
    (code0, err0), (code1, err1) = finish(procs, timeout=120)
    assert (code0, code1) == (128 + signal.SIGTERM, 128 + signal.SIGTERM), (err0[-2000:], err1[-2000:])
    for process, err in enumerate((err0, err1)):
        assert f"process {process} of 2: interrupted: SIGTERM received, checkpoint saved" in err, err[-2000:]
    stopped = saved_steps(run)[-1]
    assert STEPS_PER_EPOCH + 2 < stopped < 2 * STEPS_PER_EPOCH and not (run / "summary.json").exists()
    resume_both_and_compare(run, env, stopped, runs["full-2x1"])


def test_a_process_that_fails_alone_leaves_at_once_and_the_other_follows(digits_folder, base_env, tmp_path):
    """Process 1 cannot read the data (a host without the dataset): it reports why and leaves
    without waiting at JAX's exit barrier, and process 0 stops at its next collective."""
    run = tmp_path / "run"
    env = _own_cache(base_env, tmp_path / "cache")
    cluster = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = []
    for process, data in ((0, digits_folder), (1, tmp_path / "not_mounted_here")):
        with open(tmp_path / f"{process}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "jaxft.train", "--data", data, *map(str, ARGS),
                                           "--out", run], env={**env, **cluster, "JAX_PROCESS_ID": str(process)},
                                          stdout=subprocess.DEVNULL, stderr=err))
    started = time.time()
    codes = [p.wait(timeout=HEARTBEAT + 120) for p in procs]
    errors = [(tmp_path / f"{process}.err").read_text() for process in (0, 1)]
    assert codes == [4, 2], errors
    assert "process 1 of 2: dataset folder" in errors[1] and "does not exist" in errors[1]
    assert "process 0 of 2: lost contact with the other processes of this job" in errors[0]
    assert "Traceback" not in errors[0] + errors[1]
    assert time.time() - started < 120  # no exit barrier (JAXFT_SHUTDOWN_TIMEOUT) or heartbeat waited out


def test_a_job_that_never_forms_says_what_it_waited_for_and_writes_nothing(env, tmp_path):
    """Process 0 of 2 started alone: jaxft says what it is joining and for how long, then JAX
    ends the process with its own message once JAXFT_INIT_TIMEOUT has passed."""
    out = tmp_path / "run"
    job = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
           "JAXFT_INIT_TIMEOUT": "3"}
    result = cli("jaxft.train", "--data", "digits", "--out", out, env={**env, **job}, timeout=120)
    assert result.returncode == -signal.SIGABRT, result.stderr[-2000:]
    assert "joining a multi-host job as process 0 of 2" in result.stderr
    assert "every process must join within JAXFT_INIT_TIMEOUT (3 s)" in result.stderr
    assert "RegisterTask" in result.stderr  # JAX's DEADLINE_EXCEEDED for the missing process
    assert not out.exists()
