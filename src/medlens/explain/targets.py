"""What a saliency method explains, and where: the explained scalar, the Grad-CAM layer, model preparation.

- :class:`TargetScore` wraps a network so it returns one scalar per input (see
  :mod:`medlens.explain.saliency` for the rule per head and task).
- :func:`find_target_layer` picks the Grad-CAM layer from one forward pass.
- :func:`evaluating` puts a model in eval mode with in-place activations off and parameters untracked, and
  restores everything afterwards; :func:`pad_to_stride` and :func:`prepare_target` get a segmentation input and
  its explained region ready.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import InputError, unknown_name

log = logging.getLogger(__name__)


class TargetScore(nn.Module):
    """Wraps a network so its output is the one scalar per input being explained.

    Classification: logit ``t``; with ``ctype="binary"`` and 2 logits the log-odds ``z[t] - z[1-t]``; with
    ``ctype="ordinal"``, ``loss="coral"`` logit ``t-1`` (``-z[0]`` for class 0). Segmentation: the sum of
    class ``t``'s logits over ``region`` (the whole image when None).

    Args:
        model: the network.
        target: class index.
        task: ``"classification"`` or ``"segmentation"``.
        region: segmentation only: ``(*S)`` bool/float mask the logits are summed over.
        ctype: classification type (``binary``/``multiclass``/``multilabel``/``ordinal``), or None (raw logit).
        loss: the plan's loss name (``coral`` changes the ordinal outputs).
    """

    def __init__(
        self,
        model: nn.Module,
        target: int,
        task: str,
        region: torch.Tensor | None = None,
        ctype: str | None = None,
        loss: str | None = None,
    ) -> None:
        super().__init__()
        self.model, self.target, self.task, self.ctype, self.loss = model, int(target), task, ctype, loss
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if isinstance(z, list | tuple):  # deep-supervision heads: the first is the full-resolution output
            z = z[0]
        t = self.target
        if self.task == "segmentation":
            logit = z[:, t]
            if self.region is None:
                return logit.flatten(1).sum(1)
            return (logit * self.region.to(logit.dtype)).flatten(1).sum(1)
        if self.ctype == "binary" and z.shape[1] == 2:
            return z[:, t] - z[:, 1 - t]
        if self.ctype == "ordinal" and self.loss == "coral":
            return z[:, t - 1] if t >= 1 else -z[:, 0]
        return z[:, t]


# ---- finding the Grad-CAM layer -----------------------------------------------------------------------------


def find_target_layer(model: nn.Module, x: torch.Tensor, task: str) -> str:
    """The module name Grad-CAM uses, found from one forward pass at ``x``.

    Candidates are modules called once whose output is a feature map (same number of dimensions as ``x``).
    Classification: the last map with spatial extent above one voxel (before global pooling), taken at the
    outermost module of that resolution: ResNet ``layer4``, DenseNet ``features`` (ending in ``norm5``),
    EfficientNet ``_bn1`` (its swish module is shared, so not hookable once), ``test_classifier`` ``act2``;
    when the input is so small that the last stage is 1 voxel, the stage before it.
    Segmentation: the last decoder map (after the lowest-resolution one) below the output resolution, at
    the outermost module: MONAI UNet ``model.1`` (the 1/2-resolution skip concatenation), BasicUNet
    ``upcat_2``, SegResNet ``up_layers.1``, DynUNet ``skip_layers.next_layer``; if the network never
    downsamples, the last map that is not the output.

    Raises:
        InputError: the network has no feature map with spatial axes.
    """
    records: dict[str, list[Any]] = {}  # name -> [calls, order, shape]
    order = [0]
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
            rec = records.setdefault(name, [0, 0, None])
            rec[0] += 1
            rec[1] = order[0]
            rec[2] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            order[0] += 1

        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with evaluating(model), torch.no_grad():
            out = model(x.to(device=model_device(model), dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    out_shape = tuple((out[0] if isinstance(out, list | tuple) else out).shape)
    cands = sorted(
        (rec[1], name, rec[2])
        for name, rec in records.items()
        if rec[0] == 1 and rec[2] is not None and len(rec[2]) == x.ndim
    )
    if not cands:
        raise InputError(
            f"{type(model).__name__} has no module producing a {x.ndim - 2}D feature map; "
            "Grad-CAM needs one (pass layer=<module name>)"
        )
    if task == "classification":
        spatial = [c for c in cands if math.prod(c[2][2:]) > 1]
        return _outermost_last(spatial or cands)
    size = [math.prod(c[2][2:]) for c in cands]
    bottom = int(np.argmin(size))
    decoder = [c for c in cands[bottom:] if c[2][2:] != out_shape[2:]]
    if decoder:
        return _outermost_last(decoder)
    not_output = [c for c in cands if c[2] != out_shape]
    return (not_output or cands)[-1][1]


def _outermost_last(cands: list[tuple[int, str, tuple[int, ...]]]) -> str:
    """Among the maps at the resolution of the last candidate, the shallowest module finishing last.

    A block's output (ResNet ``layer4``, U-Net skip concatenation) rather than a layer inside it.
    """
    res = cands[-1][2][2:]
    same = [c for c in cands if c[2][2:] == res]
    depth = min(c[1].count(".") for c in same)
    return [c for c in same if c[1].count(".") == depth][-1][1]


# ---- helpers -----------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def named_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise unknown_name("layer", name, [n for n in modules if n])
    return modules[name]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode, in-place activations off and parameters untracked; everything restored afterwards."""
    training = {m: m.training for m in model.modules()}
    inplace = {m: m.inplace for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for m in inplace:
            setattr(m, "inplace", False)  # noqa: B010
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, was_training in training.items():
            m.training = was_training
        for m, flag in inplace.items():
            setattr(m, "inplace", flag)  # noqa: B010
        for p, tracked in grads.items():
            p.requires_grad_(tracked)


def _total_stride(model: nn.Module, nd: int) -> list[int]:
    """Per-axis total stride of a registry segmentation network (from ``medlens_spec``), 1 if unknown."""
    spec: Mapping[str, Any] = getattr(model, "medlens_spec", None) or {}
    name = spec.get("name")
    total = [1] * nd
    if name in ("unet", "test_unet", "dynunet"):
        strides = spec.get("strides") or ([2] if name == "test_unet" else [])
        for s in strides:
            per_axis = list(s) if isinstance(s, list | tuple) else [int(s)] * nd
            total = [t * int(v) for t, v in zip(total, per_axis, strict=False)]
    elif name == "basicunet":
        total = [16] * nd
    elif name == "segresnet":
        total = [2 ** (len(spec.get("blocks_down") or [1]) - 1)] * nd
    return total


def pad_to_stride(model: nn.Module, x: torch.Tensor, task: str) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad a segmentation input to a multiple of the network's total stride; the crop undoing it."""
    spatial = tuple(int(s) for s in x.shape[2:])
    full = tuple(slice(0, s) for s in spatial)
    if task != "segmentation":
        return x, full
    stride = _total_stride(model, len(spatial))
    target = [math.ceil(s / t) * t for s, t in zip(spatial, stride, strict=True)]
    if list(spatial) == target:
        return x, full
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pad += [0, t - s]
    log.debug("padding the input from %s to %s (network stride %s)", spatial, target, stride)
    return F.pad(x, pad), full


def prepare_target(
    model: nn.Module,
    x: torch.Tensor,
    target: int,
    task: str,
    region: torch.Tensor | None,
    crop: tuple[slice, ...],
    ctype: str | None,
    loss: str | None,
) -> tuple[list[int], torch.Tensor | None, dict[str, Any]]:
    """Check the target against the output, and fix the segmentation region."""
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise InputError(f"target must be a class index (an integer), got {target!r}")
    try:
        with torch.no_grad():
            z = model(x)
    except RuntimeError as exc:
        raise InputError(
            f"the network cannot run on an input of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}"
        ) from exc
    if isinstance(z, list | tuple):
        z = z[0]
    shape = [int(s) for s in z.shape]
    info: dict[str, Any] = {}
    k = shape[1]
    if task == "segmentation":
        if z.ndim != x.ndim or tuple(z.shape[2:]) != tuple(x.shape[2:]):
            raise InputError(
                f"task='segmentation' needs logits (1, K, *spatial) at the input size; the network returned "
                f"{tuple(z.shape)} for an input {tuple(x.shape)}"
            )
        if not 0 <= target < k:
            raise InputError(f"target class {target} is out of range for a network with {k} output classes")
        if region is None:
            mask = z.argmax(1)[0] == target
            inside = torch.zeros_like(mask)
            inside[crop] = True  # padding never counts as the region
            region = mask & inside
        else:
            region = _region_on_grid(region, x, crop)
        n = int(region.sum())
        info["region_voxels"] = n
        if n == 0:
            info["region"] = "whole image (the class is predicted nowhere)"
            return shape, None, info
        info["region"] = f"predicted class {target}"
        return shape, region, info
    if z.ndim != 2:
        raise InputError(
            f"task='classification' needs logits (1, K); the network returned {tuple(z.shape)} "
            "(use task='segmentation' for a segmentation network)"
        )
    coral = ctype == "ordinal" and loss == "coral"
    n_classes = k + 1 if coral else k
    if not 0 <= target < n_classes:
        raise InputError(
            f"target class {target} is out of range: the network's {k} outputs give {n_classes} classes"
        )
    info["explained"] = (
        f"log-odds of class {target}"
        if ctype == "binary" and k == 2
        else ("cumulative logit" if coral else f"logit of class {target}")
    )
    return shape, None, info


def _region_on_grid(region: torch.Tensor, x: torch.Tensor, crop: tuple[slice, ...]) -> torch.Tensor:
    region = torch.as_tensor(region).to(device=x.device).bool()
    spatial = tuple(x.shape[2:])
    if tuple(region.shape) == spatial:
        return region
    cropped = tuple(s.stop for s in crop)
    if tuple(region.shape) != cropped:
        raise InputError(f"the region has shape {tuple(region.shape)}, the input {cropped}; they must match")
    out = torch.zeros(spatial, dtype=torch.bool, device=x.device)
    out[crop] = region
    return out
