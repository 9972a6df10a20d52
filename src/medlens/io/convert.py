"""``medlens convert``: anything medlens reads -> NIfTI (or PNG, NRRD, MHA), keeping the geometry.

Like dcm2niix for a DICOM folder, but the same for every input format. The output format follows the
extension of ``out``; when ``out`` is a folder (existing, ending with a separator, or a name without
extension), the file is named after the source (``<SeriesNumber>_<SeriesDescription>.nii.gz`` for DICOM,
the source's stem otherwise).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from medlens.errors import InputError
from medlens.io import read_image, write_image
from medlens.io.image import Image

log = logging.getLogger(__name__)

_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".png", ".nrrd", ".mha")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    series: str | int | None = None,
    index: str | int | None = None,
) -> Path:
    """Read ``src`` and write it to ``out``; return the file written.

    Args:
        src: any readable image (see :func:`medlens.io.read_image`): a DICOM folder or file, NIfTI, NRRD,
            MetaImage, PNG/JPEG/TIFF, or a MedMNIST ``.npz``.
        out: the output file (``.nii.gz``, ``.nii``, ``.png``, ``.nrrd``, ``.mha``) or a folder to write
            ``<name>.nii.gz`` into (created if needed).
        series: the series of a DICOM folder (UID, SeriesNumber or position); default the largest.
        index: the image of a MedMNIST npz, e.g. ``"train:12"``.

    Raises:
        ImageReadError: ``src`` cannot be read.
        InputError: an unsupported output extension, or a 3D image asked for as PNG.
    """
    src, out = Path(src), Path(out)
    # an existing folder, a trailing separator, or a name without extension (never a valid output file)
    as_folder = out.is_dir() or str(out).endswith(("/", os.sep)) or not out.suffix
    if not as_folder and not out.name.lower().endswith(_OUTPUT_SUFFIXES):
        raise InputError(
            f"{out}: cannot write this format; name the output .nii.gz, .nii, .png, .nrrd or .mha"
        )
    image = read_image(src, series=series, index=index)
    target = out / f"{_stem(src, image, index)}.nii.gz" if as_folder else out
    if target.name.lower().endswith(".png"):
        if image.ndim == 3 and image.spatial_shape[2] != 1:
            raise InputError(
                f"{src} is a 3D image {image.spatial_shape}; a PNG holds one 2D image: pick a 2D image, "
                "or write NIfTI (.nii.gz)"
            )
        image, window = _display(image)
        path = write_image(image, target, window=window)
    else:
        path = write_image(image, target)
    log.debug("converted %s -> %s (%r)", src, path, image)
    return path


def _stem(src: Path, image: Image, index: str | int | None) -> str:
    """A file name for ``image`` read from ``src``: the series for DICOM folders, else the source's stem."""
    name = src.name
    lower = name.lower()
    for suffix in (".nii.gz", src.suffix.lower()):
        if suffix and lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if src.is_dir() and image.meta.get("format") == "dicom":
        parts = [str(image.meta.get("SeriesNumber", "")), str(image.meta.get("SeriesDescription", ""))]
        name = "_".join(p for p in parts if p) or name
    if index is not None:
        name += "_" + str(index).replace(":", "_")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "image"


def _display(image: Image) -> tuple[Image, tuple[float, float] | None]:
    """What a viewer would show: DICOM's stored VOI window, MONOCHROME1 inverted (for PNG output)."""
    if image.meta.get("format") != "dicom" or image.num_channels != 1:
        return image, None
    window: tuple[float, float] | None = None
    stored = image.meta.get("window")
    if stored:
        center, width = float(stored[0]), float(stored[1])
        window = (center - width / 2.0, center + width / 2.0)
    if image.meta.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = image.array.astype(np.float32)
        if window is None:
            window = (float(arr.min()), float(arr.max()))
        if window[1] > window[0]:
            # x -> low + high - x maps the window onto itself, reversed: bright becomes dark
            image = image.with_array(window[0] + window[1] - arr)
    return image, window
