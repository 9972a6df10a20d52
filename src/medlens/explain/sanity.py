"""The model-randomisation sanity check of saliency methods (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

A saliency method that explains the *model* must give a different map when the model's learned weights are
destroyed. :func:`randomisation_check` deep-copies the network, re-initialises **every** layer (full
randomisation: each module's own ``reset_parameters`` - PyTorch's default random initialisation for
convolutions and linear layers, identity for normalisation layers, whose running statistics are reset too -
and a normal draw with the tensor's own standard deviation for any parameter no module resets), recomputes
the map for the same input, target and (for segmentation) the same region as the original model's
prediction, and reports the Spearman rank correlation between the flattened original and randomised maps,
averaged over :data:`REPEATS` independent re-initialisations (one draw's correlation varies a lot). The method
passes when the mean ``|rho|`` is below ``threshold`` (default :data:`THRESHOLD` = 0.5); a method that
ignores the weights (an edge detector, the input itself) gives ``rho`` near 1 and fails.

Known limits, stated in the result's note: for segmentation the explained output (the class's logits summed
over the original prediction's region) is held fixed for both networks, so any network's gradients concentrate
near that region and moderate correlations are expected; attributions multiplied by the input (integrated
gradients) keep the image's structure and, as Adebayo et al. found, correlate more than Grad-CAM or occlusion.

With ``cascading=True`` the paper's cascading randomisation is reported as well: parameterised layers are
re-initialised from the output towards the input, cumulatively, in up to :data:`CASCADE_STAGES` stages, with
the correlation after each stage.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.errors import InputError
from medlens.explain.saliency import explain

log = logging.getLogger(__name__)

#: ``|Spearman rho|`` below which the maps count as changed.
THRESHOLD = 0.5
#: Independent full randomisations whose correlations are averaged.
REPEATS = 3
#: Stages of the cascading randomisation (top layers first).
CASCADE_STAGES = 4


def randomisation_check(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    *,
    target: int,
    task: str,
    seed: int = 0,
    ctype: str | None = None,
    loss: str | None = None,
    threshold: float = THRESHOLD,
    repeats: int = REPEATS,
    cascading: bool = False,
    return_maps: bool = False,
) -> dict[str, Any]:
    """Compare ``method``'s map of ``model`` with its map of the same network with re-initialised weights.

    Args:
        model: the trained network (left unchanged: the randomised one is a deep copy).
        x: the preprocessed input ``(1, C, *S)``.
        method: a saliency method name (:data:`medlens.explain.saliency.METHODS` or a registered one).
        target: class index explained (see :func:`medlens.explain.saliency.saliency`).
        task: ``"classification"`` or ``"segmentation"``.
        seed: seed of the first re-initialisation (draw ``r`` uses ``seed + r``).
        ctype: classification type (see :func:`~medlens.explain.saliency.saliency`).
        loss: the plan's loss name.
        threshold: mean ``|rho|`` below which the method passes.
        repeats: independent full randomisations averaged (one correlation varies a lot from draw to draw).
        cascading: also report the cascading randomisation (top layers first).
        return_maps: add ``maps = {"original", "randomised"}`` (numpy arrays; the rest stays JSON-able).

    Returns:
        ``{method, spearman (mean rho), spearman_each, passed, threshold, mode ("full"), repeats, note}``
        (+ ``cascade``: list of ``{layers, spearman}``; + ``maps`` with the last randomised map).
        ``spearman`` is None and ``passed`` False when the original map is constant (nothing to compare).
    """
    from medlens.explain.targets import model_device

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be a positive integer, got {repeats!r}")
    original = explain(model, x, method, target=target, task=task, seed=seed, ctype=ctype, loss=loss)
    region = original.region
    if task == "segmentation" and region is None:  # the class is predicted nowhere: the whole (padded) grid
        region = torch.ones(original.info["logits_shape"][2:], dtype=torch.bool)
    layer = original.info.get("layer")

    def randomised_map(net: nn.Module) -> np.ndarray:
        return explain(
            net,
            x,
            method,
            target=target,
            task=task,
            seed=seed,
            ctype=ctype,
            loss=loss,
            layer=layer,
            region=region,
        ).map

    inside = compared_voxels(x)

    def rank_corr(a: np.ndarray, b: np.ndarray) -> tuple[float | None, str]:
        return _spearman(a[inside], b[inside])

    rhos: list[float] = []
    rand_map = original.map
    why = ""
    for r in range(repeats):
        rnd = copy.deepcopy(model).to(model_device(model))
        randomise_weights(rnd, seed=seed + r)
        rand_map = randomised_map(rnd)
        del rnd
        rho_r, why = rank_corr(original.map, rand_map)
        if rho_r is None:
            break
        rhos.append(rho_r)
    rho = float(np.mean(rhos)) if len(rhos) == repeats else None
    abs_rho = float(np.mean(np.abs(rhos))) if rho is not None else None
    passed = abs_rho is not None and abs_rho < threshold
    if abs_rho is None:
        verdict = f"cannot be checked: {why}"
    elif passed:
        verdict = f"passed: the map changes when the weights are randomised (mean |rho| {abs_rho:.2f} < {threshold})"
    else:
        verdict = (
            f"FAILED: the map barely changes when the weights are randomised (mean |rho| {abs_rho:.2f} >= "
            f"{threshold}); it reflects the image (or the explained region) more than the learned weights"
        )
    context = (
        " For segmentation the explained output is the class's logits summed over the original prediction's "
        "region for both networks, so some concentration near it is expected from any network."
        if task == "segmentation"
        else ""
    )
    out: dict[str, Any] = {
        "method": method,
        "spearman": rho,
        "spearman_each": rhos,
        "passed": bool(passed),
        "threshold": float(threshold),
        "mode": "full",
        "repeats": repeats,
        "note": (
            f"{verdict}. Full randomisation (Adebayo et al. 2018): every layer re-initialised, {repeats} "
            f"independent draw(s) (seeds {seed}..{seed + repeats - 1}); Spearman rank correlation of the "
            f"flattened maps, averaged over the draws; passed when the mean |rho| is below {threshold}."
            + (
                f" Compared inside the image's nonzero mask ({int(inside.sum())} of {inside.size} voxels): the "
                "exact-zero background of a masked image is zero in both maps and would inflate the correlation."
                if not inside.all()
                else ""
            )
            + context
        ),
    }
    if cascading:
        out["cascade"] = _cascade(
            model, x, seed=seed, original=original.map, map_of=randomised_map, corr=rank_corr
        )
    if return_maps:
        out["maps"] = {"original": original.map, "randomised": rand_map}
    return out


def randomise_weights(
    model: nn.Module, *, seed: int = 0, modules: list[nn.Module] | None = None
) -> nn.Module:
    """Re-initialise ``model`` in place (all modules, or only ``modules``) and return it.

    Modules with ``reset_parameters`` use it (and ``reset_running_stats``); any remaining parameter is drawn
    from a normal distribution with its own standard deviation (0.02 when that is 0).
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        chosen = list(model.modules()) if modules is None else modules
        covered: set[int] = set()
        for m in chosen:
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                with torch.no_grad():
                    reset()
                covered.update(id(p) for p in m.parameters(recurse=False))
            stats = getattr(m, "reset_running_stats", None)
            if callable(stats):
                stats()
        for m in chosen:
            for p in m.parameters(recurse=False):
                if id(p) in covered:
                    continue
                std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
                with torch.no_grad():
                    p.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


