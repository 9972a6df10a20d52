"""The contract between the training engine and a task (segmentation, classification, detection, ...).

The engine knows nothing about images, labels or metrics: a task hands it batches, turns a batch into a
loss, and scores the model on its validation data. Adding a task never touches the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainTask(Protocol):
    """What the :class:`~medlens.engine.trainer.Trainer` needs from a task.

    Attributes:
        score_key: the validation metric to maximise (a key of :meth:`validate`'s result), e.g. ``"dice"``;
            it picks the best weights and drives early stopping. Negate a metric to minimise it.
    """

    score_key: str

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """An endless stream of training batches (CPU tensors; the trainer moves them to the device).

        The stream must be a pure function of ``seed``: the stream begun at ``start`` yields exactly what the
        stream begun at 0 yields from its ``start``-th batch on, so a resumed run sees the same data.
        Under DDP each rank calls it with ``seed + rank``.
        """
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of ``model`` on ``batch`` (called inside autocast, in train mode)."""
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the validation data; must contain ``score_key``.

        Called in eval mode under ``torch.no_grad()`` and autocast; the model lives on the training device
        (``next(model.parameters()).device``) and is never a DDP wrapper.
        """
        ...
