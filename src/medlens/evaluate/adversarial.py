"""Adversarial attacks in the network's input space: FGSM and PGD (L-inf), through a fold ensemble.

* FGSM (Goodfellow et al. 2015): one step of size ``epsilon`` along the sign of the loss gradient.
* PGD (Madry et al. 2018): a random start uniform in the L-inf ball of radius ``epsilon``, then
  :data:`PGD_STEPS` signed-gradient steps of ``2.5 * epsilon / steps`` (Madry's rule), each followed by a
  projection back onto the ball.

The attack maximises the task's training loss against the truth: cross-entropy of the class (binary,
multiclass), binary cross-entropy per label (multilabel), the plan's ordinal loss
(:class:`medlens.tasks.classify.ClassificationLoss`); for segmentation the voxel-wise cross-entropy against the
reference label map. Gradients go through every fold network with their logits averaged (the ensemble as one
model), in eval mode (no dropout, frozen batch-norm statistics) and fp32 (autocast off). The input is not
clipped to an intensity range: a z-scored input has none.

``epsilon`` is in the units of the tensor attacked. :func:`medlens.evaluate.robustness.robustness_curves`
states it in z-score units of the normalised input and converts when the plan's normalisation is not a
z-score (see there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medlens.errors import InputError, unknown_name
from medlens.evaluate.perturb import Perturbation, check_strength

#: PGD iterations and the step-size factor (step = factor * epsilon / steps).
PGD_STEPS = 10
PGD_STEP_FACTOR = 2.5
EPSILON_UNIT = "epsilon (L-inf, z-score units)"

ADVERSARIAL: dict[str, Perturbation] = {
    "fgsm": Perturbation(
        "fgsm",
        "FGSM",
        EPSILON_UNIT,
        "fast gradient sign method on the normalised input: one step of epsilon along the loss gradient's sign",
        (0.0, 0.025, 0.05, 0.1, 0.2),
    ),
    "pgd": Perturbation(
        "pgd",
        "PGD",
        EPSILON_UNIT,
        f"projected gradient descent on the normalised input, L-inf, random start, {PGD_STEPS} steps of "
        f"{PGD_STEP_FACTOR} * epsilon / steps",
        (0.0, 0.025, 0.05, 0.1, 0.2),
    ),
}
TASKS = ("segmentation", "classification")


class Ensemble(nn.Module):
    """Fold networks as one model: their logits averaged."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nets[0](x)
        for m in self.nets[1:]:
            out = out + m(x)
        return out / len(self.nets)


def as_ensemble(model: Any) -> Ensemble:
    """``model`` (a network or a sequence of fold networks) as one :class:`Ensemble`.

    Raises:
        InputError: something that is not a torch module (e.g. an ONNX Runtime backend: no gradients).
    """
    if isinstance(model, Ensemble):
        return model
    nets = list(model) if isinstance(model, Sequence | nn.ModuleList) else [model]
    if not nets or not all(isinstance(m, nn.Module) for m in nets):
        kinds = ", ".join(sorted({type(m).__name__ for m in nets})) or "no model"
        raise InputError(
            f"adversarial attacks need the gradients of torch models, got {kinds}; "
            "load the run with backend='torch'"
        )
    return Ensemble(nets)


def adversarial(
    model: Any,
    x: Any,
    target: Any,
    *,
    kind: str = "fgsm",
    epsilon: float | torch.Tensor,
    steps: int = PGD_STEPS,
    task: str,
    step_size: float | None = None,
    ctype: str | None = None,
    loss: str | None = None,
    mask: Any = None,
    seed: int = 0,
) -> torch.Tensor:
    """An adversarial version of a preprocessed batch, within ``epsilon`` of it in L-inf.

    Args:
        model: a network, or a sequence of fold networks (their logits are averaged); torch modules only.
        x: ``(B, C, *S)`` preprocessed input (the network's input space), tensor or array.
        target: classification: class indices ``(B,)`` (0/1 labels ``(B, K)`` for multilabel); segmentation:
            class indices ``(B, *S)``, where -100 marks voxels to ignore (padding).
        kind: ``fgsm`` or ``pgd``.
        epsilon: the L-inf budget in the units of ``x``: a number, or a non-negative tensor broadcastable to
            ``x`` (e.g. ``(B, C, 1, 1)``) for a budget per image and channel.
        steps: PGD iterations (FGSM takes one step).
        task: ``classification`` or ``segmentation``.
        step_size: PGD step in the units of ``x``; default ``2.5 * epsilon / steps``.
        ctype: classification type (``binary``, ``multiclass``, ``multilabel``, ``ordinal``); default
            multilabel when ``target`` is 2D, else multiclass.
        loss: the run's classification loss (``ce``, ``bce``, ``coral``); default the type's usual one.
        mask: optional 0/1 tensor broadcastable to ``x``: where the input may change (e.g. not the padding).
        seed: seed of PGD's random start.

    Returns:
        The perturbed batch, float32, detached, on the model's device.

    Raises:
        InputError: an unknown kind, task or classification type, a negative epsilon, bad ``steps``, or a
            model without gradients.
    """
    if kind not in ADVERSARIAL:
        raise unknown_name("adversarial kind", str(kind), tuple(ADVERSARIAL))
    if task not in TASKS:
        raise unknown_name("task", str(task), TASKS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r} must be a positive integer ({PGD_STEPS} is typical)")
    net = as_ensemble(model)
    device = next(net.parameters()).device
    x0 = torch.as_tensor(x).detach().to(device=device, dtype=torch.float32)
    eps = _budget(epsilon, x0, "epsilon")
    allowed = None if mask is None else torch.as_tensor(mask).to(device=device, dtype=torch.float32)
    y = torch.as_tensor(target).to(device)
    loss_fn = _loss(task, y, ctype, loss)

    def ascent(xa: torch.Tensor) -> torch.Tensor:
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            (grad,) = torch.autograd.grad(loss_fn(net(xa), y), xa)
        return grad.sign() if allowed is None else grad.sign() * allowed

    modes = [m.training for m in net.modules()]
    net.eval()
    try:
        if kind == "fgsm":
            delta = eps * ascent(x0)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            start = (torch.rand(x0.shape, generator=gen) * 2.0 - 1.0).to(device) * eps
            delta = start if allowed is None else start * allowed
            alpha = (
                PGD_STEP_FACTOR * eps / steps if step_size is None else _budget(step_size, x0, "step_size")
            )
            for _ in range(steps):
                delta = delta + alpha * ascent(x0 + delta)
                delta = torch.maximum(torch.minimum(delta, eps), -eps)
    finally:
        for m, was in zip(net.modules(), modes, strict=True):
            m.training = was
    return (x0 + delta).detach()


def _budget(value: float | torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=x.device, dtype=torch.float32)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise InputError(f"{what} must be finite and >= 0 everywhere")
        return t
    return torch.tensor(check_strength(what, value), dtype=torch.float32, device=x.device)


def _loss(
    task: str, target: torch.Tensor, ctype: str | None, loss: str | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "segmentation":
        return lambda logits, y: nn.functional.cross_entropy(logits.float(), y.long(), ignore_index=-100)
    from medlens.tasks.classify import LOSSES, ClassificationLoss

    ct = ctype or ("multilabel" if target.ndim == 2 else "multiclass")
    if ct not in LOSSES:
        raise unknown_name("classification type", ct, tuple(LOSSES))
    name = loss or LOSSES[ct][0]

    def fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1] + 1 if name == "coral" else logits.shape[1]
        return ClassificationLoss({"name": name}, ct, k).to(logits.device)(logits, y)

    return fn
