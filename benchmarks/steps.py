"""Train-step and inference throughput: jaxft against the same work in PyTorch, side by side.

One train step = forward, backward of what trains, Adam update. jaxft runs ``Engine.train_step``
with BatchNorm policy ``torch``; PyTorch freezes with ``requires_grad=False`` (the tutorials'
way) and runs ``model.train()``, eager and, where it works, ``torch.compile``. So both
frameworks compute the same step, and the first step's loss from identical weights is
compared. Both take the batch from host memory each step in the form their training loop
gives it: the PyTorch recipe's DataLoader float32 (``ToTensor`` + ``Normalize`` on the host,
``.to(device)`` in the loop), jaxft's loader uint8, normalised on the device (a quarter of the
bytes to copy: on a GPU the copy is part of the step's cost). VGG runs without dropout: the two
frameworks draw different masks, which would make that loss incomparable, and dropout costs next
to nothing.

Inference = the eval-mode forward: a jitted ``model.apply(train=False)`` against torch's
``eval()`` under ``inference_mode``, logits compared; jaxft's as ``jaxft.predict`` runs it (uint8
crops normalised on the device, its devices).

Every contender is timed round-robin (``interleaved_medians``) in the row's process, and read as
a ratio; ``torch.compile`` in a process of its own beside eager torch (``bench_torch_compile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import environment, interleaved_medians
from jaxft import create_model, runtime, to_torch
from jaxft.engine import Engine, data_mesh, model_input, replicate
from jaxft.freeze import parse_strategy
from jaxft.optim import OptimConfig
from jaxft.parity import freeze_like, rel_l2
from jaxft.pretrained import init_variables
from jaxft.weights import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 10
LEARNING_RATE = 1e-4
MiB = 2**20


@dataclass(frozen=True)
class Setup:
    """Where and how every contender runs."""

    device: str  # 'cpu' or 'gpu' (JAX's platform name; torch's is torch_device)
    dtype: str  # 'float32' or 'bfloat16' compute; parameters stay float32 in both frameworks
    batch_size: int
    repeats: int
    torch_compile: bool

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    @property
    def jax_device(self) -> jax.Device:
        return jax.devices(self.device)[0]

    @property
    def jax_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def tolerance(self) -> float:
        """Relative agreement required of the first-step loss and of the logits. The frameworks
        round at different places, so the bound follows the precision of the products: bfloat16
        keeps 8 bits of mantissa; on a GPU both run float32 convolutions on TF32 tensor cores by
        default (JAX's default precision, cuDNN's ``allow_tf32``), which keep 10."""
        if self.dtype == "bfloat16":
            return 5e-2
        return 5e-3 if self.device == "gpu" else 1e-4

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.torch_device, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    def describe(self) -> str:
        return f"batch {self.batch_size}, {self.dtype}, {self.device}, median of {self.repeats}"

    def torch_sync(self) -> None:
        """Wait for queued CUDA work, so a timed call ends when its work does."""
        if self.torch_device == "cuda":
            torch.cuda.synchronize()


def model_kwargs(arch: str) -> dict:
    """VGG without dropout in both frameworks: their masks differ, so the losses could not be compared."""
    return {"dropout": 0.0} if arch.startswith("vgg") else {}


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 pixels, as each framework's loader sends them: ``image`` float32, normalised on
    the host (the PyTorch recipe's ``ToTensor`` + ``Normalize``), ``pixels`` the uint8 images that
    jaxft's loader sends and its step normalises on the device."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    mean, std = (np.asarray(v, np.float32) for v in (IMAGENET_MEAN, IMAGENET_STD))  # torchvision's order
    return {"image": (pixels.astype(np.float32) / 255 - mean) / std, "pixels": pixels,
            "label": rng.integers(0, NUM_CLASSES, batch_size)}


def bench_devices(model, trains_backbone: bool, device: str | None, batch_size: int, image_size: int) -> list:
    """jaxft's devices for a train step or a forward pass of ``model``: one (the comparison is per
    chip, not of data parallelism), except on the CPU, where the CLIs may use both halves of a CPU
    that ``runtime.split_cpu`` split (``benchmarks.__main__`` splits it as the CLIs do)."""
    if device in (None, "cpu") and jax.default_backend() == "cpu":
        return runtime.run_devices(trains_backbone=trains_backbone, batch_size=batch_size, image_size=image_size,
                                   model=model)
    return jax.devices(device)[:1]


def bench_engine(model, variables: dict, strategy: str, devices: list) -> Engine:
    """jaxft's engine as the benchmarks run it: Adam, BatchNorm policy ``torch``, uint8 batches
    normalised on the device."""
    return Engine(model, variables, parse_strategy(strategy), OptimConfig("adam", lr=LEARNING_RATE),
                  bn_policy="torch", mesh=data_mesh(devices), normalization=(IMAGENET_MEAN, IMAGENET_STD))


def torch_twin(arch: str, variables: dict, setup: Setup) -> torch.nn.Module:
    """The torchvision model holding the same weights as jaxft's ``variables``, on the torch device."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES, **model_kwargs(arch))
    model.load_state_dict(to_torch(arch, variables))
    return model.to(setup.torch_device)


