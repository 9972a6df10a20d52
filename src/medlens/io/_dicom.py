"""DICOM pieces shared by the series reader (:mod:`medlens.io.dicom`) and the file reader (``dicom_file``).

* :func:`decode_frames` decodes pixel data of any transfer syntax pydicom's plugins handle into a uniform
  ``(frames, rows, columns, samples)`` array, colour converted to RGB, with errors that name the transfer
  syntax and the package that decodes it.
* :func:`rescale` applies RescaleSlope/RescaleIntercept per frame (CT in HU).
* :func:`stack_geometry` sorts slices by their position along the slice normal and builds the RAS+ affine,
  refusing stacks with duplicate positions, missing slices, uneven spacing or slices off one line.

Geometry conventions: ImageOrientationPatient holds the direction of a row (the direction in which the
*column* index grows) then the direction of a column (row index grows), in LPS+. PixelSpacing is
``[between rows, between columns]``, so medlens's ``i`` (columns) spacing is ``PixelSpacing[1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ImageReadError
from medlens.io._reading import check_fits_in_memory, short_message
from medlens.io.image import lps_to_ras

log = logging.getLogger(__name__)

#: Slice steps within this fraction (or 0.01 mm) of the median step count as even.
SPACING_RTOL = 0.02
SPACING_ATOL = 0.01
#: A step larger than this multiple of the median step means slices are missing.
GAP_FACTOR = 1.5
#: Orientation cosines within this tolerance count as the same orientation.
ORIENTATION_TOL = 1e-4

# Transfer syntax UID prefixes -> the package that decodes them through pydicom's plugins.
_DECODERS = (
    ("1.2.840.10008.1.2.4.5", "pylibjpeg-libjpeg"),  # JPEG baseline / extended
    ("1.2.840.10008.1.2.4.57", "pylibjpeg-libjpeg"),  # JPEG lossless
    ("1.2.840.10008.1.2.4.70", "pylibjpeg-libjpeg"),  # JPEG lossless SV1
    ("1.2.840.10008.1.2.4.8", "pylibjpeg-libjpeg"),  # JPEG-LS
    ("1.2.840.10008.1.2.4.9", "pylibjpeg-openjpeg"),  # JPEG 2000
    ("1.2.840.10008.1.2.4.20", "pylibjpeg-openjpeg"),  # HTJ2K
    ("1.2.840.10008.1.2.5", "pylibjpeg-rle"),  # RLE lossless
)


def decoder_package(transfer_syntax: str) -> str:
    """The package that lets pydicom decode ``transfer_syntax`` (``python-gdcm`` for anything else)."""
    for prefix, package in _DECODERS:
        if transfer_syntax.startswith(prefix):
            return package
    return "python-gdcm"


def transfer_syntax_of(ds: Any) -> str:
    """The dataset's transfer syntax UID (implicit VR little endian when the file meta lacks one)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return str(ts) if ts else "1.2.840.10008.1.2"


