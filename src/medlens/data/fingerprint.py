"""The dataset fingerprint: the statistics the planner derives a plan from, as plain JSON.

Schema (version 1, ``fingerprint.json`` in the dataset folder). The planner relies on these keys::

    {"medlens_fingerprint": 1, "dataset": name, "task": task, "ndim": 2|3, "num_cases": n, "num_channels": c,
     "modalities": {"0": "MR"}, "channel_names": {"0": "T1"},
     "spacing": {"median", "min", "max", "p10", "p90"},      # per spatial axis, mm
     "shape": {"median", "min", "max"},                      # spatial shapes in voxels, as stored
     "shape_after_crop": {"median", "min", "max"},           # after cropping to the nonzero bounding box
     "anisotropy": max median spacing / min median spacing,
     "intensity": {"0": {"mean", "std", "median", "p00_5", "p99_5", "min", "max"}},
     "classes": {"names": {"0": "background"}, "voxel_fraction": {"1": f}, "cases_with_class": {"1": k}}
              | {"names": ..., "counts": {"0": n0, "1": n1}}, # classification (multilabel: positives)
     "classification_type": "binary" | "multiclass" | "multilabel" | "ordinal",  # classification only
     "sites": {"A": 10}, "patients": n_patients,
     "cases": [{"id", "patient_id", "shape", "spacing", "site", "shape_after_crop", ...}]}

Only training cases count (cases with ``split == "test"`` and the ``test`` section are left out, so nothing
of the test set leaks into the plan). Intensities are taken over the foreground (label > 0 for
segmentation, nonzero voxels otherwise, the whole image when it has none), at most
``max_voxels_per_case`` voxels per case sampled with a fixed seed; ``min``/``max`` cover every foreground
voxel. Detection adds ``classes.counts`` per box class and a ``boxes`` section with box sizes in voxels.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_write_json
from medlens.data.dataset import Case, Dataset, load_dataset, read_case_image
from medlens.errors import DatasetError

__all__ = [
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "compute_fingerprint",
    "read_fingerprint",
    "write_fingerprint",
]

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"


def compute_fingerprint(
    dataset: Dataset,
    *,
    max_voxels_per_case: int = 10_000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compute the fingerprint of ``dataset`` (schema in the module docstring).

    Args:
        dataset: a loaded dataset.
        max_voxels_per_case: foreground voxels sampled per case for the intensity statistics.
        seed: seed of that sampling (same seed, same fingerprint).
        progress: called as ``progress(done, total)`` after each case.

    Raises:
        DatasetError: no training case, or cases that mix 2D/3D or channel counts, or a label map whose shape
            differs from its image (``medlens dataset check`` lists every such problem).
        ImageReadError: a file is missing or unreadable.
    """
    cases = [c for c in dataset.training if c.split != "test"]
    if not cases:
        raise DatasetError(f"{dataset.json_path}: has no training cases to fingerprint")
    rng = np.random.default_rng(seed)
    seg = dataset.task == "segmentation"
    samples: list[np.ndarray] = []
    lows: list[np.ndarray] = []
    highs: list[np.ndarray] = []
    class_voxels: Counter[int] = Counter()
    cases_with_class: Counter[int] = Counter()
    total_voxels = 0
    rows: list[dict[str, Any]] = []
    first: tuple[str, int, int, str] | None = None  # case id, ndim, channels, modality
    for n, case in enumerate(cases, 1):
        img = read_case_image(dataset, case)
        arr = img.array
        if first is None:
            first = (case.id, img.ndim, img.num_channels, img.modality)
        elif (img.ndim, img.num_channels) != first[1:3]:
            raise DatasetError(
                f"{dataset.path(case.image[0])}: case {case.id!r} is {img.ndim}D with {img.num_channels} "
                f"channel(s), case {first[0]!r} is {first[1]}D with {first[2]}; run 'medlens dataset check'"
            )
        finite = np.all(np.isfinite(arr), axis=0) if arr.dtype.kind in "fc" else None
        nonzero = np.any(arr != 0, axis=0)
        row: dict[str, Any] = {
            "id": case.id,
            "patient_id": case.patient_id,
            "shape": list(img.spatial_shape),
            "spacing": [round(s, 6) for s in img.spacing],
            "site": case.site,
            "shape_after_crop": _crop_shape(nonzero),
        }
        if seg and isinstance(case.label, str):
            fg, present = _label_stats(dataset, case, img.spatial_shape, class_voxels)
            total_voxels += int(np.prod(img.spatial_shape))
            cases_with_class.update(present)
            row["classes"] = present
        else:
            fg = nonzero if nonzero.any() else np.ones_like(nonzero)
            if case.label is not None:
                row["label"] = case.label
            if case.boxes is not None:
                row["num_boxes"] = len(case.boxes)
        if finite is not None:
            fg = fg & finite
        idx = np.flatnonzero(fg)
        if idx.size:
            flat = arr.reshape(arr.shape[0], -1)
            values = flat[:, idx]
            lows.append(values.min(axis=1).astype(np.float64))
            highs.append(values.max(axis=1).astype(np.float64))
            if idx.size > max_voxels_per_case:
                values = values[:, np.sort(rng.choice(idx.size, max_voxels_per_case, replace=False))]
            samples.append(values.astype(np.float64))
        rows.append(row)
        if progress is not None:
            progress(n, len(cases))
    assert first is not None  # cases is non-empty
    _, ndim, nch, modality = first
    spacing = np.array([r["spacing"] for r in rows], dtype=np.float64)
    med_spacing = np.median(spacing, axis=0)
    fp: dict[str, Any] = {
        "medlens_fingerprint": FINGERPRINT_VERSION,
        "dataset": dataset.name,
        "task": dataset.task,
        "ndim": ndim,
        "num_cases": len(cases),
        "num_channels": nch,
        "modalities": {str(k): v for k, v in sorted(dataset.modalities.items())} or {"0": modality},
        "channel_names": {str(k): v for k, v in sorted(dataset.channels.items())} or {"0": modality},
        "spacing": {
            **_summary(spacing),
            "p10": _r(np.percentile(spacing, 10, axis=0)),
            "p90": _r(np.percentile(spacing, 90, axis=0)),
        },
        "shape": _summary(np.array([r["shape"] for r in rows], dtype=np.int64)),
        "shape_after_crop": _summary(np.array([r["shape_after_crop"] for r in rows], dtype=np.int64)),
        "anisotropy": round(float(med_spacing.max() / med_spacing.min()), 6),
        "intensity": _intensity(samples, lows, highs, nch),
        "classes": _classes(dataset, cases, class_voxels, cases_with_class, total_voxels),
        "sites": dict(sorted(Counter(r["site"] or "unknown" for r in rows).items()))
        if any(r["site"] is not None for r in rows)
        else {},
        "patients": len({c.patient_id for c in cases}),
    }
    if dataset.task == "classification":
        fp["classification_type"] = dataset.classification_type
    if dataset.task == "detection":
        fp["boxes"] = _box_stats(cases, ndim)
    fp["cases"] = rows
    return fp


