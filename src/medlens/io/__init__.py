"""Reading and writing medical images. Everything returns or takes one :class:`~medlens.io.image.Image`.

Reader contract
---------------
``read_image(path)`` returns a channel-first array with spatial axes in NIfTI/ITK index order and a RAS+
affine in mm (see :mod:`medlens.io.image`). A reader never returns a half-read image: it raises
:class:`~medlens.errors.ImageReadError` naming the file and what to do. Heavy libraries (pydicom,
SimpleITK, PIL) are imported inside the readers, so importing :mod:`medlens.io` is cheap.
"""

from __future__ import annotations

from pathlib import Path

from medlens.errors import ImageReadError
from medlens.io.image import Image, lps_to_ras

__all__ = ["Image", "image_format", "lps_to_ras", "read_image", "write_image"]


def image_format(path: str | Path) -> str:
    """Name the format of ``path`` from its name (and, for folders, as a DICOM series)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    raise ImageReadError(p, "unknown image format", "medlens reads .nii/.nii.gz files")


def read_image(path: str | Path, modality: str = "OT") -> Image:
    """Read any supported image file or DICOM folder."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    fmt = image_format(p)
    if fmt == "nifti":
        from medlens.io.nifti import read_nifti

        return read_nifti(p, modality=modality)
    raise ImageReadError(p, f"reading {fmt} is not supported yet")


def write_image(image: Image, path: str | Path) -> Path:
    """Write ``image`` to ``path``; the format follows the extension (``.nii``, ``.nii.gz``)."""
    p = Path(path)
    if p.name.lower().endswith((".nii", ".nii.gz")):
        from medlens.io.nifti import write_nifti

        return write_nifti(image, p)
    raise ImageReadError(p, "cannot write this format", "use .nii.gz or .png")
