"""The evidence stages of ``medlens evaluate``: calibration, subgroups, domain shift, uncertainty and deferral,
robustness, explanations.

Each function takes the :class:`~medlens.evaluate.run_eval.Collected` prediction pass and returns a JSON-able
dict for ``evaluation.json``; the statistics themselves live in their own modules (calibration, subgroups,
deferral, robustness; ``explain/``), this module only decides what to compute them on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.evaluate.run_eval import MIN_GROUP_SIZE, Collected, metadata_columns

log = logging.getLogger(__name__)

#: Explanation methods shown in the report (all of :data:`medlens.explain.saliency.METHODS`).
EXPLAIN_CASES = {"fast": 2, "full": 4}
ROBUSTNESS_CASES = {"segmentation": (3, 6), "classification": (24, 200)}


# ---- calibration ---------------------------------------------------------------------------------------------
def calibration(info: dict[str, Any], run_dir: Any, got: Collected, split: str = "test") -> dict[str, Any]:
    """Classifiers: ECE before/after temperature scaling fitted on the run's validation predictions.
    Segmenters: voxel-level ECE of the class probabilities on the evaluated cases.

    ``before`` is what ``medlens predict`` returns (the run does not apply the temperature); ``after`` shows
    what scaling would give. On ``split="val"`` the temperature is fitted and measured on the same cases
    (in-sample), which the note says.
    """
    from medlens.evaluate import calibration as cal

    if got.task == "segmentation":
        result = cal.voxel_calibration(got.arrays["probs"], got.arrays["truth"], seed=0)
        return {"kind": "voxel", "before": result}
    ctype = str(got.extra["classification_type"])
    val_y, val_p = validation_evidence(info)
    if val_p is None:
        return {
            "kind": "classification",
            "before": cal.expected_calibration_error(got.arrays["probs"], got.arrays["y"], ctype),
            "note": "the run has no validation predictions: temperature scaling was not fitted",
        }
    report = cal.calibration_report(val_p, val_y, got.arrays["probs"], got.arrays["y"], ctype)
    notes = [str(report.pop("note"))] if report.get("note") else []
    notes.append("medlens predict returns the probabilities before scaling (the run does not store T)")
    if split == "val":
        notes.append("evaluated on the validation cases T was fitted on: 'after' is in-sample, optimistic")
    if len(info.get("folds", [])) > 1:
        notes.append(
            "T was fitted on each fold's own validation predictions and is applied to the fold ensemble's "
            "averaged probabilities, which are usually less confident"
        )
    return {"kind": "classification", "n_validation": len(val_p), **report, "note": "; ".join(notes) + "."}


def validation_evidence(info: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The targets and probabilities of a classification run's validation cases (``run.json``)."""
    from medlens.tasks.classify_train import META_KEY

    cases = {k: v for k, v in (info.get("validation") or {}).items() if k != META_KEY}
    rows = [v for v in cases.values() if isinstance(v, dict) and "scores" in v and "target" in v]
    if not rows:
        return None, None
    return np.asarray([r["target"] for r in rows]), np.asarray([r["scores"] for r in rows], dtype=np.float64)


# ---- subgroups and shift -------------------------------------------------------------------------------------
def group_metric(got: Collected) -> tuple[str, Any]:
    """The metric compared between groups: mean Dice (segmentation), AUC (binary) or accuracy (others)."""
    perf = got.performance
    if got.task == "segmentation":
        return "mean foreground Dice", lambda idx: float(np.nanmean(perf[idx])) if len(idx) else np.nan
    if got.extra.get("classification_type") == "binary":
        from medlens.evaluate.subgroups import auc_metric

        return "AUC", auc_metric(got.arrays["y"], got.arrays["probs"][:, 1])
    return "accuracy", lambda idx: float(np.mean(perf[idx])) if len(idx) else np.nan


def group_values(got: Collected, column: str) -> list[str | None]:
    """Each case's group in ``column`` (``None`` when missing); ages and other many-valued numbers in 20-year
    bands."""
    from medlens.evaluate.subgroups import age_bands

    raw = got.sites if column == "site" else [m.get(column) for m in got.meta]
    present = [v for v in raw if v is not None and v != ""]
    numeric = present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
    if numeric and (column == "age" or len(set(present)) > 10):
        banded = iter(age_bands([float(v) for v in present], width=20))
        return [next(banded) if v is not None and v != "" else None for v in raw]
    return [None if v is None or v == "" else str(v) for v in raw]


