"""Dense (voxel-wise) inference shared by training validation and the predictor.

Sliding-window inference with Gaussian blending (MONAI's inferer), optional mirroring test-time augmentation,
and the autocast that matches training. Inputs and outputs are on the preprocessed grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved ``precision`` ("bf16", "fp16" or "fp32") on ``device``."""
    from medlens.engine.runtime import autocast_dtype

    dtype = autocast_dtype(precision)
    if dtype is None or (dtype == torch.float16 and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mirror_axes: Sequence[int] = (),
    precision: str = "fp32",
    device: torch.device | None = None,
    slice_axis: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over a whole case.

    Args:
        model: maps ``(B, C, *patch)`` to ``(B, K, *patch)`` logits: a module, or any callable such as an
            ONNX Runtime backend (:mod:`medlens.serve.backends`).
        data: ``(C, *spatial)`` float tensor on the preprocessed grid.
        patch_size: the window (the training patch).
        overlap: fraction of window overlap; windows are blended with a Gaussian weight.
        sw_batch_size: windows per forward pass (above 1 is much faster on CPU, see FACTS.md).
        mirror_axes: spatial axes (0-based) to mirror for test-time augmentation; each flip combination is
            predicted and the probabilities averaged (nnU-Net's mirroring).
        precision: autocast precision.
        device: where to run (default: the model's device).
        slice_axis: for a 2D model on 3D data, the data axis to slice along; slices are predicted as a batch.

    Returns:
        ``(K, *spatial)`` float32 probabilities on the CPU.
    """
    from monai.inferers import sliding_window_inference

    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        # A backend object (medlens.serve.backends) says where it runs; other callables run on the CPU.
        device = params[0].device if params else getattr(model, "device", None) or torch.device("cpu")
    x = data[None].to(device=device, dtype=torch.float32)
    if slice_axis is not None:  # (1, C, *3d) -> (S, C, *2d): slices become the batch
        x = torch.movedim(x[0], slice_axis + 1, 0)
    # Windows keep the training patch size even where the case is smaller (MONAI pads it): the network's
    # strides need a patch divisible by its total stride.
    roi = [int(p) for p in patch_size]

    def run(inp: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, precision):
            out = sliding_window_inference(
                inp, roi, sw_batch_size, model, overlap=overlap, mode="gaussian", padding_mode="constant"
            )
        return torch.softmax(cast(torch.Tensor, out).float(), dim=1)

    probs = run(x)
    combos = _flip_combinations([a + 2 for a in mirror_axes])
    for dims in combos:
        probs += torch.flip(run(torch.flip(x, dims)), dims)
    probs /= 1 + len(combos)
    if slice_axis is not None:  # (S, K, *2d) -> (K, *3d)
        return torch.movedim(probs, 0, slice_axis + 1).cpu()
    return probs[0].cpu()


def _flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``axes`` (nnU-Net mirrors along all combinations)."""
    out: list[tuple[int, ...]] = []
    for mask in range(1, 2 ** len(axes)):
        out.append(tuple(a for n, a in enumerate(axes) if mask >> n & 1))
    return out


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class (1..K-1) between two label maps of class indices; NaN when both empty."""
    out = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        denom = int(p.sum()) + int(t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out
