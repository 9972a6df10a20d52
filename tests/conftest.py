"""Shared test set-up: deterministic, quiet, and kind to a 2-core machine."""

from __future__ import annotations

import os

# Tests run while other processes may use the second core: one torch thread avoids the collapse measured in
# FACTS.md, and keeps results deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".torchinductor")
)
os.environ.setdefault("MPLBACKEND", "Agg")


# ---- tiny trained runs with patient metadata (tests/builders.py), shared across rooms ---------------------------
import pytest


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """``(dataset, run_dir)``: a 3D blob segmentation run, folds 0 and 1, metadata site/sex/age, 6 test cases."""
    import builders

    root = tmp_path_factory.mktemp("seg_run")
    ds = builders.seg_dataset(root / "ds")
    return ds, builders.train_two_folds(ds, builders.seg_plan(ds, root / "plan.json"), root / "run")


@pytest.fixture(scope="session")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """``(dataset, run_dir)``: a binary 2D classification run, folds 0 and 1, metadata, 48 test images."""
    import builders

    root = tmp_path_factory.mktemp("cls_run")
    ds = builders.cls_dataset(root)
    return ds, builders.train_two_folds(ds, builders.cls_plan(ds, root / "plan.json"), root / "run")


@pytest.fixture(scope="session")
def seg_evaluated(seg_run: tuple[object, object]) -> tuple[object, object, object]:
    """``(dataset, run_dir, evaluation.json path)``: the segmentation run evaluated on its test cases (fast)."""
    from medlens.evaluate.run_eval import evaluate_run

    ds, run = seg_run
    return ds, run, evaluate_run(run, ds.root, fast=True)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def cls_evaluated(cls_run: tuple[object, object]) -> tuple[object, object, object]:
    """``(dataset, run_dir, evaluation.json path)``: the classification run evaluated on its test cases (fast)."""
    from medlens.evaluate.run_eval import evaluate_run

    ds, run = cls_run
    return ds, run, evaluate_run(run, ds.root, fast=True)  # type: ignore[attr-defined]
