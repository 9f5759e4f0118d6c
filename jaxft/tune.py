"""python -m jaxft.tune: hyperparameter search with Optuna over ``jaxft.train`` runs.

Each trial is a whole ``jaxft.train`` run (its own run directory under ``trials/``) with settings
sampled from the search space (``jaxft.search_space``); its objective is the best validation
accuracy, reported after every epoch so that a pruner stops poor trials early. A study directory
holds:

    study.db      Optuna's RDB storage (SQLite): every trial, its params, reports and state
    study.json    what --resume needs: the storage, the budget, the base config, the space
    trials/NNNN/  each trial's run directory (config.json, metrics.jsonl, checkpoints, ...)
    trials.md, trials.csv   every trial: state, value, params, epochs, time, why it stopped
    best.yaml     the best trial's config: python -m jaxft.train --config best.yaml trains it again
    plots/        Optuna's optimisation history, parameter importances, parallel coordinates

Trials heartbeat into the storage. A trial whose process died (SIGKILL, a lost node) goes stale
and is failed; a copy with the same params is queued and continues the dead trial's run directory
from its latest checkpoint. Ctrl-C does the same at once. Several processes may work on one
study: start more with ``--resume STUDY_DIR`` (a file lock in the study directory keeps them to
the study's trial budget).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sqlite3
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from jaxft.config import ConfigError, TrainConfig, add_config_flags, build_config, config_to_dict, load_config_file
from jaxft.rundir import atomic_write, prepare_run_dir, write_json
from jaxft.search_space import (DEFAULT_SPACE, Param, load_space_file, parse_assignments, parse_space,
                                 parse_trial_values, sample, to_json)
from jaxft.tracking import Callback

STUDY_FILE, DB_FILE, TRIALS_DIR = "study.json", "study.db", "trials"
PRUNERS = ("median", "percentile", "halving", "hyperband", "none")
SAMPLERS = ("tpe", "random")

EXAMPLES = """\
examples:
  python -m jaxft.tune --n-trials 20 --epochs 4            # the default space, digits 5-9
  python -m jaxft.tune --data ~/pets --weights imagenet --param lr=1e-5:1e-3:log --param strategy=head,full
  python -m jaxft.tune --space space.yaml --n-trials 50 --timeout 3600
  python -m jaxft.tune --resume runs/tune-resnet18-digits_5-9   # continue it, or add a parallel worker
  optuna-dashboard sqlite:///runs/tune-resnet18-digits_5-9/study.db   # live web view

A space file maps settings to specs: lr: 1e-5:1e-2:log, batch_size: [16, 32], strategy: [head, partial],
partial_fraction: 0.5:0.95 (F of partial:F), epochs: 2:6, optimizer: adam (fixed).
"""


class TuneError(ValueError):
    """A study that cannot be created, resumed or opened; the message names the file."""


@functools.cache  # the logging and warning settings once per process
def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("python -m jaxft.tune needs Optuna: pip install 'jaxft[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # jaxft asks for trials itself and runs the heartbeat thread as Study.optimize would (see work)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    # --enqueue may try a value outside the space's range on purpose (the recipe's lr, a known bad one)
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
    return optuna


# --- storage ----------------------------------------------------------------------------------------

def storage_url(storage: str) -> str:
    """A path becomes an SQLite URL; a URL (postgresql://, mysql://, sqlite://) is kept."""
    return storage if "://" in storage else f"sqlite:///{Path(storage).resolve()}"


def check_storage(url: str) -> None:
    """An existing SQLite file must be an Optuna database: say so before Optuna's own traceback."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):])
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise TuneError(f"storage {path} is not an Optuna database (not SQLite: {exc}); point --storage or "
                        f"--out at a new location, or at a study jaxft.tune made") from None
    if not {"studies", "trials", "version_info"} <= tables:
        raise TuneError(f"storage {path} is an SQLite database but not Optuna's (tables: "
                        f"{', '.join(sorted(tables)) or 'none'}); point --storage or --out elsewhere")


def open_storage(url: str, heartbeat: int):
    optuna = _optuna()
    check_storage(url)
    return optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def make_sampler(kind: str, seed: int, index: int):
    """Seeded per trial, from the study seed and the trial's place in the study (``index``: the
    trials before it, re-runs of dead trials not counted). Parallel workers with one --seed draw
    different trials, a one-process study is reproducible, and a study resumed after a kill draws
    what the uninterrupted study would have drawn."""
    optuna = _optuna()
    trial_seed = (seed * 1_000_003 + index) % 2**32
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    return optuna.samplers.TPESampler(seed=trial_seed)


def make_pruner(kind: str, startup_trials: int, warmup_epochs: int):
    """Trials are pruned on validation accuracy, never during their first ``warmup_epochs`` epochs
    (reports are numbered by epoch from 1; Optuna's pruners skip steps below n_warmup_steps)."""
    pruners = _optuna().pruners
    if kind == "median":
        return pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)
    if kind == "percentile":
        return pruners.PercentilePruner(25.0, n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)
    if kind == "halving":
        return pruners.SuccessiveHalvingPruner(min_resource=warmup_epochs + 1)
    if kind == "hyperband":
        return pruners.HyperbandPruner(min_resource=warmup_epochs + 1)
    return pruners.NopPruner()


