"""Network registry and factory: ``create_model(spec, spatial_dims=, in_channels=, out_channels=)``.

The built-in families (MONAI segmentation and classification networks, plus tiny ``test_*`` variants) are
registered on first use, so importing this package does not import MONAI.
"""

from __future__ import annotations

from medlens.models.registry import (
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
    resolve_spec,
)

__all__ = [
    "ModelInfo",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "resolve_spec",
]
