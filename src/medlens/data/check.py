"""Check a dataset's files against its ``dataset.json`` and list every problem, each with its file or case.

:func:`load_dataset` stops at the first structural error; :func:`check_dataset` keeps going, so one run shows
everything to fix: structure, missing or unreadable files, geometry mismatches between an image, its channels
and its label, label values outside the declared classes, NaN/Inf and constant images, targets of the wrong
shape for the classification type, boxes outside their image, and patients whose cases sit in two fixed
splits. Each image is read once; a dataset of 40 small volumes checks in well under a second.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medlens.data.dataset import Case, Dataset, _parse_case, dataset_from_json
from medlens.errors import DatasetError, ImageReadError, MedlensError
from medlens.io.image import Image

__all__ = ["CheckReport", "Problem", "check_dataset"]

log = logging.getLogger(__name__)

#: Tasks whose training cases need a ``target`` image.
_TARGET_TASKS = ("reconstruction", "enhancement", "synthesis")


class Problem(NamedTuple):
    """One finding: ``where`` is a file (relative to the dataset root), a case id or ``dataset.json``."""

    where: str
    message: str


@dataclass
class CheckReport:
    """Everything :func:`check_dataset` found.

    Attributes:
        root: the dataset folder.
        problems: findings that make the dataset unusable as is (``ok`` is False when there are any).
        warnings: findings worth a look that do not stop training (e.g. a label map with no foreground).
        num_cases: number of cases checked.
    """

    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    num_cases: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings allowed)."""
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(str(where), message))

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(Problem(str(where), message))

    def to_text(self) -> str:
        """A human-readable report: one line per finding, problems first."""
        head = (
            f"{self.root}: {self.num_cases} cases checked, {len(self.problems)} problem(s), "
            f"{len(self.warnings)} warning(s)"
        )
        lines = [head + (" - OK" if self.ok else "")]
        lines += [f"  error:   {p.where}: {p.message}" for p in self.problems]
        lines += [f"  warning: {w.where}: {w.message}" for w in self.warnings]
        return "\n".join(lines)


