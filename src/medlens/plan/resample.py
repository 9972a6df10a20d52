"""Resampling between grids whose voxel areas are aligned (the convention of the preprocessed affine).

Voxel ``i`` of an axis resampled from ``n`` to ``m`` voxels covers the same extent as ``n/m`` input voxels
(``scipy.ndimage.zoom(grid_mode=True)``), so the new affine is the old one times
``diag(n/m)`` shifted by ``(n/m - 1)/2``. Equal shapes return the input unchanged (exact round trips).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_ORDER = {"nearest": 0, "linear": 1, "cubic": 3}


def resample(
    arr: np.ndarray, new_shape: Sequence[int], method: str, separate_axis: int | None = None
) -> np.ndarray:
    """Resample ``(C, *spatial)`` continuous data to ``new_shape`` (voxel areas aligned, as the affine assumes).

    With ``separate_axis`` the in-plane axes use ``method`` and that axis nearest-neighbour.
    """
    from scipy import ndimage

    order = _ORDER[method]
    new_shape = [int(s) for s in new_shape]
    out = np.empty((arr.shape[0], *new_shape), dtype=np.float32)
    for c in range(arr.shape[0]):
        x = arr[c].astype(np.float32, copy=False)
        if separate_axis is None:
            out[c] = _zoom(ndimage, x, new_shape, order)
        else:
            inplane = list(new_shape)
            inplane[separate_axis] = x.shape[separate_axis]
            x = _zoom(ndimage, x, inplane, order)
            out[c] = _zoom(ndimage, x, new_shape, 0)
    return out


def resample_labels(
    seg: np.ndarray, new_shape: Sequence[int], method: str, separate_axis: int | None = None
) -> np.ndarray:
    """Resample ``(1, *spatial)`` integer labels: ``"nearest"`` or ``"linear_onehot"`` (each class' mask
    linearly, then the most likely class per voxel)."""
    from scipy import ndimage

    new_shape = [int(s) for s in new_shape]
    x = seg[0]
    if method == "nearest":
        out = _zoom(ndimage, x, new_shape, 0).astype(seg.dtype)
        return out[None]
    classes = np.unique(x)
    best = np.full(new_shape, -1.0, dtype=np.float32)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for c in classes:
        mask = (x == c).astype(np.float32)
        if separate_axis is None:
            prob = _zoom(ndimage, mask, new_shape, 1)
        else:
            inplane = list(new_shape)
            inplane[separate_axis] = x.shape[separate_axis]
            prob = _zoom(ndimage, _zoom(ndimage, mask, inplane, 1), new_shape, 0)
        better = prob > best
        out[better] = c
        best[better] = prob[better]
    return out[None]


def _zoom(ndimage: Any, x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    if list(x.shape) == list(shape):
        return x
    factors = [n / o for n, o in zip(shape, x.shape, strict=True)]
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if list(out.shape) != list(shape):  # float rounding in scipy's output-shape computation
        out = out[tuple(slice(0, s) for s in shape)]
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape, strict=True)], mode="edge")
    return out


def separate_axis(spacing: Sequence[float], target: Sequence[float], threshold: float) -> int | None:
    """nnU-Net's rule: resample the coarse axis on its own when the data or the target is anisotropic."""
    for values in (spacing, target):
        sp = np.asarray(values, dtype=float)
        if sp.max() / sp.min() > threshold:
            worst = int(np.argmax(sp))
            if np.sum(np.isclose(sp, sp[worst])) == 1:
                return worst
    return None