def row_inputs(arch: str, size: int, setup: Setup) -> tuple[Any, dict, dict[str, np.ndarray]]:
    """A row's jaxft model, its initial variables (the same in every process: a fixed seed) and its batch."""
    model = create_model(arch, num_classes=NUM_CLASSES, dtype=setup.jax_dtype, **model_kwargs(arch))
    return model, init_variables(model), random_batch(setup.batch_size, size)


def frozen_twin(arch: str, model, variables: dict, labels: dict, setup: Setup) -> tuple[torch.nn.Module, list]:
    """A fresh torch twin of ``variables`` and its trainable parameters, frozen as jaxft's ``labels`` freeze."""
    twin = torch_twin(arch, variables, setup)
    return twin, freeze_like(twin, model, labels)


def torch_images(images: np.ndarray, setup: Setup) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(setup.torch_device)


@dataclass
class Machine:
    """What the report says about where it ran, found in a process of the benchmark's own."""

    environment: dict[str, str]  # benchmarks.common.environment()
    peak: float  # matmul FLOP/s (matmul_peak)
    cpu_devices: int
    cpu_split_by_jaxft: bool  # runtime.split_cpu made them, as the CLIs do


def machine(setup: Setup) -> Machine | str:
    """The machine's facts, or what is missing for ``setup`` (``--device gpu`` with no GPU), in one line."""
    if setup.device == "gpu":
        try:
            jax.devices("gpu")
        except RuntimeError:
            return "--device gpu: JAX sees no GPU (install jaxft[cuda12] or [cuda13] on a machine with one)"
        if not torch.cuda.is_available():
            return "--device gpu: torch sees no CUDA device"
    cpu = jax.devices("cpu")
    return Machine(environment(), matmul_peak(setup), len(cpu), runtime.cpu_split_in_use(cpu))


