"""DICOM series from a folder: find files, group them by series, sort slices by position, stack.

How a folder is read (the rules a radiologist would expect, not the file names):

1. Every file below the folder is considered; files without the DICM preamble (README, DICOMDIR's
   siblings, thumbnails) are skipped quietly, and so are non-image objects (DICOMDIR, SR, RTSTRUCT, SEG,
   presentation states). Headers are read with ``stop_before_pixels`` first, so scanning is fast.
2. Files are grouped by SeriesInstanceUID. :func:`list_series` describes each group; ``series=`` picks one by
   SeriesInstanceUID, SeriesNumber, or position in that list (in that order of precedence). By default the
   series with the most slices is read.
3. Slices are sorted by their position along the slice normal, ``dot(ImagePositionPatient,
   cross(row_cos, col_cos))``, never by file name or InstanceNumber. The slice spacing comes from the positions
   (SliceThickness is not a spacing). Duplicate positions, missing slices (a gap above 1.5x the median step),
   uneven spacing, mixed orientations and mixed image sizes are errors naming the series.
4. RescaleSlope/RescaleIntercept are applied per slice: CT comes out in HU as float32.

``image.meta`` keeps StudyInstanceUID, SeriesInstanceUID, the SOPInstanceUIDs and files in slice order,
PatientID and Modality: what a DICOM-SEG written later needs to reference its source.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ImageReadError, did_you_mean
from medlens.io._dicom import (
    DICOM_SUFFIXES,
    dcmread,
    decode_frames,
    has_dicm_preamble,
    orientation,
    position,
    rescale,
    rescale_of,
    spacing_of,
    stack_geometry,
    text,
)
from medlens.io._reading import check_fits_in_memory, reading
from medlens.io.dicom_file import FLOAT_MODALITIES, dataset_meta, read_dicom_file
from medlens.io.image import Image

log = logging.getLogger(__name__)

#: Modalities of DICOM objects that are not images to read (they reference images instead).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "ECG", "HD", "AU", "RWV", "FID"}
)


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder.

    Attributes:
        uid: SeriesInstanceUID.
        number: SeriesNumber, or None when absent.
        modality: DICOM Modality.
        description: SeriesDescription ('' when absent).
        num_files: number of image files in the series.
        shape: ``(columns, rows, slices)`` in medlens index order; slices is the number of frames for a
            single multi-frame file.
        study_uid: StudyInstanceUID.
        files: the series' files (in no particular order).
    """

    uid: str
    number: int | None
    modality: str
    description: str
    num_files: int
    shape: tuple[int, int, int]
    study_uid: str = ""
    files: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        num = "?" if self.number is None else str(self.number)
        desc = f" '{self.description}'" if self.description else ""
        shape = "x".join(str(s) for s in self.shape)
        return f"series {num} {self.modality}{desc}: {self.num_files} files, {shape} (uid {self.uid})"


