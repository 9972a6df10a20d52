"""Tiny trained runs with patient metadata, shared by the evaluate, explain, report and serve tests.

Both runs train two folds (an ensemble of two) for a few dozen steps on data built to be learnable, and their
datasets carry ``site``, ``sex`` and ``age`` on every case and a held-out test split, so the trust report has
subgroups, a site column and something to evaluate. Built once per test session (about 20 s together).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.data.dataset import Case, Dataset, load_dataset
from medlens.io import Image, write_image

SITES = ("A", "B", "C")


def case_meta(k: int) -> dict[str, object]:
    """Deterministic metadata for case number ``k``: three sites, two sexes, ages 25-84."""
    return {
        "patient_id": f"P{k:03d}",
        "site": SITES[k % 3],
        "sex": "F" if (k // 3) % 2 else "M",
        "age": 25 + (k * 7) % 60,
    }


def seg_dataset(
    root: Path, n_train: int = 12, n_test: int = 6, shape: tuple[int, ...] = (16, 16, 12)
) -> Dataset:
    """Bright ellipsoids (label 1 'blob') in noise, anisotropic 1.5x1.5x2 mm, with metadata."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(np.float32)
    training, test = [], []
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for k in range(n_train + n_test):
        centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        d = sum(((g - c) / (0.25 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
        label = (d <= 1.0).astype(np.uint8)
        image = rng.normal(0.0, 0.3, shape).astype(np.float32) + 100.0 + 2.0 * label
        cid = f"case{k:02d}"
        write_image(Image(image[None], affine, modality="MR"), root / "imagesTr" / f"{cid}.nii.gz")
        write_image(Image(label[None], affine), root / "labelsTr" / f"{cid}.nii.gz")
        case = Case(
            id=cid, image=[f"imagesTr/{cid}.nii.gz"], label=f"labelsTr/{cid}.nii.gz", meta=case_meta(k)
        )
        (test if k >= n_train else training).append(case)
    ds = Dataset(
        root=root,
        name="blobs",
        task="segmentation",
        labels={"background": 0, "blob": 1},
        channels={0: "T1"},
        modalities={0: "MR"},
        training=training,
        test=test,
        ndim=len(shape),
    )
    ds.save()
    return ds


def seg_plan(dataset: Dataset, path: Path, iterations: int = 16, dropout: float = 0.0) -> Path:
    """A FLOP-model plan (no timing) with a small 3D U-Net, cut to a few fp32 iterations."""
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
    if dropout:
        config["network"]["dropout"] = dropout
    config["training"].update(val_every=iterations, checkpoint_every=iterations)
    config["training"]["optimizer"]["lr"] = 0.01
    return Plan.from_dict(data).save(path)


def cls_dataset(root: Path) -> Dataset:
    """A binary 2D dataset (bright blob or not, 16x16, MedMNIST layout) with metadata on every case."""
    from medlens.data.importers import import_dataset
    from medlens.tasks.medmnist_synthetic import synthetic_medmnist

    npz = synthetic_medmnist(
        root / "binary.npz", classification_type="binary", size=16, n_train=96, n_val=32, n_test=48
    )
    ds = import_dataset("medmnist", npz, root / "data")
    for k, case in enumerate([*ds.training, *ds.test]):
        case.meta.update(case_meta(k))
        if case.split != "test":
            case.split = None  # cross-validation folds instead of MedMNIST's fixed validation split
    ds.save()
    return load_dataset(ds.root)


def cls_plan(dataset: Dataset, path: Path, iterations: int = 60, dropout: float = 0.0) -> Path:
    """A FLOP-model plan with a tiny classifier, cut to a few fp32 iterations."""
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.plan.plan import Plan
    from medlens.plan.planner import make_plan

    network: dict[str, object] = {"name": "test_classifier", "width": 8}
    if dropout:
        network["dropout"] = dropout
    plan = make_plan(
        compute_fingerprint(dataset),
        task="classification",
        budget="2m",
        device="cpu",
        measure=False,
        overrides={
            "threads": 1,
            "precision": "fp32",
            "memory_gb": 4,
            "batch_size": 16,
            "network": network,
            "iterations": iterations,
        },
    )
    data = plan.to_dict()
    cfg = data["configurations"][plan.default_configuration]
    cfg["training"].update(val_every=iterations // 3, checkpoint_every=iterations)
    # A deliberately imperfect model (the tests need some mistakes and attackable margins): the best
    # validation checkpoint of a short plain run, not the planner's mixup and final weights.
    cfg.setdefault("validation", {})["selection"] = "best"
    cfg.get("augmentation", {}).pop("mixup", None)
    return Plan.from_dict(data).save(path)


def train_two_folds(dataset: Dataset, plan: Path, run: Path) -> Path:
    """Train folds 0 and 1 of ``plan`` on ``dataset`` into ``run`` (an ensemble of two)."""
    import torch

    from medlens.tasks.run import train

    torch.set_num_threads(1)
    train(dataset.root, plan, run, fold="0,1", n_folds=3, progress=False, device="cpu")
    return run
