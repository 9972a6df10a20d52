"""Per-case segmentation metrics: overlap (Dice, Jaccard) and boundary (HD95, ASD, NSD) per class.

All five numbers come from MONAI's metric functions (``monai.metrics.compute_dice``, ``compute_iou``,
``compute_hausdorff_distance``, ``compute_average_surface_distance``, ``compute_surface_dice``), applied to
binary one-hot tensors of one class at a time, cropped to the bounding box of ``pred | truth`` (plus a
one-voxel margin). Cropping changes no value: every voxel outside that box is background in both masks, so
it is neither an overlap voxel nor a surface voxel, and the nearest surface voxel of either mask is inside
the box. It makes a 100x120x100 volume with a few classes take a fraction of a second.

Metric keys (see :data:`METRICS`)
---------------------------------
``dice``     2|P∩T| / (|P|+|T|), in [0, 1], higher is better.
``jaccard``  |P∩T| / |P∪T|, in [0, 1], higher is better.
``hd95``     95th percentile symmetric Hausdorff distance in mm (MONAI: the 95th percentile of the
             pred->truth surface distances and of the truth->pred ones, whichever is larger). Lower is better.
``asd``      average symmetric surface distance in mm (mean over the surface voxels of both masks of the
             distance to the other mask's surface). Lower is better.
``nsd``      normalised surface Dice at ``tolerance_mm``: the fraction of surface voxels of both masks lying
             within the tolerance of the other mask's surface, in [0, 1], higher is better.

Surfaces are the mask voxels with a background face neighbour; distances are Euclidean between voxel
centres, in mm, with the voxel ``spacing``.

Edge cases (defined here, once)
-------------------------------
* Both masks empty (the class is absent and correctly not predicted): ``dice = jaccard = nsd = 1`` and
  ``hd95 = asd = 0``: a perfect answer.
* Exactly one mask empty (a missed or a hallucinated structure): ``dice = jaccard = nsd = 0``, and
  ``hd95 = asd = NaN``: a distance to nothing is undefined. :func:`medlens.evaluate.summary.summarise`
  counts these NaNs as *missing* per metric and states its rule (by default the mean is over the cases
  where the distance is defined, and the count of missing cases is reported next to it; a worst-case value
  can be substituted instead).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError

log = logging.getLogger(__name__)

#: Metric keys returned per class, in display order.
METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "nsd")
#: Whether a larger value is better, per metric key.
HIGHER_IS_BETTER: dict[str, bool] = {"dice": True, "jaccard": True, "hd95": False, "asd": False, "nsd": True}
#: Units for display.
UNITS: dict[str, str] = {"dice": "", "jaccard": "", "hd95": "mm", "asd": "mm", "nsd": ""}


def segmentation_metrics(
    pred: Any,
    truth: Any,
    spacing: Sequence[float] | None,
    class_values: Mapping[str, int],
    tolerance_mm: float | Mapping[str, float] = 1.0,
    include_background: bool = False,
) -> dict[str, dict[str, float]]:
    """Compute Dice, Jaccard, HD95, ASD and NSD per class for one case.

    Args:
        pred: predicted label map, an integer array (or a float array holding integers, or a CPU/GPU tensor)
            with the spatial axes only, 2D ``(i, j)`` or 3D ``(i, j, k)``; no channel axis.
        truth: reference label map, same shape as ``pred``.
        spacing: voxel size in mm along each spatial axis (e.g. ``Image.spacing``); ``None`` means 1 mm.
        class_values: class name -> label value, as in ``dataset.json`` ``labels``. The class with value 0
            (background) is skipped unless ``include_background`` is true.
        tolerance_mm: the NSD tolerance in mm, one number for all classes or one per class name.
        include_background: also report the class whose value is 0.

    Returns:
        ``{class_name: {metric: value}}`` in label-value order, with the keys of :data:`METRICS`. Values are
        Python floats; ``hd95``/``asd`` are NaN when exactly one of the two masks is empty (module docstring).

    Raises:
        InputError: the shapes differ, an array is not a 2D/3D integer label map, the spacing or tolerance
            is not positive and finite, or ``class_values`` is empty or not integer.
    """
    p = _as_label_map(pred, "pred")
    t = _as_label_map(truth, "truth")
    if p.shape != t.shape:
        raise InputError(
            f"pred has shape {p.shape} but truth has {t.shape}: resample the prediction onto the reference "
            "grid before computing metrics"
        )
    sp = _check_spacing(spacing, p.ndim)
    classes = _check_classes(class_values, include_background)
    tolerances = _check_tolerances(tolerance_mm, list(classes))

    out: dict[str, dict[str, float]] = {}
    for name, value in classes.items():
        out[name] = _class_metrics(p == value, t == value, sp, tolerances[name])
    unknown = sorted(set(np.unique(p).tolist()) | set(np.unique(t).tolist()))
    unknown = [v for v in unknown if v != 0 and v not in set(class_values.values())]
    if unknown:
        log.warning(
            "label values %s are not in class_values %s and were not scored", unknown, dict(class_values)
        )
    return out


def _class_metrics(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    """All metrics of one class from its two boolean masks (the edge cases are decided here, not by MONAI)."""
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}
    if not (p_any and t_any):
        return {"dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan, "nsd": 0.0}

    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    box = _union_box(p | t)
    yp = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None].float()
    yt = torch.from_numpy(np.ascontiguousarray(t[box]))[None, None].float()
    with warnings.catch_warnings():
        # MONAI warns about an argument it passes to itself (deprecated in its own API); nothing to act on.
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(yp, yt, include_background=True, ignore_empty=False)
        iou = compute_iou(yp, yt, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(
            yp, yt, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = compute_surface_dice(yp, yt, class_thresholds=[tol], include_background=True, spacing=spacing)
    return {
        "dice": float(dice.item()),
        "jaccard": float(iou.item()),
        "hd95": float(hd95.item()),
        "asd": float(asd.item()),
        "nsd": float(nsd.item()),
    }


def _union_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean mask, grown by ``margin`` voxels and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _as_label_map(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim not in (2, 3):
        hint = " (drop the channel axis, e.g. image.array[0])" if a.ndim == 4 and a.shape[0] == 1 else ""
        raise InputError(
            f"{what} must be a 2D or 3D label map without a channel axis, got shape {a.shape}{hint}"
        )
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError(
                f"{what} holds non-integer values (dtype {a.dtype}): pass a label map, e.g. argmax over the "
                "class probabilities, not the probabilities themselves"
            )
        return a.astype(np.int64)
    raise InputError(f"{what} has dtype {a.dtype}; a label map must hold integers")


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing {spacing!r} must be {ndim} numbers in mm") from None
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(
            f"spacing {spacing!r} must be {ndim} positive finite numbers (mm), one per spatial axis"
        )
    return sp


def _check_classes(class_values: Mapping[str, int], include_background: bool) -> dict[str, int]:
    if not isinstance(class_values, Mapping) or not class_values:
        raise InputError(
            f"class_values {class_values!r} must map class names to label values, e.g. {{'background': 0, 'tumour': 1}}"
        )
    out: dict[str, int] = {}
    for name, value in sorted(class_values.items(), key=lambda kv: kv[1]):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(f"class_values[{name!r}] = {value!r} must be an integer label value")
        if int(value) == 0 and not include_background:
            continue
        out[str(name)] = int(value)
    if not out:
        raise InputError(f"class_values {dict(class_values)} has no foreground class (a value other than 0)")
    return out


def _check_tolerances(tolerance_mm: float | Mapping[str, float], names: list[str]) -> dict[str, float]:
    if isinstance(tolerance_mm, Mapping):
        missing = [n for n in names if n not in tolerance_mm]
        if missing:
            raise InputError(
                f"tolerance_mm has no value for class(es) {missing}; give one per class or one number"
            )
        tol = {n: tolerance_mm[n] for n in names}
    else:
        tol = dict.fromkeys(names, tolerance_mm)
    for name, v in tol.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise InputError(f"tolerance_mm for {name!r} is {v!r}; it must be a finite distance in mm >= 0")
    return {n: float(v) for n, v in tol.items()}