@dataclass(frozen=True)
class _Header:
    """What the scan keeps of one file's header."""

    path: Path
    series: str
    study: str
    number: int | None
    modality: str
    description: str
    rows: int
    cols: int
    frames: int
    samples: int
    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    slope: float
    intercept: float
    instance: int | None
    bits: tuple[int, int]


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Describe the image series below ``folder``, sorted by StudyInstanceUID, SeriesNumber and UID.

    Raises:
        ImageReadError: the folder does not exist, is empty, or holds no DICOM image.
    """
    folder = Path(folder)
    return [info for info, _ in _series_groups(folder)]


def read_dicom_series(folder: str | Path, series: str | int | None = None, modality: str = "OT") -> Image:
    """Read one DICOM series from ``folder`` (searched recursively) into a 3D :class:`Image`.

    Args:
        folder: a folder holding one or several series, in any sub-folder layout.
        series: SeriesInstanceUID, SeriesNumber, or position in :func:`list_series`; default: the series with
            the most slices.
        modality: used only when the files have no Modality.

    Raises:
        ImageReadError: no DICOM images, unknown ``series``, or a series that is not one regular stack
            (missing slices, uneven spacing, duplicate positions, mixed orientations or sizes).
    """
    folder = Path(folder)
    groups = _series_groups(folder)
    info, headers = _choose(groups, series, folder)
    label = f"series {info.number if info.number is not None else '?'}"
    label += f" '{info.description}'" if info.description else ""
    label += f" ({info.uid})"
    if len(headers) == 1:
        image = read_dicom_file(headers[0].path, modality=modality)
        image.meta["source"] = str(folder)
        return image
    if any(h.frames > 1 for h in headers):
        raise ImageReadError(
            folder,
            f"{label} holds {len(headers)} multi-frame files",
            "read one of them with read_image(file)",
        )
    _check_uniform(headers, folder, label)
    order, affine = _series_geometry(headers, folder, label)
    ordered = [headers[i] for i in order]
    return _decode_series(ordered, affine, folder, label, modality)


# ---- scanning ----------------------------------------------------------------------------------------------
def _files_below(folder: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files


def _scan(folder: Path) -> list[_Header]:
    if not folder.is_dir():
        raise ImageReadError(folder, "is not a folder")
    files = _files_below(folder)
    if not files:
        raise ImageReadError(folder, "is empty", "pass a folder that holds DICOM files")
    headers: list[_Header] = []
    failures: list[str] = []
    for f in files:
        if not has_dicm_preamble(f) and f.suffix.lower() not in DICOM_SUFFIXES:
            continue
        try:
            with reading(f, "DICOM file"):
                h = _header(f)
        except ImageReadError as e:
            if has_dicm_preamble(f):
                log.warning("skipping %s", e)
                failures.append(str(e))
            continue
        if h is not None:
            headers.append(h)
    if not headers:
        why = f"; {failures[0]}" if failures else ""
        raise ImageReadError(
            folder,
            f"holds {len(files)} files but no readable DICOM image{why}",
            "pass a folder of DICOM images",
        )
    return headers


def _header(path: Path) -> _Header | None:
    ds = dcmread(path, headers_only=True)
    modality = text(ds.get("Modality"))
    if "Rows" not in ds or "Columns" not in ds or modality in NON_IMAGE_MODALITIES:
        log.debug("%s: not an image (%s), skipped", path, modality or "no Rows/Columns")
        return None
    number = ds.get("SeriesNumber")
    instance = ds.get("InstanceNumber")
    slope, intercept = rescale_of(ds)
    return _Header(
        path=path,
        series=text(ds.get("SeriesInstanceUID")) or "(no SeriesInstanceUID)",
        study=text(ds.get("StudyInstanceUID")),
        number=int(number) if number not in (None, "") else None,
        modality=modality,
        description=text(ds.get("SeriesDescription")),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames") or 1),
        samples=int(ds.get("SamplesPerPixel") or 1),
        ipp=tuple(position(ds.ImagePositionPatient, path)) if "ImagePositionPatient" in ds else None,
        iop=tuple(float(v) for v in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None,
        spacing=spacing_of(ds.get("PixelSpacing"), path),
        slope=slope,
        intercept=intercept,
        instance=int(instance) if instance not in (None, "") else None,
        bits=(int(ds.get("BitsAllocated") or 0), int(ds.get("PixelRepresentation") or 0)),
    )


def _series_groups(folder: Path) -> list[tuple[SeriesInfo, list[_Header]]]:
    groups: dict[str, list[_Header]] = {}
    for h in _scan(folder):
        groups.setdefault(h.series, []).append(h)
    out = []
    for uid, hs in groups.items():
        (rows, cols), _ = Counter((h.rows, h.cols) for h in hs).most_common(1)[0]
        slices = hs[0].frames if len(hs) == 1 else len(hs)
        info = SeriesInfo(
            uid=uid,
            number=hs[0].number,
            modality=hs[0].modality,
            description=hs[0].description,
            num_files=len(hs),
            shape=(cols, rows, slices),
            study_uid=hs[0].study,
            files=tuple(str(h.path) for h in hs),
        )
        out.append((info, hs))
    out.sort(key=lambda g: (g[0].study_uid, g[0].number is None, g[0].number or 0, g[0].uid))
    return out


def _choose(
    groups: list[tuple[SeriesInfo, list[_Header]]], series: str | int | None, folder: Path
) -> tuple[SeriesInfo, list[_Header]]:
    if series is None:
        best = max(range(len(groups)), key=lambda n: (groups[n][0].shape[2], -n))
        if len(groups) > 1:
            log.info(
                "%s holds %d series; reading %s, the one with the most slices (choose another by UID, number or position)",
                folder,
                len(groups),
                groups[best][0],
            )
        return groups[best]
    key = str(series).strip()
    by_uid = [g for g in groups if g[0].uid == key]
    if by_uid:
        return by_uid[0]
    if key.lstrip("-").isdigit():
        num = int(key)
        by_number = [g for g in groups if g[0].number == num]
        if len(by_number) == 1:
            return by_number[0]
        if len(by_number) > 1:
            uids = ", ".join(g[0].uid for g in by_number)
            raise ImageReadError(
                folder, f"several series have SeriesNumber {num} ({uids})", "choose one by SeriesInstanceUID"
            )
        if 0 <= num < len(groups):
            return groups[num]
    listing = "; ".join(f"[{n}] {g[0]}" for n, g in enumerate(groups))
    raise ImageReadError(
        folder,
        f"has no series {key!r}.{did_you_mean(key, [g[0].uid for g in groups])} Available: {listing}",
        "choose by SeriesInstanceUID, SeriesNumber or position in the list",
    )


# ---- geometry and pixels -----------------------------------------------------------------------------------
def _check_uniform(headers: list[_Header], folder: Path, label: str) -> None:
    sizes = Counter((h.cols, h.rows) for h in headers)
    if len(sizes) > 1:
        desc = ", ".join(f"{c}x{r} ({n} files)" for (c, r), n in sizes.most_common())
        raise ImageReadError(
            folder,
            f"{label} mixes image sizes: {desc}",
            "it holds localizers or several stacks; move the odd files out or pick another series",
        )
    if len({h.samples for h in headers}) > 1:
        raise ImageReadError(folder, f"{label} mixes grayscale and colour images")


def _series_geometry(headers: list[_Header], folder: Path, label: str) -> tuple[list[int], np.ndarray]:
    with_pos = [h.ipp is not None and h.iop is not None for h in headers]
    if not any(with_pos):
        # No patient geometry (e.g. a US or secondary-capture series): InstanceNumber is all there is.
        order = sorted(range(len(headers)), key=lambda n: (headers[n].instance or 0, str(headers[n].path)))
        log.warning("%s has no ImagePositionPatient; slices ordered by InstanceNumber, spacing 1", label)
        sp = headers[0].spacing or (1.0, 1.0)
        affine = np.diag([sp[0], sp[1], 1.0, 1.0])
        return order, affine
    if not all(with_pos):
        missing = sum(not w for w in with_pos)
        raise ImageReadError(folder, f"{label}: {missing} of {len(headers)} slices lack ImagePositionPatient")
    cosines = np.array([h.iop for h in headers], dtype=np.float64)
    distinct = {tuple(np.round(c, 3)) for c in cosines}
    if cosines.shape[1] != 6 or np.abs(cosines - cosines[0]).max() > 1e-3:
        raise ImageReadError(
            folder,
            f"{label} mixes {len(distinct)} slice orientations",
            "it holds several stacks (e.g. a localizer); move the odd files out or pick another series",
        )
    spacings = {h.spacing for h in headers}
    if len(spacings) > 1:
        raise ImageReadError(folder, f"{label} mixes pixel spacings {sorted(str(s) for s in spacings)}")
    row, col = orientation(headers[0].iop, headers[0].path)
    positions = np.array([h.ipp for h in headers], dtype=np.float64)
    sp = headers[0].spacing or (1.0, 1.0)
    sorted_idx, affine = stack_geometry(positions, row, col, sp, folder, label)
    return [int(i) for i in sorted_idx], affine


def _decode_series(
    headers: list[_Header], affine: np.ndarray, folder: Path, label: str, modality: str
) -> Image:
    first = headers[0]
    n, rows, cols, samples = len(headers), first.rows, first.cols, first.samples
    mod = first.modality or modality
    need_float = samples == 1 and (
        mod in FLOAT_MODALITIES
        or any(h.slope != 1.0 or h.intercept != 0.0 for h in headers)
        or len({h.bits for h in headers}) > 1
    )
    check_fits_in_memory(folder, n * rows * cols * samples * 4, f"{label} volume")
    out: np.ndarray | None = None
    meta: dict[str, Any] = {}
    for k, h in enumerate(headers):
        with reading(h.path, "DICOM file", f"a slice of {label}; is it truncated?"):
            ds = dcmread(h.path)
            frames = decode_frames(ds, h.path)
            if frames.shape != (1, rows, cols, samples):
                raise ImageReadError(
                    h.path, f"decoded to {frames.shape[1:]}, the series has {(rows, cols, samples)}"
                )
            if samples == 1:
                slope, intercept = rescale_of(ds)
                frames = rescale(frames, [slope], [intercept], force_float=need_float)
            if out is None:
                out = np.empty((n, rows, cols, samples), dtype=np.float32 if need_float else frames.dtype)
                meta = dataset_meta(ds, [h.path for h in headers], source=folder)
                meta["SOPInstanceUIDs"] = []
            out[k] = frames[0]
            meta["SOPInstanceUIDs"].append(text(ds.get("SOPInstanceUID")))
    if out is None:  # unreachable: a series has at least one file
        raise ImageReadError(folder, f"{label} has no slices")
    # (k, rows, cols, S) -> (S, i, j, k): a view, Fortran-ordered like nibabel's arrays (a C-order copy
    # of a 200-slice CT would cost seconds)
    arr = np.transpose(out, (3, 2, 1, 0))
    return Image(arr, affine, modality=mod, meta=meta)
