"""The plan: a frozen, versioned, human-editable ``plan.json``.

Layout (``"medlens_plan": 1``)::

    {"medlens_plan": 1, "dataset": ..., "task": "segmentation", "created": ISO time,
     "planner": {budget, device, threads, memory...}, "fingerprint": {summary},
     "labels": {"background": 0, ...}, "num_channels": 1,
     "default_configuration": "3d_fullres",
     "configurations": {
        "2d": {...}, "3d_fullres": {...},
        "3d_lowres": {"inherits": "3d_fullres", ...only what differs...}},
     "reasons": ["why each decision was taken", ...]}

A configuration holds ``spatial_dims``, ``patch_size``, ``batch_size`` and the sections ``preprocessing``,
``network`` (for :func:`medlens.models.create_model`), ``loss``, ``sampling``, ``augmentation``, ``training``
(for :meth:`medlens.engine.config.TrainConfig.from_dict`), ``inference``, ``postprocessing`` and the planner's
``estimates``. A configuration may ``inherit`` another: it is deep-merged over its parent (objects merge key by
key, lists and values replace), which is how a user writes a variant with only the keys that change.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from medlens._fs import atomic_write_json
from medlens.errors import InputError, PlanError, did_you_mean
from medlens.plan.schema import CONFIGURATION, CONFIGURATION_SECTIONS, PLAN

PLAN_VERSION = 1


class FrozenDict(dict):  # type: ignore[type-arg]
    """A read-only dict (still a ``dict``, so JSON and ``isinstance`` checks work)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a resolved plan configuration is read-only; use thaw() for an editable copy")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))

    def __reduce__(self) -> tuple[Any, ...]:  # pickle / deepcopy without calling __setitem__
        return (FrozenDict, (dict(self),))


