"""The process-wide JAX settings jaxft chooses, applied once when ``jaxft`` is imported.

* **XLA:CPU flags** (none at present, see ``CPU_XLA_FLAGS``). XLA reads ``XLA_FLAGS`` once, when
  JAX starts its first backend, so the flags are added to the environment at import, before any
  device is touched. A flag the user
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
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Optional

# None at present. The one candidate measured, YNNPACK's reduction kernels
# (--xla_cpu_experimental_ynn_fusion_type=reduce), made resnet18's full step at 224 px 17% faster
# (1.56 -> 1.29 s) but its gradients in train mode 500x further from a float64 reference (3.6e-3
# against XLA's own 7e-6; torch float32: 3e-6), which tests/test_parity.py's gradient test caught:
# docs/benchmarks.md. A flag goes here only when the parity tests pass under it.
CPU_XLA_FLAGS: dict[str, str] = {}
# jaxlib releases (major, minor) whose XLA was checked to know every flag above.
CHECKED_JAXLIB = {(0, 10), (0, 11)}


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


def default_xla_flags(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The flags jaxft would add to ``environ['XLA_FLAGS']``: none the user set, none when
    ``JAXFT_XLA_DEFAULTS=0`` or this jaxlib was not checked."""
    if environ.get("JAXFT_XLA_DEFAULTS", "1") == "0" or _jaxlib_release() not in CHECKED_JAXLIB:
        return {}
    user = environ.get("XLA_FLAGS", "").split()
    return {flag: value for flag, value in CPU_XLA_FLAGS.items()
            if not any(word == flag or word.startswith(flag + "=") for word in user)}


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
