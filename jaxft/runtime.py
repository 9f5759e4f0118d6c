"""The process-wide JAX settings jaxft chooses, applied once when ``jaxft`` is imported.

* **XLA:CPU flags** (``CPU_XLA_FLAGS``: copy insertion's region analysis). XLA reads
  ``XLA_FLAGS`` once, when JAX starts its first backend, so the flags are added to the
  environment at import, before any device is touched. A flag the user
  already put in ``XLA_FLAGS`` is never changed (theirs wins, whatever its value), and
  ``JAXFT_XLA_DEFAULTS=0`` turns jaxft's additions off. Why each flag, with the measurements:
  docs/benchmarks.md. XLA aborts the process on a flag it does not know, so they are added only
  for jaxlib releases where they were checked to exist.
* **Persistent compilation cache** under ``$JAXFT_CACHE/xla`` (default ``~/.cache/jaxft/xla``),
  so a second run of the same model and shapes loads its compiled steps instead of compiling
  them. Kept when the user set ``JAX_COMPILATION_CACHE_DIR`` (or the config option) themselves;
  ``JAXFT_COMPILATION_CACHE=0`` turns it off. jaxft also caches compilations from
  ``CACHE_MIN_COMPILE_SECONDS`` up (JAX's default is 1 s), unless the user set
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` or the option.

The command-line tools also make a machine without an accelerator **two CPU devices**
(``split_cpu``, before JAX starts a backend), and each run then chooses whether its steps use
both (``run_devices``): those that are forward passes over large enough batches do, unless
torch's kernels would take all their convolutions on one device. Same rules:
never when the user chose a device count, and ``JAXFT_XLA_DEFAULTS=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any, Optional

# Copy insertion with region analysis: XLA proves more of its copies unneeded when a value is
# read and then overwritten in place. The train step updates each trained parameter and its
# optimizer moments in place (donated buffers) with the guard's select fused in, and without
# it XLA copied Adam's two moments before the update, so the step held them twice (vgg16
# `partial:0.8`: 1,371 -> 950 MiB of temporaries, 1.00 -> 0.81 s a step at 64 px, the same
# values bit for bit: docs/benchmarks.md). It removes copies only, so numerics cannot move.
# Not taken: --xla_cpu_experimental_ynn_fusion_type=reduce, 17% off resnet18's full step at 224
# px (1.56 -> 1.29 s) but its train-mode gradients 500x further from a float64 reference (3.6e-3
# against the default's 7e-6; torch float32: 3e-6), which tests/test_parity.py's gradient test
# caught. (It narrows YNNPACK's fusions, by default reductions and convolutions, to reductions:
# the convolutions went to XLA's Eigen ones, the gain and the loss both theirs.) A flag goes
# here only when the parity tests pass under it.
CPU_XLA_FLAGS: dict[str, str] = {"--xla_cpu_copy_insertion_use_region_analysis": "true"}

# jaxlib releases (major, minor) whose XLA was checked to know every flag above (XLA aborts on
# one it does not know; 0.10 is the newest this project could install).
CHECKED_JAXLIB = {(0, 10)}


def _jaxlib_release() -> Optional[tuple[int, int]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return None


def _backend_started() -> bool:
    """True when JAX has already started a backend: XLA_FLAGS can no longer take effect."""
    import sys

    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def _user_set_flag(environ: MutableMapping[str, str], flag: str) -> bool:
    """``flag`` is in the user's ``XLA_FLAGS``, with a value or without."""
    return any(word == flag or word.startswith(flag + "=") for word in environ.get("XLA_FLAGS", "").split())


def user_chose_cpu_devices(environ: MutableMapping[str, str]) -> bool:
    """The user set the CPU device count themselves (XLA's flag, JAX's variable or its option)."""
    import jax

    return (_user_set_flag(environ, "--xla_force_host_platform_device_count") or "JAX_NUM_CPU_DEVICES" in environ
            or jax.config.jax_num_cpu_devices != -1)


