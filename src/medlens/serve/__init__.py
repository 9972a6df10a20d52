"""Applying trained runs: ``load_predictor(RUN)`` returns the predictor for the run's task.

Every predictor has ``from_run(run_dir, folds=None, device="auto")`` and ``predict_path(src, out_dir, ...)``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

#: Task name -> "module:class" of its predictor.
PREDICTORS = {
    "segmentation": "medlens.serve.predictor:Predictor",
    "classification": "medlens.serve.classify:ClassificationPredictor",
}


def load_predictor(run_dir: str | Path, device: str = "auto", backend: str = "auto") -> Any:
    """Load the predictor that fits the run in ``run_dir`` (read from its ``run.json``).

    ``backend`` ("auto", "torch" or "onnx") is passed to predictors that offer a choice; "auto" suits all.
    """
    from medlens.errors import InputError, RunError
    from medlens.serve.backends import check_backend
    from medlens.tasks.run import read_run

    task = read_run(run_dir).get("task", "")
    if task not in PREDICTORS:
        raise RunError(
            f"{run_dir}: medlens cannot apply {task!r} runs yet (available: {', '.join(PREDICTORS)})"
        )
    module, cls = PREDICTORS[task].split(":")
    predictor = getattr(importlib.import_module(module), cls)
    check_backend(backend)
    if "backend" in inspect.signature(predictor.from_run).parameters:
        return predictor.from_run(run_dir, device=device, backend=backend)
    if backend == "onnx":
        raise InputError(f"{run_dir}: {task} runs have no ONNX backend yet (use --backend auto or torch)")
    return predictor.from_run(run_dir, device=device)
