"""Saliency maps for medlens networks: Grad-CAM, occlusion sensitivity and integrated gradients (captum).

Every method explains one scalar per input, built by :class:`TargetScore` from the network's output:

- classification: the logit of the target class (``ctype="binary"`` with the 2-logit softmax head of
  :mod:`medlens.tasks.classify`: the log-odds ``z[t] - z[1-t]``, which is what the decision uses;
  ``ctype="ordinal"`` with ``loss="coral"`` (K-1 cumulative logits): class ``t >= 1`` -> logit ``t-1``
  ("grade >= t"), class 0 -> ``-z[0]``);
- segmentation: the sum of the target class's logits over the region the model predicts as that class
  (``argmax == target`` on the unperturbed input), the wrapper of captum's segmentation tutorial but with the
  region held fixed while the input is perturbed. When the class is predicted nowhere the whole image is used
  (and said so). Segmentation inputs are zero-padded to a multiple of the network's total stride (registry
  networks) and the map cropped back.

The methods and their stated settings:

- ``gradcam``: captum ``LayerGradCam`` on a layer :func:`find_target_layer` picks (classifiers: the last
  feature map with spatial extent before global pooling; U-Nets: the last decoder feature map below full
  resolution, usually 1/2), positive part, upsampled to the input size (bilinear in 2D, trilinear in 3D).
- ``occlusion``: captum ``Occlusion`` with a zero baseline (the mean of the normalised intensities), a window
  of a quarter of the extent along each axis and a stride giving at most 8 positions per axis in 2D and
  5 in 3D (at most 64 / 125 forward passes whatever the input size); the positive part (occluding the region
  lowers the target) is kept.
- ``integrated_gradients``: captum ``IntegratedGradients`` from a zero baseline with
  :data:`IG_STEPS` Gauss-Legendre steps, ``internal_batch_size`` bounded by :data:`MAX_BATCH_VOXELS`;
  the absolute value is kept.

Every map is summed over channels and scaled to ``[0, 1]`` by its maximum. The model is put in eval mode
(in-place activations switched off, parameters not tracked) for the computation and restored afterwards;
the global torch random state is left untouched. More methods can be added with :func:`register_method`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import InputError, unknown_name
from medlens.explain.targets import (
    TargetScore,
    evaluating,
    find_target_layer,
    model_device,
    named_module,
    pad_to_stride,
    prepare_target,
)

log = logging.getLogger(__name__)

METHODS = ("gradcam", "occlusion", "integrated_gradients")
TASKS = ("classification", "segmentation")
#: Integrated-gradients steps (Gauss-Legendre quadrature).
IG_STEPS = 32
#: Bound on voxels in one forward batch (IG's ``internal_batch_size``, occlusion's perturbations per eval).
MAX_BATCH_VOXELS = 2**21
#: Occlusion: positions of the window along each axis, at most, in 2D / 3D.
OCCLUSION_POSITIONS = {2: 8, 3: 5}


@dataclass
class SaliencyContext:
    """What a saliency method gets.

    Attributes:
        model: the network (in eval mode, in-place activations off).
        x: the input ``(1, C, *S)`` on the model's device.
        score: maps an input batch ``(B, C, *S)`` to the explained scalar per item ``(B,)``.
        task: ``"classification"`` or ``"segmentation"``.
        layer: the module name to use for layer methods (``None``: found automatically).
        info: settings the method used, filled in by the method (reported with the map).
    """

    model: nn.Module
    x: torch.Tensor
    score: Callable[[torch.Tensor], torch.Tensor]
    task: str
    layer: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


#: A saliency method: returns a non-negative relevance map of shape ``S``, ``(C, *S)`` or ``(1, C, *S)``.
Method = Callable[[SaliencyContext], "torch.Tensor | np.ndarray"]
_METHODS: dict[str, Method] = {}


def register_method(name: str, fn: Method) -> None:
    """Add (or replace) a saliency method under ``name``; negative values of its map are clipped to 0."""
    _METHODS[name] = fn


@dataclass
class Explanation:
    """A saliency map and how it was made.

    Attributes:
        map: float32 array of shape ``S`` in ``[0, 1]``.
        method: the method name.
        info: the settings used (layer, window, steps, target, region...), JSON-able.
        region: segmentation: the boolean region ``(*S')`` whose logits were summed, on the (possibly
            padded) grid the network saw, or None for the whole image; None for classification.
    """

    map: np.ndarray
    method: str
    info: dict[str, Any]
    region: torch.Tensor | None = None


def saliency(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    *,
    target: int,
    task: str,
    seed: int = 0,
    ctype: str | None = None,
    loss: str | None = None,
    layer: str | None = None,
) -> np.ndarray:
    """A saliency map of ``model`` at ``x`` for ``target``: shape ``S``, non-negative, scaled to ``[0, 1]``.

    Args:
        model: a medlens network (logits ``(B, K)`` or ``(B, K, *S)``).
        x: the preprocessed input ``(1, C, *S)``, 2D or 3D.
        method: one of :data:`METHODS` or a name given to :func:`register_method`.
        target: class index (see the module docstring for how it picks the explained output).
        task: ``"classification"`` or ``"segmentation"``.
        seed: seed of torch's random generator during the computation (the global state is restored).
        ctype: classification type, to explain the binary log-odds / CORAL logits rightly.
        loss: the plan's loss name (``coral`` for cumulative ordinal outputs).
        layer: Grad-CAM layer (module name) instead of the automatic choice.

    Raises:
        InputError: unknown method or task, bad input shape or target.
    """
    return explain(
        model, x, method, target=target, task=task, seed=seed, ctype=ctype, loss=loss, layer=layer
    ).map


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    *,
    target: int,
    task: str,
    seed: int = 0,
    ctype: str | None = None,
    loss: str | None = None,
    layer: str | None = None,
    region: torch.Tensor | None = None,
) -> Explanation:
    """Like :func:`saliency`, with the settings used; ``region`` fixes the segmentation region (``(*S)``)."""
    fn = _lookup(method)
    if task not in TASKS:
        raise unknown_name("task", task, TASKS)
    x = _check_input(x)
    device = model_device(model)
    x = x.detach().to(device=device, dtype=torch.float32)
    with evaluating(model), torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        x, crop = pad_to_stride(model, x, task)
        logits_shape, region, info = prepare_target(model, x, target, task, region, crop, ctype, loss)
        score = TargetScore(model, target, task, region, ctype, loss)
        ctx = SaliencyContext(model, x, score, task, layer, info)
        raw = fn(ctx)
    out = raw.detach().float().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, float)
    spatial = tuple(x.shape[2:])
    if out.shape == (1, *x.shape[1:]):
        out = out[0]
    if out.shape == tuple(x.shape[1:]):
        out = out.sum(0)
    if out.shape != spatial:
        raise InputError(
            f"saliency method {method!r} returned a map of shape {out.shape}; it must return {spatial}"
        )
    out = out[crop]
    out = np.nan_to_num(np.clip(out, 0.0, None), nan=0.0, posinf=0.0)
    peak = float(out.max()) if out.size else 0.0
    if peak > 0:
        out = out / peak
    else:
        info["note"] = (
            "the map is zero everywhere: no positive evidence for the target, or none that this method sees"
        )
    info.update(target=int(target), task=task, logits_shape=logits_shape)
    return Explanation(out.astype(np.float32), method, info, region)


# ---- the built-in methods -----------------------------------------------------------------------------------


def _gradcam(ctx: SaliencyContext) -> torch.Tensor:
    from captum.attr import LayerGradCam

    name = ctx.layer or find_target_layer(ctx.model, ctx.x, ctx.task)
    module = named_module(ctx.model, name)
    x = ctx.x.clone().requires_grad_(True)
    cam = LayerGradCam(ctx.score, module).attribute(x, relu_attributions=True)
    if isinstance(cam, tuple):
        cam = cam[0]
    ctx.info.update(layer=name, layer_shape=list(cam.shape[2:]))
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    ctx.info["upsampling"] = mode
    return F.interpolate(cam.detach().float(), size=tuple(x.shape[2:]), mode=mode, align_corners=False)[0, 0]


def occlusion_window(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlusion window and stride for a spatial ``shape`` (see the module docstring).

    The window is a quarter of the extent (at least 1 voxel), the stride gives at most
    :data:`OCCLUSION_POSITIONS` positions per axis, and the window is widened (by less than a stride) so the
    positions tile the axis exactly and every voxel is occluded at least once.
    """
    n = OCCLUSION_POSITIONS.get(len(shape), 5)
    window, stride = [], []
    for size in shape:
        w = max(1, math.ceil(size / 4))
        s = max(1, math.ceil((size - w) / (n - 1))) if size > w else 1
        w = size - s * ((size - w) // s)
        window.append(w)
        stride.append(s)
    return tuple(window), tuple(stride)


def _occlusion(ctx: SaliencyContext) -> torch.Tensor:
    from captum.attr import Occlusion

    x = ctx.x
    window, stride = occlusion_window(tuple(x.shape[2:]))
    c = int(x.shape[1])
    per_eval = _batch_size(x)
    with torch.no_grad():
        attr = Occlusion(ctx.score).attribute(
            x,
            sliding_window_shapes=(c, *window),
            strides=(c, *stride),
            baselines=0.0,
            perturbations_per_eval=per_eval,
        )
    ctx.info.update(window=list(window), stride=list(stride), baseline=0.0, sign="positive part")
    return attr.sum(1)[0].clamp_min(0)


def _integrated_gradients(ctx: SaliencyContext) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    x = ctx.x
    batch = _batch_size(x)
    attr = IntegratedGradients(ctx.score).attribute(
        x, baselines=torch.zeros_like(x), n_steps=IG_STEPS, internal_batch_size=batch
    )
    ctx.info.update(steps=IG_STEPS, baseline="zeros", internal_batch_size=batch, sign="absolute value")
    return attr.detach().abs().sum(1)[0]


register_method("gradcam", _gradcam)
register_method("occlusion", _occlusion)
register_method("integrated_gradients", _integrated_gradients)


# ---- helpers -----------------------------------------------------------------------------------------------


def _lookup(method: str) -> Method:
    if method not in _METHODS:
        raise unknown_name("saliency method", method, list(_METHODS))
    return _METHODS[method]


def _check_input(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim not in (4, 5) or x.shape[0] != 1:
        raise InputError(
            f"saliency needs one preprocessed input of shape (1, C, *spatial) with 2 or 3 spatial axes, "
            f"got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise InputError("the input to explain contains NaN or infinite values; preprocess it first")
    return x


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _batch_size(x: torch.Tensor) -> int:
    return int(max(1, min(IG_STEPS, MAX_BATCH_VOXELS // max(1, x[0].numel()))))