# ---- helpers -----------------------------------------------------------------------------------------------


def compared_voxels(x: torch.Tensor) -> np.ndarray:
    """The voxels whose saliency is compared: inside the nonzero mask of a masked image (skull-stripped MR:
    at least 5% of the voxels exactly 0 in every channel), else all of them."""
    nonzero = (x[0] != 0).any(dim=0).detach().cpu().numpy()
    if nonzero.mean() > 0.95 or nonzero.sum() < 16:
        return np.ones_like(nonzero, dtype=bool)
    return nonzero


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float | None, str]:
    """Spearman's rho of two maps; a constant randomised map counts as uncorrelated (rho 0)."""
    from scipy.stats import spearmanr

    fa, fb = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if np.ptp(fa) == 0:
        return None, "the original map is constant"
    if np.ptp(fb) == 0:
        return 0.0, "the randomised map is constant (no ranking shared with the original)"
    rho = float(spearmanr(fa, fb).statistic)
    return (rho, "") if math.isfinite(rho) else (None, "the correlation is undefined")


def _cascade(
    model: nn.Module,
    x: torch.Tensor,
    *,
    seed: int,
    original: np.ndarray,
    map_of: Callable[[nn.Module], np.ndarray],
    corr: Callable[[np.ndarray, np.ndarray], tuple[float | None, str]] = _spearman,
) -> list[dict[str, Any]]:
    """Cumulative re-initialisation from the output layer down, in up to CASCADE_STAGES stages."""
    from medlens.explain.targets import model_device

    net = copy.deepcopy(model).to(model_device(model))
    modules = dict(net.named_modules())
    params = [n for n in _execution_order(net, x) if any(True for _ in modules[n].parameters(recurse=False))]
    params.reverse()  # top (output) first
    if not params:
        return []
    edges = np.linspace(0, len(params), min(CASCADE_STAGES, len(params)) + 1).round().astype(int)
    out = []
    for a, b in itertools.pairwise(edges.tolist()):
        randomise_weights(net, seed=seed + int(a), modules=[modules[n] for n in params[a:b]])
        rho, _ = corr(original, map_of(net))
        out.append({"layers": f"{params[0]} .. {params[b - 1]} ({b} of {len(params)})", "spearman": rho})
    return out


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Module names in the order of their first call in a forward pass at ``x``."""
    from medlens.explain.targets import evaluating, model_device

    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _i, n=n: None if n in order else order.append(n))
        for n, m in model.named_modules()
        if n
    ]
    try:
        with evaluating(model), torch.no_grad():
            model(x.detach().to(device=model_device(model), dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    return order
