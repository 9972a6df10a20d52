"""A tiny one-fold segmentation run shared by the serve tests (made once per session, about 10 s).

The data and plan come from ``tests/builders.py`` (the same blobs as the shared ``seg_run``, which trains two
folds); this run trains fold 0 only, as the export and backend tests expect.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for a few steps on blobs; training also measured the backends (run.json)."""
    import builders
    from medlens.tasks.run import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_run")
    ds = builders.seg_dataset(root / "ds", n_train=6, n_test=0)
    plan = builders.seg_plan(ds, root / "plan.json", iterations=8)
    train(ds.root, plan, root / "run", fold=0, n_folds=3, progress=False)
    return root / "run"