def check_dataset(
    root: str | Path,
    *,
    geometry_atol: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Check the dataset in ``root`` and report every problem found.

    Args:
        root: the dataset folder (or its ``dataset.json``).
        geometry_atol: tolerance in mm on the affine when comparing an image with its label or its channels
            (headers store float32, so exact equality is too strict).
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when anything must be fixed.
    """
    root = Path(root)
    if root.name == "dataset.json":
        root = root.parent
    report = CheckReport(root=root)
    ds = _check_structure(root, report)
    if ds is None:
        return report
    _check_patient_splits(ds, report)
    ndims: dict[int, str] = {}
    cases = [(c, "training") for c in ds.training] + [(c, "test") for c in ds.test]
    for n, (case, section) in enumerate(cases, 1):
        _check_case_fields(ds, case, section, report)
        nd = _check_case_files(ds, case, section, report, geometry_atol)
        if nd is not None:
            ndims.setdefault(nd, case.id)
        if progress is not None:
            progress(n, len(cases))
    report.num_cases = len(cases)
    if len(ndims) > 1:
        where = ", ".join(f"{nd}D (e.g. case {cid!r})" for nd, cid in sorted(ndims.items()))
        report.add("dataset.json", f"images mix spatial dimensions: {where}; a dataset is all 2D or all 3D")
    log.info("checked %d cases in %s: %d problem(s)", len(cases), root, len(report.problems))
    return report


# ---- structure --------------------------------------------------------------------------------------------------
def _check_structure(root: Path, report: CheckReport) -> Dataset | None:
    """Parse ``dataset.json`` leniently: report every structural error, return what could be parsed."""
    jpath = root / "dataset.json"
    if not root.is_dir():
        report.add(str(root), "no such dataset folder")
        return None
    if not jpath.is_file():
        report.add(str(jpath), "missing (make one with 'medlens dataset import')")
        return None
    try:
        raw = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.add("dataset.json", f"is not valid JSON ({e})")
        return None
    if not isinstance(raw, dict):
        report.add("dataset.json", "must hold a JSON object at the top level")
        return None
    top = {k: v for k, v in raw.items() if k not in ("training", "test")}
    try:
        ds: Dataset | None = dataset_from_json(top, root, where="dataset.json")
    except DatasetError as e:
        report.add("dataset.json", _strip(e))
        ds = None
    sections: dict[str, list[Case]] = {"training": [], "test": []}
    seen: dict[str, str] = {}
    for section in sections:
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            report.add("dataset.json", f"'{section}' must be a list of cases")
            continue
        for n, entry in enumerate(entries):
            try:
                case = _parse_case(entry, section, n, "dataset.json")
            except DatasetError as e:
                report.add("dataset.json", _strip(e))
                continue
            if case.id in seen:
                report.add(
                    "dataset.json", f"case id {case.id!r} of {section}[{n}] is also used by {seen[case.id]}"
                )
                continue
            seen[case.id] = f"{section}[{n}]"
            sections[section].append(case)
    if ds is None:
        report.add("dataset.json", "files were not checked: fix the top-level keys above first")
        return None
    ds.training, ds.test = sections["training"], sections["test"]
    for key, n in (("numTraining", len(ds.training)), ("numTest", len(ds.test))):
        declared = raw.get(key)
        if isinstance(declared, int) and declared != n:
            report.warn("dataset.json", f"{key} is {declared} but {n} cases are listed")
    if not ds.training:
        hint = (
            " (an nnU-Net raw folder? import it: 'medlens dataset import nnunet')"
            if "file_ending" in raw
            else ""
        )
        report.add("dataset.json", f"lists no training cases{hint}")
    if ds.task in ("segmentation", "classification", "detection") and not ds.labels:
        report.add("dataset.json", f"'labels' is empty; a {ds.task} dataset must declare its classes")
    if ds.task == "classification" and ds.classification_type == "binary" and len(ds.labels) not in (0, 2):
        report.add(
            "dataset.json", f"classification_type is 'binary' but {len(ds.labels)} classes are declared"
        )
    return ds


def _strip(e: Exception) -> str:
    msg = str(e)
    return msg[len("dataset.json: ") :] if msg.startswith("dataset.json: ") else msg


def _check_patient_splits(ds: Dataset, report: CheckReport) -> None:
    """A patient's cases must not sit in two fixed splits (train/val/test), nor in test and the CV pool."""
    splits: dict[str, dict[str, str]] = defaultdict(dict)
    for c in ds.training:
        splits[c.patient_id].setdefault(c.split or "cross-validation pool", c.id)
    for c in ds.test:
        splits[c.patient_id].setdefault("test", c.id)
    for patient, where in splits.items():
        fixed = [s for s in where if s != "cross-validation pool"]
        if len(where) > 1 and (len(fixed) > 1 or "test" in where):
            cases = ", ".join(f"{cid!r} in {s}" for s, cid in where.items())
            report.add(f"patient {patient}", f"has cases in more than one split ({cases}); a patient's cases "
                       "must stay in one split, or test results leak")  # fmt: skip


# ---- per-case fields ----------------------------------------------------------------------------------------------
def _check_case_fields(ds: Dataset, case: Case, section: str, report: CheckReport) -> None:
    """Checks that need no image: targets present and well-formed for the task."""
    where = f"case {case.id}"
    training = section == "training" and case.split != "test"
    if ds.task == "segmentation":
        if case.label is None and training:
            report.add(where, "training case has no 'label' (path of its label map)")
        elif case.label is not None and not isinstance(case.label, str):
            report.add(where, f"label {case.label!r} must be the path of a label map for segmentation")
    elif ds.task == "classification":
        _check_class_label(ds, case, where, report, training)
    elif ds.task == "detection":
        _check_box_fields(ds, case, where, report)
    elif ds.task == "registration" and (case.fixed is None or case.moving is None):
        report.add(where, "a registration case needs both 'fixed' and 'moving' image paths")
    elif ds.task in _TARGET_TASKS and case.target is None and training:
        report.add(where, f"a {ds.task} training case needs a 'target' image path")


def _check_class_label(ds: Dataset, case: Case, where: str, report: CheckReport, training: bool) -> None:
    lab, ctype = case.label, ds.classification_type
    if lab is None:
        if training:
            report.add(where, "training case has no 'label' (class index)")
        return
    declared = sorted(ds.labels.values())
    if ctype == "multilabel":
        k = len(ds.labels)
        if (
            not isinstance(lab, list)
            or len(lab) != k
            or any(v not in (0, 1) or isinstance(v, bool) for v in lab)
        ):
            report.add(where, f"label {lab!r} must be a list of {k} values 0/1 (one per declared label) for "
                       "multilabel classification")  # fmt: skip
        return
    if not isinstance(lab, int):
        hint = " (a class name? use its index from 'labels')" if isinstance(lab, str) else ""
        report.add(where, f"label {lab!r} must be a class index for {ctype} classification{hint}")
    elif lab not in declared:
        report.add(where, f"label {lab} is not a declared class (declared: {_classes(ds)})")


def _classes(ds: Dataset) -> str:
    return ", ".join(f"{v} {n}" for n, v in sorted(ds.labels.items(), key=lambda kv: kv[1]))


def _check_box_fields(ds: Dataset, case: Case, where: str, report: CheckReport) -> None:
    boxes, labels = case.boxes, case.box_labels
    if boxes is None:
        if labels:
            report.add(where, "has box_labels but no boxes")
        return
    if not isinstance(boxes, list):
        report.add(where, "boxes must be a list of [i0, j0, (k0,) i1, j1, (k1)] lists")
        return
    for n, b in enumerate(boxes):
        if not isinstance(b, list) or len(b) not in (4, 6) or not all(_is_number(v) for v in b):
            report.add(where, f"box {n} {b!r} must be 4 (2D) or 6 (3D) numbers [mins..., maxs...]")
    if labels is None:
        if len([v for v in ds.labels.values() if v != 0]) > 1:
            report.add(
                where, "has boxes but no box_labels (one class index per box; needed with several classes)"
            )
        return
    if not isinstance(labels, list) or len(labels) != len(boxes):
        report.add(where, f"box_labels must be a list with one class index per box ({len(boxes)} boxes)")
        return
    declared = set(ds.labels.values())
    for n, v in enumerate(labels):
        if not isinstance(v, int) or isinstance(v, bool) or v not in declared:
            report.add(where, f"box_labels[{n}] = {v!r} is not a declared class (declared: {_classes(ds)})")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


# ---- files ----------------------------------------------------------------------------------------------------
def _check_case_files(ds: Dataset, case: Case, section: str, report: CheckReport, atol: float) -> int | None:
    """Read the case's files once and check them; return the image's spatial dimension (None if unreadable)."""
    where = f"case {case.id}"
    images = [(rel, _read(ds, rel, case, report)) for rel in case.image]
    first = next(((r, im) for r, im in images if im is not None), None)
    for rel, im in images:
        if im is not None:
            _check_values(rel, case, im, report)
            if first is not None and im is not first[1] and not im.same_geometry(first[1], atol=atol):
                report.add(rel, f"case {case.id!r}: channel geometry differs from {first[0]}: "
                           f"{_geometry_diff(im, first[1])}")  # fmt: skip
    if first is None or any(im is None for _, im in images):
        ref = None
    else:
        ref = first[1]
        nch = sum(im.num_channels for _, im in images if im is not None)
        if ds.channels and nch != len(ds.channels):
            report.add(first[0], f"case {case.id!r} has {nch} channel(s); dataset.json declares "
                       f"{len(ds.channels)} ({', '.join(ds.channels.values())})")  # fmt: skip
        if ds.ndim is not None and ref.ndim != ds.ndim:
            report.add(first[0], f"case {case.id!r} is {ref.ndim}D; dataset.json declares {ds.ndim}D images")
    if ds.task == "segmentation" and isinstance(case.label, str):
        label = _read(ds, case.label, case, report)
        if label is not None:
            _check_label_map(ds, case, label, ref, first[0] if first else "", report, atol)
    if ds.task == "detection" and ref is not None and isinstance(case.boxes, list):
        _check_boxes_inside(case, ref, first[0] if first else where, report)
    for key in ("target", "fixed", "moving"):
        rel = getattr(case, key)
        if rel:
            im = _read(ds, rel, case, report)
            if im is not None:
                _check_values(rel, case, im, report)
    return None if first is None else first[1].ndim


def _read(ds: Dataset, rel: str, case: Case, report: CheckReport) -> Image | None:
    from medlens.io import read_image

    path = ds.path(rel)
    if not path.exists():
        report.add(rel, f"missing (referred to by case {case.id!r})")
        return None
    try:
        return read_image(path)
    except ImageReadError as e:
        report.add(rel, f"unreadable (case {case.id!r}): {e.problem}")
    except MedlensError as e:
        report.add(rel, f"unreadable (case {case.id!r}): {e}")
    except Exception as e:  # a checker must keep going: any reader failure is a finding about this file
        report.add(rel, f"unreadable (case {case.id!r}): {type(e).__name__}: {e}")
    return None


def _check_values(rel: str, case: Case, im: Image, report: CheckReport) -> None:
    arr = im.array
    finite = None
    if arr.dtype.kind in "fc":
        finite = np.isfinite(arr)
        bad = int(finite.size - np.count_nonzero(finite))
        if bad:
            report.add(rel, f"case {case.id!r}: {bad} of {arr.size} voxels are NaN or Inf")
    for c in range(arr.shape[0]):
        ch = arr[c] if finite is None else arr[c][finite[c]]
        if ch.size == 0 or ch.min() == ch.max():
            value = "NaN/Inf" if ch.size == 0 else f"{ch.flat[0]:g}"
            name = f"channel {c} " if arr.shape[0] > 1 else ""
            report.add(rel, f"case {case.id!r}: {name}is empty (every voxel is {value})")


def _check_label_map(
    ds: Dataset, case: Case, label: Image, ref: Image | None, ref_rel: str, report: CheckReport, atol: float
) -> None:
    rel = str(case.label)
    if label.num_channels != 1:
        report.add(rel, f"case {case.id!r}: a label map has one channel, this one has {label.num_channels}")
        return
    if ref is not None and not label.same_geometry(ref, atol=atol):
        report.add(rel, f"case {case.id!r}: label geometry differs from its image {ref_rel}: "
                   f"{_geometry_diff(label, ref)}")  # fmt: skip
    arr = label.array
    if arr.dtype.kind in "fc":
        finite = np.isfinite(arr)
        if not finite.all() or np.any(arr[finite] != np.round(arr[finite])):
            report.add(rel, f"case {case.id!r}: label map holds non-integer values (or NaN); labels are class "
                       "values such as 0, 1, 2")  # fmt: skip
            return
    values = np.unique(arr)
    declared = set(ds.labels.values())
    outside = [v for v in values.tolist() if int(v) not in declared]
    if outside:
        shown = ", ".join(f"{v:g}" for v in outside[:10]) + (" ..." if len(outside) > 10 else "")
        report.add(rel, f"case {case.id!r}: label values {shown} are not declared classes "
                   f"(declared: {_classes(ds)})")  # fmt: skip
    elif values.size and values.max() <= 0:
        report.warn(rel, f"case {case.id!r}: label map has no foreground")


def _check_boxes_inside(case: Case, im: Image, rel: str, report: CheckReport) -> None:
    nd, shape = im.ndim, np.asarray(im.spatial_shape)
    for n, b in enumerate(case.boxes or []):
        if not isinstance(b, list) or not all(_is_number(v) for v in b) or len(b) not in (4, 6):
            continue  # already reported as malformed
        if len(b) != 2 * nd:
            report.add(rel, f"case {case.id!r}: box {n} has {len(b)} numbers; a {nd}D image needs {2 * nd}")
            continue
        lo, hi = np.asarray(b[:nd], dtype=float), np.asarray(b[nd:], dtype=float)
        if np.any(lo >= hi):
            report.add(
                rel, f"case {case.id!r}: box {n} {b} has a min not below its max (format: mins then maxs)"
            )
        elif np.any(lo < 0) or np.any(hi > shape):
            report.add(rel, f"case {case.id!r}: box {n} {b} is outside the image (shape {tuple(shape.tolist())}; "
                       "boxes are voxel indices, max exclusive)")  # fmt: skip


def _geometry_diff(a: Image, b: Image) -> str:
    if a.spatial_shape != b.spatial_shape:
        return f"shape {a.spatial_shape} vs {b.spatial_shape}"
    if a.ndim != b.ndim:
        return f"{a.ndim}D vs {b.ndim}D"
    diff = float(np.abs(a.affine - b.affine).max())

    def fmt(v: tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    return (
        f"affines differ by up to {diff:.4g} mm (spacing {fmt(a.spacing)} vs {fmt(b.spacing)}, "
        f"origin {fmt(a.origin)} vs {fmt(b.origin)})"
    )
