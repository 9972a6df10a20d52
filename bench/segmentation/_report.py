"""Scoring the peers' test predictions with one metric function, and the table, ratios and targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from _common import PeerResult

#: The issue's targets for medlens (section 7).
TARGETS = (
    "Dice: medlens >= nnU-Net at equal budget, and >= the MONAI loop",
    "Inference: >= 3x faster than nnU-Net's CPU predictor at default settings, at equal or better Dice",
    "Training throughput: >= 2x the MONAI loop's samples/s",
    "Peak RAM for training within 8 GB",
)


def find_prediction(pred_dir: Path, case_id: str) -> Path:
    """The one label map in ``pred_dir`` for ``case_id`` (``<id>.nii.gz``, or a name starting ``<id>_``)."""
    exact = [pred_dir / f"{case_id}{ext}" for ext in (".nii.gz", ".nii")]
    for p in exact:
        if p.is_file():
            return p
    found = sorted(p for p in pred_dir.glob(f"{case_id}_*") if p.name.endswith((".nii", ".nii.gz")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{pred_dir}: expected one prediction for {case_id}, found {[p.name for p in found] or 'none'}"
        )
    return found[0]


def score(
    result: PeerResult, dataset_dir: Path, test_ids: tuple[str, ...], labels: dict[str, int]
) -> dict[str, Any]:
    """Per-case and mean metrics of a peer's test predictions against the truth, in the truth's geometry.

    A prediction must be on the reference grid (same shape and affine within 1e-3 mm); one that is not is an
    error recorded for the peer, not silently resampled.
    """
    from medlens.data.dataset import load_dataset
    from medlens.evaluate import segmentation_metrics
    from medlens.io import read_image

    ds = load_dataset(dataset_dir)
    if result.pred_dir is None:
        return {}
    classes = {n: v for n, v in labels.items() if v != 0}
    per_case: dict[str, Any] = {}
    problems = []
    for cid in test_ids:
        case = ds.case(cid)
        if not isinstance(case.label, str):
            problems.append(f"{cid}: has no label map in {ds.json_path}; not scored")
            continue
        truth = read_image(ds.path(case.label))
        try:
            pred = read_image(find_prediction(result.pred_dir, cid))
        except (FileNotFoundError, OSError) as e:
            problems.append(str(e))
            continue
        if pred.spatial_shape != truth.spatial_shape or not pred.same_geometry(truth):
            problems.append(
                f"{cid}: prediction grid {pred.spatial_shape} / affine differs from the input's "
                f"{truth.spatial_shape}; not scored"
            )
            continue
        p = np.rint(np.asarray(pred.array[0])).astype(np.int16)
        per_case[cid] = segmentation_metrics(p, np.asarray(truth.array[0]), truth.spacing, classes)
    summary: dict[str, Any] = {"per_case": per_case, "problems": problems, "scored": len(per_case)}
    if per_case:
        dice = {n: float(np.mean([per_case[c][n]["dice"] for c in per_case])) for n in classes}
        hd = [per_case[c][n]["hd95"] for c in per_case for n in classes]
        finite = [h for h in hd if math.isfinite(h)]
        summary.update(
            dice=dice,
            dice_mean=float(np.mean(list(dice.values()))),
            hd95=float(np.mean(finite)) if finite else math.nan,
            hd95_undefined=len(hd) - len(finite),
        )
    return summary


# ---- rendering ------------------------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / 1000.0


def rows(results: list[PeerResult], scores: dict[str, dict[str, Any]], n_test: int) -> list[dict[str, Any]]:
    out = []
    for r in results:
        s = scores.get(r.peer, {})
        out.append(
            {
                "peer": r.peer,
                "title": r.title,
                "setup": r.setup or "-",
                "dice": s.get("dice", {}),
                "dice_mean": s.get("dice_mean"),
                "hd95": s.get("hd95"),
                "train_s": r.train.seconds if r.train else None,
                "samples_s": r.samples_per_s,
                "mvox_s": r.mvox_per_s,
                "infer_s": r.predict.seconds / n_test if r.predict and r.predict.ok else None,
                "ram_train": _gb(r.train.peak_mb) if r.train else None,
                "ram_infer": _gb(r.predict.peak_mb) if r.predict else None,
                "error": r.error,
            }
        )
    return out


def table(rws: list[dict[str, Any]], class_names: list[str]) -> str:
    head = [
        "peer",
        "setup",
        *[f"Dice {n}" for n in class_names],
        "Dice mean",
        "HD95 mm",
        "train s",
        "samples/s",
        "Mvox/s",
        "infer s/vol",
        "RAM train GB",
        "RAM infer GB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rws:
        if r["error"] and r["dice_mean"] is None:
            lines.append(f"| {r['title']} | failed (see below) |" + " |" * (len(head) - 2))
            continue
        cells = [
            r["title"],
            r["setup"],
            *[_f(r["dice"].get(n)) for n in class_names],
            _f(r["dice_mean"]),
            _f(r["hd95"], 2),
            _f(r["train_s"], 0),
            _f(r["samples_s"], 2),
            _f(r["mvox_s"], 2),
            _f(r["infer_s"], 1),
            _f(r["ram_train"], 2),
            _f(r["ram_infer"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RATIO_KEYS = (
    ("dice_mean", "Dice mean"),
    ("hd95", "HD95"),
    ("samples_s", "samples/s"),
    ("mvox_s", "Mvox/s"),
    ("infer_s", "infer s/vol"),
    ("ram_train", "RAM train"),
    ("ram_infer", "RAM infer"),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def ratio_table(rws: list[dict[str, Any]]) -> str:
    base = next((r for r in rws if r["peer"] == "medlens"), None)
    if base is None:
        return "(medlens did not run: no ratios)"
    head = ["peer / medlens", *[label for _, label in RATIO_KEYS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rws:
        if r["peer"] == "medlens":
            continue
        cells = [r["title"], *[_f(_ratio(r[k], base[k]), 2) for k, _ in RATIO_KEYS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rws: list[dict[str, Any]]) -> list[str]:
    """One line per issue target: PASS, FAIL or n/a (a peer missing), with the numbers."""
    by = {r["peer"]: r for r in rws}
    m, nn, mo = by.get("medlens"), by.get("nnunet"), by.get("monai")

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    def ok_ge(a: float | None, b: float | None, factor: float = 1.0) -> bool | None:
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return None
        return a >= factor * b

    def both(*xs: bool | None) -> bool | None:
        return None if any(x is None for x in xs) else all(xs)

    def g(r: dict[str, Any] | None, k: str) -> Any:
        return r[k] if r else None

    dice_nn, dice_mo = (
        ok_ge(g(m, "dice_mean"), g(nn, "dice_mean")),
        ok_ge(g(m, "dice_mean"), g(mo, "dice_mean")),
    )
    speed = _ratio(g(nn, "infer_s"), g(m, "infer_s"))
    thr = _ratio(g(m, "samples_s"), g(mo, "samples_s"))
    ram = g(m, "ram_train")
    return [
        f"{verdict(both(dice_nn, dice_mo))}  {TARGETS[0]}: medlens {_f(g(m, 'dice_mean'))}, nnU-Net "
        f"{_f(g(nn, 'dice_mean'))}, MONAI {_f(g(mo, 'dice_mean'))}",
        f"{verdict(both(ok_ge(speed, 1.0, 3.0), dice_nn))}  {TARGETS[1]}: {_x(speed)}",
        f"{verdict(ok_ge(thr, 1.0, 2.0))}  {TARGETS[2]}: {_x(thr)}",
        f"{verdict(None if ram is None else ram <= 8.0)}  {TARGETS[3]}: {_f(ram, 2)} GB",
    ]
