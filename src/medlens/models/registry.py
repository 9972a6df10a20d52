"""A decorator registry of network builders and the one factory, :func:`create_model`.

A *network spec* is the plan's ``network`` section: a JSON object with a ``name`` and the builder's keyword
arguments, e.g. ``{"name": "unet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2]}``. Every key a builder
accepts is a named keyword parameter of the builder function (no ``**kwargs``), so the accepted keys and their
defaults are read from its signature; unknown names and keys fail here, with a "did you mean", not five frames
deep inside MONAI.

The model returned carries two plain attributes: ``medlens_spec`` (the fully resolved spec, defaults filled in,
plus ``spatial_dims``/``in_channels``/``out_channels``: enough to rebuild it) and ``medlens_head`` (the module-name
prefixes of its output head, used by the engine's parameter groups for fine-tuning).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medlens.errors import InputError, did_you_mean, unknown_name

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: Keyword parameters every builder takes from :func:`create_model` itself, never from the spec.
FIXED_PARAMS = ("spatial_dims", "in_channels", "out_channels")
TASKS = ("segmentation", "classification")


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one network family.

    Attributes:
        name: registry name, the spec's ``name``.
        task: ``"segmentation"`` (output ``(B, out_channels, *spatial)``) or ``"classification"``
            (output ``(B, out_channels)`` logits).
        spatial_dims: the spatial dimensionalities the network supports.
        head: module-name prefixes of the output head (what "train only the head" trains).
        builder: the function building the network.
    """

    name: str
    task: str
    spatial_dims: tuple[int, ...]
    head: tuple[str, ...]
    builder: Callable[..., nn.Module]

    @property
    def defaults(self) -> dict[str, Any]:
        """The spec keys this network accepts, with their default values."""
        out: dict[str, Any] = {}
        for p in inspect.signature(self.builder).parameters.values():
            if p.name in FIXED_PARAMS:
                continue
            default = p.default
            out[p.name] = list(default) if isinstance(default, tuple) else default
        return out

    @property
    def description(self) -> str:
        """First line of the builder's docstring."""
        doc = inspect.getdoc(self.builder) or ""
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, task: str, spatial_dims: tuple[int, ...] = (2, 3), head: tuple[str, ...] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a network builder under ``name``.

    The builder takes keyword-only ``spatial_dims``, ``in_channels`` and ``out_channels`` plus one keyword
    parameter (with a JSON-able default) per spec key. It validates its values and returns the module.

    Args:
        name: registry name.
        task: ``"segmentation"`` or ``"classification"``.
        spatial_dims: supported spatial dimensionalities.
        head: module-name prefixes of the output head.
    """
    if task not in TASKS:
        raise ValueError(f"register_model({name!r}): task must be one of {TASKS}, got {task!r}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = inspect.signature(builder).parameters
        missing = [p for p in FIXED_PARAMS if p not in params]
        if missing or any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params.values()):
            raise TypeError(f"builder {builder.__name__} must take keyword-only {FIXED_PARAMS} and spec keys")
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, task, tuple(spatial_dims), tuple(head), builder)
        return builder

    return decorate


def _registry() -> dict[str, ModelInfo]:
    # The built-in families register themselves on import; importing them here (not at package import)
    # keeps `import medlens.models` cheap.
    from medlens.models import classification, segmentation  # noqa: F401

    return _REGISTRY


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered networks, optionally only those for ``task``."""
    if task is not None and task not in TASKS:
        raise unknown_name("task", task, TASKS)
    return sorted(n for n, info in _registry().items() if task is None or info.task == task)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered network (InputError with "did you mean" if unknown)."""
    registry = _registry()
    if name not in registry:
        raise unknown_name("model", name, list(registry))
    return registry[name]


def resolve_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a network spec's name and keys and return it with every default filled in."""
    if not isinstance(spec, Mapping):
        raise InputError(f"network spec must be a JSON object with a 'name', got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise InputError(f"network spec has no model 'name' (one of: {', '.join(list_models())})")
    info = model_info(name)
    defaults = info.defaults
    for key in spec:
        if key != "name" and key not in defaults:
            accepted = ", ".join(sorted(defaults))
            raise InputError(
                f"unknown key {key!r} in the {name!r} network spec.{did_you_mean(key, list(defaults))} "
                f"Accepted: {accepted}."
            )
    return {"name": name, **defaults, **{k: v for k, v in spec.items() if k != "name"}}


def create_model(
    spec: Mapping[str, Any], *, spatial_dims: int, in_channels: int, out_channels: int
) -> nn.Module:
    """Build the network a spec names.

    Args:
        spec: the plan's ``network`` section, ``{"name": ..., **keys}``; missing keys take their defaults.
        spatial_dims: 2 or 3.
        in_channels: input image channels.
        out_channels: output channels (segmentation classes including background, or classification logits).

    Returns:
        The module, with ``medlens_spec`` and ``medlens_head`` attributes (see the module docstring).

    Raises:
        InputError: unknown name or key (with "did you mean"), or a value the network cannot take.
    """
    resolved = resolve_spec(spec)
    name = resolved.pop("name")
    info = model_info(name)
    if spatial_dims not in info.spatial_dims:
        dims = " or ".join(str(d) for d in info.spatial_dims)
        raise InputError(f"model {name!r} supports spatial_dims {dims}, got {spatial_dims!r}")
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    try:
        model = info.builder(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **resolved
        )
    except InputError:
        raise
    except (ValueError, TypeError, AssertionError, IndexError, KeyError, NotImplementedError) as exc:
        raise InputError(
            f"network spec for {name!r} cannot be built ({spatial_dims}D, {in_channels} -> {out_channels} "
            f"channels): {exc}. Check the values in {dict(resolved)}."
        ) from exc
    full_spec = {
        "name": name,
        **resolved,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }
    # Plain attributes; setattr because mypy types Module.__setattr__ for tensors and modules only.
    setattr(model, "medlens_spec", full_spec)  # noqa: B010
    setattr(model, "medlens_head", info.head)  # noqa: B010
    log.debug("built %s with %d parameters", name, count_parameters(model))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# ---- value checks shared by the builders -------------------------------------------------------------------


def check_int(model: str, key: str, value: Any, minimum: int = 1) -> int:
    """A spec value that must be an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{model!r} network spec: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(model: str, key: str, value: Any, low: float, high: float) -> float:
    """A spec value that must be a number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InputError(f"{model!r} network spec: {key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_ints(model: str, key: str, value: Any, length: int | None = None, minimum: int = 1) -> list[int]:
    """A spec value that must be a list of integers >= ``minimum`` (of ``length`` if given)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    ok = ok and all(not isinstance(v, bool) and isinstance(v, int) and v >= minimum for v in value)
    if not ok or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else ""
        raise InputError(
            f"{model!r} network spec: {key} must be a list of {size}integers >= {minimum}, got {value!r}"
        )
    return [int(v) for v in value]


def check_per_axis(model: str, key: str, value: Any, spatial_dims: int) -> list[int | list[int]]:
    """A list whose entries are an integer or one integer per spatial axis (anisotropic strides/kernels)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise InputError(f"{model!r} network spec: {key} must be a list, got {value!r}")
    out: list[int | list[int]] = []
    for i, v in enumerate(value):
        if isinstance(v, Sequence) and not isinstance(v, str):
            out.append(check_ints(model, f"{key}[{i}]", v, length=spatial_dims))
        else:
            out.append(check_int(model, f"{key}[{i}]", v))
    return out


def check_choice(model: str, key: str, value: Any, choices: Sequence[str]) -> str:
    """A spec value that must be one of ``choices``."""
    if value not in choices:
        raise InputError(
            f"{model!r} network spec: unknown {key} {value!r}.{did_you_mean(str(value), list(choices))} "
            f"Accepted: {', '.join(choices)}."
        )
    return str(value)
