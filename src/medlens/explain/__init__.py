"""Explaining and qualifying predictions: saliency maps, their sanity checks, and uncertainty.

- :mod:`medlens.explain.saliency`: ``saliency(model, x, method, *, target, task)`` with ``METHODS``
  (Grad-CAM, occlusion, integrated gradients via captum), ``register_method`` for more.
- :mod:`medlens.explain.sanity`: ``randomisation_check`` (Adebayo et al. 2018 model randomisation).
- :mod:`medlens.explain.uncertainty`: MC-dropout, ensemble and TTA uncertainty, deferral thresholds.

Nothing heavy is imported here: the names below load their module (torch, captum) on first access. The
function ``saliency`` is not re-exported (its module has the same name): use
``from medlens.explain.saliency import saliency``.
"""

from __future__ import annotations

from typing import Any

METHODS = ("gradcam", "occlusion", "integrated_gradients")

_LAZY = {
    "explain": "medlens.explain.saliency",
    "register_method": "medlens.explain.saliency",
    "find_target_layer": "medlens.explain.saliency",
    "randomisation_check": "medlens.explain.sanity",
    "randomise_weights": "medlens.explain.sanity",
}

__all__ = ["METHODS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medlens.explain' has no attribute {name!r}")
