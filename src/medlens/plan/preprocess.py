"""Preprocessing a case the way a plan says, and inverting it exactly back to the input grid.

The steps, in order (nnU-Net v2's, with every parameter recorded in :class:`PreprocessInfo`):

1. reorient to the closest canonical axis order (RAS+ for 3D, RA for 2D) with nibabel's orientation tools: a
   pure flip/transpose of voxels, so it is lossless;
2. crop to the bounding box of the nonzero voxels of any channel;
3. normalise each channel (``ct``: clip to the dataset's foreground percentiles then z-score with the dataset's
   foreground mean/std; ``zscore``: per image, inside the nonzero mask when the plan says so; ``rescale``: to
   [0, 1]; ``none``);
4. resample to the target spacing (given in the canonical axis order; ``null`` keeps an axis' spacing): data
   with linear or cubic splines, labels nearest-neighbour or one-hot linear; for anisotropic data the coarse
   axis is resampled separately with nearest-neighbour (nnU-Net's "separate z");
5. map label values to contiguous class indices (``label_values`` -> 0..K-1).

:func:`invert` undoes 5, 4, 2 and 1 for a prediction (labels or probabilities): back to the cropped shape,
padded with background, reoriented to the input's axes. With an identity resampling the round trip is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.io.image import Image
from medlens.plan.resample import resample, resample_labels, separate_axis

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "target_spacing": None,
    "orientation": "RAS",
    "crop_nonzero": True,
    "resample_data": "cubic",
    "resample_label": "linear_onehot",
    "anisotropy_threshold": 3.0,
    "normalization": {},
    "label_values": None,
    "cache_dtype": "float16",
}


@dataclass
class PreprocessInfo:
    """Everything needed to map arrays between an input image's grid and its preprocessed grid (JSON-able).

    Attributes:
        ndim: spatial dimensions.
        num_channels: image channels.
        original_shape / original_affine: the input grid.
        orientation: nibabel orientation transform from the input axes to the canonical axes.
        canonical_shape / canonical_affine: after reorientation.
        crop_bbox: ``[[start, stop], ...]`` per canonical axis.
        cropped_shape / cropped_spacing: after cropping (spacing in canonical axis order).
        target_spacing: the spacing asked for (``null`` axes resolved to the cropped spacing).
        shape / affine / spacing: the preprocessed grid (spacing differs from the target by rounding only).
        separate_axis: the axis resampled with nearest-neighbour (anisotropic data), or None.
        resample_data / resample_label: the interpolation used.
        normalization: per channel, the scheme and the statistics applied.
        label_values: original label value of each class index (None = values are the indices).
        modality: the input's modality code.
        case_id: the case this came from.
    """

    ndim: int
    num_channels: int
    original_shape: list[int]
    original_affine: list[list[float]]
    orientation: list[list[float]]
    canonical_shape: list[int]
    canonical_affine: list[list[float]]
    crop_bbox: list[list[int]]
    cropped_shape: list[int]
    cropped_spacing: list[float]
    target_spacing: list[float]
    shape: list[int]
    affine: list[list[float]]
    spacing: list[float]
    separate_axis: int | None = None
    resample_data: str = "cubic"
    resample_label: str = "linear_onehot"
    normalization: list[dict[str, Any]] = field(default_factory=list)
    label_values: list[int] | None = None
    modality: str = "OT"
    case_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PreprocessInfo:
        return cls(**dict(d))


# ---- public API ----------------------------------------------------------------------------------------------


def preprocess_case(
    images: Image | Sequence[Image],
    label: Image | None,
    config: Mapping[str, Any],
    *,
    case_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """Preprocess one case.

    Args:
        images: one (possibly multi-channel) image, or one image per channel on the same grid.
        label: the label map on the same grid, or None.
        config: a resolved plan configuration (its ``preprocessing`` section is used) or that section.
        case_id: named in errors and recorded in the info.

    Returns:
        ``data`` float32 ``(C, *spatial)``, ``seg`` uint8/int16 ``(1, *spatial)`` of class indices (or None),
        and the :class:`PreprocessInfo` that :func:`invert` needs.

    Raises:
        InputError: channels or label on another grid, label values the plan does not declare.
    """
    cfg = {**DEFAULTS, **dict(config.get("preprocessing", config))}
    name = case_id or "case"
    image = _stack_channels(images, name)
    nd = image.ndim
    arr = image.array.astype(np.float32, copy=False)
    seg = None if label is None else _label_array(image, label, name)

    # 1. reorient
    xform = _orientation_transform(image.affine, nd, cfg["orientation"])
    arr, canon_affine = _reorient(arr, image.affine, xform)
    if seg is not None:
        seg, _ = _reorient(seg, image.affine, xform)
    canon_shape = list(arr.shape[1:])

    # 2. crop to nonzero
    nonzero = np.any(arr != 0, axis=0)
    crop = bool(cfg["crop_nonzero"]) and bool(nonzero.any())
    bbox = _bbox(nonzero) if crop else [[0, s] for s in canon_shape]
    sl = (slice(None), *(slice(a, b) for a, b in bbox))
    arr, nonzero = arr[sl], nonzero[sl[1:]]
    if seg is not None:
        seg = seg[sl]
    crop_affine = canon_affine.copy()
    crop_affine[:nd, nd] = (
        canon_affine[:nd, :nd] @ np.array([a for a, _ in bbox], float) + canon_affine[:nd, nd]
    )
    cropped_shape = list(arr.shape[1:])
    spacing = [float(s) for s in np.linalg.norm(crop_affine[:nd, :nd], axis=0)]

    # 3. normalise
    arr, norm_applied = _normalize(arr, nonzero, cfg["normalization"], name)

    # 4. resample
    target = _target_spacing(cfg["target_spacing"], spacing, name)
    new_shape = [max(1, round(s * sp / t)) for s, sp, t in zip(cropped_shape, spacing, target, strict=True)]
    sep = separate_axis(spacing, target, float(cfg["anisotropy_threshold"])) if nd == 3 else None
    if new_shape != cropped_shape:
        arr = resample(arr, new_shape, cfg["resample_data"], sep)
        if seg is not None:
            seg = resample_labels(seg, new_shape, cfg["resample_label"], sep)
    scale = np.array(cropped_shape, float) / np.array(new_shape, float)
    grid = np.eye(nd + 1)
    grid[:nd, :nd] = np.diag(scale)
    grid[:nd, nd] = 0.5 * scale - 0.5
    affine = crop_affine @ grid

    # 5. contiguous class indices
    label_values = cfg["label_values"]
    if seg is not None:
        seg = _to_indices(seg, label_values, name)

    info = PreprocessInfo(
        ndim=nd,
        num_channels=int(arr.shape[0]),
        original_shape=list(image.spatial_shape),
        original_affine=image.affine.tolist(),
        orientation=xform.tolist(),
        canonical_shape=canon_shape,
        canonical_affine=canon_affine.tolist(),
        crop_bbox=bbox,
        cropped_shape=cropped_shape,
        cropped_spacing=spacing,
        target_spacing=[float(t) for t in target],
        shape=list(new_shape),
        affine=affine.tolist(),
        spacing=[float(s) for s in np.linalg.norm(affine[:nd, :nd], axis=0)],
        separate_axis=sep,
        resample_data=cfg["resample_data"],
        resample_label=cfg["resample_label"],
        normalization=norm_applied,
        label_values=None if label_values is None else [int(v) for v in label_values],
        modality=image.modality,
        case_id=case_id,
    )
    return np.ascontiguousarray(arr, dtype=np.float32), seg, info


def invert(array: np.ndarray, info: PreprocessInfo, is_label: bool, fill: float = 0.0) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the original input grid.

    Args:
        array: ``(*spatial)`` or ``(C, *spatial)`` on the preprocessed grid: a label map of class indices
            (``is_label=True``) or continuous values such as probabilities.
        info: from :func:`preprocess_case`.
        is_label: labels are resampled as labels and mapped back to the original label values.
        fill: value outside the cropped region (background; 0).

    Returns:
        The array on the input grid, with the same leading channel axis (if any) as ``array``.
    """
    arr = np.asarray(array)
    nd = info.ndim
    squeeze = arr.ndim == nd
    if squeeze:
        arr = arr[None]
    if list(arr.shape[1:]) != list(info.shape):
        raise InputError(
            f"{info.case_id or 'array'}: shape {list(arr.shape[1:])} is not the preprocessed shape {info.shape}"
        )
    if list(info.cropped_shape) != list(info.shape):
        if is_label:
            arr = resample_labels(arr, info.cropped_shape, info.resample_label, info.separate_axis)
        else:
            arr = resample(arr.astype(np.float32), info.cropped_shape, "linear", info.separate_axis)
    if is_label and info.label_values is not None:
        lut = np.asarray(info.label_values)
        arr = lut[arr.astype(np.int64)]
        arr = arr.astype(np.uint8 if lut.max(initial=0) < 256 else np.int16)
    out = np.full((arr.shape[0], *info.canonical_shape), fill, dtype=arr.dtype)
    out[(slice(None), *(slice(a, b) for a, b in info.crop_bbox))] = arr
    back = _inverse_transform(np.asarray(info.orientation))
    out, _ = _reorient(out, np.asarray(info.canonical_affine), back)
    return out[0] if squeeze else out


