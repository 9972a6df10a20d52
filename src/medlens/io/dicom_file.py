"""Single DICOM files: one slice, legacy multi-frame (US cine, RT dose, NM) and enhanced multi-frame CT/MR.

What a file becomes:

* a slice with ImagePositionPatient/ImageOrientationPatient -> a 3D image with one slice (slice spacing from
  SpacingBetweenSlices, else SliceThickness, else 1 mm);
* a slice without geometry (CR, DX, US, secondary capture) -> a 2D image, spacing from PixelSpacing,
  ImagerPixelSpacing or the ultrasound regions, else 1;
* enhanced multi-frame (per-frame PlanePositionSequence) -> a 3D stack sorted along the slice normal, with
  per-frame rescale; RT dose (GridFrameOffsetVector) likewise, scaled to Gy by DoseGridScaling;
* multi-frame without geometry (US cine, multi-frame secondary capture) -> frames stacked along ``k`` with
  spacing 1 (frame time is not a distance).

Colour (RGB, YBR, PALETTE COLOR) becomes 3 RGB channels. MONOCHROME1 values are kept as stored (bright =
low attenuation); ``meta["PhotometricInterpretation"]`` tells consumers to invert them for display.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ImageReadError
from medlens.io._dicom import (
    dcmread,
    decode_frames,
    orientation,
    position,
    rescale,
    rescale_of,
    spacing_of,
    stack_geometry,
    text,
    transfer_syntax_of,
)
from medlens.io._reading import reading
from medlens.io.image import Image

log = logging.getLogger(__name__)

#: Modalities whose stored values are always converted to float32 physical units.
FLOAT_MODALITIES = ("CT", "PT", "RTDOSE")


def read_dicom_file(path: str | Path, modality: str = "OT") -> Image:
    """Read one DICOM file (single- or multi-frame) into an :class:`Image`.

    Args:
        path: a DICOM Part 10 file (a ``.dcm`` or any file with the DICM preamble).
        modality: used only when the file has no Modality.

    Raises:
        ImageReadError: not DICOM, no pixel data, an undecodable transfer syntax (naming the package that
            decodes it), truncated pixel data, or inconsistent geometry.
    """
    path = Path(path)
    with reading(path, "DICOM file", "is it truncated or damaged?"):
        ds = dcmread(path)
        return image_from_dataset(ds, path, modality)


def image_from_dataset(ds: Any, path: Path, modality: str = "OT") -> Image:
    """Build an :class:`Image` from a fully read pydicom dataset (see the module docstring for the rules)."""
    frames = decode_frames(ds, path)
    nframes, _, _, samples = frames.shape
    mod = text(ds.get("Modality")) or modality
    meta = dataset_meta(ds, [path], source=path)
    label = f"{path.name} ({mod})"

    if samples == 1:
        slopes, intercepts = _frame_rescale(ds, nframes, mod)
        frames = rescale(frames, slopes, intercepts, force_float=mod in FLOAT_MODALITIES)

    geometry = _frame_geometry(ds, path, nframes)
    if geometry is not None:
        positions, row, col, spacing, single_step = geometry
        order, affine = stack_geometry(positions, row, col, spacing, path, label, single_step)
        frames = frames[order]
        if nframes > 1:
            meta["frame_order"] = [int(o) + 1 for o in order]  # 1-based frame numbers along k
        arr = np.transpose(frames, (3, 2, 1, 0))  # (F, rows, cols, S) -> (S, i=cols, j=rows, k)
        return Image(arr, affine, modality=mod, meta=meta)

    spacing2 = _plane_spacing(ds, path) or (1.0, 1.0)
    if nframes == 1:
        arr2 = np.transpose(frames[0], (2, 1, 0))  # (rows, cols, S) -> (S, i, j)
        return Image.from_spacing(arr2, spacing2, modality=mod, meta=meta)
    arr3 = np.transpose(frames, (3, 2, 1, 0))
    return Image.from_spacing(arr3, (*spacing2, 1.0), modality=mod, meta=meta)


def dataset_meta(ds: Any, files: list[Path], source: Path) -> dict[str, Any]:
    """The provenance medlens keeps from DICOM: UIDs (SOP instances in slice order), patient, files, window."""
    meta: dict[str, Any] = {
        "source": str(source),
        "format": "dicom",
        "Modality": text(ds.get("Modality")),
        "PatientID": text(ds.get("PatientID")),
        "StudyInstanceUID": text(ds.get("StudyInstanceUID")),
        "SeriesInstanceUID": text(ds.get("SeriesInstanceUID")),
        "SeriesNumber": text(ds.get("SeriesNumber")),
        "SeriesDescription": text(ds.get("SeriesDescription")),
        "FrameOfReferenceUID": text(ds.get("FrameOfReferenceUID")),
        "SOPClassUID": text(ds.get("SOPClassUID")),
        "SOPInstanceUIDs": [text(ds.get("SOPInstanceUID"))],
        "TransferSyntaxUID": transfer_syntax_of(ds),
        "PhotometricInterpretation": text(ds.get("PhotometricInterpretation")),
        "files": [str(f) for f in files],
    }
    window = _first_window(ds)
    if window is not None:
        meta["window"] = window
    return meta


def _first_window(ds: Any) -> list[float] | None:
    """[center, width] of the first VOI window in the file, if any."""
    from pydicom.multival import MultiValue

    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c = c[0] if isinstance(c, MultiValue | list | tuple) and len(c) else c
    w = w[0] if isinstance(w, MultiValue | list | tuple) and len(w) else w
    try:
        cf, wf = float(c), float(w)
    except (TypeError, ValueError):
        return None
    return [cf, wf] if np.isfinite(cf) and np.isfinite(wf) and wf > 0 else None


def _frame_rescale(ds: Any, nframes: int, mod: str) -> tuple[list[float], list[float]]:
    """Slope and intercept per stored frame: from the functional groups (enhanced), else the dataset's."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        pairs = [rescale_of(frame_item(ds, f, "PixelValueTransformationSequence")) for f in range(nframes)]
    else:
        pairs = [rescale_of(ds)] * nframes
    scale = float(ds.get("DoseGridScaling") or 1.0) if mod == "RTDOSE" else 1.0  # RT dose -> Gy
    return [s * scale for s, _ in pairs], [b * scale for _, b in pairs]