def subgroups(got: Collected, *, seed: int = 0) -> dict[str, Any]:
    """Per metadata column (site first): the metric per group with CIs and the largest gap."""
    from medlens.evaluate.subgroups import subgroup_analysis

    name, metric = group_metric(got)
    columns = (["site"] if any(s is not None for s in got.sites) else []) + [
        c for c in metadata_columns(got.meta) if c != "site"
    ]
    out: dict[str, Any] = {"metric": name, "min_size": MIN_GROUP_SIZE, "columns": {}}
    for column in columns:
        out["columns"][column] = subgroup_analysis(
            metric,
            len(got.ids),
            group_values(got, column),
            column,
            min_size=MIN_GROUP_SIZE,
            seed=seed,
            metric_name=name,
        )
    if not columns:
        out["note"] = "the cases carry no metadata (site, sex, age, ...): no subgroups to compare"
    return out


def shift(info: dict[str, Any], dataset: Any, got: Collected, *, seed: int = 0) -> dict[str, Any]:
    """Results per site, and which evaluated sites the run never saw in training (a held-out site)."""
    from medlens.evaluate.subgroups import subgroup_analysis

    trained_ids: set[str] = set()
    for fold in info.get("folds", []):
        trained_ids.update(info["splits"]["folds"][int(fold)]["train"])
    seen = sorted({str(c.site) for c in dataset.training if c.id in trained_ids and c.site is not None})
    evaluated = sorted({str(s) for s in got.sites if s is not None})
    if not evaluated:
        return {"note": "the cases carry no site: domain shift cannot be assessed", "held_out_sites": []}
    held_out = [s for s in evaluated if s not in seen]
    name, metric = group_metric(got)
    per_site = subgroup_analysis(
        metric, len(got.ids), group_values(got, "site"), "site", min_size=2, seed=seed
    )
    result: dict[str, Any] = {
        "metric": name,
        "training_sites": seen,
        "evaluated_sites": evaluated,
        "held_out_sites": held_out,
        "per_site": per_site,
    }
    if held_out:
        column = ["held-out" if s in held_out else None if s is None else "seen" for s in got.sites]
        versus = subgroup_analysis(metric, len(got.ids), column, "held-out site", min_size=2, seed=seed)
        by_group = {g["group"]: g for g in versus["groups"]}
        for key, group in (("held_out", "held-out"), ("seen", "seen")):
            g = by_group.get(group)
            result[key] = {"estimate": g["estimate"], "ci": g["ci"], "n": g["n"]} if g else None
        result["gap"] = versus["gap"]
    else:
        result["note"] = "every evaluated site was seen in training: no held-out site in this dataset"
    return result


# ---- uncertainty ---------------------------------------------------------------------------------------------
def deferral(info: dict[str, Any], got: Collected) -> dict[str, Any]:
    """Per-case uncertainty, the deferral curve (metric on kept cases vs fraction referred) and the referral
    threshold stored in the run."""
    from medlens.evaluate.deferral import deferral_curve

    assert got.uncertainty is not None  # both collectors estimate it
    curve = deferral_curve(got.performance, got.uncertainty)
    referral = info.get("referral")
    out: dict[str, Any] = {
        **got.uncertainty_info,
        "performance": "mean foreground Dice" if got.task == "segmentation" else "correct at the threshold",
        "scores": {i: float(s) for i, s in zip(got.ids, got.uncertainty, strict=True)},
        "curve": curve,
        "referral": referral,
    }
    if referral and referral.get("threshold") is not None:
        refer = got.uncertainty > float(referral["threshold"])  # the rule of explain.uncertainty.refer
        out["referred"] = {
            "n": int(refer.sum()),
            "of": len(refer),
            "kept_metric": float(np.nanmean(got.performance[~refer])) if (~refer).any() else None,
            "referred_metric": float(np.nanmean(got.performance[refer])) if refer.any() else None,
        }
    return out


# ---- robustness ----------------------------------------------------------------------------------------------
def robustness(
    predictor: Any, dataset: Any, cases: Sequence[Any], got: Collected, *, seed: int = 0, fast: bool = False
) -> dict[str, Any]:
    """Metric curves under noise, blur, contrast, bias field, FGSM and PGD on (a subset of) the cases."""
    from medlens.data.dataset import read_case_image
    from medlens.evaluate.robustness import robustness_curves
    from medlens.io import read_image

    few, many = ROBUSTNESS_CASES[got.task]
    n = min(len(cases), few if fast else many)
    chosen = list(cases)[:n]
    images = [read_case_image(dataset, c) for c in chosen]
    if got.task == "segmentation":
        references: Any = [read_image(dataset.path(str(c.label))) for c in chosen]
    else:
        references = got.arrays["y"][:n]
    curves = robustness_curves(predictor, images, references, task=got.task, seed=seed, max_cases=n)
    return {"n_cases": n, "curves": curves}


