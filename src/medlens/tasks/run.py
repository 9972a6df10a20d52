"""A run directory: what ``medlens train`` writes and ``Predictor.from_run`` reads.

Layout::

    RUN/
      run.json      task, dataset summary (labels, channels, modalities), configuration, folds trained,
                    the split, post-processing decisions, versions
      plan.json     the plan the run was trained with (a copy, so the run is self-contained)
      cache/        the preprocessed cache (unless --cache points elsewhere)
      fold_K/       the engine's run directory per fold: model.safetensors, history.json, config.json, tb/ ...

Everything is JSON or safetensors; nothing is unpickled.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from medlens._fs import atomic_write_json
from medlens.errors import InputError, RunError

log = logging.getLogger(__name__)

RUN_VERSION = 1
RUN_FILE = "run.json"


#: Task name -> module implementing ``train_fold(...) -> FoldOutcome`` and ``decide(validation, options)``.
TASK_MODULES = {
    "segmentation": "medlens.tasks.segment_train",
    "classification": "medlens.tasks.classify_train",
}


class TaskTrainer(Protocol):
    """What a task module offers ``train``: train one fold, and decide from all folds' validation evidence."""

    def train_fold(
        self,
        dataset: Any,
        config: Mapping[str, Any],
        fold: Any,
        run_dir: Path,
        *,
        cache_dir: Path,
        resume: bool,
        progress: bool,
        device: str,
        options: dict[str, Any],
    ) -> FoldOutcome: ...

    def decide(self, validation: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]: ...


def task_module(task: str, where: Path | str) -> TaskTrainer:
    """The module that trains ``task``, with a clear error for tasks medlens cannot train yet."""
    import importlib

    if task not in TASK_MODULES:
        raise InputError(
            f"{where}: training for task {task!r} is not available yet (available: {', '.join(TASK_MODULES)})"
        )
    return cast(TaskTrainer, importlib.import_module(TASK_MODULES[task]))


@dataclass
class FoldOutcome:
    """A trained fold and its per-case validation evidence (JSON-able; kept in run.json for ``decide``)."""

    trained: TrainedFold
    validation: dict[str, Any] = field(default_factory=dict)
    #: Run-level facts measured on this fold, merged into run.json (e.g. ``inference_backend``).
    run_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainedFold:
    """What training one fold produced."""

    fold: int
    run_dir: Path
    best_score: float | None
    iterations: int
    seconds: float


