"""The process-wide settings ``import jaxft`` makes (jaxft.runtime): XLA flags that never override
the user's, and the persistent compilation cache a second run loads its compiled steps from.

Both are about a fresh process (XLA reads its flags once, when the first backend starts), so
each check runs a real interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


import jaxft.runtime
from clitools import TWO_CORES, device_probe
from jaxft.runtime import apply_xla_flags, default_xla_flags

OURS = "--xla_cpu_experimental_ynn_fusion_type"  # a real flag, standing in for a default jaxft would add

PROBE = """
import json, os, jax
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
import jaxft
@jax.jit
def f(x):
    for _ in range(30):
        x = jax.numpy.sin(x) @ x
    return x
f(jax.numpy.ones((64, 64))).block_until_ready()
print(json.dumps({"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "devices": len(jax.devices()),
                  "cache_dir": jax.config.jax_compilation_cache_dir,
                  "min_compile_seconds": jax.config.jax_persistent_cache_min_compile_time_secs,
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def probe(tmp_path, min_compile_seconds: str | None = "0", **env) -> dict:
    """What a fresh interpreter that imports jaxft sees; ``min_compile_seconds``: the user's
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (None: unset)."""
    unset = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(JAXFT_CACHE=str(tmp_path / "cache"), **env)
    if min_compile_seconds is not None:
        environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = min_compile_seconds
    done = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_flag_the_user_set_is_never_changed(monkeypatch):
    monkeypatch.setattr(jaxft.runtime, "CPU_XLA_FLAGS", {OURS: "reduce"})
    assert default_xla_flags({"XLA_FLAGS": f"{OURS}=dot"}) == {}
    assert default_xla_flags({"XLA_FLAGS": f"--xla_foo=1 {OURS}"}) == {}
    assert default_xla_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) == {OURS: "reduce"}
    assert default_xla_flags({"JAXFT_XLA_DEFAULTS": "0"}) == {}
    fresh = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    monkeypatch.setattr(jaxft.runtime, "_backend_started", lambda: False)
    assert apply_xla_flags(fresh) == {OURS: "reduce"}
    assert fresh["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OURS}=reduce"  # theirs first, kept


def test_user_xla_flags_are_kept_and_take_effect(tmp_path):
    mine = f"--xla_force_host_platform_device_count=3 {OURS}=dot"
    ours = [f"{k}={v}" for k, v in jaxft.runtime.CPU_XLA_FLAGS.items()]
    found = probe(tmp_path, XLA_FLAGS=mine)
    # the user's flags untouched and first, read by XLA; jaxft's defaults follow them
    assert found["XLA_FLAGS"] == " ".join([mine, *ours]) and found["devices"] == 3
    assert probe(tmp_path)["XLA_FLAGS"] == (" ".join(ours) or None)
    # a default the user set themselves, to another value, is theirs alone
    theirs = " ".join(f"{k}={'false' if v == 'true' else v}" for k, v in jaxft.runtime.CPU_XLA_FLAGS.items())
    if theirs:
        assert probe(tmp_path, XLA_FLAGS=theirs)["XLA_FLAGS"] == theirs
    assert probe(tmp_path, JAXFT_XLA_DEFAULTS="0")["XLA_FLAGS"] is None


def test_second_process_loads_compiled_code_from_the_cache(tmp_path):
    first = probe(tmp_path)
    assert first["cache_dir"] == str(tmp_path / "cache" / "xla")
    assert first["hits"] == 0 and any((tmp_path / "cache" / "xla").iterdir())
    assert probe(tmp_path)["hits"] >= 1
    # the user's own cache folder, or none, is respected
    assert probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))["cache_dir"] == str(tmp_path / "mine")
    off = probe(tmp_path, JAXFT_COMPILATION_CACHE="0")
    assert off["cache_dir"] is None and off["hits"] == 0
    # sub-second compilations (small eval steps) are cached too, unless the user says otherwise
    assert first["min_compile_seconds"] == 0  # the user's, from the environment
    assert probe(tmp_path, min_compile_seconds=None)["min_compile_seconds"] == jaxft.runtime.CACHE_MIN_COMPILE_SECONDS


SPLIT_PROBE = """
import json, jax
from jaxft import create_model, runtime
made = runtime.split_cpu()
vgg, resnet = create_model("vgg11", num_classes=5), create_model("resnet18", num_classes=5)
print(json.dumps({"made": made, "devices": len(jax.devices()), "again": runtime.split_cpu(),
                  "head 16 x 112^2": len(runtime.run_devices(False, 16, 112, model=None)),
                  "head 32 x 64^2": len(runtime.run_devices(False, 32, 64, model=None)),
                  "full 16 x 224^2": len(runtime.run_devices(True, 16, 224, model=None)),
                  "vgg11 head 16 x 224^2": len(runtime.run_devices(False, 16, 224, model=vgg)),
                  "vgg11 head 16 x 112^2": len(runtime.run_devices(False, 16, 112, model=vgg)),
                  "resnet18 head 16 x 224^2": len(runtime.run_devices(False, 16, 224, model=resnet))}))
"""


@TWO_CORES
def test_the_tools_split_the_cpu_and_runs_use_both_halves_only_for_large_forward_steps():
    split = device_probe(SPLIT_PROBE)
    assert split == {"made": True, "devices": 2, "again": False,  # once, before the backend: then never
                     "head 16 x 112^2": 2, "head 32 x 64^2": 1, "full 16 x 224^2": 1,
                     # every 3x3 convolution of vgg11 at 224 px on torch's kernels, which use both cores:
                     # one device; at 112 px its last layers (7x7 maps, 512 channels) stay XLA's, and so
                     # do resnet18's layer3 and layer4 at 224 px: both devices
                     "vgg11 head 16 x 224^2": 1, "vgg11 head 16 x 112^2": 2, "resnet18 head 16 x 224^2": 2}
    # with every kernel XLA's, vgg11's forward passes take both devices again
    assert device_probe(SPLIT_PROBE, JAXFT_TORCH_KERNELS="0")["vgg11 head 16 x 224^2"] == 2
    # the user's device count wins (each way of setting it), and so does turning jaxft's defaults off;
    # a run then uses every device there is, as before the split existed
    for env, devices in (({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
                         ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, 1),
                         ({"JAX_NUM_CPU_DEVICES": "3"}, 3), ({"JAXFT_XLA_DEFAULTS": "0"}, 1)):
        assert device_probe(SPLIT_PROBE, **env) == {"made": False, "devices": devices, "again": False,
                                                    "head 16 x 112^2": devices, "head 32 x 64^2": devices,
                                                    "full 16 x 224^2": devices, "vgg11 head 16 x 224^2": devices,
                                                    "vgg11 head 16 x 112^2": devices,
                                                    "resnet18 head 16 x 224^2": devices}, env


CALLER_PROBE = """
import json, sys, jax
from jaxft.train import main
code = main(["--epochs", "0", "--out", sys.argv[1]])  # a Python caller's bad flag: refused after the split point
print(json.dumps({"code": code, "devices": len(jax.devices())}))
"""


@TWO_CORES
def test_a_python_caller_of_a_tool_keeps_its_own_devices(tmp_path):
    assert device_probe(CALLER_PROBE, tmp_path / "run") == {"code": 2, "devices": 1}
