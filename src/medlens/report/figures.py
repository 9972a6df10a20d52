"""Figures for reports: segmentation overlays, training curves, per-case bars.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure registry, no
GUI backend, safe in a server thread); embed it with :meth:`medlens.report.html.Report.figure`. matplotlib
is imported inside the functions, so importing this module is cheap.

Display convention: arrays follow the medlens world convention (``i`` = columns, ``j`` = rows, ``k`` =
slices). A 2D image is drawn as a picture (row 0 at the top); a slice of a 3D volume is drawn with its
second in-plane axis pointing up (for a RAS+ volume cut across ``k``: anterior up, patient right on the
screen's right). Voxel spacing, when given, sets the aspect ratio.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Class colours by label value (1 -> first colour, ...), colour-blind friendly (Okabe-Ito plus extras).
PALETTE = (
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#8C564B",
    "#7F7F7F",
    "#17BECF",
)


def class_colour(value: int) -> str:
    """The colour of label ``value`` (value 0 is background and has none)."""
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def overlay_figure(
    image: Any,
    truth: Any,
    pred: Any | None,
    class_names: Mapping[str, int] | Sequence[str],
    axis: int = 2,
    slices: int = 3,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    alpha: float = 0.45,
) -> Figure:
    """Image, reference and prediction side by side on representative slices, with a class legend.

    For a 3D volume the slices are chosen where there is most foreground (reference or prediction): the
    range of slices that contain any foreground is split into ``slices`` equal parts and the slice with the
    most foreground in each part is shown, so the picks are spread over the structure rather than adjacent.

    Args:
        image: the intensity image, 2D ``(i, j)`` or 3D ``(i, j, k)`` (a leading channel axis of size 1 is
            dropped).
        truth: the reference label map, same spatial shape (or ``None`` to show the prediction only).
        pred: the predicted label map, same spatial shape (or ``None`` to show the reference only).
        class_names: ``{name: label value}`` (``dataset.json`` ``labels``) or a list of names indexed by
            value (index 0 is background). Value 0 is never drawn.
        axis: the axis to slice across for 3D (``2`` = ``k``).
        slices: how many slices to show for 3D.
        spacing: voxel size in mm per spatial axis, for the aspect ratio.
        title: figure title.
        alpha: opacity of the label colours.

    Raises:
        InputError: shapes disagree, the arrays are not 2D/3D, or nothing is given to overlay.
    """
    img = _spatial(image, "image")
    maps = {"reference": truth, "prediction": pred}
    labels = {k: _spatial(v, k) for k, v in maps.items() if v is not None}
    if not labels:
        raise InputError("overlay_figure needs a reference (truth) or a prediction to overlay")
    for name, lab in labels.items():
        if lab.shape != img.shape:
            raise InputError(
                f"the {name} has shape {lab.shape} but the image has {img.shape}; they must match"
            )
    classes = _classes(class_names)
    nd = img.ndim
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=float)
    if sp.shape != (nd,) or not np.all(sp > 0):
        raise InputError(f"spacing {spacing!r} must be {nd} positive numbers (mm)")
    if slices < 1:
        raise InputError(f"slices={slices} must be at least 1")

    if nd == 2:
        cuts: list[tuple[str, np.ndarray, dict[str, np.ndarray]]] = [("", img, labels)]
        row_sp, col_sp, origin = sp[1], sp[0], "upper"
    else:
        if not -3 <= axis < 3:
            raise InputError(f"axis={axis} must be 0, 1 or 2 for a 3D volume")
        ax = axis % 3
        fg = np.zeros(img.shape, dtype=np.int64)
        for lab in labels.values():
            fg += np.isin(lab, list(classes.values()))
        counts = fg.sum(axis=tuple(a for a in range(3) if a != ax))
        picks = representative_slices(counts, slices)
        names = "ijk"
        cuts = [
            (
                f"{names[ax]} = {s}",
                np.take(img, s, axis=ax),
                {k: np.take(v, s, axis=ax) for k, v in labels.items()},
            )
            for s in picks
        ]
        in_plane = [a for a in range(3) if a != ax]
        col_sp, row_sp, origin = sp[in_plane[0]], sp[in_plane[1]], "lower"

    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    max_value = max([*classes.values(), 1])
    colours = ["#000000"] * (max_value + 1)
    for value in classes.values():
        colours[value] = class_colour(value)
    cmap = ListedColormap(colours)
    columns = ["image", *labels]
    fig = Figure(figsize=(3.2 * len(columns), 3.2 * len(cuts) + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(cuts), len(columns), squeeze=False))
    for r, (label, plane, lab_planes) in enumerate(cuts):
        for c, col in enumerate(columns):
            a = axes[r, c]
            a.imshow(
                plane.T,
                cmap="gray",
                vmin=lo,
                vmax=hi if hi > lo else lo + 1,
                origin=origin,
                aspect=row_sp / col_sp,
                interpolation="nearest",
            )
            if col != "image":
                lab = lab_planes[col].T
                shown = np.ma.masked_where(~np.isin(lab, list(classes.values())), lab)
                a.imshow(
                    shown,
                    cmap=cmap,
                    vmin=0,
                    vmax=max_value,
                    alpha=alpha,
                    origin=origin,
                    aspect=row_sp / col_sp,
                    interpolation="nearest",
                )
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(col)
            if c == 0 and label:
                a.set_ylabel(label)
    handles = [Patch(facecolor=class_colour(v), label=n) for n, v in classes.items()]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def representative_slices(counts: np.ndarray | None, n: int) -> list[int]:
    """Pick ``n`` slice indices spread over the foreground: the fullest slice in each of ``n`` equal parts.

    Args:
        counts: foreground voxels per slice.
        n: how many slices to pick.

    Returns:
        Sorted distinct indices; the middle slice(s) when there is no foreground.
    """
    counts = np.asarray(counts if counts is not None else [], dtype=float)
    total = counts.size
    if total == 0:
        return []
    nz = np.flatnonzero(counts > 0)
    if nz.size == 0:
        lo, hi = 0, total  # no foreground: spread over the whole volume
    else:
        lo, hi = int(nz[0]), int(nz[-1]) + 1
    n = min(n, hi - lo)
    edges = np.linspace(lo, hi, n + 1).round().astype(int)
    picks = []
    for a, b in itertools.pairwise(edges):
        b = max(b, a + 1)
        part = counts[a:b]
        picks.append(a + int(np.argmax(part)) if part.any() else (a + b - 1) // 2)
    return sorted(set(picks))


def training_curve_figure(history: Any, title: str | None = None, smooth: float = 0.9) -> Figure:
    """Training loss and validation scores against the iteration.

    Args:
        history: the training history in any of these shapes: a list of records
            ``[{"iteration": 10, "loss": 0.8}, {"iteration": 50, "dice": 0.7}, ...]``; a dict of such lists
            (e.g. ``{"train": [...], "val": [...]}``); or a dict of columns
            ``{"iteration": [...], "loss": [...], "val_dice": [...]}``. Records without ``iteration`` use
            ``step`` or their position. Keys ``loss``/``train_loss`` go to the loss panel, other numeric keys
            (except lr, timings, epoch) to the validation panel; in the ``{"train", "val"}`` form (the
            engine's ``history.json``) the panels take only their own records, so a validation ``loss`` is
            plotted as a validation value.
        title: figure title.
        smooth: exponential smoothing factor of the loss line (0 = none); the raw loss is drawn faintly.

    Raises:
        InputError: the history has no loss and no validation values.
    """
    records = _history_records(history)
    loss_keys = ("loss", "train_loss")
    skip = {
        "iteration",
        "step",
        "epoch",
        "lr",
        "time",
        "seconds",
        "elapsed",
        "s_per_it",
        "it_per_s",
        *loss_keys,
    }
    train = [r for r in records if r.get("_source") != "val"]
    val = [r for r in records if r.get("_source") != "train"]
    loss_pts = [(r["iteration"], float(r[k])) for r in train for k in loss_keys if _is_num(r.get(k))]
    score_keys: dict[str, None] = {}
    for r in val:
        ignore = skip - set(loss_keys) if r.get("_source") == "val" else skip
        score_keys.update(
            {k: None for k, v in r.items() if k not in ignore and not k.startswith("_") and _is_num(v)}
        )
    if not loss_pts and not score_keys:
        raise InputError("the training history has no 'loss' and no validation values to plot")

    from matplotlib.figure import Figure

    panels = int(bool(loss_pts)) + int(bool(score_keys))
    fig = Figure(figsize=(5.0 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    i = 0
    if loss_pts:
        it, loss = (np.asarray(v, dtype=float) for v in zip(*sorted(loss_pts), strict=True))
        a = axes[i]
        i += 1
        a.plot(it, loss, color="#0072B2", alpha=0.3 if smooth > 0 else 1.0, lw=1, label="loss")
        if smooth > 0 and loss.size > 2:
            a.plot(it, _ema(loss, smooth), color="#0072B2", lw=2, label=f"smoothed ({smooth:g})")
        if np.all(loss > 0) and loss.max() / loss.min() > 20:
            a.set_yscale("log")
        a.set_xlabel("iteration")
        a.set_ylabel("training loss")
        a.grid(alpha=0.3)
        a.legend(frameon=False)
    if score_keys:
        a = axes[i]
        for n, key in enumerate(score_keys):
            pts = sorted((r["iteration"], float(r[key])) for r in val if _is_num(r.get(key)))
            x, y = zip(*pts, strict=True)
            a.plot(x, y, marker="o", ms=3, color=PALETTE[n % len(PALETTE)], label=key)
            best = (
                int(np.nanargmax(y))
                if not any(w in key for w in ("loss", "hd", "asd"))
                else int(np.nanargmin(y))
            )
            a.scatter([x[best]], [y[best]], s=60, facecolors="none", edgecolors=PALETTE[n % len(PALETTE)])
        a.set_xlabel("iteration")
        a.set_ylabel("validation")
        a.grid(alpha=0.3)
        a.legend(frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def per_case_bar_figure(
    per_case: Sequence[Mapping[str, Any]],
    metric: str = "dice",
    class_name: str | None = None,
    color_by: str | None = "site",
    title: str | None = None,
) -> Figure:
    """One bar per case (sorted) for a metric of one class or the mean over classes, coloured by group.

    Missing values (NaN, e.g. a surface distance with an empty mask) are marked with a red cross at zero.

    Args:
        per_case: per-case records as for :func:`medlens.evaluate.summarise`.
        metric: the metric key.
        class_name: a class, or ``None`` for the mean over the classes where the metric is defined.
        color_by: ``"site"``, a ``meta`` key, or ``None`` for one colour.
        title: figure title (default: the metric and class).

    Raises:
        InputError: no cases, or the class or metric is not in the records.
    """
    if not per_case:
        raise InputError("per_case_bar_figure needs at least one case record")
    ids, vals, groups = [], [], []
    for rec in per_case:
        ms = rec.get("metrics", {})
        if class_name is not None:
            if class_name not in ms:
                raise InputError(f"case {rec.get('id')!r} has no class {class_name!r} (it has {sorted(ms)})")
            chosen = [ms[class_name]]
        else:
            chosen = list(ms.values())
        found = [m[metric] for m in chosen if metric in m and m[metric] is not None]
        if not found and not any(metric in m for m in chosen):
            raise InputError(f"case {rec.get('id')!r} has no metric {metric!r}")
        arr = np.asarray(found, dtype=float)
        vals.append(float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else math.nan)
        ids.append(str(rec.get("id")))
        if color_by is None:
            groups.append("")
        else:
            g = rec.get("site") if color_by == "site" else (rec.get("meta") or {}).get(color_by)
            groups.append("unknown" if g is None else str(g))
    v = np.asarray(vals)
    order = np.argsort(np.where(np.isnan(v), -np.inf, v), kind="stable")
    levels = list(dict.fromkeys(groups[i] for i in order))
    colour = {lv: PALETTE[n % len(PALETTE)] for n, lv in enumerate(sorted(levels))}

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(ids)
    fig = Figure(figsize=(min(max(4.0, 0.28 * n + 1.5), 14.0), 3.8), layout="constrained")
    a = fig.subplots()
    x = np.arange(n)
    heights = np.nan_to_num(v[order], nan=0.0)
    a.bar(x, heights, color=[colour[groups[i]] for i in order], width=0.8)
    missing = np.isnan(v[order])
    if missing.any():
        a.scatter(
            x[missing], np.zeros(int(missing.sum())), marker="x", color="#C00000", zorder=3, label="missing"
        )
    if not np.isnan(v).all():
        a.axhline(float(np.nanmean(v)), color="#333333", ls="--", lw=1, label=f"mean {np.nanmean(v):.3g}")
    if n <= 40:
        a.set_xticks(x, [ids[i] for i in order], rotation=90, fontsize=7)
    else:
        a.set_xticks([])
        a.set_xlabel(f"{n} cases (sorted)")
    what = f"{metric} ({class_name})" if class_name else f"{metric} (mean over classes)"
    a.set_ylabel(what)
    a.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=colour[lv], label=lv) for lv in sorted(levels)] if color_by else []
    extra, _ = a.get_legend_handles_labels()
    if handles or extra:
        a.legend(handles=handles + extra, frameon=False, fontsize=8, title=color_by if handles else None)
    a.set_title(title or what)
    return fig


# ---- helpers ---------------------------------------------------------------------------------------------


def _spatial(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim in (3, 4) and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise InputError(f"{what} must be a 2D or 3D array (spatial axes, one channel), got shape {a.shape}")
    return a


def _classes(class_names: Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    if isinstance(class_names, Mapping):
        pairs = [(str(k), int(v)) for k, v in class_names.items()]
    elif isinstance(class_names, Sequence) and not isinstance(class_names, str):
        pairs = [(str(n), i) for i, n in enumerate(class_names)]
    else:
        raise InputError(f"class_names {class_names!r} must be a dict name -> value or a list of names")
    return {n: v for n, v in sorted(pairs, key=lambda p: p[1]) if v != 0}


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(v)
    )


def _history_records(history: Any) -> list[dict[str, Any]]:
    if isinstance(history, Mapping):
        values = list(history.values())
        if values and all(isinstance(v, Sequence) and not isinstance(v, str) for v in values):
            if all(all(isinstance(e, Mapping) for e in v) for v in values):  # {"train": [...], "val": [...]}
                records = [{**e, "_source": str(k)} for k, v in history.items() for e in v]
            else:  # columns
                length = max(len(v) for v in values)
                records = [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(length)]
        else:
            raise InputError("training history must be a list of records or a dict of lists")
    elif isinstance(history, Sequence) and all(isinstance(e, Mapping) for e in history):
        records = [dict(e) for e in history]
    else:
        raise InputError("training history must be a list of records or a dict of lists")
    for pos, r in enumerate(records):
        it = r.get("iteration", r.get("step", pos))
        r["iteration"] = float(it) if _is_num(it) else float(pos)  # type: ignore[arg-type]
    return records


def _ema(x: np.ndarray, beta: float) -> np.ndarray:
    out = np.empty_like(x)
    acc = 0.0
    for i, v in enumerate(x):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1))  # bias-corrected, like TensorBoard's smoothing
    return out
