"""A DICOM tree plus a CSV of labels: each series the CSV names becomes one NIfTI case.

Each CSV row names one image by the most specific of these columns it fills (names matched without regard
to case): ``SeriesInstanceUID``; a path column (``path``, relative to the DICOM root: a series folder or a
single file); ``StudyInstanceUID``; ``PatientID``. A study or patient with several series needs
``series_description`` (a case-insensitive substring of SeriesDescription) to pick one, or a
``SeriesInstanceUID`` column. The label column holds class names or indices; every other column is kept as
case metadata (``PatientSex``/``sex``, ``PatientAge``/``age`` and ``site`` under their medlens names).

The tree is indexed once (:func:`medlens.io.dicom.list_series`); every series is then read on its own
(:func:`medlens.io.read_image`), so a tree of many series imports in time linear in its size.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens._fs import atomic_dir
from medlens.data.dataset import Case, Dataset
from medlens.data.importers._common import reload, safe_id, squeeze_single_slice, write_json
from medlens.errors import DatasetError, InputError, did_you_mean
from medlens.io import Image, read_image, write_image

if TYPE_CHECKING:
    from medlens.io.dicom import SeriesInfo

log = logging.getLogger(__name__)

#: Columns that identify the image of a row, most specific first.
KEY_COLUMNS = ("SeriesInstanceUID", "path", "StudyInstanceUID", "PatientID")
#: CSV columns stored under a medlens metadata name.
_META_NAMES = {"patientsex": "sex", "sex": "sex", "patientage": "age", "age": "age", "site": "site"}


def import_dicom(
    src: Path,
    out: Path,
    *,
    labels_csv: Path | None = None,
    label_column: str = "label",
    id_column: str | None = None,
    classes: Sequence[str] | None = None,
    ordinal: bool = False,
    series_description: str | None = None,
    overwrite: bool = False,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Import the series of a DICOM tree that a CSV lists, with their labels, as a classification dataset.

    Args:
        src: the DICOM root folder (any sub-folder layout).
        out: the dataset folder to create.
        labels_csv: the CSV (columns described in the module docstring).
        label_column: the CSV column holding the class.
        id_column: a CSV column of case ids (default: ``id`` or ``case_id`` when present, else
            ``<PatientID>_<n>``).
        classes: class names in index order; labels must be one of them (or its index). Default: the sorted
            distinct labels (or ``0..max`` when every label is an integer).
        ordinal: the classes are ordered grades.
        series_description: substring of SeriesDescription choosing one series where a study or patient has
            several.
        overwrite: replace an existing ``out``.
        name: dataset name (default: the CSV file name without extension).
        progress: called as ``progress(done, total)`` after each row.

    Raises:
        InputError: no CSV given, or a column named in an option is missing.
        DatasetError: a row whose series is not found or is ambiguous, a label outside ``classes``, a series
            matched by two rows, images mixing 2D and 3D (the CSV row is named).
        ImageReadError: a series that cannot be read (named).
    """
    from medlens.io.dicom import list_series

    if labels_csv is None:
        raise InputError(
            "dicom import needs labels_csv (--labels): a CSV with a label column and a SeriesInstanceUID, "
            "StudyInstanceUID, PatientID or path column"
        )
    header, rows = _read_csv(Path(labels_csv))
    cols = {c.lower(): c for c in header}
    label_col = _column(label_column, cols, labels_csv, "label_column")
    keys = {k: cols[k.lower()] for k in KEY_COLUMNS if k.lower() in cols}
    if not keys:
        raise DatasetError(
            f"{labels_csv}: no column identifies the images; add one of {', '.join(KEY_COLUMNS)} "
            f"(columns are: {', '.join(header)})"
        )
    id_col = (
        _column(id_column, cols, labels_csv, "id_column")
        if id_column
        else cols.get("id", cols.get("case_id"))
    )
    names, class_of = _classes(labels_csv, rows, label_col, classes)
    series = list_series(src)
    index = _Index(src, series)
    used = set(keys.values()) | {label_col} | ({id_col} if id_col else set())
    sections: list[Case] = []
    seen: dict[str, int] = {}
    per_patient: dict[str, int] = {}
    first: tuple[int, Image] | None = None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for n, (line, row) in enumerate(rows, 1):
            where = f"{labels_csv}: row {line}"
            info, file = index.match(row, keys, series_description, where)
            key = info.uid if info is not None else str(file)
            if key in seen:
                raise DatasetError(
                    f"{where}: names the same image as row {seen[key]} ({key}); one row per image"
                )
            seen[key] = line
            img = squeeze_single_slice(index.read(info, file, tmp))
            if first is None:
                first = (line, img)
            elif img.ndim != first[1].ndim:
                raise DatasetError(
                    f"{where}: image is {img.ndim}D but row {first[0]}'s is {first[1].ndim}D; "
                    "a dataset is all 2D or all 3D"
                )
            patient = str(row.get(keys.get("PatientID", ""), "") or img.meta.get("PatientID") or "unknown")
            per_patient[patient] = per_patient.get(patient, 0) + 1
            cid = (
                safe_id(row[id_col])
                if id_col and row.get(id_col)
                else f"{safe_id(patient)}_{per_patient[patient]}"
            )
            if any(c.id == cid for c in sections):
                raise DatasetError(
                    f"{where}: case id {cid!r} is used twice; give unique ids in the id column"
                )
            rel = f"images/{cid}.nii.gz"
            write_image(img, tmp / rel)
            meta: dict[str, Any] = {"patient_id": patient}
            for col in header:
                if col not in used and row.get(col, "") != "":
                    meta[_META_NAMES.get(col.lower(), col)] = _value(row[col])
            for tag in ("StudyInstanceUID", "SeriesInstanceUID", "Modality"):
                if img.meta.get(tag):
                    meta[tag] = img.meta[tag]
            label = class_of(row[label_col], where)
            sections.append(Case(id=cid, image=[rel], label=label, meta=meta))
            if progress is not None:
                progress(n, len(rows))
        shutil.rmtree(tmp / ".staging", ignore_errors=True)
        assert first is not None  # _read_csv rejects a CSV without rows
        img0 = first[1]
        mods = sorted({c.meta.get("Modality") or img0.modality for c in sections})
        ds = Dataset(
            root=tmp,
            name=name or Path(labels_csv).stem,
            task="classification",
            labels={nm: i for i, nm in enumerate(names)},
            channels={
                k: f"channel_{k}" if img0.num_channels > 1 else mods[0] for k in range(img0.num_channels)
            },
            modalities=dict.fromkeys(range(img0.num_channels), mods[0]),
            training=sections,
            classification_type="ordinal" if ordinal else "binary" if len(names) == 2 else "multiclass",
            ndim=img0.ndim,
            description=f"Imported from DICOM {src} with labels from {Path(labels_csv).name}",
        )
        write_json(ds, tmp)
    if len(mods) > 1:
        log.warning("%s: series of several modalities (%s) in one dataset", out, ", ".join(mods))
    return reload(out)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs; cells stripped of spaces."""
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in r.items() if k is not None})
                for r in reader
                if any((v or "").strip() for v in r.values() if isinstance(v, str))
            ]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: is not a readable UTF-8 CSV file ({e})") from None
    if not header or not rows:
        raise DatasetError(f"{path}: has no header or no rows")
    return header, rows


def _column(name: str | None, cols: dict[str, str], csv_path: Path | None, option: str) -> str:
    if name is None or name.lower() not in cols:
        raise InputError(
            f"{csv_path}: has no column {name!r} ({option}).{did_you_mean(str(name), list(cols.values()))} "
            f"Columns: {', '.join(cols.values())}"
        )
    return cols[name.lower()]


def _classes(
    csv_path: Path | None, rows: list[tuple[int, dict[str, str]]], col: str, classes: Sequence[str] | None
) -> tuple[list[str], Callable[[str, str], int]]:
    """Class names and a function mapping a label cell to its index (errors name the row)."""
    values = [r[col] for _, r in rows]
    for line, r in rows:
        if r[col] == "":
            raise DatasetError(f"{csv_path}: row {line} has an empty {col!r}")
    if classes is not None:
        names = [str(c) for c in classes]
    elif all(v.lstrip("-").isdigit() for v in values):
        top = max(int(v) for v in values)
        names = [f"class_{i}" for i in range(max(top + 1, 2))]
    else:
        names = sorted(set(values))
    lookup = {nm: i for i, nm in enumerate(names)}

    def class_of(value: str, where: str) -> int:
        if value in lookup:
            return lookup[value]
        if value.lstrip("-").isdigit() and 0 <= int(value) < len(names):
            return int(value)
        raise DatasetError(
            f"{where}: label {value!r} is not one of the declared classes ({', '.join(names)})."
            f"{did_you_mean(value, names)}"
        )

    return names, class_of


def _value(cell: str) -> Any:
    """A metadata cell as int or float when it is a number (DICOM ages like ``045Y`` become 45)."""
    text = cell[:3] if len(cell) == 4 and cell[:3].isdigit() and cell[3] == "Y" else cell
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return cell


class _Index:
    """The series of a DICOM tree by UID, study, patient and folder; reads one series at a time."""

    def __init__(self, root: Path, series: list[SeriesInfo]) -> None:
        self.root = root
        self.series = series
        self.by_uid = {s.uid: s for s in series}
        self._patients: dict[str, list[SeriesInfo]] | None = None
        self._folders: dict[str, set[Path]] = {}

    def folders(self, info: SeriesInfo) -> set[Path]:
        """The (resolved) folders holding a series' files."""
        if info.uid not in self._folders:
            self._folders[info.uid] = {Path(f).resolve().parent for f in info.files}
        return self._folders[info.uid]

    def match(
        self, row: dict[str, str], keys: dict[str, str], description: str | None, where: str
    ) -> tuple[SeriesInfo | None, Path | None]:
        """The series (or single file) a row names."""
        uid = row.get(keys.get("SeriesInstanceUID", ""), "")
        if uid:
            if uid not in self.by_uid:
                raise DatasetError(
                    f"{where}: series {uid} is not in {self.root}.{did_you_mean(uid, list(self.by_uid))}"
                )
            return self.by_uid[uid], None
        rel = row.get(keys.get("path", ""), "")
        if rel:
            path = (self.root / rel).resolve()
            if path.is_file():
                return None, path
            if not path.is_dir():
                raise DatasetError(f"{where}: path {rel!r} is not found below {self.root}")
            found = [s for s in self.series if any(d == path or path in d.parents for d in self.folders(s))]
            return self._one(found, description, where, f"folder {rel!r}"), None
        study = row.get(keys.get("StudyInstanceUID", ""), "")
        if study:
            found = [s for s in self.series if s.study_uid == study]
            return self._one(found, description, where, f"study {study}"), None
        patient = row.get(keys.get("PatientID", ""), "")
        if patient:
            return self._one(
                self.patients().get(patient, []), description, where, f"patient {patient!r}"
            ), None
        raise DatasetError(f"{where}: every identifying column ({', '.join(keys.values())}) is empty")

    def _one(self, found: list[SeriesInfo], description: str | None, where: str, what: str) -> SeriesInfo:
        if not found:
            raise DatasetError(f"{where}: no series of {what} in {self.root}")
        if description is not None:
            found = [s for s in found if description.lower() in s.description.lower()]
            if not found:
                raise DatasetError(
                    f"{where}: no series of {what} has a SeriesDescription containing {description!r}"
                )
        if len(found) > 1:
            listing = "; ".join(str(s) for s in found)
            raise DatasetError(
                f"{where}: {what} has {len(found)} series ({listing}); add a SeriesInstanceUID column or pass "
                "series_description to choose one"
            )
        return found[0]

    def patients(self) -> dict[str, list[SeriesInfo]]:
        """PatientID -> series, read from one file of each series (only when a row needs it)."""
        if self._patients is None:
            self._patients = {}
            for s in self.series:
                pid = str(read_image(Path(s.files[0])).meta.get("PatientID", ""))
                self._patients.setdefault(pid, []).append(s)
        return self._patients

    def read(self, info: SeriesInfo | None, file: Path | None, tmp: Path) -> Image:
        """Read a single file, or a series from the smallest folder holding it (staged when it shares one)."""
        if file is not None or info is None:
            return read_image(file or self.root)
        files = [Path(f) for f in info.files]
        parent = Path(os.path.commonpath([str(f.parent) for f in files]))
        below = sum(1 for _, _, names in os.walk(parent) for n in names if not n.startswith("."))
        if below == len(files):
            return read_image(parent, series=info.uid)
        stage = tmp / ".staging" / safe_id(info.uid)
        stage.mkdir(parents=True)
        for k, f in enumerate(files):
            dst = stage / f"{k:06d}_{f.name}"
            try:
                os.symlink(f.resolve(), dst)
            except OSError:
                shutil.copyfile(f, dst)
        try:
            return read_image(stage, series=info.uid)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
