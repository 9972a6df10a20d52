"""Training one segmentation fold: cache -> model -> engine -> post-processing evidence."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medlens.data.dataset import Dataset
from medlens.data.splits import Fold
from medlens.tasks.run import FoldOutcome, TrainedFold

log = logging.getLogger(__name__)


def class_names(labels: Mapping[str, int]) -> list[str]:
    """Names of the foreground classes in label-value order (class index 1..K-1)."""
    return [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]


def train_fold(
    dataset: Dataset,
    config: Mapping[str, Any],
    fold: Fold,
    run_dir: Path,
    *,
    cache_dir: Path,
    resume: bool = False,
    progress: bool = True,
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> FoldOutcome:
    """Preprocess (cached), build the planned network, train it with the engine, and measure post-processing.

    Args:
        dataset: the dataset.
        config: the resolved plan configuration.
        fold: which cases train and which validate.
        run_dir: the fold's directory (the engine writes its checkpoints here).
        cache_dir: the preprocessed cache.
        resume: continue from the fold's last checkpoint.
        progress: rich progress bars.
        device: "auto", "cpu" or "cuda".
        options: ``measure_backends`` (default true): after training, export ``fold_K/model.onnx`` and time
            PyTorch against ONNX Runtime on one validation case (``inference_backend`` in run.json).

    Returns:
        The trained fold and, per validation case, the Dice with and without largest-component
        post-processing (see :func:`decide`); as run information, the measured inference backend.
    """
    from medlens.engine import Trainer, configure_threads, seed_everything
    from medlens.engine.distributed import barrier, is_main_process
    from medlens.models import create_model
    from medlens.plan.cache import build_cache
    from medlens.tasks.segment import SegmentationTask, postprocessing_effect

    configure_threads(config["training"].get("threads"))
    main = is_main_process()
    ids = [*fold.train, *fold.val]
    if main:  # under torchrun rank 0 builds the cache; the others then find it valid and only read it
        build_cache(dataset, config, cache_dir, case_ids=ids, progress=progress)
    barrier()
    cache = build_cache(dataset, config, cache_dir, case_ids=ids, progress=False)
    names = class_names(dataset.labels)
    num_classes = len(names) + 1
    seed = int(config["training"].get("seed", 0))
    seed_everything(seed + fold.index)
    model = create_model(
        dict(config["network"]),
        spatial_dims=int(config["spatial_dims"]),
        in_channels=dataset.num_channels,
        out_channels=num_classes,
    )
    task = SegmentationTask(cache, fold.train, fold.val, config, num_classes, names)
    log.info("fold %d: %d training and %d validation cases", fold.index, len(fold.train), len(fold.val))
    result = Trainer(model, task, dict(config["training"]), run_dir, progress=progress, device=device).fit(
        resume=resume
    )
    model.eval()
    effects = {}
    for cid in fold.val if main else ():
        seg = cache.seg(cid)
        if seg is None:
            continue
        pred = task.predict_case(model, cid).argmax(0).numpy().astype(np.uint8)
        effects[cid] = postprocessing_effect(pred, np.asarray(seg[0]), num_classes, names)
    trained = TrainedFold(
        fold=fold.index,
        run_dir=run_dir,
        best_score=result.best_score,
        iterations=result.iterations,
        seconds=result.seconds,
    )
    run_info = {}
    if main and fold.val and (options or {}).get("measure_backends", True):
        run_info["inference_backend"] = _measure_backends(run_dir, model, config, cache, fold.val[0], device)
    return FoldOutcome(trained=trained, validation=effects, run_info=run_info)


def _measure_backends(
    run_dir: Path, model: Any, config: Mapping[str, Any], cache: Any, case_id: str, device: str
) -> dict[str, Any]:
    """Export ``fold_K/model.onnx`` and time PyTorch vs ONNX Runtime on one validation case (run.json record)."""
    from medlens.serve.backends import measure_fold

    try:
        return measure_fold(
            run_dir, model, config, np.asarray(cache.data(case_id)), case_id=case_id, device=device
        )
    except Exception as exc:  # a speed measurement must never cost a trained fold its run.json entry
        log.warning("could not measure ONNX Runtime against PyTorch (%s); predictions use PyTorch", exc)
        return {"choice": "torch", "reason": f"measurement failed: {exc}"}


def decide(validation: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Post-processing from every trained fold's validation cases (``run.json`` keys it sets)."""
    from medlens.tasks.segment import decide_postprocessing

    decisions, reasons = decide_postprocessing(validation)
    return {"postprocessing": decisions, "postprocessing_reasons": reasons}