def matmul_peak(setup: Setup, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in the benchmark's dtype on JAX's device: the ceiling a
    convolution-heavy step could approach on this machine."""
    n = 8192 if setup.device == "gpu" else 2048
    a = jax.device_put(jnp.ones((n, n), setup.jax_dtype), setup.jax_device)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


# --- train step ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    arch: str
    strategy: str
    size: int
    seconds: dict[str, float]  # median per step: 'jaxft', 'torch eager' and, if it ran, 'torch.compile'
    compile_failure: str | None  # why torch.compile could not run, when it was tried
    jax_loss: float  # first step from identical weights, same batch
    torch_loss: float
    flops: float  # one jaxft step, from XLA's cost analysis
    jax_state_bytes: int  # optimizer state
    torch_state_bytes: int
    argument_bytes: int | None  # the compiled step's inputs (train state + batch), where jax reports it
    temp_bytes: int | None  # its scratch (activations, gradients), where jax reports it
    compilations: tuple[int, int]  # the train step's compiled versions after warm-up, after timing
    devices: int = 1  # jaxft's step ran on this many devices, each with a part of the batch

    def images_per_s(self, batch_size: int) -> dict[str, float]:
        return {name: batch_size / t for name, t in self.seconds.items()}

    @property
    def vs_eager(self) -> float:
        return self.seconds["torch eager"] / self.seconds["jaxft"]

    @property
    def vs_best_torch(self) -> float:
        return min(t for name, t in self.seconds.items() if name != "jaxft") / self.seconds["jaxft"]

    @property
    def loss_difference(self) -> float:
        return abs(self.jax_loss - self.torch_loss) / max(abs(self.torch_loss), 1e-30)


def torch_train_step(model: torch.nn.Module, trainable: list, batch: dict, setup: Setup,
                     compile_model: bool) -> tuple[Callable[[], float], torch.optim.Optimizer]:
    """One PyTorch step as the tutorials write it; returns the step (giving the loss) and its optimizer."""
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    model.train()
    forward = torch.compile(model) if compile_model else model
    # The batch starts in host memory, as in training: the recipe's loop does `inputs.to(device)`
    # (a no-op on the CPU).
    x_host = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    y_host = torch.from_numpy(batch["label"])

    def step() -> float:
        x, y = x_host.to(setup.torch_device), y_host.to(setup.torch_device)
        with setup.autocast():
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()  # waits for the step, on CUDA too

    return step, optimizer


def torch_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def bench_train(arch: str, strategy: str, size: int, setup: Setup) -> TrainResult:
    """Time jaxft's train step against PyTorch's on one batch, and measure what the step costs."""
    model, variables, batch = row_inputs(arch, size, setup)
    # Each side's batch starts in host memory as its training loop's does: jaxft's loader sends
    # uint8 (normalised on the device), the recipe's DataLoader float32 (ToTensor + Normalize).
    jax_batch = {"image": batch["pixels"], "label": batch["label"]}
    devices = bench_devices(model, strategy != "head", setup.device, setup.batch_size, size)
    engine = bench_engine(model, variables, strategy, devices)

    def jax_step() -> float:
        metrics = engine.train_step(jax_batch)
        jax.block_until_ready(engine.state)  # the step may return before the device is done
        return float(metrics["loss_sum"]) / float(metrics["count"])

    eager, eager_optimizer = torch_train_step(*frozen_twin(arch, model, variables, engine.labels, setup), batch,
                                              setup, compile_model=False)
    contenders = {"jaxft": jax_step, "torch eager": eager}
    first_losses = {name: step() for name, step in contenders.items()}  # from identical weights
    for step in contenders.values():  # a second warm-up step: a recompile on the donated state shows now
        step()
    warm = engine.compiled_train_step._cache_size()
    seconds = interleaved_medians(contenders, setup.repeats, warmup=0)
    timed = engine.compiled_train_step._cache_size()

    memory = engine.compiled_train_step.lower(*engine.step_arguments(jax_batch)).compile().memory_analysis()
    return TrainResult(
        arch=arch, strategy=strategy, size=size, seconds=seconds, compile_failure=None,
        jax_loss=first_losses["jaxft"], torch_loss=first_losses["torch eager"], flops=step_flops(engine, jax_batch),
        jax_state_bytes=engine.optimizer_state_bytes(), torch_state_bytes=torch_state_bytes(eager_optimizer),
        argument_bytes=_all_devices(getattr(memory, "argument_size_in_bytes", None), len(devices)),
        temp_bytes=_all_devices(getattr(memory, "temp_size_in_bytes", None), len(devices)),
        compilations=(warm, timed), devices=len(devices))


def bench_torch_compile(arch: str, strategy: str, size: int, setup: Setup) -> tuple[float | None, str | None]:
    """``torch.compile``'s train step time over eager torch's, timed round-robin in a process without
    jaxft's step (a compiled model in the same process slowed jaxft's steps: vgg16 ``full`` at 224 px,
    1.7 -> 1.3 img/s); or why it could not run. ``with_torch_compile`` puts it into a row."""
    model, variables, batch = row_inputs(arch, size, setup)
    labels = parse_strategy(strategy).labels(model, variables["params"])
    eager, _ = torch_train_step(*frozen_twin(arch, model, variables, labels, setup), batch, setup, compile_model=False)
    try:
        compiled, _ = torch_train_step(*frozen_twin(arch, model, variables, labels, setup), batch, setup,
                                       compile_model=True)
        compiled()  # compiles now, so a failure is caught here
    except Exception as exc:  # noqa: BLE001 - report it in the table, don't lose the row
        return None, f"failed: {type(exc).__name__}"
    for step in (eager, compiled):
        step()
    seconds = interleaved_medians({"eager": eager, "compiled": compiled}, setup.repeats, warmup=0)
    return seconds["compiled"] / seconds["eager"], None


def with_torch_compile(result: TrainResult, compiled_over_eager: float | None, failure: str | None) -> TrainResult:
    """``result`` with a ``torch.compile`` time: eager torch's time in the row's own process times
    the compiled/eager ratio measured in another, so that every column stays a side-by-side figure."""
    seconds = dict(result.seconds)
    if compiled_over_eager is not None:
        seconds["torch.compile"] = seconds["torch eager"] * compiled_over_eager
    return dataclasses.replace(result, seconds=seconds, compile_failure=failure)


def _all_devices(per_device: int | None, devices: int) -> int | None:
    """XLA's memory analysis is of one device's program; on the CPU every device's is host memory."""
    return None if per_device is None else per_device * devices


