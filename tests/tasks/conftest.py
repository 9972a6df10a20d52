"""Tiny learnable segmentation datasets: bright blobs in noise, written as NIfTI files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlens.data.dataset import Case, Dataset
from medlens.io import Image, write_image


def oblique_affine(spacing: tuple[float, float, float], angle: float = 0.3) -> np.ndarray:
    """An affine rotated about two axes with anisotropic spacing (an oblique acquisition)."""
    c, s = np.cos(angle), np.sin(angle)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(spacing)
    aff[:3, 3] = [-20.0, 15.0, 7.5]
    return aff


def blob_case(rng: np.random.Generator, shape: tuple[int, ...], affine: np.ndarray) -> tuple[Image, Image]:
    """An image with 1-2 bright ellipsoids (label 1) and one dimmer cube (label 2) in Gaussian noise."""
    grid = np.indices(shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        centre = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
        radius = [rng.uniform(0.12 * s, 0.2 * s) for s in shape]
        d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
        label[d <= 1.0] = 1
    lo = [int(rng.integers(1, max(2, s // 4))) for s in shape]
    cube = tuple(slice(a, a + max(2, s // 5)) for a, s in zip(lo, shape, strict=True))
    label[cube] = np.where(label[cube] == 0, 2, label[cube])
    image = rng.normal(0.0, 0.35, shape).astype(np.float32) + 100.0
    image += np.where(label == 1, 1.5, 0.0) + np.where(label == 2, 3.0, 0.0)
    image[grid[0] < 1] = 0  # a zero border, as skull-stripped MR has (exercises crop-to-nonzero)
    return Image(image[None], affine, modality="MR"), Image(label[None], affine)


def make_blob_dataset(
    root: Path,
    n_train: int = 10,
    n_test: int = 2,
    shape: tuple[int, ...] = (24, 24, 20),
    spacing: tuple[float, ...] = (1.5, 1.5, 2.0),
    seed: int = 0,
    oblique_test: bool = True,
) -> Dataset:
    """Write a segmentation dataset of blob images; test cases may be oblique (rotated affine)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training, test = [], []
    for n in range(n_train + n_test):
        is_test = n >= n_train
        if len(shape) == 3 and is_test and oblique_test:
            affine = oblique_affine(tuple(spacing))  # type: ignore[arg-type]
        else:
            affine = np.diag([*spacing, 1.0])
        img, lab = blob_case(rng, shape, affine)
        cid = f"case{n:02d}"
        write_image(img, root / "imagesTr" / f"{cid}.nii.gz")
        write_image(lab, root / "labelsTr" / f"{cid}.nii.gz")
        case = Case(
            id=cid,
            image=[f"imagesTr/{cid}.nii.gz"],
            label=f"labelsTr/{cid}.nii.gz",
            meta={"site": "A" if n % 2 else "B", "patient_id": f"P{n:02d}"},
        )
        (test if is_test else training).append(case)
    ds = Dataset(
        root=root,
        name="blobs",
        task="segmentation",
        labels={"background": 0, "blob": 1, "cube": 2},
        channels={0: "T1"},
        modalities={0: "MR"},
        training=training,
        test=test,
        ndim=len(shape),
    )
    ds.save()
    return ds


def quick_plan(dataset: Dataset, path: Path, iterations: int = 60, val_every: int = 30) -> Path:
    """A plan for ``dataset`` from the FLOP model (no timing), cut to a few iterations for a test."""
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.plan.plan import Plan
    from medlens.plan.planner import make_plan

    config = "2d" if dataset.ndim == 2 else "3d_fullres"
    plan = make_plan(
        compute_fingerprint(dataset),
        task="segmentation",
        budget="5m",
        measure=False,
        overrides={"configurations": [config], "iterations": iterations, "precision": "fp32", "threads": 1},
    )
    data = plan.to_dict()
    training = data["configurations"][config]["training"]
    training.update(val_every=val_every, checkpoint_every=val_every)
    training["optimizer"]["lr"] = 0.01  # a toy problem: learn it in tens of steps
    return Plan.from_dict(data).save(path)


@pytest.fixture(scope="module")
def trained3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """A 3D blob dataset (oblique, anisotropic test cases) and a run trained on it for a few dozen steps."""
    from medlens.tasks.run import train

    root = tmp_path_factory.mktemp("seg3d")
    ds = make_blob_dataset(root / "ds", shape=(20, 20, 16))
    plan = quick_plan(ds, root / "plan.json")
    train(ds.root, plan, root / "run", fold=0, progress=False)
    return ds, root / "run"