def invert_to_image(
    array: np.ndarray, info: PreprocessInfo, is_label: bool, modality: str | None = None
) -> Image:
    """:func:`invert`, wrapped as an :class:`Image` with the input's geometry."""
    arr = invert(array, info, is_label)
    if arr.ndim == info.ndim:
        arr = arr[None]
    return Image(
        arr, np.asarray(info.original_affine), modality=modality or info.modality, meta={"case": info.case_id}
    )


# ---- steps ---------------------------------------------------------------------------------------------------


def _stack_channels(images: Image | Sequence[Image], name: str) -> Image:
    if isinstance(images, Image):
        return images
    images = list(images)
    if not images:
        raise InputError(f"{name}: no image channels given")
    first = images[0]
    for c, im in enumerate(images[1:], start=1):
        if im.spatial_shape != first.spatial_shape or not np.allclose(im.affine, first.affine, atol=1e-2):
            raise InputError(
                f"{name}: channel {c} ({im.meta.get('source', '?')}) is not on the grid of channel 0 "
                f"({im.spatial_shape} vs {first.spatial_shape}); resample the channels onto one grid first"
            )
    arr = np.concatenate([im.array for im in images], axis=0)
    return Image(arr, first.affine, modality=first.modality, meta=dict(first.meta))


def _label_array(image: Image, label: Image, name: str) -> np.ndarray:
    src = label.meta.get("source", "label")
    if label.num_channels != 1:
        raise InputError(f"{name}: label {src} has {label.num_channels} channels; expected one label map")
    if label.spatial_shape != image.spatial_shape:
        raise InputError(
            f"{name}: label {src} has shape {label.spatial_shape} but the image has {image.spatial_shape}"
        )
    diff = float(np.abs(label.affine - image.affine).max())
    if diff > 0.1:
        raise InputError(
            f"{name}: label {src} is not on the image's grid (affines differ by {diff:.3g} mm); "
            "run 'medlens dataset check' to find such cases"
        )
    arr = np.asarray(label.array)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise InputError(f"{name}: label {src} holds non-integer values; expected a label map")
        arr = rounded
    if arr.size and arr.min() < 0:
        raise InputError(f"{name}: label {src} holds negative values; label values must be >= 0")
    return arr.astype(np.int16 if arr.size and arr.max() > 255 else np.uint8)