def parse_folds(fold: str | int, n_folds: int) -> list[int]:
    """``"all"`` -> every fold; ``"0"``/``0`` -> ``[0]``; ``"0,2"`` -> ``[0, 2]``."""
    if str(fold) == "all":
        return list(range(n_folds))
    try:
        folds = [int(f) for f in str(fold).split(",")]
    except ValueError:
        raise InputError(f"--fold {fold!r}: give a fold number, a comma-separated list or 'all'") from None
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise InputError(f"--fold {fold!r}: folds run from 0 to {n_folds - 1}")
    return folds


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """Load ``run.json`` of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a medlens run (no {RUN_FILE}); train one with 'medlens train'")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("medlens_run") != RUN_VERSION:
        raise RunError(f"{path}: not a medlens run file of version {RUN_VERSION}")
    return info


def write_run(run_dir: Path, info: dict[str, Any]) -> Path:
    path = run_dir / RUN_FILE
    atomic_write_json(path, info)
    return path


def train(
    dataset_dir: str | Path,
    plan_path: str | Path,
    out: str | Path,
    *,
    fold: str | int = 0,
    configuration: str | None = None,
    n_folds: int = 5,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> list[TrainedFold]:
    """Train the plan's model on a dataset, one fold or several, into the run directory ``out``.

    Args:
        dataset_dir: the dataset folder.
        plan_path: a ``plan.json`` made by ``medlens plan`` (and perhaps edited).
        out: the run directory.
        fold: fold number, comma-separated list, or ``"all"`` (cross-validation; predict ensembles the folds).
        configuration: plan configuration to train (default: the plan's default).
        n_folds: number of cross-validation folds.
        cache_dir: where to keep the preprocessed cache (default ``out/cache``).
        resume: continue interrupted folds from their last checkpoint.
        progress: rich progress bars.
        device: "auto", "cpu" or "cuda".
        options: task-specific options passed to the task's ``train_fold`` and ``decide`` (e.g. a target
            sensitivity for a classifier's threshold).

    Returns:
        One :class:`TrainedFold` per fold trained.
    """
    from medlens.data.dataset import load_dataset
    from medlens.data.splits import make_folds
    from medlens.plan.plan import Plan

    dataset = load_dataset(dataset_dir)
    plan = Plan.load(plan_path)
    if plan.task != dataset.task:
        raise InputError(
            f"{plan_path}: plans a {plan.task} model but {dataset.root} is a {dataset.task} dataset"
        )
    name = configuration or plan.default_configuration
    config = plan.configuration(name)
    out = Path(out)
    folds = make_folds(dataset, n_folds=n_folds, seed=int(config["training"].get("seed", 0)))
    wanted = parse_folds(fold, len(folds))
    existing = (out / RUN_FILE).is_file()
    if existing and not resume:
        prior = read_run(out)
        clash = [f for f in wanted if f in prior.get("folds", [])]
        if clash:
            raise RunError(f"{out}: fold(s) {clash} are already trained here; use --resume or another --out")
    from medlens.engine import device_for
    from medlens.engine.distributed import DistContext

    # Under torchrun, join the process group now: rank 0 alone writes the run's files and builds the cache.
    dist = DistContext.from_env(device_for(device))
    try:
        return _train_folds(
            dataset, plan, name, config, folds, wanted, out, existing, cache_dir, resume, progress, device,
            dict(options or {}), dist.is_main,
        )  # fmt: skip
    finally:
        dist.close()


def _train_folds(
    dataset: Any,
    plan: Any,
    name: str,
    config: Any,
    folds: list[Any],
    wanted: list[int],
    out: Path,
    existing: bool,
    cache_dir: str | Path | None,
    resume: bool,
    progress: bool,
    device: str,
    options: dict[str, Any],
    is_main: bool,
) -> list[TrainedFold]:
    from medlens.data.splits import splits_json

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        plan.save(out / "plan.json")
    info = read_run(out) if existing else _new_run_info(dataset, plan, name, splits_json(folds))

    module = task_module(dataset.task, dataset.root)
    results = []
    for f in wanted:
        fold_obj = folds[f]
        outcome = module.train_fold(
            dataset,
            config,
            fold_obj,
            out / f"fold_{f}",
            cache_dir=Path(cache_dir) if cache_dir else out / "cache" / name,
            resume=resume,
            progress=progress,
            device=device,
            options=options,
        )
        results.append(outcome.trained)
        info["folds"] = sorted({*info.get("folds", []), f})
        info.setdefault("fold_results", {})[str(f)] = {
            "best_score": outcome.trained.best_score,
            "iterations": outcome.trained.iterations,
            "seconds": round(outcome.trained.seconds, 1),
            "val_cases": list(fold_obj.val),
        }
        if is_main:
            info.setdefault("validation", {}).update(outcome.validation)
            info.update(outcome.run_info)
            info.update(module.decide(info["validation"], options))
            write_run(out, info)
    return results


def _new_run_info(dataset: Any, plan: Any, configuration: str, splits: dict[str, Any]) -> dict[str, Any]:
    from medlens import __version__

    return {
        "medlens_run": RUN_VERSION,
        "medlens_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task": dataset.task,
        "configuration": configuration,
        "dataset": {
            "name": dataset.name,
            "root": str(dataset.root.resolve()),
            "labels": dataset.labels,
            "channels": {str(k): v for k, v in dataset.channels.items()},
            "modalities": {str(k): v for k, v in dataset.modalities.items()},
            "ndim": dataset.ndim,
        },
        "splits": splits,
        "folds": [],
    }


def fold_dirs(run_dir: Path, info: dict[str, Any], folds: Sequence[int] | None = None) -> list[Path]:
    """The directories of the trained folds (all, or the ones asked for), checked to hold weights."""
    trained = list(info.get("folds", []))
    chosen = trained if folds is None else [f for f in folds if f in trained]
    if not chosen:
        raise RunError(f"{run_dir}: no trained fold{'' if folds is None else f' among {list(folds)}'}")
    dirs = []
    for f in chosen:
        d = run_dir / f"fold_{f}"
        if not (d / "model.safetensors").is_file():
            raise RunError(
                f"{d}: model.safetensors is missing; the fold did not finish (train with --resume)"
            )
        dirs.append(d)
    return dirs