def step_flops(engine: Engine, batch: dict) -> float:
    """FLOPs of one jaxft train step by XLA's cost analysis of the step lowered for the CPU. The
    count does not depend on the device, and on a GPU neither the lowered program (no analysis)
    nor the compiled one (convolutions become cuDNN calls it does not count) gives it."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), engine.step_arguments(batch))
    return jax.jit(engine.compiled_train_step.__wrapped__).lower(*args).cost_analysis()["flops"]


def train_table(results: list[TrainResult], setup: Setup, peak: float) -> tuple[list[str], list[list[str]]]:
    headers = ["arch", "strategy", "px", "jaxft devices", "jaxft img/s", "torch eager img/s", "torch.compile img/s",
               "jaxft/eager", "jaxft/best torch", "jaxft opt state MiB", "jaxft GFLOP/s", "of matmul peak",
               "compilations (warm -> timed)", "loss rel diff"]
    rows = []
    for r in results:
        ips = r.images_per_s(setup.batch_size)
        compiled = f"{ips['torch.compile']:.1f}" if "torch.compile" in ips else (r.compile_failure or "not run")
        achieved = r.flops / r.seconds["jaxft"]
        rows.append([r.arch, r.strategy, r.size, r.devices, f"{ips['jaxft']:.1f}", f"{ips['torch eager']:.1f}",
                     compiled, f"{r.vs_eager:.2f}", f"{r.vs_best_torch:.2f}", f"{r.jax_state_bytes / MiB:.1f}",
                     f"{achieved / 1e9:.1f}", f"{achieved / peak:.1%}",
                     f"{r.compilations[0]} -> {r.compilations[1]}", f"{r.loss_difference:.1e}"])
    return headers, rows


def memory_table(results: list[TrainResult]) -> tuple[list[str], list[list[str]]]:
    def mib(n: int | None) -> str:
        return "n/a" if n is None else f"{n / MiB:.1f}"

    headers = ["arch", "strategy", "px", "jaxft opt state MiB", "torch opt state MiB", "jaxft step arguments MiB",
               "jaxft step temporaries MiB"]
    rows = [[r.arch, r.strategy, r.size, mib(r.jax_state_bytes), mib(r.torch_state_bytes), mib(r.argument_bytes),
             mib(r.temp_bytes)] for r in results]
    return headers, rows


def train_problems(result: TrainResult, setup: Setup) -> list[str]:
    """Why this row cannot be trusted: the two steps compute different things, or jaxft recompiled."""
    where = f"train step {result.arch} {result.strategy} {result.size}px"
    problems = []
    if not result.loss_difference <= setup.tolerance:  # written so that NaN fails too
        problems.append(f"{where}: jaxft's first-step loss {result.jax_loss:.7g} and torch's {result.torch_loss:.7g} "
                        f"differ by {result.loss_difference:.1e} relative (allowed {setup.tolerance:.0e})")
    warm, timed = result.compilations
    if timed != warm:
        problems.append(f"{where}: the jitted train step compiled again while timed ({warm} -> {timed} versions)")
    return problems


# --- inference ----------------------------------------------------------------------------------

@dataclass
class InferenceResult:
    arch: str
    size: int
    seconds: dict[str, float]  # median per forward: 'jaxft', 'torch'
    logits_difference: float  # relative L2, jaxft against torch
    devices: int = 1  # jaxft's forward pass ran on this many devices, each with a part of the batch

    @property
    def ratio(self) -> float:
        return self.seconds["torch"] / self.seconds["jaxft"]


def bench_inference(arch: str, size: int, setup: Setup) -> InferenceResult:
    """Time the eval-mode forward of both frameworks on the same weights and batch, jaxft's as
    ``python -m jaxft.predict`` runs it: on the devices it would use, from uint8 crops
    normalised on the device (torch's from the same pixels normalised on the host)."""
    model, variables, batch = row_inputs(arch, size, setup)
    twin = torch_twin(arch, variables, setup).eval()
    x = torch_images(batch["image"], setup)
    devices = bench_devices(model, False, setup.device, setup.batch_size, size)
    mesh = data_mesh(devices)
    on_device, placed = replicate(variables, mesh), jax.device_put(batch["pixels"], NamedSharding(mesh, P("data")))
    normalization = (IMAGENET_MEAN, IMAGENET_STD)
    forward = jax.jit(lambda v, pixels: model.apply(v, model_input(pixels, normalization), train=False))

    def jax_forward() -> jax.Array:
        return jax.block_until_ready(forward(on_device, placed))

    def torch_forward() -> torch.Tensor:
        with torch.inference_mode(), setup.autocast():
            logits = twin(x)
        setup.torch_sync()
        return logits

    difference = rel_l2(np.asarray(jax_forward(), np.float32), torch_forward().float().cpu().numpy())
    seconds = interleaved_medians({"jaxft": jax_forward, "torch": torch_forward}, setup.repeats, warmup=1)
    return InferenceResult(arch, size, seconds, difference, devices=len(devices))


def inference_table(results: list[InferenceResult], setup: Setup) -> tuple[list[str], list[list[str]]]:
    headers = ["arch", "px", "jaxft devices", "jaxft img/s", "torch img/s", "jaxft/torch", "logits rel L2"]
    rows = [[r.arch, r.size, r.devices, f"{setup.batch_size / r.seconds['jaxft']:.1f}",
             f"{setup.batch_size / r.seconds['torch']:.1f}", f"{r.ratio:.2f}", f"{r.logits_difference:.1e}"]
            for r in results]
    return headers, rows


def inference_problems(result: InferenceResult, setup: Setup) -> list[str]:
    if result.logits_difference <= setup.tolerance:  # NaN falls through to the problem
        return []
    problem = (f"inference {result.arch} {result.size}px: jaxft's logits differ from torch's by "
               f"{result.logits_difference:.1e} relative L2 (allowed {setup.tolerance:.0e})")
    return [problem]
