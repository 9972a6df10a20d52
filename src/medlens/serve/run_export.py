"""Export the folds of a run (``medlens export RUN --format onnx|torchscript``) and keep ONNX files current.

Each fold's network is rebuilt from the plan and its ``model.safetensors`` (nothing is unpickled), exported with
:mod:`medlens.serve.export`, and checked against PyTorch on random inputs and on centre patches of the fold's
preprocessed validation cases; the file is moved into place only when the check passes, so a failed export never
replaces a good one. Every exported ONNX file records the SHA-256 of the weights it was made from, so an export
made stale by further training is noticed and remade (:func:`onnx_for_fold`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens._fs import atomic_path
from medlens.errors import MedlensError, RunError, unknown_name
from medlens.serve.export import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    FILE_NAMES,
    FORMATS,
    ExportCheck,
    export_onnx,
    export_torchscript,
    file_sha256,
    onnx_metadata,
    verify_export,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass
class ExportedFold:
    """One fold exported by :func:`export_run`."""

    fold: int
    path: Path
    check: ExportCheck


def fold_model(info: Mapping[str, Any], config: Mapping[str, Any], fold_dir: Path) -> nn.Module:
    """The fold's network built from the plan and loaded from its ``model.safetensors`` (CPU, eval mode)."""
    from medlens.engine import load_weights
    from medlens.models import create_model

    model = create_model(
        dict(config["network"]),
        spatial_dims=int(config["spatial_dims"]),
        in_channels=max(len(info["dataset"].get("channels") or {}), 1),
        out_channels=len(info["dataset"]["labels"]),
    )
    load_weights(model, fold_dir / "model.safetensors")
    return model.eval()


def example_shape_for(config: Mapping[str, Any], in_channels: int) -> tuple[int, ...]:
    """``(sw_batch_size, C, *window)``: the input a network sees during the plan's sliding-window inference."""
    inf = config.get("inference", {})
    roi = [int(p) for p in inf.get("roi_size", config["patch_size"])]
    return (int(inf.get("sw_batch_size", 4)), int(in_channels), *roi)


def onnx_for_fold(fold_dir: Path, model: nn.Module, example_shape: Sequence[int]) -> Path:
    """``fold_dir/model.onnx``, exported from the fold's safetensors weights if missing or stale.

    Stale means made from other weights: the SHA-256 of ``model.safetensors`` is stored in the file.
    """
    target = fold_dir / FILE_NAMES["onnx"]
    weights = file_sha256(fold_dir / "model.safetensors")
    if target.is_file():
        with contextlib.suppress(RunError):
            if onnx_metadata(target).get("weights_sha256") == weights:
                return target
        log.info("%s was made from other weights: exporting it again", target)
    try:
        return export_onnx(model, example_shape, target, metadata={"weights_sha256": weights})
    except PermissionError:
        raise RunError(
            f"{fold_dir}: cannot write {target.name} here (read-only run); export it with "
            "'medlens export RUN --format onnx' where the run is writable, or use the torch backend"
        ) from None


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    *,
    fold: str | int | None = None,
    out_dir: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[ExportedFold]:
    """Export the folds of a run and check each file against PyTorch (random and real inputs).

    A file is moved into place only when its check passes, so a failed export never replaces a good one.

    Args:
        run_dir: the run directory.
        fmt: "onnx" or "torchscript".
        fold: a fold number, a comma-separated list, or None/"all" for every trained fold.
        out_dir: where to write ``fold_K.onnx``/``fold_K.ts`` (default: ``RUN/fold_K/model.onnx``/``model.ts``).
        opset: ONNX opset.
        tolerance: largest accepted absolute logit difference.

    Returns:
        One :class:`ExportedFold` per fold.

    Raises:
        InputError: unknown format (with "did you mean") or fold.
        MedlensError: an exported file does not match PyTorch within ``tolerance``.
    """
    from medlens.plan.plan import Plan
    from medlens.tasks.run import fold_dirs, parse_folds, read_run

    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, FORMATS)
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    if info.get("task") != "segmentation":
        raise RunError(f"{run_dir}: a {info.get('task')} run; export covers segmentation runs so far")
    n_folds = int(info.get("splits", {}).get("n_folds", max(info.get("folds", [0]), default=0) + 1))
    folds = None if fold in (None, "all") else parse_folds(str(fold), n_folds)
    config = Plan.load(run_dir / "plan.json").configuration(info["configuration"])
    in_channels = max(len(info["dataset"].get("channels") or {}), 1)
    shape = example_shape_for(config, in_channels)
    results = []
    for d in fold_dirs(run_dir, info, folds):
        k = int(d.name.split("_")[-1])
        model = fold_model(info, config, d)
        target = Path(out_dir) / f"fold_{k}{Path(FILE_NAMES[fmt]).suffix}" if out_dir else d / FILE_NAMES[fmt]
        meta = {
            "weights_sha256": file_sha256(d / "model.safetensors"),
            "dataset": info.get("dataset", {}).get("name", ""),
            "fold": k,
            "labels": info["dataset"]["labels"],
        }
        real = real_patches(run_dir, info, config, k, shape)
        with atomic_path(target) as tmp:
            if fmt == "onnx":
                export_onnx(model, shape, tmp, opset, metadata=meta)
            else:
                export_torchscript(model, shape, tmp, metadata=meta)
            check = verify_export(model, tmp, shape, real_inputs=real, tolerance=tolerance, fmt=fmt)
            if not check.passed:
                raise MedlensError(
                    f"{target}: the exported model does not match PyTorch ({check.summary()}); nothing was "
                    "written. Try another --opset or --format, or report the network"
                )
        check.path = target
        results.append(ExportedFold(k, target, check))
    return results


