"""Shared fixtures of the plan-room tests: handwritten fingerprints, one planned plan, tiny datasets."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.io import Image, write_image
from medlens.plan import Plan, make_plan


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def fingerprint(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (160, 192, 160),
    crop: Sequence[int] | None = None,
    n: int = 20,
    modality: str = "MR",
    classes: int = 2,
    p10: Sequence[float] | None = None,
    channels: int = 1,
) -> dict[str, Any]:
    """A fingerprint in the schema of medlens.data.fingerprint, written by hand."""
    crop = list(crop or shape)
    nd = len(spacing)
    names = {"0": "background", **{str(i): f"class{i}" for i in range(1, classes)}}
    intensity = {
        "mean": 40.0,
        "std": 50.0,
        "median": 35.0,
        "p00_5": -100.0,
        "p99_5": 250.0,
        "min": -1024.0,
        "max": 3000.0,
    }
    return {
        "medlens_fingerprint": 1,
        "dataset": "handwritten",
        "task": "segmentation",
        "ndim": nd,
        "num_cases": n,
        "num_channels": channels,
        "modalities": {str(c): modality for c in range(channels)},
        "channel_names": {str(c): f"ch{c}" for c in range(channels)},
        "spacing": {
            "median": list(spacing),
            "min": list(spacing),
            "max": list(spacing),
            "p10": list(p10 or spacing),
            "p90": list(spacing),
        },
        "shape": {"median": list(shape), "min": list(shape), "max": list(shape)},
        "shape_after_crop": {"median": crop, "min": crop, "max": crop},
        "anisotropy": max(spacing) / min(spacing),
        "intensity": {str(c): dict(intensity) for c in range(channels)},
        "classes": {"names": names, "voxel_fraction": {}, "cases_with_class": {}},
        "sites": {"A": n},
        "patients": n,
        "cases": [],
    }


@pytest.fixture(scope="session")
def brain_plan() -> Plan:
    """A 3D MR plan (2 mm brain-like data, 1.5 min budget) made once per session with the FLOP model."""
    torch.set_num_threads(1)
    fp = fingerprint(spacing=(2.0, 2.0, 2.0), shape=(99, 117, 95))
    return make_plan(
        fp, task="segmentation", budget="90s", device="cpu", measure=False, overrides={"memory_gb": 8}
    )


def blob_case(
    shape: Sequence[int], rng: np.random.Generator, margin: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image that is zero outside a margin, with an ellipsoid (label 1) and a small cube (label 2)."""
    img = np.zeros(shape, np.float32)
    inner = tuple(slice(margin, s - margin) for s in shape)
    img[inner] = rng.normal(100.0, 10.0, [s - 2 * margin for s in shape])
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = sum(((g - s / 2) / (s / 5)) ** 2 for g, s in zip(grid, shape, strict=True))
    lab = np.zeros(shape, np.uint8)
    lab[r < 1] = 1
    lab[tuple(slice(s // 2 + s // 8, s // 2 + s // 8 + 2) for s in shape)] = 2
    img[lab == 1] += 60
    img[lab == 2] -= 50
    return img, lab


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a segmentation dataset folder of ``n`` small 3D cases (labels background/organ/lesion)."""

    def make(
        n: int = 3, shape: Sequence[int] = (20, 18, 12), spacing: Sequence[float] = (1.0, 1.0, 2.0)
    ) -> Path:
        root = tmp_path / "ds"
        rng = np.random.default_rng(0)
        cases = []
        for i in range(n):
            img, lab = blob_case(shape, rng)
            write_image(
                Image.from_spacing(img[None], spacing=spacing, modality="MR"),
                root / f"imagesTr/case{i}.nii.gz",
            )
            write_image(Image.from_spacing(lab[None], spacing=spacing), root / f"labelsTr/case{i}.nii.gz")
            cases.append(
                {"id": f"case{i}", "image": f"imagesTr/case{i}.nii.gz", "label": f"labelsTr/case{i}.nii.gz"}
            )
        meta = {
            "name": "blobs",
            "task": "segmentation",
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "channel_names": {"0": "T1"},
            "modality": {"0": "MR"},
            "training": cases,
        }
        (root / "dataset.json").write_text(json.dumps(meta))
        return root

    return make


@pytest.fixture
def make_fingerprint() -> Callable[..., dict[str, Any]]:
    """Factory of handwritten fingerprints (see :func:`fingerprint`)."""
    return fingerprint
