"""Tiny, learnable tasks for engine tests: bright squares to segment, blobs to classify.

Batch ``i`` of the stream seeded ``seed`` is drawn from ``np.random.default_rng([seed, i])``, so the stream
begun at ``start`` is exactly the tail of the stream begun at 0 (the TrainTask contract).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def squares(
    rng: np.random.Generator, n: int, size: int = 16, noise: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy images (n, 1, size, size) each with one bright square, and its mask (n, size, size)."""
    images = rng.normal(0.0, noise, (n, 1, size, size)).astype(np.float32)
    labels = np.zeros((n, size, size), dtype=np.int64)
    for k in range(n):
        w = int(rng.integers(3, size // 2))
        i, j = rng.integers(0, size - w, 2)
        labels[k, i : i + w, j : j + w] = 1
        images[k, 0, i : i + w, j : j + w] += 1.0
    return images, labels


class SquaresTask:
    """Segment bright squares (2 classes); the score is the foreground Dice on 16 fixed validation images."""

    score_key = "dice"

    def __init__(self, batch_size: int = 8, size: int = 16) -> None:
        self.batch_size = batch_size
        self.size = size
        images, labels = squares(np.random.default_rng(12345), 16, size)
        self.val_images = torch.from_numpy(images)
        self.val_labels = torch.from_numpy(labels)

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in count(start):
            images, labels = squares(np.random.default_rng([seed, i]), self.batch_size, self.size)
            yield {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]).float(), batch["label"])

    def validate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        pred = model(self.val_images.to(device)).argmax(1).cpu()
        truth = self.val_labels
        inter = float(((pred == 1) & (truth == 1)).sum())
        dice = 2 * inter / (float((pred == 1).sum()) + float((truth == 1).sum()) + 1e-8)
        return {"dice": dice, "accuracy": float((pred == truth).float().mean())}


def blobs(rng: np.random.Generator, n: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy images, half of them (label 1) with a bright 4x4 blob somewhere."""
    images = rng.normal(0.0, 0.5, (n, 1, size, size)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    for k in np.flatnonzero(labels):
        i, j = rng.integers(0, size - 4, 2)
        images[k, 0, i : i + 4, j : j + 4] += 1.5
    return images, labels.astype(np.int64)


class BlobsTask:
    """Classify images by whether they contain a bright blob; the score is accuracy on 64 fixed images."""

    score_key = "accuracy"

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        images, labels = blobs(np.random.default_rng(777), 64)
        self.val_images = torch.from_numpy(images)
        self.val_labels = torch.from_numpy(labels)

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in count(start):
            images, labels = blobs(np.random.default_rng([seed, i]), self.batch_size)
            yield {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]).float(), batch["label"])

    def validate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        pred = model(self.val_images.to(device)).argmax(1).cpu()
        return {"accuracy": float((pred == self.val_labels).float().mean())}