def real_patches(
    run_dir: Path,
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    fold: int,
    shape: Sequence[int],
    n: int = 2,
) -> list[torch.Tensor]:
    """Up to ``n`` centre patches of the fold's validation cases, preprocessed (from the run's cache).

    Returns an empty list (logged) when the run has no cache of its configuration.
    """
    import torch

    from medlens.plan.cache import Cache

    root = run_dir / "cache" / str(info["configuration"])
    try:
        cache = Cache(root)
    except MedlensError:
        log.warning("%s: no preprocessed cache; the export is checked on random inputs only", root)
        return []
    ids = [c for c in validation_cases(info, fold) if c in cache][:n]
    window = [int(s) for s in shape[2:]]
    out = []
    for cid in ids:
        data = np.asarray(cache.data(cid), dtype=np.float32)
        if config.get("spatial_dims") == 2 and data.ndim == 4:
            axis = int(config.get("sampling", {}).get("slice_axis") or 0)
            data = np.take(data, data.shape[axis + 1] // 2, axis=axis + 1)
        out.append(torch.from_numpy(_centre_crop(data, window)))
    return out


def validation_cases(info: Mapping[str, Any], fold: int) -> list[str]:
    """The validation case ids of ``fold`` recorded in ``run.json`` (its fold results, else its split)."""
    result = info.get("fold_results", {}).get(str(fold), {})
    if result.get("val_cases"):
        return [str(c) for c in result["val_cases"]]
    for entry in info.get("splits", {}).get("folds", []):
        if entry.get("fold") == fold:
            return [str(c) for c in entry.get("val", [])]
    return []


def _centre_crop(data: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """The ``window`` at the centre of ``(C, *spatial)`` data, zero-padded where the data is smaller."""
    pad = [(0, 0)] + [
        (max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2)
        for s, w in zip(data.shape[1:], window, strict=True)
    ]
    data = np.pad(data, pad)
    starts = [(s - w) // 2 for s, w in zip(data.shape[1:], window, strict=True)]
    index = (slice(None), *(slice(b, b + w) for b, w in zip(starts, window, strict=True)))
    return np.ascontiguousarray(data[index])
