"""Applying trained runs: ``load_predictor(RUN)`` returns the predictor for the run's task.

Every predictor has ``from_run(run_dir, folds=None, device="auto")`` and ``predict_path(src, out_dir, ...)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

#: Task name -> "module:class" of its predictor.
PREDICTORS = {"segmentation": "medlens.serve.predictor:Predictor"}


def load_predictor(run_dir: str | Path, device: str = "auto") -> Any:
    """Load the predictor that fits the run in ``run_dir`` (read from its ``run.json``)."""
    from medlens.errors import RunError
    from medlens.tasks.run import read_run

    task = read_run(run_dir).get("task", "")
    if task not in PREDICTORS:
        raise RunError(
            f"{run_dir}: medlens cannot apply {task!r} runs yet (available: {', '.join(PREDICTORS)})"
        )
    module, cls = PREDICTORS[task].split(":")
    return getattr(importlib.import_module(module), cls).from_run(run_dir, device=device)
