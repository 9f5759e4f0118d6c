"""Saving and loading Flax variables with their metadata.

Three formats: an orbax checkpoint directory (the default, what JAX tooling expects),
a single msgpack file (``flax.serialization``) and a safetensors file with Flax paths as
keys (``params/layer1_0/conv1/kernel``). Each carries a small JSON header naming the arch,
the class count, the class names and the preprocessing, so a file is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization, traverse_util

FORMAT_TAG = "jaxft-variables"
FORMATS = ("orbax", "msgpack", "safetensors")


class CheckpointError(ValueError):
    """A file or directory that is not a readable jaxft variables checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or variables file that could not be written (a full disk, say); what was
    written before it is kept."""


def _first_line(exc: BaseException, limit: int) -> str:
    """An exception's first line, at most ``limit`` characters (its type's name when it has no text)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def format_for(path: Path, requested: str | None = None) -> str:
    if requested:
        return requested
    if path.suffix == ".msgpack":
        return "msgpack"
    if path.suffix == ".safetensors":
        return "safetensors"
    return "orbax"


def _this_process_checkpointer():
    """An orbax checkpointer that involves this process alone. ``best/`` and exported variables
    are written by one process of a multi-host job (the writer) and read by each on its own;
    orbax's default would wait at a barrier for every process."""
    import orbax.checkpoint as ocp

    process = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=process, active_processes={process},
                                               barrier_sync_key_prefix=f"process{process}")
    handler = ocp.CompositeCheckpointHandler(composite_options=ocp.CompositeOptions(multiprocessing_options=alone))
    return ocp.Checkpointer(handler, multiprocessing_options=alone)


def _to_numpy(variables: Mapping[str, Any]) -> dict[str, Any]:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(variables))


def save_variables(path: str | Path, variables: Mapping[str, Any], meta: Mapping[str, Any],
                   fmt: str | None = None) -> Path:
    """Write ``variables`` and ``meta`` to ``path`` in ``fmt`` (guessed from the suffix)."""
    path = Path(path).resolve()
    fmt = format_for(path, fmt)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    header = {"format": FORMAT_TAG, "version": 1, **meta}
    try:
        if fmt == "msgpack":
            path.write_bytes(serialization.msgpack_serialize({"meta": json.dumps(header),
                                                              "variables": _to_numpy(variables)}))
        elif fmt == "safetensors":
            from safetensors import SafetensorError
            from safetensors.numpy import save_file

            flat = traverse_util.flatten_dict(_to_numpy(variables), sep="/")
            try:
                save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path),
                          metadata={"jaxft": json.dumps(header)})
            except SafetensorError as exc:  # its I/O errors are its own type
                raise OSError(str(exc)) from exc
        else:
            import orbax.checkpoint as ocp

            with _this_process_checkpointer() as ckptr:
                ckptr.save(path, ocp.args.Composite(variables=ocp.args.StandardSave(_to_numpy(variables)),
                                                    meta=ocp.args.JsonSave(header)))
    except (OSError, ValueError) as exc:  # a full disk, a file size limit (orbax reports these as ValueError)
        raise CheckpointWriteError(f"{path} could not be written: {_first_line(exc, 1000)}") from exc
    return path


ORBAX_VARIABLES_ENTRIES = frozenset({"variables", "meta", "_CHECKPOINT_METADATA", "commit_success.txt"})


def is_variables_dir(path: Path) -> bool:
    """A directory :func:`save_variables` wrote in orbax format, and nothing else besides."""
    path = Path(path)
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return {"variables", "meta"} <= names <= ORBAX_VARIABLES_ENTRIES


def _check_header(header: Any, path: Path) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a jaxft variables checkpoint (no '{FORMAT_TAG}' header)")
    return header


