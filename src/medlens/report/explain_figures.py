"""Saliency overlays for the report: the image, then one panel per explanation method with its map on top.

Built without pyplot (like :mod:`medlens.report.figures`, whose display convention this follows: a 2D image
is drawn as a picture, row 0 at the top; a slice of a 3D volume with its second in-plane axis pointing up).
The map is drawn with a perceptual colour map whose opacity grows with the saliency, so the anatomy stays
visible where the map is low. Panels are small (about 2.3 inches each, 110 dpi in the report: tens of kB).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Human-readable panel titles of the built-in methods.
METHOD_TITLES = {
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion",
    "integrated_gradients": "Integrated gradients",
}


def explanation_figure(
    image2d: Any,
    maps: Mapping[str, Any],
    title: str | None = None,
    *,
    axis: int = 2,
    slice_index: int | None = None,
    spacing: Sequence[float] | None = None,
    checks: Mapping[str, Mapping[str, Any]] | None = None,
    cmap: str = "inferno",
    alpha: float = 0.7,
) -> Figure:
    """The image and each method's saliency map overlaid on it, one panel per method.

    Args:
        image2d: the image, 2D ``(i, j)`` or 3D ``(i, j, k)``; a leading channel axis is dropped (the first
            channel is shown when there are several).
        maps: method name -> saliency map of the image's spatial shape (values in ``[0, 1]``, as
            :func:`medlens.explain.saliency.saliency` returns; others are rescaled by their maximum).
        title: figure title.
        axis: for 3D, the axis to cut across (``2`` = ``k``).
        slice_index: for 3D, the slice to show; default: the slice with the most saliency (summed over maps),
            the middle slice when every map is zero.
        spacing: voxel size in mm per spatial axis, for the aspect ratio.
        checks: method name -> :func:`medlens.explain.sanity.randomisation_check` result, written under the
            panel (rank correlation, passed or FAILED in red).
        cmap: matplotlib colour map of the saliency.
        alpha: opacity where the saliency is 1 (it falls to 0 with the saliency).

    Raises:
        InputError: no maps, a map of another shape, an image that is not 2D/3D, a slice out of range.
    """
    if not maps:
        raise InputError("explanation_figure needs at least one saliency map")
    img = _spatial(image2d, np.ndim(next(iter(maps.values()))))
    sal = {}
    for name, m in maps.items():
        arr = np.asarray(m, dtype=np.float64)
        if arr.shape != img.shape:
            raise InputError(
                f"the {name!r} map has shape {arr.shape} but the image has {img.shape}; they must match"
            )
        arr = np.nan_to_num(np.clip(arr, 0.0, None))
        peak = arr.max() if arr.size else 0.0
        sal[name] = arr / peak if peak > 1 else arr
    nd = img.ndim
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=float)
    if sp.shape != (nd,) or not np.all(sp > 0):
        raise InputError(f"spacing {spacing!r} must be {nd} positive numbers (mm)")

    label = ""
    if nd == 3:
        if not -3 <= axis < 3:
            raise InputError(f"axis={axis} must be 0, 1 or 2 for a 3D volume")
        ax = axis % 3
        if slice_index is None:
            per_slice = np.asarray(sum(sal.values())).sum(axis=tuple(a for a in range(3) if a != ax))
            slice_index = int(np.argmax(per_slice)) if per_slice.any() else img.shape[ax] // 2
        if not 0 <= slice_index < img.shape[ax]:
            raise InputError(f"slice_index={slice_index} is outside 0..{img.shape[ax] - 1} along axis {ax}")
        label = f"{'ijk'[ax]} = {slice_index}"
        img = np.take(img, slice_index, axis=ax)
        sal = {k: np.take(v, slice_index, axis=ax) for k, v in sal.items()}
        in_plane = [a for a in range(3) if a != ax]
        col_sp, row_sp, origin = sp[in_plane[0]], sp[in_plane[1]], "lower"
    else:
        col_sp, row_sp, origin = sp[0], sp[1], "upper"

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    colours = colormaps[cmap]
    n = 1 + len(sal)
    fig = Figure(figsize=(2.3 * n + 0.6, 2.9 if checks else 2.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    aspect = row_sp / col_sp
    for a, (name, m) in zip(axes, [("image", None), *sal.items()], strict=True):
        a.imshow(
            img.T,
            cmap="gray",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            origin=origin,
            aspect=aspect,
            interpolation="nearest",
        )
        if m is not None:
            rgba = colours(m.T)
            rgba[..., 3] = alpha * m.T
            a.imshow(rgba, origin=origin, aspect=aspect, interpolation="nearest")
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(
            METHOD_TITLES.get(name, name) if m is not None else (f"image ({label})" if label else "image"),
            fontsize=9,
        )
        check = (checks or {}).get(name)
        if check is not None:
            rho = check.get("spearman")
            ok = bool(check.get("passed"))
            text = "randomisation: " + ("n/a" if rho is None else f"rho {rho:+.2f}")
            text += ", passed" if ok else ", FAILED"
            a.set_xlabel(text, fontsize=8, color="black" if ok else "#C00000")
    fig.colorbar(ScalarMappable(Normalize(0, 1), colours), ax=list(axes), shrink=0.8, label="saliency")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _spatial(x: Any, map_ndim: int) -> np.ndarray:
    """The image without its channel axis (first channel), judged by the maps' dimensionality."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == map_ndim + 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise InputError(
            f"the image must be 2D or 3D (optionally with a leading channel axis), got {arr.shape}"
        )
    return arr
