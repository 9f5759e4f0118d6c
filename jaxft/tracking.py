"""What the fit loop reports to: one small callback interface, and the experiment trackers on it.

``fit`` writes every record to ``metrics.jsonl`` (always) and hands the same records to its
callbacks, so TensorBoard, Weights & Biases and the Optuna pruner (``jaxft.tune``) are each one
class here, not branches in the loop:

* ``TensorBoardTracker`` (``--tensorboard``): event files in ``RUN_DIR/tensorboard`` through
  tensorboardX, which needs no TensorFlow: step and epoch scalars, the learning rate, the config
  as text, and at the end the curves and confusion matrices as images.
* ``WandbTracker`` (``--wandb PROJECT``, extra ``[wandb]``): config, metrics, plots and the summary
  in one W&B run, continued (same run id) when the jaxft run is resumed. ``WANDB_MODE=offline``
  writes it under ``RUN_DIR/wandb`` for a later ``wandb sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from jaxft.config import ConfigError, TrainConfig, config_to_dict


class Callback:
    """Receives a run's records as ``fit`` writes them. Every method may be left out.

    An exception raised here stops the run the way any error would (checkpoints are closed);
    ``jaxft.tune`` prunes a trial that way."""

    def on_start(self, cfg: TrainConfig, run_dir: Path, step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Training starts (or resumes) at global ``step``; ``history`` holds the epoch records so far
        (a resumed run's; empty for a new one)."""

    def on_record(self, record: Mapping[str, Any]) -> None:
        """One record of ``metrics.jsonl``: ``event`` is "step", "epoch" or "resume"."""

    def on_end(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """The run finished: ``summary.json`` and ``plots/`` are written."""

    def close(self) -> None:
        """Called once, however the run ended."""


# metrics.jsonl names -> tracker names, grouped the way TensorBoard and W&B show them
STEP_SCALARS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
                "grad_norm": "train/grad_norm", "images_per_sec": "train/images_per_sec"}
EPOCH_SCALARS = {"train_loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy",
                 "val_loss": "val/loss", "val_accuracy": "val/accuracy", "epoch": "epoch/epoch"}


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The tracker scalars of one metrics.jsonl record (none for events without numbers)."""
    names = {"step": STEP_SCALARS, "epoch": EPOCH_SCALARS}.get(record.get("event"), {})
    return {tag: float(record[key]) for key, tag in names.items() if record.get(key) is not None}


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of summary.json, flat."""
    out = {"best_epoch": summary["best_epoch"], "wall_seconds": summary["wall_seconds"],
           "images_per_sec": summary["images_per_sec"]}
    for split in ("val", "test"):
        if split in summary:
            out[f"{split}_accuracy"] = summary[split]["accuracy"]
            out[f"{split}_loss"] = summary[split]["loss"]
    return {k: float(v) for k, v in out.items()}


def config_markdown(cfg: TrainConfig) -> str:
    from jaxft.report import markdown_table

    return markdown_table(["setting", "value"], list(config_to_dict(cfg).items()))


def run_plots(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "plots").glob("*.png"))


class TensorBoardTracker(Callback):
    def __init__(self) -> None:
        self.writer = None

    def on_start(self, cfg: TrainConfig, run_dir: Path, step: int, history: Sequence[Mapping[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops what an interrupted session logged after the step the run
        # resumes from, so the curves show the run that counts, not both attempts. What was logged
        # at that step itself came before its checkpoint, and stays.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        self.writer.add_text("config", config_markdown(cfg), step)

    def on_record(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def on_end(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        step = summary["steps"]
        for path in run_plots(run_dir):
            image = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", image, step, dataformats="HWC")
        for tag, value in summary_scalars(summary).items():
            self.writer.add_scalar(f"summary/{tag}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("--wandb needs Weights & Biases, which is not installed: pip install 'jaxft[wandb]' "
                          "(or leave out --wandb; metrics.jsonl and --tensorboard need nothing extra)") from None


class WandbTracker(Callback):
    """One W&B run per jaxft run; the id is kept in RUN_DIR/wandb_run_id so --resume continues it."""

    def __init__(self, project: str, group: Optional[str] = None) -> None:
        self.project, self.group, self.run = project, group, None

    def on_start(self, cfg: TrainConfig, run_dir: Path, step: int, history: Sequence[Mapping[str, Any]]) -> None:
        import secrets

        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=self.project, group=self.group, name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config_to_dict(cfg),
                              job_type="fine-tune", settings=wandb.Settings(quiet=True))

    def on_record(self, record: Mapping[str, Any]) -> None:
        scalars = scalars_of(record)
        if scalars:
            self.run.log(scalars, step=record["step"])

    def on_end(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        import wandb

        self.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in run_plots(run_dir)},
                     step=summary["steps"])
        self.run.summary.update(summary_scalars(summary))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def trackers_for(cfg: TrainConfig) -> list[Callback]:
    """The trackers ``cfg`` asks for (``--tensorboard``, ``--wandb``)."""
    trackers: list[Callback] = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker())
    if cfg.wandb:
        require_wandb()
        trackers.append(WandbTracker(cfg.wandb, cfg.wandb_group))
    return trackers