def superseded(trials: Sequence[Any]) -> dict[int, int]:
    """{number of a trial that died and was queued again: the number of its first re-run}."""
    reruns: dict[int, int] = {}
    for t in sorted(trials, key=lambda t: t.number):
        for number in t.system_attrs.get("retry_history", []):
            reruns.setdefault(number, t.number)
    return reruns


def counted_trials(trials: Sequence[Any]) -> int:
    """Trials that use the budget: every one, finished, running or queued, except those re-run."""
    dead = superseded(trials)
    return sum(1 for t in trials if t.number not in dead)


def more_to_run(trials: Sequence[Any], n_trials: int) -> bool:
    """Budget left, or a queued trial (a re-run, --enqueue) that counts in the budget but has not run."""
    return any(t.state.name == "WAITING" for t in trials) or counted_trials(trials) < n_trials


# --- one trial --------------------------------------------------------------------------------------

class TrialReporter(Callback):
    """Reports validation accuracy after every epoch and prunes the trial when the pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def on_start(self, cfg: TrainConfig, run_dir: Path, step: int, history: Sequence[Mapping[str, Any]]) -> None:
        for record in history:  # a retried trial continues a run: report what it already did
            self._report(record, prune=False)

    def on_record(self, record: Mapping[str, Any]) -> None:
        if record.get("event") == "epoch":
            self._report(record, prune=True)

    def _report(self, record: Mapping[str, Any], prune: bool) -> None:
        epoch = record["epoch"]
        if epoch < 1:
            return
        self.trial.report(record["val_accuracy"], epoch)
        if prune and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"pruned after epoch {epoch}")


def heartbeat(study: Any, trial: Any):
    """The thread that keeps ``trial`` alive in the storage while it runs. Optuna starts it inside
    ``study.optimize``; jaxft asks for trials itself (see ``work``), so it starts it the same way."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def frozen(study: Any, number: int) -> Any:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def has_checkpoint(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def run_trial(study: Any, trial: Any, original: Optional[int], base: TrainConfig, space: Mapping[str, Param],
              study_dir: Path, group: str) -> tuple[str, Optional[float], str, TrainConfig]:
    """Train one trial; returns (state, value, note, its config). The trial is told here.
    ``original``: the trial it re-runs (it continues that trial's run directory), if any."""
    optuna = _optuna()
    from jaxft.train import StopRequested, train, user_errors

    values = sample(space, trial, base.strategy)
    run_dir = study_dir / TRIALS_DIR / f"{original if original is not None else trial.number:04d}"
    group = (base.wandb_group or group) if base.wandb else None  # each trial a W&B run in the study's group
    trial.set_user_attr("run_dir", str(run_dir.relative_to(study_dir)))
    try:
        cfg = build_config({**config_to_dict(base), **values, "out": str(run_dir), "wandb_group": group}, {})
    except user_errors() as exc:  # settings the space allows but training refuses: this trial fails
        trial.set_user_attr("failed", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "failed", None, str(exc), base
    resume = original is not None and has_checkpoint(run_dir)
    if not resume:
        prepare_run_dir(run_dir, overwrite=True)
        write_json(run_dir / "config.json", config_to_dict(cfg))
    reporter = TrialReporter(trial)
    with open(run_dir / "log.txt", "a", encoding="utf-8") as log_file:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        try:
            summary = train(cfg, run_dir, resume=resume, log=log, quiet=True, callbacks=[reporter])
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return "pruned", None, str(pruned), cfg
        except FloatingPointError as exc:  # diverged: a result, not a crash of the study
            reason = f"diverged: {str(exc).rstrip('.')}"
            trial.set_user_attr("failed", reason)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "failed", None, reason, cfg
        except user_errors() as exc:
            trial.set_user_attr("failed", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "failed", None, str(exc), cfg
        except (StopRequested, KeyboardInterrupt):
            # Queue it again now (not after the heartbeat's grace period): --resume continues this
            # trial's run directory from the checkpoint Ctrl-C just saved.
            trial.set_user_attr("failed", "interrupted")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, frozen(study, trial.number))
            raise
    value = summary["val"]["accuracy"]
    for key in ("best_epoch", "wall_seconds", "images_per_sec"):
        trial.set_user_attr(key, summary[key])
    if "test" in summary:
        trial.set_user_attr("test_accuracy", summary["test"]["accuracy"])
    study.tell(trial, value)
    return "complete", value, f"best epoch {summary['best_epoch']}", cfg


# --- results ----------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def trial_rows(trials: Sequence[Any], names: Sequence[str]) -> list[list[Any]]:
    reruns = superseded(trials)
    rows = []
    for t in trials:
        note = t.user_attrs.get("failed", "")
        if t.number in reruns:
            note = f"re-run as trial {reruns[t.number]}"
        elif t.state.name == "PRUNED":
            note = f"pruned after epoch {t.last_step}"
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append([t.number, t.state.name.lower(), t.value if t.state.name == "COMPLETE" else None,
                     *[t.params.get(n) for n in names], t.last_step, seconds, note])
    return rows


def write_results(study: Any, trials: Sequence[Any], study_dir: Path, space: Mapping[str, Param],
                  plots: bool) -> list[Path]:
    """trials.md, trials.csv and best.yaml (when a trial completed) from ``trials`` (the study's,
    as just read); the plots when ``plots``."""
    import csv

    from jaxft.report import markdown_table

    names = [n for n in space if not space[n].fixed]
    headers = ["trial", "state", "val accuracy", *names, "epochs", "seconds", "note"]
    rows = trial_rows(trials, names)
    written = [atomic_write(study_dir / "trials.md", lambda tmp: tmp.write_text(
        markdown_table(headers, [[_fmt(c) for c in row] for row in rows]) + "\n"))]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([headers, *rows])

    written.append(atomic_write(study_dir / "trials.csv", write_csv))
    best = best_trial(trials)
    if best is not None:
        written.append(write_best_config(best, study.study_name, study_dir))
    if plots:
        written += write_plots(study, study_dir, names)
    return written


def write_best_config(best: Any, study_name: str, study_dir: Path) -> Path:
    import yaml

    run_dir = study_dir / best.user_attrs["run_dir"]
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("out")  # training it again makes a new run directory
    header = (f"# best trial of study {study_name}: trial {best.number}, val accuracy {best.value:.4f}\n"
              f"# its run: {run_dir}\n# train it again: python -m jaxft.train --config {study_dir / 'best.yaml'}\n")
    return atomic_write(study_dir / "best.yaml",
                        lambda tmp: tmp.write_text(header + yaml.safe_dump(config, sort_keys=False)))


def write_plots(study: Any, study_dir: Path, names: Sequence[str]) -> list[Path]:
    """Optuna's own matplotlib plots; one that the trials cannot support yet (importances need two
    completed trials that differ) is skipped with the reason."""
    from optuna.visualization import matplotlib as optuna_plots

    from jaxft.report import _save_figure

    (study_dir / "plots").mkdir(exist_ok=True)
    written = []
    for name, plot in (("optimization_history", optuna_plots.plot_optimization_history),
                       ("param_importances", optuna_plots.plot_param_importances),
                       ("parallel_coordinate", optuna_plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():  # matplotlib's notes on a one-valued axis
                warnings.simplefilter("ignore", UserWarning)
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            written.append(_save_figure(figure, study_dir / "plots" / f"{name}.png"))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            print(f"  plot {name} skipped: {exc}")
    return written


# --- the study --------------------------------------------------------------------------------------

def trial_line(number: int, values: Mapping[str, Any], state: str, value: Optional[float], note: str,
               seconds: float, best: Any) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    result = f"{value:.4f}" if value is not None else state
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no trial completed yet"
    return f"trial {number} [{params}]: {result} ({note}; {seconds:.0f} s) | {best_text}"


def best_trial(trials: Sequence[Any]) -> Any:
    """The completed trial with the highest value, the first on a tie (as Optuna's best_trial)."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def work(study: Any, settings: Mapping[str, Any], base: TrainConfig, space: Mapping[str, Param],
         study_dir: Path, timeout: Optional[float]) -> int:
    """Run trials until the study's budget is used (by every worker together) or ``timeout``."""
    from filelock import FileLock

    lock = FileLock(str(study_dir / ".ask.lock"))
    started, ran = time.monotonic(), 0
    while timeout is None or time.monotonic() - started < timeout:
        with lock:  # counting and asking as one step: two workers never both take the last trial
            _optuna().storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)  # every trial before the one asked for next
            if not more_to_run(trials, settings["n_trials"]):
                break
            trial = study.ask()
        dead = superseded(trials)
        index = sum(1 for t in trials if t.number < trial.number and t.number not in dead)
        # a queued re-run (in ``trials`` as WAITING) names the trial it continues
        original = next((t.system_attrs.get("failed_trial") for t in trials if t.number == trial.number), None)
        study.sampler = make_sampler(settings["sampler"], base.seed, index)
        beat = heartbeat(study, trial)
        beat.start()
        clock = time.monotonic()
        try:
            state, value, note, cfg = run_trial(study, trial, original, base, space, study_dir,
                                                settings["study_name"])
        finally:
            beat.join()
        ran += 1
        shown = {k: getattr(cfg, k) for k in space if k != "partial_fraction" and not space[k].fixed}
        trials = study.get_trials(deepcopy=False)
        print(trial_line(trial.number, shown, state, value, note, time.monotonic() - clock, best_trial(trials)),
              flush=True)
        write_results(study, trials, study_dir, space, plots=False)
    return ran


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxft.tune",
        description="Search training settings with Optuna: each trial is a jaxft.train run, its objective the best "
                    "validation accuracy, reported every epoch so the pruner stops poor trials early. The training "
                    "flags below set the base of every trial; the search space overrides what it names. --out is "
                    "the study directory.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune = parser.add_argument_group("study")
    tune.add_argument("--resume", metavar="STUDY_DIR",
                      help="continue the study in STUDY_DIR, or join it as one more parallel worker")
    tune.add_argument("--n-trials", type=int, help="trials in the whole study, all workers together (default 20)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (this process)")
    tune.add_argument("--space", metavar="FILE", help="search space file (YAML/JSON: setting -> spec); replaces the "
                                                     "default space")
    tune.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                      help="add or override one setting of the space: lr=1e-5:1e-2:log, batch_size=16,32, "
                           "epochs=3 (fixed)")
    tune.add_argument("--enqueue", action="append", default=[], metavar="NAME=VALUE,...",
                      help="run a trial with these settings first (e.g. the recipe's: lr=1e-3,strategy=head); "
                           "repeat for more")
    tune.add_argument("--sampler", choices=SAMPLERS, help="tpe (default) or random; seeded from --seed")
    tune.add_argument("--pruner", choices=PRUNERS, help="median (default), percentile (25th), halving, hyperband, none")
    tune.add_argument("--prune-startup", type=int, help="trials that finish before any is pruned (default 3)")
    tune.add_argument("--prune-warmup", type=int, help="epochs a trial runs before it can be pruned (default 1)")
    tune.add_argument("--storage", help="Optuna storage: an SQLite file or a database URL (default STUDY_DIR/study.db)")
    tune.add_argument("--heartbeat", type=int, help="seconds between a trial's heartbeats; a trial silent for twice "
                                                    "that is taken as dead and re-run (default 30)")
    parser.add_argument("--config", help="YAML or JSON file with training flags (the base of every trial)")
    add_config_flags(parser)
    return parser


TUNE_DEFAULTS = {"n_trials": 20, "sampler": "tpe", "pruner": "median", "prune_startup": 3, "prune_warmup": 1,
                 "heartbeat": 30}
TUNE_OPTIONS = ("resume", "n_trials", "timeout", "space", "param", "enqueue", "sampler", "pruner", "prune_startup",
                "prune_warmup", "storage", "heartbeat", "config")


def new_study(args: argparse.Namespace, flags: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Check everything, then create the study directory and its study.json."""
    from jaxft.train import default_run_dir

    base = build_config(load_config_file(args.config) if args.config else {}, flags, args.config or "flags")
    specs = dict(DEFAULT_SPACE) if args.space is None else load_space_file(args.space)
    specs.update(parse_assignments(args.param))
    space = parse_space(specs, args.space or "the default space and --param")
    for item in args.enqueue:  # checked here too: a mistake must leave no study directory behind
        parse_trial_values(item, space)
    study_dir = Path(base.out) if base.out else default_run_dir(base, "tune")
    if (study_dir / STUDY_FILE).exists():
        raise TuneError(f"{study_dir} holds a study already: continue it (or add a worker) with "
                        f"python -m jaxft.tune --resume {study_dir}, or choose another --out")
    if study_dir.exists() and not study_dir.is_dir():
        raise TuneError(f"--out {study_dir} is a file, not a directory")
    url = storage_url(args.storage or str(study_dir / DB_FILE))
    check_storage(url)
    settings = {**TUNE_DEFAULTS, **{k: getattr(args, k) for k in TUNE_DEFAULTS if getattr(args, k) is not None}}
    for key in ("n_trials", "heartbeat", "prune_startup"):
        if settings[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {settings[key]}")
    if settings["prune_warmup"] < 0:
        raise ConfigError(f"--prune-warmup must be >= 0, got {settings['prune_warmup']}")
    settings.update(storage=url, study_name=study_dir.name, base=config_to_dict(base), space=to_json(space))
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json(study_dir / STUDY_FILE, settings)
    return study_dir, settings


def resumed_study(args: argparse.Namespace, flags: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    study_dir = Path(args.resume)
    if not (study_dir / STUDY_FILE).is_file():
        raise TuneError(f"--resume {study_dir}: no study there (no {STUDY_FILE}); start one with python -m "
                        f"jaxft.tune --out {study_dir}")
    given = sorted(flags) + [f"--{n}" for n in ("space", "param", "config", "storage") if getattr(args, n)]
    if given:
        raise ConfigError(f"--resume continues the study with its own base config, space and storage; it cannot "
                          f"change {', '.join(given)}. It may change --n-trials, --timeout, --sampler, --pruner")
    try:
        settings = json.loads((study_dir / STUDY_FILE).read_text())
    except ValueError as exc:
        raise TuneError(f"{study_dir / STUDY_FILE} cannot be read as JSON ({exc}); it was edited or damaged") from None
    settings.update({k: getattr(args, k) for k in TUNE_DEFAULTS if getattr(args, k) is not None})
    return study_dir, settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # No jax.distributed here: every tuning process is a worker of its own (several of them,
    # started by hand or by srun, share one study through its storage); a trial runs on the
    # devices of its process.
    from jaxft import runtime
    from jaxft.train import StopRequested, user_errors

    runtime.split_cpu_for_command(argv)  # before anything starts a backend

    flags = {k: v for k, v in vars(args).items() if k not in TUNE_OPTIONS}
    study_dir: Optional[Path] = Path(args.resume) if args.resume else None
    try:
        optuna = _optuna()
        study_dir, settings = resumed_study(args, flags) if args.resume else new_study(args, flags)
        base = build_config(settings["base"], {}, str(study_dir / STUDY_FILE))
        space = parse_space(settings["space"], str(study_dir / STUDY_FILE))
        enqueued = [parse_trial_values(item, space) for item in args.enqueue]
        storage = open_storage(settings["storage"], settings["heartbeat"])
        pruner = make_pruner(settings["pruner"], settings["prune_startup"], settings["prune_warmup"])
        if args.resume:
            study = optuna.load_study(study_name=settings["study_name"], storage=storage, pruner=pruner)
        else:
            study = optuna.create_study(study_name=settings["study_name"], storage=storage, direction="maximize",
                                        pruner=pruner)
        for values in enqueued:
            study.enqueue_trial(values)
        done = counted_trials(study.get_trials(deepcopy=False))
        print(f"study {settings['study_name']} in {study_dir}: {done} of {settings['n_trials']} trials run or queued, "
              f"{settings['sampler']} sampler (seed {base.seed}), {settings['pruner']} pruner")
        print("  space: " + ", ".join(f"{name} {p.describe()}" for name, p in space.items()))
        print(f"  live view: optuna-dashboard {settings['storage']}")
        work(study, settings, base, space, study_dir, args.timeout)
    except (StopRequested, KeyboardInterrupt) as exc:
        print(f"interrupted: the running trial is checkpointed and queued again; continue with python -m jaxft.tune "
              f"--resume {study_dir}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, StopRequested) else 130
    except (*user_errors(), TuneError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    trials = study.get_trials(deepcopy=False)
    files = write_results(study, trials, study_dir, space, plots=True)
    best = best_trial(trials)
    counts = collections.Counter(t.state.name.lower() for t in trials)
    print(f"done: {', '.join(f'{n} {state}' for state, n in sorted(counts.items()))}"
          + (f"; best val accuracy {best.value:.4f} (trial {best.number})" if best else "; no trial completed"))
    print(f"wrote {', '.join(str(p.relative_to(study_dir)) for p in files)} in {study_dir}")
    if best:
        print(f"train the best again: python -m jaxft.train --config {study_dir / 'best.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