def load_variables(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, meta)`` from a file or directory written by :func:`save_variables`."""
    path = Path(path).resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    fmt = format_for(path) if path.is_file() else "orbax"
    try:
        if fmt == "msgpack":
            payload = serialization.msgpack_restore(path.read_bytes())
            return payload["variables"], _check_header(json.loads(payload["meta"]), path)
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                header = _check_header(json.loads((f.metadata() or {}).get("jaxft", "null")), path)
                flat = {k: f.get_tensor(k) for k in f.keys()}
            return traverse_util.unflatten_dict(flat, sep="/"), header
        import orbax.checkpoint as ocp

        if not (path / "variables").is_dir() or not (path / "meta").exists():
            raise CheckpointError(f"{path} is not a jaxft orbax checkpoint (expected 'variables' and 'meta' inside)")
        with _this_process_checkpointer() as ckptr:
            restored = ckptr.restore(path, ocp.args.Composite(variables=ocp.args.StandardRestore(),
                                                              meta=ocp.args.JsonRestore()))
        return dict(restored["variables"]), _check_header(restored["meta"], path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        raise CheckpointError(f"{path} could not be read as a jaxft {fmt} checkpoint: {exc}") from exc


class RunCheckpoints:
    """A training run's orbax ``CheckpointManager``: the TrainState plus a JSON ``progress``
    item (epoch, position in the epoch, running metrics, data iterator state).

    Keeps the latest ``keep`` checkpoints and, beside them, the best one by validation
    accuracy. Saves are atomic (orbax writes a temporary directory and renames it), so a
    process killed mid-save leaves the previous checkpoints readable; leftover temporary
    directories are removed when the manager opens. In a single-process run they are
    asynchronous: ``save`` returns once the state is held on the host, and the files are
    written while training goes on (a save waits for the one before it; reads and ``close``
    wait for every save). In a multi-host job every process opens, saves, restores and closes
    it together, as orbax requires, and saves are synchronous; process 0 writes the replicated
    state and the progress.
    """

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1, keep_checkpoints_without_metrics=False),
        ])
        # Asynchronous in one process: an epoch's save costs its host copy, not its writes (0.5 s
        # of resnet18's `full` state on two CPU cores, several seconds for vgg16's; measured in
        # docs/benchmarks.md). Not across processes, where each save would add orbax's barriers.
        self.asynchronous = jax.process_count() == 1
        options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                               enable_async_checkpointing=self.asynchronous,
                                               cleanup_tmp_directories=not read_only, read_only=read_only,
                                               create=not read_only)
        self._ocp = ocp
        # Uncompressed: zstd took a quarter of a save's CPU time and kept 8% of the bytes of
        # float32 weights and moments (docs/benchmarks.md); the format reads either way.
        state_handler = ocp.PyTreeCheckpointHandler(use_compression=False)
        self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options,
                                             item_names=("state", "progress"),
                                             item_handlers={"state": state_handler,
                                                            "progress": ocp.JsonCheckpointHandler()})
        self._writing: int | None = None  # the step whose files may still be being written

    def _finish_writes(self) -> None:
        """Wait for the save in flight. A write that failed in the background (a full disk, a
        file size limit) becomes a CheckpointWriteError that names the step and the folder."""
        try:
            self.manager.wait_until_finished()
        except Exception as exc:  # noqa: BLE001 - whatever the writer raised, the save is lost
            step, self._writing = self._writing, None
            raise CheckpointWriteError(f"the checkpoint of step {step} could not be written into "
                                       f"{self.manager.directory}: {_first_line(exc, 1000)}") from exc
        self._writing = None  # only once the wait returned: after a Ctrl-C in it, the next wait names that save

    def save(self, step: int, state: Any, progress: Mapping[str, Any], val_accuracy: float | None = None) -> None:
        ocp = self._ocp
        if step in self.all_steps():
            return  # already saved at this step (an epoch end that is also a save interval)
        # the progress is written in the background: a copy, so that the caller's later changes
        # to it (the next epoch's record) cannot reach this checkpoint
        progress = json.loads(json.dumps(dict(progress)))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                         progress=ocp.args.JsonSave(progress)),
                          metrics={"val_accuracy": val_accuracy} if val_accuracy is not None else None)
        self._writing = step

    def wait(self) -> None:
        """Until every save so far is on disk (CheckpointError if one could not be written)."""
        self._finish_writes()

    def latest_step(self) -> int | None:
        self._finish_writes()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps with a checkpoint, once every save so far is on disk."""
        self._finish_writes()
        return list(self.manager.all_steps())

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state at ``step`` shaped and sharded like ``like_state``, and its progress."""
        ocp = self._ocp
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        self._finish_writes()
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)  # each leaf placed as like_state's
            state_args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args)
            restored = self.manager.restore(step, args=ocp.args.Composite(state=state_args,
                                                                           progress=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as exc:  # orbax: the saved tree is not this state's
            first = _first_line(exc, 300)
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.manager.directory} does not fit this run's training state "
                f"(written by another jaxft version, or its files were changed): {first}") from exc
        return restored["state"], dict(restored["progress"])

    def progress(self, step: int) -> dict[str, Any]:
        self._finish_writes()
        restored = self.manager.restore(step, args=self._ocp.args.Composite(progress=self._ocp.args.JsonRestore()))
        return dict(restored["progress"])

    def close(self) -> None:
        try:
            self._finish_writes()
        finally:
            self.manager.close()