def frame_item(ds: Any, frame: int, sequence: str) -> Any:
    """The first item of ``sequence`` for ``frame`` in an enhanced object: per-frame group, else shared group."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > idx:
            inner = seq[idx].get(sequence)
            if inner:
                return inner[0]
    return {}


def _frame_geometry(
    ds: Any, path: Path, nframes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], float] | None:
    """Per-frame positions, orientation, in-plane spacing and single-slice step, or None without geometry."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        groups = len(ds.PerFrameFunctionalGroupsSequence)
        if groups < nframes:
            raise ImageReadError(path, f"has {groups} per-frame functional groups for {nframes} frames")
        if groups > nframes:
            log.warning(
                "%s: %d per-frame groups for %d frames; using the first %d", path, groups, nframes, nframes
            )
        pos_items = [frame_item(ds, f, "PlanePositionSequence") for f in range(nframes)]
        iop_items = [frame_item(ds, f, "PlaneOrientationSequence") for f in range(nframes)]
        if not all("ImagePositionPatient" in p for p in pos_items) or not all(
            "ImageOrientationPatient" in o for o in iop_items
        ):
            return None
        cosines = np.array([[float(v) for v in o.ImageOrientationPatient] for o in iop_items])
        if np.abs(cosines - cosines[0]).max() > 1e-4:
            raise ImageReadError(
                path, "frames have different orientations", "medlens reads one stack at a time"
            )
        row, col = orientation(iop_items[0].ImageOrientationPatient, path)
        positions = np.stack([position(p.ImagePositionPatient, path) for p in pos_items])
        measures = frame_item(ds, 0, "PixelMeasuresSequence")
        spacing = spacing_of(measures.get("PixelSpacing"), path) or (1.0, 1.0)
        step = float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
        return positions, row, col, spacing, step if step > 0 else 1.0
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return None
    row, col = orientation(ds.ImageOrientationPatient, path)
    origin = position(ds.ImagePositionPatient, path)
    normal = np.cross(row, col)
    spacing = spacing_of(ds.get("PixelSpacing"), path) or (1.0, 1.0)
    step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    step = step if step > 0 else 1.0
    if nframes == 1:
        return origin[None], row, col, spacing, step
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is not None and len(offsets) == nframes:
        off = np.asarray([float(v) for v in offsets])
        off = off - off[0]  # relative (first 0) or absolute z (deprecated form): both become relative
    elif ds.get("SpacingBetweenSlices"):
        off = np.arange(nframes) * step
    else:
        return None
    return origin[None] + off[:, None] * normal[None], row, col, spacing, step


def _plane_spacing(ds: Any, path: Path) -> tuple[float, float] | None:
    """In-plane spacing (i, j) of an image without patient geometry."""
    for name in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        sp = spacing_of(ds.get(name), path, name)
        if sp is not None:
            return sp
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    # PhysicalUnits 3 = cm; use the regions only when they all agree
    deltas = {
        (float(r.PhysicalDeltaX) * 10.0, float(r.PhysicalDeltaY) * 10.0)
        for r in regions
        if r.get("PhysicalUnitsXDirection") == 3
        and r.get("PhysicalUnitsYDirection") == 3
        and r.get("PhysicalDeltaX")
        and r.get("PhysicalDeltaY")
    }
    if len(deltas) == 1:
        dx, dy = deltas.pop()
        if dx > 0 and dy > 0 and np.isfinite(dx) and np.isfinite(dy):
            return abs(dx), abs(dy)
    return None