def freeze(obj: Any) -> Any:
    """A deep read-only copy: dicts become :class:`FrozenDict`, lists tuples."""
    if isinstance(obj, Mapping):
        return FrozenDict({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, list | tuple):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    """A deep editable copy: mappings become dicts, tuples lists."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [thaw(v) for v in obj]
    return copy.copy(obj)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: nested objects merge key by key; lists and plain values replace."""
    out = thaw(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = thaw(value)
    return out


def config_diff(child: Mapping[str, Any], parent: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest ``override`` with ``deep_merge(parent, override) == child`` (keys only ever added)."""
    out: dict[str, Any] = {}
    for key, value in child.items():
        if key not in parent:
            out[key] = thaw(value)
        elif isinstance(value, Mapping) and isinstance(parent[key], Mapping):
            sub = config_diff(value, parent[key])
            if sub:
                out[key] = sub
        elif thaw(value) != thaw(parent[key]):
            out[key] = thaw(value)
    return out


class Plan:
    """A validated plan. Construct with :meth:`load`, :meth:`from_dict`, or the planner (:func:`make_plan`).

    Attributes:
        where: how errors name the plan (its path, or ``"plan.json"``).
    """

    def __init__(self, data: Mapping[str, Any], *, where: str = "plan.json") -> None:
        self._data: dict[str, Any] = thaw(data)
        self.where = where
        self._resolved: dict[str, FrozenDict] = {}
        self.validate()

    # ---- construction and persistence --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan.json") -> Plan:
        """Validate ``data`` (parsed JSON) and wrap it."""
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: must hold a JSON object at the top level")
        return cls(data, where=where)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a ``plan.json``.

        Raises:
            PlanError: missing file, invalid JSON, or any key or value that is wrong (with its JSON path).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file (make one with 'medlens plan')")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: is not valid JSON ({e})") from None
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the plan as indented JSON, atomically."""
        path = Path(path)
        atomic_write_json(path, self._data)
        return path

    def to_dict(self) -> dict[str, Any]:
        """An editable deep copy of the plan's JSON."""
        return thaw(self._data)

    # ---- access --------------------------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return str(self._data.get("dataset", ""))

    @property
    def task(self) -> str:
        return str(self._data["task"])

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> label value, background included."""
        return dict(self._data["labels"])

    @property
    def num_channels(self) -> int:
        return int(self._data["num_channels"])

    @property
    def num_classes(self) -> int:
        """Network output channels: one per class, background included."""
        return len(self._data["labels"])

    @property
    def default_configuration(self) -> str:
        return str(self._data["default_configuration"])

    @property
    def configuration_names(self) -> list[str]:
        return list(self._data["configurations"])

    @property
    def reasons(self) -> list[str]:
        return list(self._data.get("reasons", []))

    @property
    def fingerprint(self) -> dict[str, Any]:
        return thaw(self._data.get("fingerprint", {}))

    def configuration(self, name: str | None = None) -> FrozenDict:
        """A configuration with inheritance resolved, read-only (``thaw()`` it for an editable copy).

        Args:
            name: configuration name; the default configuration when None.

        Raises:
            PlanError: no such configuration (with "did you mean").
        """
        name = self.default_configuration if name is None else name
        if name not in self._resolved:
            self._check_name(name, "configuration")
            self._resolved[name] = freeze(self._resolve(name, ()))
        return self._resolved[name]

    def add_variant(
        self, name: str, inherits: str, overrides: Mapping[str, Any], description: str | None = None
    ) -> Plan:
        """A new plan with configuration ``name`` = ``inherits`` + ``overrides`` (validated).

        Raises:
            PlanError: ``name`` exists, ``inherits`` is unknown, or the variant is invalid.
        """
        if name in self._data["configurations"]:
            raise PlanError(
                f"{self.where}: configurations.{name}: already exists; choose another variant name"
            )
        self._check_name(inherits, "configuration")
        data = self.to_dict()
        entry: dict[str, Any] = {"inherits": inherits}
        if description:
            entry["description"] = description
        entry.update(thaw(overrides))
        data["configurations"][name] = entry
        return Plan(data, where=self.where)

    def __repr__(self) -> str:
        names = ", ".join(self.configuration_names)
        return f"Plan({self.dataset!r}, task={self.task}, default={self.default_configuration}, configurations=[{names}])"

    # ---- validation ----------------------------------------------------------------------------------------
    def _check_name(self, name: str, kind: str) -> None:
        names = list(self._data["configurations"])
        if name not in names:
            raise PlanError(
                f"{self.where}: no {kind} {name!r}.{did_you_mean(name, names)} Available: {', '.join(names)}."
            )

    def _resolve(self, name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        configs = self._data["configurations"]
        if name in chain:
            cycle = " -> ".join((*chain, name))
            raise PlanError(f"{self.where}: configurations.{chain[-1]}.inherits: inheritance cycle {cycle}")
        entry = configs[name]
        parent = entry.get("inherits")
        if parent is None:
            return thaw(entry)
        if parent not in configs:
            raise PlanError(
                f"{self.where}: configurations.{name}.inherits: no configuration {parent!r}."
                f"{did_you_mean(parent, list(configs))} Available: {', '.join(configs)}."
            )
        merged = deep_merge(self._resolve(parent, (*chain, name)), entry)
        merged.pop("inherits", None)
        merged.pop("description", None)
        if "description" in entry:
            merged["description"] = entry["description"]
        return merged

    def validate(self) -> None:
        """Check every key and value, then each resolved configuration as a whole.

        Raises:
            PlanError: naming the file, the JSON path, what is wrong and what is accepted.
        """
        d, where = self._data, self.where
        PLAN.check(d, "", where)
        if not d["configurations"]:
            raise PlanError(f"{where}: configurations: a plan needs at least one configuration")
        default = d["default_configuration"]
        if default not in d["configurations"]:
            names = list(d["configurations"])
            raise PlanError(
                f"{where}: default_configuration: no configuration {default!r}.{did_you_mean(default, names)} "
                f"Available: {', '.join(names)}."
            )
        values = list(d["labels"].values())
        if len(set(values)) != len(values):
            raise PlanError(f"{where}: labels: two classes share one value ({d['labels']})")
        if d["task"] == "segmentation" and 0 not in values:
            raise PlanError(f"{where}: labels: segmentation needs a background class with value 0")
        self._resolved = {}
        for name in d["configurations"]:
            self._validate_resolved(name, self._resolve(name, ()))

    def _validate_resolved(self, name: str, cfg: dict[str, Any]) -> None:
        where, path = self.where, f"configurations.{name}"
        CONFIGURATION.check(cfg, path, where)
        required = ("spatial_dims", "patch_size", "batch_size", *CONFIGURATION_SECTIONS)
        missing = [k for k in required if k not in cfg]
        if missing:
            raise PlanError(
                f"{where}: {path}: missing {', '.join(missing)} (give them, or inherit a configuration that has them)"
            )
        nd = cfg["spatial_dims"]
        data_nd = int(self._data.get("fingerprint", {}).get("ndim", nd))
        patch = cfg["patch_size"]
        if len(patch) != nd:
            raise PlanError(f"{where}: {path}.patch_size: expected {nd} positive integers, got {patch!r}")
        roi = cfg["inference"].get("roi_size")
        if roi is not None and len(roi) != nd:
            raise PlanError(
                f"{where}: {path}.inference.roi_size: expected {nd} positive integers, got {roi!r}"
            )
        for ax in cfg["inference"].get("mirror_axes", []):
            if ax >= nd:
                raise PlanError(f"{where}: {path}.inference.mirror_axes: axis {ax} >= spatial_dims {nd}")
        pre = cfg["preprocessing"]
        ts = pre.get("target_spacing")
        if ts is not None and len(ts) != data_nd:
            raise PlanError(
                f"{where}: {path}.preprocessing.target_spacing: expected {data_nd} values (mm, or null to keep "
                f"the image's spacing), got {ts!r}"
            )
        slice_axis = cfg["sampling"].get("slice_axis")
        if nd < data_nd and (slice_axis is None or slice_axis >= data_nd):
            raise PlanError(
                f"{where}: {path}.sampling.slice_axis: a {nd}D configuration of {data_nd}D data needs the axis "
                f"to slice along (0..{data_nd - 1}), got {slice_axis!r}"
            )
        norm = pre.get("normalization", {})
        if norm and sorted(norm, key=int) != [str(c) for c in range(self.num_channels)]:
            raise PlanError(
                f"{where}: {path}.preprocessing.normalization: needs one entry per channel "
                f"{[str(c) for c in range(self.num_channels)]}, got {sorted(norm)}"
            )
        lv = pre.get("label_values")
        if lv is not None and sorted(lv) != sorted(self._data["labels"].values()):
            raise PlanError(
                f"{where}: {path}.preprocessing.label_values: must list the plan's label values "
                f"{sorted(self._data['labels'].values())}, got {lv!r}"
            )
        self._check_strides(path, cfg)
        self._delegate(path, cfg)

    def _check_strides(self, path: str, cfg: dict[str, Any]) -> None:
        nd, patch = cfg["spatial_dims"], cfg["patch_size"]
        strides = cfg["network"].get("strides")
        if not isinstance(strides, list | tuple):
            return
        total = [1] * nd
        for s in strides:
            per_axis = list(s) if isinstance(s, list | tuple) else [s] * nd
            if len(per_axis) != nd or not all(isinstance(v, int) for v in per_axis):
                return  # malformed; the network check below reports it
            total = [t * v for t, v in zip(total, per_axis, strict=True)]
        for ax, (p, t) in enumerate(zip(patch, total, strict=True)):
            if p % t:
                lo, hi = max(t, p // t * t), (p // t + 1) * t
                raise PlanError(
                    f"{self.where}: {path}.patch_size: {p} along axis {ax} is not a multiple of the network's "
                    f"total stride {t} (use {lo} or {hi})"
                )

    def _delegate(self, path: str, cfg: dict[str, Any]) -> None:
        """Sections owned by other rooms are checked by their owners' own validators."""
        from medlens.data.augment import parse_augmentation
        from medlens.engine.config import TrainConfig
        from medlens.models import resolve_spec

        where = self.where
        try:
            resolve_spec(cfg["network"])
        except InputError as e:
            raise PlanError(f"{where}: {path}.network: {e}") from None
        try:
            TrainConfig.from_dict(cfg["training"], where=f"{path}.training")
        except InputError as e:
            raise PlanError(f"{where}: {e}") from None
        try:
            parse_augmentation(cfg["augmentation"], cfg["spatial_dims"], where=f"{path}.augmentation")
        except InputError as e:
            raise PlanError(f"{where}: {e}") from None