def decode_frames(ds: Any, path: Path) -> np.ndarray:
    """Decode a dataset's pixel data to ``(frames, rows, columns, samples)``, colour as RGB, native byte order.

    YBR colour (JPEG) is converted to RGB by pydicom; PALETTE COLOR is expanded through its lookup table.

    Raises:
        ImageReadError: no pixel data, an impossible size, or a transfer syntax that cannot be decoded.
    """
    from pydicom.uid import UID

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = text(ds.get("Modality")) or UID(text(ds.get("SOPClassUID"))).name or "unknown"
        kind = "".join(ch for ch in kind if ch.isprintable())[:40]
        raise ImageReadError(
            path,
            f"has no pixel data (object type: {kind})",
            "pass an image file or folder; if this should be an image, the file is damaged",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(path, "has pixel data but no Rows/Columns", "the header is damaged")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    if min(rows, cols, samples, frames, bits) <= 0:
        raise ImageReadError(path, f"declares an empty image ({frames} frames of {rows}x{cols})")
    check_fits_in_memory(path, frames * rows * cols * max(samples, 3) * 4, "decoded image")
    ts = UID(transfer_syntax_of(ds))
    try:
        arr = ds.pixel_array
    except Exception as e:
        if not ts.is_compressed:
            raise  # reading() names the file and the cause (e.g. truncated pixel data)
        package = decoder_package(ts)
        missing = "missing" in str(e) or "no pixel data handlers" in str(e).lower()
        hint = (
            f"install {package} to decode it"
            if missing
            else f"the compressed data may be damaged; {package} is the decoder used, python-gdcm sometimes copes"
        )
        raise ImageReadError(
            path, f"cannot decode its {ts.name} pixel data ({ts}): {short_message(e)}", hint
        ) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        samples = 3
    arr = np.asarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    expected = (frames, rows, cols, samples)
    if arr.size != int(np.prod(expected)):
        raise ImageReadError(
            path, f"decoded to shape {arr.shape}, expected {expected}", "the header is inconsistent"
        )
    return arr.reshape(expected)


def rescale(
    frames: np.ndarray, slopes: Sequence[float], intercepts: Sequence[float], force_float: bool
) -> np.ndarray:
    """Apply per-frame ``value * slope + intercept`` (float32) to ``(frames, ...)``; identity keeps the dtype."""
    s = np.asarray(slopes, dtype=np.float64)
    b = np.asarray(intercepts, dtype=np.float64)
    identity = bool(np.all(s == 1.0) and np.all(b == 0.0))
    if identity and not force_float:
        return frames
    shape = (-1,) + (1,) * (frames.ndim - 1)
    out = frames.astype(np.float32)
    if not identity:
        out *= s.astype(np.float32).reshape(shape)
        out += b.astype(np.float32).reshape(shape)
    return out


def rescale_of(item: Any) -> tuple[float, float]:
    """(slope, intercept) from a dataset or a PixelValueTransformationSequence item (default (1, 0))."""
    slope = item.get("RescaleSlope")
    intercept = item.get("RescaleIntercept")
    return (
        1.0 if slope in (None, "") else float(slope),
        0.0 if intercept in (None, "") else float(intercept),
    )


def orientation(value: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validate an ImageOrientationPatient value; return the unit row and column direction cosines (LPS)."""
    try:
        v = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        v = np.zeros(0)
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise ImageReadError(
            path, f"has an invalid ImageOrientationPatient {value!r}", "it must hold 6 numbers"
        )
    row, col = v[:3], v[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01 or abs(float(row @ col)) > 0.01:
        raise ImageReadError(
            path,
            f"has an invalid ImageOrientationPatient {v.round(4).tolist()}",
            "the row and column directions must be orthogonal unit vectors",
        )
    return row / nr, col / nc


def position(value: Any, path: Path) -> np.ndarray:
    """Validate an ImagePositionPatient value (3 finite numbers, mm, LPS)."""
    try:
        p = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        p = np.zeros(0)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ImageReadError(path, f"has an invalid ImagePositionPatient {value!r}", "it must hold 3 numbers")
    return p


def spacing_of(value: Any, path: Path, name: str = "PixelSpacing") -> tuple[float, float] | None:
    """(column spacing, row spacing) = spacing along i and j from a PixelSpacing-like value, or None."""
    if value in (None, ""):
        return None
    try:
        v = [float(x) for x in value]
    except (TypeError, ValueError):
        v = []
    if len(v) != 2 or not all(np.isfinite(x) and x > 0 for x in v):
        raise ImageReadError(path, f"has an invalid {name} {value!r}", "it must hold 2 positive numbers")
    return v[1], v[0]


def stack_geometry(
    positions: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    spacing_ij: tuple[float, float],
    path: Path,
    label: str,
    single_step: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Order slices along the normal and build the RAS+ affine of the stack.

    Args:
        positions: ``(n, 3)`` ImagePositionPatient of each slice, LPS mm, in any order.
        row, col: unit direction cosines (LPS) shared by all slices.
        spacing_ij: in-plane spacing along ``i`` (columns) and ``j`` (rows).
        path: file or folder named in errors.
        label: names the series or file in errors ("series 3 'AX T1' (1.2.3...)").
        single_step: slice spacing to use when there is only one slice.

    Returns:
        ``order`` (indices that sort the slices along ``k``) and the 4x4 RAS+ affine. The third column is
        the mean step between consecutive slices, so a tilted gantry gives a correctly sheared affine.

    Raises:
        ImageReadError: duplicate positions, missing slices, uneven spacing, or slices not on one line.
    """
    normal = np.cross(row, col)
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    p = positions[order]
    n = len(p)
    if n == 1:
        step = normal * single_step
    else:
        d = np.diff(proj[order])
        dup = np.flatnonzero(d < 1e-3)
        if dup.size:
            raise ImageReadError(
                path,
                f"{label}: {dup.size + 1} slices share a position (e.g. {proj[order][dup[0]]:.2f} mm along the normal)",
                "the series mixes several echoes, phases or acquisitions; split it or pick another series",
            )
        med = float(np.median(d))
        big = np.flatnonzero(d > GAP_FACTOR * med)
        if big.size:
            z = proj[order]
            raise ImageReadError(
                path,
                f"{label}: missing slice(s): a gap of {d[big[0]]:.2f} mm between {z[big[0]]:.2f} and "
                f"{z[big[0] + 1]:.2f} mm along the normal, where slices are {med:.2f} mm apart",
                "re-export the complete series",
            )
        if np.any(np.abs(d - med) > max(SPACING_RTOL * med, SPACING_ATOL)):
            raise ImageReadError(
                path,
                f"{label}: uneven slice spacing (steps from {d.min():.3f} to {d.max():.3f} mm)",
                "resample it with a tool that interpolates, or pick another series",
            )
        step = (p[-1] - p[0]) / (n - 1)
        line = p[0] + np.arange(n)[:, None] * step
        off = float(np.max(np.linalg.norm(p - line, axis=1)))
        if off > max(0.1 * min(spacing_ij), SPACING_ATOL):
            raise ImageReadError(
                path,
                f"{label}: slice positions do not lie on one line (off by up to {off:.2f} mm)",
                "the series mixes several stacks; split it or pick another series",
            )
        tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0.0, 1.0))))
        if tilt > 0.01:
            log.info(
                "%s: slices are sheared by %.2f degrees (gantry tilt); the affine keeps the shear",
                label,
                tilt,
            )
    affine = np.eye(4)
    affine[:3, 0] = row * spacing_ij[0]
    affine[:3, 1] = col * spacing_ij[1]
    affine[:3, 2] = step
    affine[:3, 3] = p[0]
    return order, lps_to_ras(affine)


def text(value: Any) -> str:
    """A DICOM value as a plain JSON-friendly string ('' for missing)."""
    return "" if value is None else str(value).strip()


#: Suffixes tried as DICOM even without the 128-byte preamble + "DICM" (old ACR-NEMA style files).
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")


def has_dicm_preamble(path: Path) -> bool:
    """True when ``path`` starts with the DICOM Part 10 preamble (128 bytes then ``DICM``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dcmread(path: Path, headers_only: bool = False) -> Any:
    """Read a DICOM file with pydicom (``force`` only for preamble-less files that still look like DICOM).

    Args:
        path: the file.
        headers_only: stop before the pixel data (fast; for scanning folders).

    Raises:
        ImageReadError: a preamble-less file that turned out not to be DICOM. Parser errors propagate; the
            caller runs this inside :func:`medlens.io._reading.reading`.
    """
    import pydicom

    force = not has_dicm_preamble(path)
    ds = pydicom.dcmread(str(path), stop_before_pixels=headers_only, force=force)
    if force and "SOPClassUID" not in ds and "Rows" not in ds:
        raise ImageReadError(path, "is not a DICOM file (no DICM preamble and no DICOM image attributes)")
    return ds