def _orientation_transform(affine: np.ndarray, nd: int, orientation: str) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    if orientation == "none":
        return np.array([[i, 1] for i in range(nd)], dtype=float)
    return ornt_transform(io_orientation(affine), axcodes2ornt(tuple("RAS"[:nd])))


def _inverse_transform(xform: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``xform`` (row i = [output axis of input axis i, flip])."""
    inv = np.zeros_like(xform)
    for i, (j, flip) in enumerate(xform):
        inv[int(j)] = [i, flip]
    return inv


def _reorient(arr: np.ndarray, affine: np.ndarray, xform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply an orientation transform to ``(C, *spatial)`` and its affine."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    nd = arr.ndim - 1
    if np.array_equal(xform, np.array([[i, 1] for i in range(nd)], dtype=float)):
        return arr, np.asarray(affine, float).copy()
    spatial = arr.shape[1:]
    moved = apply_orientation(np.moveaxis(arr, 0, -1), xform)
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0)), np.asarray(affine, float) @ inv_ornt_aff(
        xform, spatial
    )


def _bbox(mask: np.ndarray) -> list[list[int]]:
    out = []
    for ax in range(mask.ndim):
        proj = np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != ax))
        idx = np.flatnonzero(proj)
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def _target_spacing(target: Sequence[float | None] | None, spacing: list[float], name: str) -> list[float]:
    if target is None:
        return list(spacing)
    if len(target) != len(spacing):
        raise InputError(
            f"{name}: target_spacing {list(target)} has {len(target)} values for a {len(spacing)}D image"
        )
    return [float(sp if t is None else t) for t, sp in zip(target, spacing, strict=True)]


def _normalize(
    arr: np.ndarray, nonzero: np.ndarray, schemes: Mapping[str, Any], name: str
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    out = np.empty_like(arr, dtype=np.float32)
    applied: list[dict[str, Any]] = []
    mask = None
    for c in range(arr.shape[0]):
        cfg = dict(schemes.get(str(c), {"scheme": "zscore", "use_nonzero_mask": False}))
        scheme = cfg["scheme"]
        x = arr[c].astype(np.float32)
        rec: dict[str, Any] = {"scheme": scheme}
        if scheme == "ct":
            if "clip" not in cfg or "mean" not in cfg or "std" not in cfg:
                raise InputError(
                    f"{name}: CT normalisation of channel {c} needs 'clip', 'mean' and 'std' in the plan"
                )
            lo, hi = cfg["clip"]
            mean, std = float(cfg["mean"]), max(float(cfg["std"]), 1e-8)
            x = (np.clip(x, lo, hi) - mean) / std
            rec.update(clip=[float(lo), float(hi)], mean=mean, std=std)
        elif scheme == "zscore":
            if cfg.get("use_nonzero_mask", False):
                if mask is None:
                    from scipy.ndimage import binary_fill_holes

                    mask = binary_fill_holes(nonzero)
                vals = x[mask]
                mean = float(vals.mean()) if vals.size else 0.0
                std = max(float(vals.std()) if vals.size else 1.0, 1e-8)
                x = np.where(mask, (x - mean) / std, 0.0).astype(np.float32)
                rec.update(mean=mean, std=std, use_nonzero_mask=True)
            else:
                mean, std = float(x.mean()), max(float(x.std()), 1e-8)
                x = (x - mean) / std
                rec.update(mean=mean, std=std, use_nonzero_mask=False)
        elif scheme == "rescale":
            lo, hi = cfg.get("range", [float(x.min()), float(x.max())])
            x = (x - lo) / max(float(hi - lo), 1e-8)
            rec.update(range=[float(lo), float(hi)])
        elif scheme != "none":
            raise InputError(f"{name}: unknown normalisation scheme {scheme!r} for channel {c}")
        out[c] = x
        applied.append(rec)
    return out, applied


def _to_indices(seg: np.ndarray, label_values: Sequence[int] | None, name: str) -> np.ndarray:
    present = np.unique(seg)
    if label_values is None:
        return seg
    values = [int(v) for v in label_values]
    unknown = sorted(set(present.tolist()) - set(values))
    if unknown:
        raise InputError(
            f"{name}: label values {unknown} are not classes of the plan ({values}); fix the label map or "
            "the dataset's 'labels'"
        )
    if values == list(range(len(values))):
        return seg
    lut = np.zeros(int(max(values)) + 1, dtype=np.int16)
    for i, v in enumerate(values):
        lut[v] = i
    out = lut[seg.astype(np.int64)]
    return out.astype(np.uint8 if len(values) <= 256 else np.int16)
