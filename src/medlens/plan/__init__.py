"""Planning: fingerprint + task + budget -> a frozen, versioned, human-editable ``plan.json``; the
preprocessing it prescribes (invertible back to the input geometry) and the preprocessed cache.

* :func:`make_plan` (``planner.py``; sizing in ``patch.py``/``topology.py``, rules in ``segmentation.py``)
  and :class:`Plan` (``plan.py``, schema in ``schema.py``);
* :func:`parse_budget` and step costing (``budget.py``);
* :func:`preprocess_case` / :func:`invert` (``preprocess.py``, ``resample.py``);
* :func:`build_cache` / :class:`Cache` (``cache.py``).

Names are imported on first use, so ``import medlens.plan`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Plan": "medlens.plan.plan",
    "make_plan": "medlens.plan.planner",
    "parse_budget": "medlens.plan.budget",
    "SegmentationPlanner": "medlens.plan.segmentation",
    "PreprocessInfo": "medlens.plan.preprocess",
    "preprocess_case": "medlens.plan.preprocess",
    "invert": "medlens.plan.preprocess",
    "invert_to_image": "medlens.plan.preprocess",
    "Cache": "medlens.plan.cache",
    "build_cache": "medlens.plan.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medlens.plan' has no attribute {name!r}")
