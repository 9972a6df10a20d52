"""Learnable MedMNIST-layout files: for tests, and for trying ``medlens bench medmnist`` without a download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_path


def synthetic_medmnist(
    path: str | Path,
    *,
    classification_type: str = "multiclass",
    num_classes: int = 3,
    ndim: int = 2,
    size: int = 28,
    channels: int = 1,
    n_train: int = 120,
    n_val: int = 40,
    n_test: int = 60,
    seed: int = 0,
    omit: tuple[str, ...] = (),
) -> Path:
    """Write a learnable ``.npz`` in MedMNIST's layout (uint8 images, integer labels), for tests and for trying
    the bench without a download.

    Each class (label) is a pattern at a random place in noise, recognisable by local appearance (what a
    convolutional network with global pooling can see): a bright blob, a dark blob, stripes, a checkerboard, a
    ring, a large blob. Multiclass: class k shows pattern k; multilabel: label j shows pattern j when positive;
    binary: positives show a bright blob; ordinal: grade g is a bright blob whose radius grows with g.
    ``omit`` leaves keys out (to test errors).
    """
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * ndim).astype(np.float32)

    def blob(radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Distance to a random centre, and the disc (ball) of ``radius`` around it."""
        centre = rng.uniform(radius, size - radius, ndim)
        d = np.sqrt(np.sum((grid - centre.reshape(-1, *[1] * ndim)) ** 2, axis=0))
        return d, (d <= radius).astype(np.float32)

    def pattern(j: int, grade: int = 0) -> np.ndarray:
        r = size * 0.18
        d, inside = blob(size * (0.08 + 0.07 * grade) if j < 0 else r)
        if j < 0 or j % 6 == 0:
            return 110 * inside
        if j % 6 == 1:
            return -70 * inside
        if j % 6 == 2:
            return 90 * inside * (np.sin(grid[0] * np.pi / 1.5) > 0)
        if j % 6 == 3:
            return 90 * inside * (np.sum(grid, axis=0).astype(np.int64) % 2)
        if j % 6 == 4:
            return 110 * ((d <= r) & (d >= r * 0.6)).astype(np.float32)
        return 110 * (blob(size * 0.3)[1])

    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if classification_type == "multilabel":
            lab = (rng.random((n, num_classes)) < 0.35).astype(np.uint8)
        else:
            k = 2 if classification_type == "binary" else num_classes
            lab = rng.permutation(np.arange(n)[:, None] % k).astype(np.uint8)
        imgs = rng.normal(100, 15, (n, *(size,) * ndim)).astype(np.float32)
        for i in range(n):
            if classification_type == "multilabel":
                for j in np.flatnonzero(lab[i]):
                    imgs[i] += pattern(int(j))
            elif classification_type == "ordinal":
                imgs[i] += pattern(-1, int(lab[i, 0]))
            elif classification_type == "binary":
                imgs[i] += pattern(0) if lab[i, 0] else 0
            else:
                imgs[i] += pattern(int(lab[i, 0]))
        imgs = np.clip(imgs, 0, 255).astype(np.uint8)
        if channels == 3:
            imgs = np.stack([imgs, (imgs * 0.8).astype(np.uint8), (imgs * 0.6).astype(np.uint8)], axis=-1)
        out[f"{split}_images"], out[f"{split}_labels"] = imgs, lab
    path = Path(path)
    kept: dict[str, Any] = {k: v for k, v in out.items() if k not in omit}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **kept)
    return path