def default_xla_flags(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The flags jaxft would add to ``environ['XLA_FLAGS']``: none the user set, none when
    ``JAXFT_XLA_DEFAULTS=0`` or this jaxlib was not checked."""
    if environ.get("JAXFT_XLA_DEFAULTS", "1") == "0" or _jaxlib_release() not in CHECKED_JAXLIB:
        return {}
    return {flag: value for flag, value in CPU_XLA_FLAGS.items() if not _user_set_flag(environ, flag)}


def apply_xla_flags(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Append jaxft's defaults to ``XLA_FLAGS``; returns what was added."""
    added = {} if _backend_started() else default_xla_flags(environ)
    if added:
        words = environ.get("XLA_FLAGS", "").split() + [f"{flag}={value}" for flag, value in added.items()]
        environ["XLA_FLAGS"] = " ".join(words)
    return added


def cache_dir() -> Path:
    """``$JAXFT_CACHE`` or ``$XDG_CACHE_HOME/jaxft`` (default ``~/.cache/jaxft``): source
    checkpoints, feature caches, folder scans and compiled steps."""
    if environ_value := os.environ.get("JAXFT_CACHE"):
        return Path(environ_value)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxft"


# JAX caches only compilations of 1 s or more by default. An eval step of a small model or image
# compiles in 0.3-0.5 s on the CPU (resnet18 at 64 px: 0.37 s, loaded from the cache in 0.05 s),
# and a run compiles one per split; the few-millisecond jits of placing arrays stay out.
CACHE_MIN_COMPILE_SECONDS = 0.2
JAX_DEFAULT_MIN_COMPILE_SECONDS = 1.0


def compilation_cache_dir() -> Path:
    return cache_dir() / "xla"


def enable_compilation_cache(environ: MutableMapping[str, str] = os.environ) -> Optional[Path]:
    """Point JAX's persistent compilation cache at jaxft's cache folder unless the user chose
    one or turned it off; returns the folder jaxft set, or None."""
    import jax

    if environ.get("JAXFT_COMPILATION_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return None
    directory = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ
            and jax.config.jax_persistent_cache_min_compile_time_secs == JAX_DEFAULT_MIN_COMPILE_SECONDS):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    return directory


def configure() -> None:
    apply_xla_flags()
    enable_compilation_cache()


# --- the CPU as two devices -------------------------------------------------------------------------
# XLA:CPU (jaxlib 0.10) runs many of a CNN's convolutions on one thread: YNNPACK's 3x3 ones unless
# both channel counts are 128 or more. A step that is mostly forward passes (the `head` strategy:
# a frozen backbone, a trained classifier) then leaves a core idle; two CPU devices, each running
# half of the batch, use both. Measured on 2 cores, batch 16, a step (docs/benchmarks.md):
# resnet18 `head` 0.47 -> 0.34 s at 224 px, 0.21 -> 0.16 s at 160, 0.12 -> 0.09 s at 112;
# resnet50 0.98 -> 0.83 s at 224; vgg16 even (and faster on one device, where torch's kernels take
# all its convolutions: run_devices). Steps that train the backbone pay for the
# all-reduce of its gradients and an optimizer update on both devices (resnet50 `partial:0.8`
# at 224 px 1.29 -> 1.38 s, resnet18 `full` at 64 px 1.7x slower), and small batches gain
# nothing (resnet18 `head`, 32 x 64 px: even; 16 x 64 px: slower). A process's device count is
# fixed when its backend starts, so the tools make two and each run picks its devices.
CPU_DEVICES = 2
# batch x height x width of a forward-pass step, from which it uses both devices: 16 x 112^2
# gained 1.3x, 32 x 64^2 nothing
SPLIT_MIN_PIXELS = 200_000

_cpu_split_by_jaxft = False


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make JAX's CPU backend ``CPU_DEVICES`` devices, unless the user chose a count, jaxft's
    defaults are off (``JAXFT_XLA_DEFAULTS=0``), a backend has started or there is one core.
    Only a CPU backend changes (on a machine with an accelerator the steps run there). For the
    command-line tools, in a process of their own (a Python caller's devices are its own
    business); returns whether it made them."""
    global _cpu_split_by_jaxft
    import jax

    if (environ.get("JAXFT_XLA_DEFAULTS", "1") == "0" or user_chose_cpu_devices(environ) or _backend_started()
            or available_cores() < 2):
        return False
    jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
    _cpu_split_by_jaxft = True
    return True


def split_cpu_for_command(argv: Optional[Sequence[str]]) -> None:
    """``split_cpu`` for a tool's ``main(argv)``: only with ``argv`` None, i.e. run as a command
    in a process of its own (``python -m``, the console script), not called from Python."""
    if argv is None:
        split_cpu()


def run_devices(trains_backbone: bool, batch_size: int, image_size: int, *, model: Any) -> list:
    """The devices a run's steps use: every device of every process (``engine.data_mesh``),
    except where ``split_cpu`` made the CPU two devices: both for a step that is forward passes
    (``trains_backbone`` False) over at least ``SPLIT_MIN_PIXELS``, else the first alone, as if
    it had not been split. A forward-pass step of a ``model`` whose kxk convolutions all run on
    torch's kernels on one device stays on one (``model`` None: the model is not known, and
    the rule goes by pixels alone): those use both cores, which is what the split
    is for (``models.layers.forward_convolutions_by_torch``; vgg16 at 224 px, batch 16: the
    `head` step 2.49 -> 2.15 s on one device, the forward pass 2.34 -> 2.08 s)."""
    import jax

    devices = jax.devices()
    if not _cpu_split_by_jaxft or jax.default_backend() != "cpu" or jax.process_count() > 1:
        return devices
    if not trains_backbone and batch_size * image_size ** 2 >= SPLIT_MIN_PIXELS:
        from jaxft.models.layers import forward_convolutions_by_torch

        if model is None or not forward_convolutions_by_torch(model, batch_size, image_size):
            return devices
    return devices[:1]


def cpu_split_in_use(devices) -> bool:
    """Whether a run on ``devices`` uses the CPU devices ``split_cpu`` made (not GPUs, say)."""
    return _cpu_split_by_jaxft and len(devices) > 1 and all(d.platform == "cpu" for d in devices)