# ---- explanations --------------------------------------------------------------------------------------------
def explanations(
    predictor: Any, dataset: Any, cases: Sequence[Any], got: Collected, *, seed: int = 0, fast: bool = False
) -> dict[str, Any]:
    """Saliency maps (every method) for the worst and chosen cases, and the randomisation sanity check of each
    method on the first of them. The 2D slices shown go to the pictures."""
    import torch

    from medlens.explain.saliency import METHODS, saliency
    from medlens.explain.sanity import randomisation_check

    n = EXPLAIN_CASES["fast" if fast else "full"]
    wanted = [*got.extra.get("worst_cases", []), *got.extra.get("chosen_cases", [])]
    by_id = {c.id: c for c in cases}
    chosen = [by_id[i] for i in dict.fromkeys(wanted) if i in by_id][:n]
    model = predictor.models[0]
    kw: dict[str, Any] = {"task": got.task, "seed": seed}
    if (
        got.task == "classification"
    ):  # a binary softmax head explains the log-odds, CORAL its cumulative logit
        kw.update(ctype=predictor.ctype, loss=predictor.loss)
    explained: list[dict[str, Any]] = []
    sanity: dict[str, Any] = {}
    for case in chosen:
        x, target = _explain_input(predictor, dataset, case, got)
        xt = torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32))
        maps = {m: saliency(model, xt, m, target=target, **kw) for m in METHODS}
        k = _salient_slice(maps)
        got.pictures[f"{case.id}/explain/image"] = _slice(x[0], k)
        for m, a in maps.items():
            got.pictures[f"{case.id}/explain/{m}"] = _slice(a, k).astype(np.float32)
        explained.append({"id": case.id, "target": target, "slice": k, "methods": list(maps)})
        if not sanity:
            for m in METHODS:
                sanity[m] = randomisation_check(model, xt, m, target=target, repeats=1 if fast else 3, **kw)
    return {"cases": explained, "sanity": sanity, "methods": list(METHODS), "fold": 0}


def _explain_input(predictor: Any, dataset: Any, case: Any, got: Collected) -> tuple[np.ndarray, int]:
    """The preprocessed input the network sees and the class to explain.

    Segmentation: a patch of the plan's size centred on the reference foreground (any input size a U-Net
    accepts), explaining the largest foreground class. Classification: the prepared image and the positive
    class (binary) or the predicted class.
    """
    if got.task == "classification":
        i = got.ids.index(case.id)
        probs = got.arrays["probs"][i]
        target = 1 if got.extra.get("classification_type") == "binary" else int(np.argmax(probs))
        return got.arrays["x"][i], target
    from medlens.data.dataset import read_case_image
    from medlens.io import read_image
    from medlens.plan.preprocess import preprocess_case

    image = read_case_image(dataset, case)
    label = read_image(dataset.path(str(case.label)))
    data, seg, _ = preprocess_case(image, label, predictor.config, case_id=case.id)
    assert seg is not None  # a label was given
    counts = np.bincount(seg.ravel().astype(np.int64))
    target = int(np.argmax(counts[1:]) + 1) if len(counts) > 1 and counts[1:].sum() else 1
    patch = [int(p) for p in predictor.config["patch_size"]]
    fg = np.argwhere(seg[0] > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.asarray(seg.shape[1:]) // 2
    return _crop_or_pad(data, centre, patch), target


def _crop_or_pad(data: np.ndarray, centre: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A ``size`` window of ``(C, *S)`` centred at ``centre`` (clipped inside), zero-padded where too small."""
    out = np.zeros((data.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for c, s, n in zip(centre, size, data.shape[1:], strict=True):
        start = int(np.clip(c - s // 2, 0, max(n - s, 0)))
        length = min(s, n)
        src.append(slice(start, start + length))
        dst.append(slice(0, length))
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    return out


def _salient_slice(maps: dict[str, np.ndarray]) -> int | None:
    first = next(iter(maps.values()))
    if first.ndim != 3:
        return None
    return int(np.argmax(first.sum(axis=(0, 1))))


def _slice(a: np.ndarray, k: int | None) -> np.ndarray:
    return (
        np.asarray(a, dtype=np.float32) if k is None else np.ascontiguousarray(a[:, :, k], dtype=np.float32)
    )