def write_fingerprint(
    root: str | Path, *, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Compute the fingerprint of the dataset in ``root`` and write ``root/fingerprint.json`` atomically.

    Returns:
        The path written.
    """
    ds = load_dataset(root)
    fp = compute_fingerprint(ds, seed=seed, progress=progress)
    path = ds.root / FINGERPRINT_FILE
    atomic_write_json(path, fp)
    log.info("wrote %s (%d cases)", path, fp["num_cases"])
    return path


def read_fingerprint(root: str | Path) -> dict[str, Any]:
    """Read ``fingerprint.json`` from a dataset folder (or the file itself) and check its version."""
    path = Path(root)
    if path.is_dir():
        path = path / FINGERPRINT_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: no fingerprint (make one with 'medlens dataset fingerprint')")
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: is not valid JSON ({e}); re-run 'medlens dataset fingerprint'") from None
    if not isinstance(fp, dict) or fp.get("medlens_fingerprint") != FINGERPRINT_VERSION:
        raise DatasetError(
            f"{path}: not a version {FINGERPRINT_VERSION} medlens fingerprint; re-run 'medlens dataset fingerprint'"
        )
    return fp


# ---- helpers --------------------------------------------------------------------------------------------------
def _r(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


def _summary(values: np.ndarray) -> dict[str, list[Any]]:
    """Per-axis median/min/max of an ``(n_cases, ndim)`` array (min/max stay integers for integer input)."""
    if np.issubdtype(values.dtype, np.integer):
        low, high = values.min(axis=0).tolist(), values.max(axis=0).tolist()
    else:
        low, high = _r(values.min(axis=0)), _r(values.max(axis=0))
    return {"median": _r(np.median(values, axis=0)), "min": low, "max": high}


def _crop_shape(nonzero: np.ndarray) -> list[int]:
    """Spatial shape of the bounding box of the nonzero voxels (the whole shape when there are none)."""
    if not nonzero.any():
        return [int(s) for s in nonzero.shape]
    out = []
    for ax in range(nonzero.ndim):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != ax)))
        out.append(int(hit[-1] - hit[0] + 1))
    return out


def _label_stats(
    dataset: Dataset, case: Case, shape: tuple[int, ...], class_voxels: Counter[int]
) -> tuple[np.ndarray, list[int]]:
    """Read a label map: add its voxel counts per class, return its foreground mask and classes present."""
    from medlens.io import read_image

    path = dataset.path(str(case.label))
    label = read_image(path)
    if label.spatial_shape != tuple(shape) or label.num_channels != 1:
        raise DatasetError(
            f"{path}: label of case {case.id!r} has shape {label.array.shape}, its image {shape}; "
            "run 'medlens dataset check'"
        )
    lab = label.array[0]
    values, counts = np.unique(lab, return_counts=True)
    for v, k in zip(values.tolist(), counts.tolist(), strict=True):
        class_voxels[int(v)] += int(k)
    present = [int(v) for v in values.tolist() if v != 0]
    return lab > 0, present


def _intensity(
    samples: list[np.ndarray], lows: list[np.ndarray], highs: list[np.ndarray], nch: int
) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    keys = ("mean", "std", "median", "p00_5", "p99_5", "min", "max")
    for c in range(nch):
        if not samples:
            out[str(c)] = dict.fromkeys(keys)
            continue
        x = np.concatenate([s[c] for s in samples])
        out[str(c)] = {
            "mean": float(x.mean()),
            "std": float(x.std()),
            "median": float(np.median(x)),
            "p00_5": float(np.percentile(x, 0.5)),
            "p99_5": float(np.percentile(x, 99.5)),
            "min": float(min(lo[c] for lo in lows)),
            "max": float(max(hi[c] for hi in highs)),
        }
    return out


def _classes(
    dataset: Dataset,
    cases: list[Case],
    class_voxels: Counter[int],
    cases_with_class: Counter[int],
    total_voxels: int,
) -> dict[str, Any]:
    names = {str(v): n for n, v in sorted(dataset.labels.items(), key=lambda kv: kv[1])}
    out: dict[str, Any] = {"names": names}
    values = sorted(dataset.labels.values())
    if dataset.task == "segmentation":
        fg = sorted({v for v in values if v != 0} | {v for v in class_voxels if v != 0})
        out["voxel_fraction"] = {str(v): class_voxels[v] / total_voxels if total_voxels else 0.0 for v in fg}
        out["cases_with_class"] = {str(v): cases_with_class[v] for v in fg}
    elif dataset.task == "classification":
        counts: Counter[int] = Counter()
        if dataset.classification_type == "multilabel":
            for c in cases:
                if isinstance(c.label, list):
                    counts.update(k for k, v in enumerate(c.label) if v)
            keys = sorted(set(range(len(dataset.labels))) | set(counts))
        else:
            counts.update(c.label for c in cases if isinstance(c.label, int))
            keys = sorted(set(values) | set(counts))
        out["counts"] = {str(k): counts[k] for k in keys}
    elif dataset.task == "detection":
        box_counts: Counter[int] = Counter()
        only = ([v for v in values if v != 0] or [1])[0]  # the class of boxes without box_labels
        for c in cases:
            labels = c.box_labels if c.box_labels is not None else [only] * len(c.boxes or [])
            box_counts.update(int(v) for v in labels)
        out["counts"] = {str(k): box_counts[k] for k in sorted(set(values) | set(box_counts)) if k != 0}
    return out


def _box_stats(cases: list[Case], ndim: int) -> dict[str, Any]:
    sizes = [
        np.asarray(b[ndim:], dtype=float) - np.asarray(b[:ndim], dtype=float)
        for c in cases
        for b in (c.boxes or [])
        if isinstance(b, list) and len(b) == 2 * ndim
    ]
    out: dict[str, Any] = {
        "num_boxes": len(sizes),
        "cases_with_boxes": sum(1 for c in cases if c.boxes),
    }
    if sizes:
        out["size"] = _summary(np.stack(sizes))
    return out
