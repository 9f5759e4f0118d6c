"""Multi-host runs on JAX's distributed runtime: joining the cluster, and what processes agree on.

A multi-host job is several copies of the same command, one process per host (each with all
of its local devices), started by the cluster: ``srun``, ``mpirun``, a Kubernetes indexed Job,
or by hand. :func:`join_cluster` reads the cluster's environment and calls
``jax.distributed.initialize`` only when it names more than one process (a one-task SLURM job
or a shell inside an allocation is a single-host run). Then every process runs the same
program on the same data order: each loads its own rows of every global batch
(:func:`batch_share`), the compiled steps run over the devices of all processes, and process
0 alone writes the run directory (:func:`is_writer`). A decision that could differ between
processes (a Ctrl-C on one host, a feature cache present on one disk) is agreed first
(:func:`any_process`, :func:`largest_of_processes`), so that all of them take the same branch and meet at the same
collectives.

When a process dies, the others learn of it at their next collective (Gloo closes the
connection at once) or from the coordinator's heartbeat (``JAXFT_HEARTBEAT_TIMEOUT`` seconds),
and stop; :func:`lost_peer` recognises the error so that the command can say so in one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

from jaxft.data.pipeline import BatchShare

# Seconds, each overridable by the environment variable of the same name.
TIMEOUTS = {
    "JAXFT_INIT_TIMEOUT": 300,  # every process must have joined within this
    "JAXFT_HEARTBEAT_TIMEOUT": 60,  # a process silent this long is taken for dead, and the job stops
    "JAXFT_SHUTDOWN_TIMEOUT": 60,  # how long a finished process waits for the others at exit
}


class DistributedError(RuntimeError):
    """The cluster environment names a multi-host run that cannot be started as given."""


@dataclass(frozen=True)
class Cluster:
    """What the environment says about this job: ``coordinator`` None lets JAX find it
    (SLURM's first node, Open MPI's launcher, a Cloud TPU's metadata)."""

    num_processes: int
    process_id: int
    coordinator: Optional[str]
    source: str  # the variables it came from, for messages


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedError(f"{name}={environ[name]!r} is not a whole number") from None


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> Optional[Cluster]:
    """The job this process belongs to, or None when the environment names no launcher.

    * ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (or a Kubernetes indexed Job's
      ``JOB_COMPLETION_INDEX``) with ``JAX_COORDINATOR_ADDRESS``: a manual start;
    * SLURM: the tasks of the ``srun`` step (``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``),
      not the allocation's ``SLURM_NTASKS``: a batch script or a shell inside an allocation
      is one process;
    * Open MPI: ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_RANK`` under ``mpirun``;
    * Cloud TPU: ``TPU_WORKER_HOSTNAMES``, one process per host.
    """
    if "JAX_NUM_PROCESSES" in environ or "JAX_COORDINATOR_ADDRESS" in environ:
        missing = [name for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES") if not environ.get(name)]
        id_name = "JAX_PROCESS_ID" if "JAX_PROCESS_ID" in environ else "JOB_COMPLETION_INDEX"
        if id_name not in environ:
            missing.append("JAX_PROCESS_ID")
        if missing:
            raise DistributedError(
                f"a manual multi-host start needs JAX_COORDINATOR_ADDRESS (host:port of process 0), "
                f"JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 .. N-1) on every process; {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set")
        return Cluster(_int(environ, "JAX_NUM_PROCESSES"), _int(environ, id_name), environ["JAX_COORDINATOR_ADDRESS"],
                       f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, {id_name}")
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        return Cluster(_int(environ, "SLURM_STEP_NUM_TASKS"), _int(environ, "SLURM_PROCID"), None,
                       "SLURM_STEP_NUM_TASKS, SLURM_PROCID")
    if "OMPI_COMM_WORLD_SIZE" in environ and "OMPI_COMM_WORLD_RANK" in environ:
        return Cluster(_int(environ, "OMPI_COMM_WORLD_SIZE"), _int(environ, "OMPI_COMM_WORLD_RANK"), None,
                       "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK")
    if environ.get("TPU_WORKER_HOSTNAMES") and "TPU_WORKER_ID" in environ:
        hosts = [h for h in environ["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]
        return Cluster(len(hosts), _int(environ, "TPU_WORKER_ID"), None, "TPU_WORKER_HOSTNAMES, TPU_WORKER_ID")
    return None


def timeouts(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    return {name: _int(environ, name) if name in environ else default for name, default in TIMEOUTS.items()}


def join_cluster(distributed: Optional[bool] = None, environ: Mapping[str, str] = os.environ,
                 announce: Callable[[str], None] = lambda line: None) -> bool:
    """Join the multi-host job the environment names, before anything touches a device.

    ``distributed``: None joins when the environment names more than one process; True joins
    whatever it names (and lets JAX detect a cluster it alone knows, such as a Cloud TPU pod),
    failing when there is none; False never joins. ``announce`` gets one line saying what is
    being joined: it comes before JAX waits for the other processes, and before JAX's own
    message if one never comes (JAX ends the process then). Returns whether this is a
    multi-host run."""
    if distributed is False:
        return False
    cluster = cluster_from_env(environ)
    if cluster is not None and not 0 <= cluster.process_id < cluster.num_processes:
        raise DistributedError(f"{cluster.source}: process id {cluster.process_id} is not in 0 .. "
                               f"{cluster.num_processes - 1}")
    if not distributed and (cluster is None or cluster.num_processes < 2):
        return False
    import jax

    limits = timeouts(environ)
    if cluster is None:
        announce("joining a multi-host job that JAX detects (--distributed)")
    else:
        announce(f"joining a multi-host job as process {cluster.process_id} of {cluster.num_processes} "
                 f"({cluster.source}), coordinator {cluster.coordinator or 'found by JAX'}; every process "
                 f"must join within JAXFT_INIT_TIMEOUT ({limits['JAXFT_INIT_TIMEOUT']} s)")
    known = {} if cluster is None else {"num_processes": cluster.num_processes, "process_id": cluster.process_id,
                                        "coordinator_address": cluster.coordinator}
    try:
        jax.distributed.initialize(**known, initialization_timeout=limits["JAXFT_INIT_TIMEOUT"],
                                   heartbeat_timeout_seconds=limits["JAXFT_HEARTBEAT_TIMEOUT"],
                                   shutdown_timeout_seconds=limits["JAXFT_SHUTDOWN_TIMEOUT"])
    except (ValueError, RuntimeError) as exc:
        where = cluster.source if cluster else "the environment (no launcher variables found)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"could not join the multi-host job described by {where}: {first}. Every process must be started "
            f"within JAXFT_INIT_TIMEOUT ({limits['JAXFT_INIT_TIMEOUT']} s) and reach process 0's coordinator; "
            f"see docs/distributed.md") from None
    return True


def is_multihost() -> bool:
    import jax

    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run directory, logs and progress bars: process 0."""
    import jax

    return jax.process_index() == 0


def batch_share(mesh) -> BatchShare:
    """The rows of every global batch this process loads for ``mesh`` (a 1-D mesh whose
    devices are grouped by process, as ``engine.data_mesh`` orders them)."""
    import jax

    owners = [d.process_index for d in mesh.devices.flat]
    processes = list(dict.fromkeys(owners))  # in mesh order
    per_process = len(owners) // len(processes)
    grouped = [p for p in processes for _ in range(per_process)]
    if owners != grouped:
        raise DistributedError(f"the data mesh must give every process the same number of devices, in one block "
                               f"each; its devices belong to processes {owners}")
    return BatchShare(len(owners), processes.index(jax.process_index()), len(processes))


def largest_of_processes(value: int) -> int:
    """The largest of every process's ``value`` (every process must call this at the same point)."""
    if not is_multihost():
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call this at the same point)."""
    return bool(largest_of_processes(int(flag)))


def from_writer(text: str) -> str:
    """Process 0's ``text`` on every process (every process must call this at the same point)."""
    if not is_multihost():
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buffer = np.zeros(size, np.uint8)
    buffer[:min(size, len(data))] = data[:size]
    return bytes(multihost_utils.broadcast_one_to_all(buffer)).decode()


_LOST_PEER = re.compile(r"gloo|connection (closed|reset)|coordination service|heartbeat|unhealthy|barrier",
                        re.IGNORECASE)


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` means that another process of this job stopped or died: a collective
    lost its connection, or the coordinator reported the job broken."""
    return is_multihost() and not isinstance(exc, DistributedError) and bool(_LOST_PEER.search(str(exc)))


def exit_now(code: int) -> None:
    """Leave at once, with worker processes: a process of a multi-host job that stopped alone must
    not wait at JAX's exit barrier for the others (they would wait in a collective for it)."""
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
