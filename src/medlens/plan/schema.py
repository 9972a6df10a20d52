"""The ``plan.json`` schema: every key a plan may hold, its type and accepted values.

A tiny declarative checker: each node names what it expects, so an error reads
``plan.json: configurations.3d_fullres.patch_size: expected 3 positive integers, got [128, 128]`` and an
unknown key gets a "did you mean". The network and training sections are checked by their owners
(:func:`medlens.models.resolve_spec`, :meth:`medlens.engine.config.TrainConfig.from_dict`), so the plan never
accepts a key the trainer would reject.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medlens.errors import PlanError, did_you_mean

TASKS = ("segmentation", "classification")
CONFIGURATION_SECTIONS = (
    "preprocessing", "network", "loss", "sampling", "augmentation", "training", "inference", "postprocessing",
)  # fmt: skip
NORMALIZATION_SCHEMES = ("ct", "zscore", "rescale", "none")


class Node:
    """A schema node: ``check(value, path, where)`` raises :class:`PlanError` naming the JSON path."""

    def check(self, value: Any, path: str, where: str) -> None:
        raise NotImplementedError

    @staticmethod
    def fail(where: str, path: str, msg: str, value: Any) -> PlanError:
        return PlanError(f"{where}: {path}: {msg}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class Int(Node):
    low: int | None = None
    high: int | None = None

    def check(self, value: Any, path: str, where: str) -> None:
        if (
            not _is_int(value)
            or (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
        ):
            rng = f" >= {self.low}" if self.high is None and self.low is not None else ""
            if self.high is not None:
                rng = f" in [{self.low}, {self.high}]"
            raise self.fail(where, path, f"expected an integer{rng}", value)


@dataclass
class Num(Node):
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def check(self, value: Any, path: str, where: str) -> None:
        ok = _is_num(value)
        if ok and self.low is not None:
            ok = value > self.low if self.open_low else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.open_high else value <= self.high
        if not ok:
            lo = "" if self.low is None else ("(" if self.open_low else "[") + f"{self.low}"
            hi = "" if self.high is None else f"{self.high}" + (")" if self.open_high else "]")
            rng = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
            raise self.fail(where, path, f"expected a number{rng}", value)


@dataclass
class Str(Node):
    choices: tuple[str, ...] = ()

    def check(self, value: Any, path: str, where: str) -> None:
        if not isinstance(value, str):
            raise self.fail(where, path, "expected a string", value)
        if self.choices and value not in self.choices:
            raise PlanError(
                f"{where}: {path}: unknown value {value!r}.{did_you_mean(value, self.choices)} "
                f"Accepted: {', '.join(self.choices)}."
            )


class Bool(Node):
    def check(self, value: Any, path: str, where: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(where, path, "expected true or false", value)


class AnyValue(Node):
    def check(self, value: Any, path: str, where: str) -> None:
        return None


@dataclass
class Nullable(Node):
    inner: Node

    def check(self, value: Any, path: str, where: str) -> None:
        if value is not None:
            self.inner.check(value, path, where)


@dataclass
class OneOf(Node):
    options: tuple[Node, ...]
    expected: str

    def check(self, value: Any, path: str, where: str) -> None:
        for opt in self.options:
            try:
                opt.check(value, path, where)
                return
            except PlanError:
                continue
        raise self.fail(where, path, f"expected {self.expected}", value)


@dataclass
class List(Node):
    item: Node
    length: int | None = None
    expected: str | None = None

    def check(self, value: Any, path: str, where: str) -> None:
        if not isinstance(value, list | tuple) or (self.length is not None and len(value) != self.length):
            size = f"{self.length} " if self.length is not None else ""
            raise self.fail(where, path, self.expected or f"expected a list of {size}items", value)
        for i, v in enumerate(value):
            if self.expected:
                try:
                    self.item.check(v, f"{path}[{i}]", where)
                except PlanError:
                    raise self.fail(where, path, self.expected, value) from None
            else:
                self.item.check(v, f"{path}[{i}]", where)


@dataclass
class Obj(Node):
    fields: dict[str, Node]
    required: tuple[str, ...] = ()
    open: bool = False

    def check(self, value: Any, path: str, where: str) -> None:
        if not isinstance(value, Mapping):
            raise self.fail(where, path, "expected a JSON object", value)
        for key in self.required:
            if key not in value:
                raise PlanError(f"{where}: {path + ': ' if path else ''}missing key {key!r}")
        for key, v in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in self.fields:
                self.fields[key].check(v, sub, where)
            elif not self.open:
                raise PlanError(
                    f"{where}: {sub}: unknown key.{did_you_mean(str(key), list(self.fields))} "
                    f"Accepted: {', '.join(self.fields)}."
                )


@dataclass
class MapOf(Node):
    value_node: Node
    key_check: Callable[[str], bool] = field(default=lambda k: True)
    key_expected: str = "a name"

    def check(self, value: Any, path: str, where: str) -> None:
        if not isinstance(value, Mapping):
            raise self.fail(where, path, "expected a JSON object", value)
        for key, v in value.items():
            if not self.key_check(str(key)):
                raise PlanError(f"{where}: {path}: key {key!r} must be {self.key_expected}")
            self.value_node.check(v, f"{path}.{key}", where)


# ---- the plan schema -----------------------------------------------------------------------------------------

_P = Num(0.0, 1.0)
_RANGE_POS = List(Num(0.0, open_low=True), length=2, expected="expected [low, high], two positive numbers")

NORMALIZATION = Obj(
    {
        "scheme": Str(NORMALIZATION_SCHEMES),
        "clip": List(Num(), length=2, expected="expected [low, high], two numbers"),
        "mean": Num(),
        "std": Num(0.0, open_low=True),
        "use_nonzero_mask": Bool(),
        "range": List(Num(), length=2, expected="expected [low, high], two numbers"),
    },
    required=("scheme",),
)

PREPROCESSING = Obj(
    {
        "target_spacing": Nullable(
            List(
                Nullable(Num(0.0, open_low=True)),
                expected="expected a list of positive numbers (null = keep)",
            )
        ),
        "orientation": Str(("RAS", "none")),
        "crop_nonzero": Bool(),
        "resample_data": Str(("linear", "cubic", "nearest")),
        "resample_label": Str(("nearest", "linear_onehot")),
        "anisotropy_threshold": Num(1.0),
        "normalization": MapOf(NORMALIZATION, str.isdigit, 'a channel index ("0", "1", ...)'),
        "label_values": List(Int(0), expected="expected a list of label values (integers >= 0)"),
        "cache_dtype": Str(("float16", "float32")),
    }
)

SAMPLING = Obj(
    {
        "oversample_foreground": _P,
        "slice_axis": Nullable(Int(0, 2)),
        "balanced": Bool(),  # classification: draw batches class-balanced
    }
)

INFERENCE = Obj(
    {
        "roi_size": List(Int(1), expected="expected positive integers"),
        "overlap": Num(0.0, 1.0, open_high=True),
        "sw_batch_size": Int(1),
        "mode": Str(("gaussian", "constant")),
        "sigma_scale": Num(0.0, open_low=True),
        "mirror_axes": List(Int(0, 2), expected="expected a list of spatial axes"),
        "precision": Str(("auto", "bf16", "fp16", "fp32")),
    }
)

LOSS = Obj(
    {
        "name": Str(("dice_ce", "dice", "ce", "bce", "coral")),  # bce, coral: classification
        "include_background": Bool(),
        "batch_dice": Bool(),
        "lambda_dice": Num(0.0),
        "lambda_ce": Num(0.0),
        "class_weights": List(Num(0.0, open_low=True), expected="expected a list of positive weights"),
        "label_smoothing": Num(0.0, 1.0, open_high=True),  # classification
    },
    required=("name",),
)

POSTPROCESSING = Obj(
    {
        "largest_component": OneOf(
            (Str(("auto",)), Bool(), List(Int(1))), "'auto', true, false or a list of label values"
        ),
        "fill_holes": Bool(),
    }
)

CONFIGURATION = Obj(
    {
        "inherits": Str(),
        "description": Str(),
        "spatial_dims": Int(2, 3),
        "patch_size": List(Int(1), expected="expected positive integers"),
        "batch_size": Int(1),
        "preprocessing": PREPROCESSING,
        "network": Obj({"name": Str()}, open=True),  # keys checked by medlens.models
        "loss": LOSS,
        "sampling": SAMPLING,
        "augmentation": Obj({}, open=True),  # checked by medlens.data.augment
        "training": Obj({}, open=True),  # checked by medlens.engine.config.TrainConfig
        "inference": INFERENCE,
        "postprocessing": POSTPROCESSING,
        "validation": Obj(
            {
                "max_cases": Nullable(Int(1)),
                "selection": Str(("best", "smoothed", "last")),  # classification: which weights are kept
            }
        ),
        "estimates": Obj({}, open=True),  # what the planner measured; informational
    }
)

PLAN = Obj(
    {
        "medlens_plan": Int(1, 1),
        "dataset": Str(),
        "task": Str(TASKS),
        "created": Str(),
        "planner": Obj({}, open=True),
        "fingerprint": Obj({}, open=True),
        "labels": MapOf(Int(0)),
        "num_channels": Int(1),
        "default_configuration": Str(),
        "configurations": MapOf(CONFIGURATION),
        "reasons": List(Str(), expected="expected a list of strings"),
    },
    required=("medlens_plan", "task", "labels", "num_channels", "default_configuration", "configurations"),
)
