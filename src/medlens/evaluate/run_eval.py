"""``medlens evaluate RUN --data DIR``: every piece of evidence the trust report shows, computed once.

One pass predicts the held-out cases with the run's models, then adds, for every task: metrics with bootstrap
CIs and the per-case table; calibration (ECE with its binning, reliability bins, temperature scaling fitted on
validation for classifiers, voxel-level calibration for segmenters); subgroups for every metadata column
(site, sex, age band, ...) with the largest gap and its CI; domain shift (per site, and sites never seen in
training); robustness curves (noise, blur, contrast, bias field, FGSM, PGD); explanations (Grad-CAM, occlusion,
integrated gradients) on chosen and worst cases with the model-randomisation sanity check; per-case uncertainty
and the deferral curve.

Everything lands in ``RUN/evaluation/`` (or ``out_dir``): ``evaluation.json`` (numbers, JSON-able) and
``pictures.npz`` (2D slices of the pictured cases: image, reference, prediction, uncertainty and saliency
maps), which :func:`medlens.report.trust.build_report` turns into the HTML report and the model card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError

log = logging.getLogger(__name__)

EVALUATION_VERSION = 1
#: Metadata keys that identify rather than group cases.
ID_COLUMNS = ("patient_id", "study_id", "subject", "id")
#: Below this many cases a subgroup is reported as too small to compare.
MIN_GROUP_SIZE = 5
#: The evidence stages after the prediction pass, in order (each a key of ``evaluation.json``).
STAGES = ("calibration", "subgroups", "shift", "uncertainty", "robustness", "explanations")


@dataclass
class Collected:
    """What one pass over the evaluated cases produced (the inputs of every evidence function)."""

    task: str
    ids: list[str]
    sites: list[str | None]
    meta: list[dict[str, Any]]
    performance: np.ndarray  # per case: mean foreground Dice, or 1/0 correct at the stored threshold
    uncertainty: np.ndarray | None
    uncertainty_info: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    pictures: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)  # big inputs of later stages, not written


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str = "test",
    seed: int = 0,
    fast: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Evaluate a trained run on a dataset's held-out cases and write ``evaluation.json`` + ``pictures.npz``.

    Args:
        run_dir: a run from ``medlens train``.
        data_dir: a dataset folder of the same task, classes and channels (usually the one trained on).
        out_dir: where to write (default ``RUN/evaluation``).
        split: ``test`` (the dataset's test cases) or ``val`` (the validation cases of the run's folds).
        seed: every bootstrap, perturbation and sampling seed.
        fast: fewer cases and draws for the costly parts (robustness, explanations); the metrics,
            calibration, subgroups and uncertainty always use every case.
        progress: called with a short text before each stage.

    Returns:
        The path of ``evaluation.json``.

    Raises:
        InputError: the dataset does not match the run (task, classes, channels) or has no cases to evaluate.
    """
    from medlens._fs import atomic_path, atomic_write_json
    from medlens.data.dataset import load_dataset
    from medlens.evaluate import evidence
    from medlens.serve import load_predictor
    from medlens.tasks.run import read_run

    t0 = time.perf_counter()
    say = progress or (lambda text: log.info("%s", text))
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    dataset = load_dataset(data_dir)
    check_compatible(info, dataset, run_dir)
    cases = select_cases(info, dataset, split)
    out = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)

    if "referral" not in info and _has_validation_cases(info, dataset):
        from medlens.explain.uncertainty import decide_referral

        say("decide the referral threshold on the run's validation cases")
        decide_referral(run_dir, data_dir)  # stores run.json["referral"]
        info = read_run(run_dir)
    say(f"predict {len(cases)} {split} cases")
    predictor = load_predictor(run_dir, device="auto", backend="torch")
    if info["task"] == "segmentation":
        from medlens.evaluate.run_collect import collect_segmentation as collect
    else:
        from medlens.evaluate.run_collect import collect_classification as collect
    got = collect(predictor, dataset, cases, seed=seed)

    times: dict[str, float] = {"predict": round(time.perf_counter() - t0, 1)}
    result: dict[str, Any] = {
        "medlens_evaluation": EVALUATION_VERSION,
        "run": str(run_dir.resolve()),
        "run_name": run_dir.resolve().name,
        "task": info["task"],
        "dataset": {"name": dataset.name, "root": str(Path(data_dir).resolve())},
        "split": split,
        "n_cases": len(cases),
        "seed": seed,
        "fast": fast,
        "cases": [
            {"id": i, "site": s, "meta": m, "performance": _round(p)}
            for i, s, m, p in zip(got.ids, got.sites, got.meta, got.performance, strict=True)
        ],
        "prediction_seconds": got.seconds,
        **got.extra,
    }
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("calibration", lambda: evidence.calibration(info, run_dir, got, split)),
        ("subgroups", lambda: evidence.subgroups(got, seed=seed)),
        ("shift", lambda: evidence.shift(info, dataset, got, seed=seed)),
        ("uncertainty", lambda: evidence.deferral(info, got)),
        ("robustness", lambda: evidence.robustness(predictor, dataset, cases, got, seed=seed, fast=fast)),
        ("explanations", lambda: evidence.explanations(predictor, dataset, cases, got, seed=seed, fast=fast)),
    ]
    for name, stage in stages:
        say(name)
        t1 = time.perf_counter()
        result[name] = stage()
        times[name] = round(time.perf_counter() - t1, 1)
    result["seconds"] = {**times, "total": round(time.perf_counter() - t0, 1)}
    with atomic_path(out / "pictures.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, allow_pickle=False, **got.pictures)  # type: ignore[arg-type]
    atomic_write_json(out / "evaluation.json", _jsonable(result))
    return out / "evaluation.json"


def check_compatible(info: dict[str, Any], dataset: Any, run_dir: Path) -> None:
    """Refuse a dataset whose task, classes or channels differ from the run's, saying which and how."""
    where = f"{dataset.root}: dataset {dataset.name!r}"
    if dataset.task != info.get("task"):
        raise InputError(
            f"{where} is a {dataset.task} dataset; run {run_dir} is a {info.get('task')} model "
            "(evaluate it on a dataset of its own task)"
        )
    run_labels = {str(k): int(v) for k, v in (info["dataset"].get("labels") or {}).items()}
    data_labels = {str(k): int(v) for k, v in dataset.labels.items()}
    if run_labels and run_labels != data_labels:
        raise InputError(
            f"{where} has classes {data_labels}; run {run_dir} was trained on {run_labels} "
            "(the classes and their values must match)"
        )
    n_run = max(len(info["dataset"].get("channels") or {}), 1)
    n_data = max(len(dataset.channels or {}), 1)
    if n_run != n_data:
        raise InputError(
            f"{where} has {n_data} channel(s); run {run_dir} was trained on {n_run} "
            f"({', '.join(map(str, (info['dataset'].get('channels') or {}).values()))})"
        )


def select_cases(info: dict[str, Any], dataset: Any, split: str) -> list[Any]:
    """The cases of ``split``: the dataset's test cases, or the validation cases of the run's trained folds."""
    if split == "test":
        cases = list(dataset.test)
        if not cases:
            raise InputError(
                f"{dataset.json_path}: has no test cases to evaluate; add a 'test' list (or use --split val "
                "to evaluate on the run's validation cases)"
            )
        missing = [c.id for c in cases if c.label is None]
        if missing:
            raise InputError(
                f"{dataset.json_path}: test case(s) {', '.join(missing[:5])} have no label; evaluation needs "
                "a reference for every case"
            )
        return cases
    if split == "val":
        wanted: list[str] = []
        for fold in info.get("folds", []):
            wanted += info["splits"]["folds"][int(fold)]["val"]
        by_id = {c.id: c for c in dataset.training}
        absent = [w for w in wanted if w not in by_id]
        if absent:
            raise InputError(
                f"{dataset.json_path}: validation case(s) {', '.join(absent[:5])} of the run are not in this "
                "dataset; --split val needs the dataset the run was trained on"
            )
        return [by_id[w] for w in wanted]
    from medlens.errors import unknown_name

    raise unknown_name("split", split, ("test", "val"))


def _has_validation_cases(info: dict[str, Any], dataset: Any) -> bool:
    """Whether ``dataset`` holds the run's validation cases (it is the dataset the run was trained on)."""
    ids = {c.id for c in dataset.training}
    folds = info.get("splits", {}).get("folds", [])
    wanted = [w for f in info.get("folds", []) if int(f) < len(folds) for w in folds[int(f)]["val"]]
    return bool(wanted) and all(w in ids for w in wanted)


def metadata_columns(meta: Sequence[dict[str, Any]]) -> list[str]:
    """Columns to form subgroups from: every metadata key present on a case, except identifiers."""
    keys: list[str] = []
    for m in meta:
        for k in m:
            if k not in keys and k not in ID_COLUMNS:
                keys.append(k)
    return keys


def _round(v: Any, digits: int = 6) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if not np.isfinite(f) else round(f, digits)


def _jsonable(x: Any) -> Any:
    """NumPy scalars/arrays to Python, NaN/inf to None, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        return None if not np.isfinite(x) else float(x)
    return x
