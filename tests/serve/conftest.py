"""A tiny trained segmentation run shared by the serve tests (made once per session, about 10 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medlens.data.dataset import Case, Dataset
from medlens.io import Image, write_image


def blob_dataset(root: Path, n: int = 6, shape: tuple[int, ...] = (16, 16, 12), seed: int = 0) -> Dataset:
    """Bright ellipsoids (label 1) in noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    cases = []
    for k in range(n):
        centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        d = sum(((g - c) / (0.25 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
        label = (d <= 1.0).astype(np.uint8)
        image = rng.normal(0.0, 0.3, shape).astype(np.float32) + 100.0 + 2.0 * label
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        cid = f"case{k:02d}"
        write_image(Image(image[None], affine, modality="MR"), root / "imagesTr" / f"{cid}.nii.gz")
        write_image(Image(label[None], affine), root / "labelsTr" / f"{cid}.nii.gz")
        cases.append(Case(id=cid, image=[f"imagesTr/{cid}.nii.gz"], label=f"labelsTr/{cid}.nii.gz"))
    ds = Dataset(
        root=root,
        name="blobs",
        task="segmentation",
        labels={"background": 0, "blob": 1},
        channels={0: "T1"},
        modalities={0: "MR"},
        training=cases,
        test=[],
        ndim=len(shape),
    )
    ds.save()
    return ds


def tiny_plan(dataset: Dataset, path: Path, iterations: int = 8) -> Path:
    """A FLOP-model plan (no timing) with a small U-Net, cut to a few fp32 iterations."""
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.plan.plan import Plan
    from medlens.plan.planner import make_plan

    plan = make_plan(
        compute_fingerprint(dataset),
        task="segmentation",
        budget="2m",
        measure=False,
        overrides={
            "configurations": ["3d_fullres"],
            "iterations": iterations,
            "precision": "fp32",
            "threads": 1,
        },
    )
    data = plan.to_dict()
    config = data["configurations"]["3d_fullres"]
    config["network"].update(channels=[8, 16, 32], strides=[2, 2])
    config["training"].update(val_every=iterations, checkpoint_every=iterations)
    config["training"]["optimizer"]["lr"] = 0.01
    return Plan.from_dict(data).save(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for a few steps on blobs; training also measured the backends (run.json)."""
    from medlens.tasks.run import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_run")
    ds = blob_dataset(root / "ds")
    train(ds.root, tiny_plan(ds, root / "plan.json"), root / "run", fold=0, n_folds=3, progress=False)
    return root / "run"
