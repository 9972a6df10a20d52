"""Reading and writing medical images. Everything returns or takes one :class:`~medlens.io.image.Image`.

Reader contract
---------------
``read_image(path)`` returns a channel-first array with spatial axes in NIfTI/ITK index order and a RAS+
affine in mm (see :mod:`medlens.io.image`). A reader never returns a half-read image: it raises
:class:`~medlens.errors.ImageReadError` naming the file and what to do. Heavy libraries (pydicom,
SimpleITK, PIL, nibabel) are imported inside the readers, so importing :mod:`medlens.io` is cheap.

Arrays are usually Fortran-ordered (``i`` varies fastest), as nibabel returns them and as DICOM/ITK pixel
buffers are laid out once put in ``(i, j, k)`` order: readers return transposed views instead of paying for a
copy. Call ``np.ascontiguousarray`` where C order matters.

=============  ==============================================  =====================================
format         files                                           module
=============  ==============================================  =====================================
``nifti``      ``.nii``, ``.nii.gz``                           :mod:`medlens.io.nifti`
``nrrd``       ``.nrrd``, ``.nhdr``                            :mod:`medlens.io.itk`
``metaimage``  ``.mha``, ``.mhd``                              :mod:`medlens.io.itk`
``dicom``      a folder (series), or one file (``.dcm`` or     :mod:`medlens.io.dicom`,
               any file with the DICM preamble)                :mod:`medlens.io.dicom_file`
``png`` ...    ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``   :mod:`medlens.io.raster`
``medmnist``   ``.npz`` (MedMNIST layout)                      :mod:`medlens.io.medmnist`
=============  ==============================================  =====================================
"""

from __future__ import annotations

from pathlib import Path

from medlens.errors import ImageReadError, InputError, unknown_name
from medlens.io.image import MODALITIES, Image, lps_to_ras

__all__ = ["FORMATS", "Image", "image_format", "lps_to_ras", "read_image", "write_image"]

#: Format names returned by :func:`image_format`.
FORMATS = ("nifti", "nrrd", "metaimage", "dicom", "png", "jpeg", "tiff", "medmnist")

_SUFFIX_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npz": "medmnist",
}
_READABLE = "NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha/.mhd), DICOM files or folders, PNG, JPEG, TIFF, MedMNIST .npz"
_WRITABLE = {".nii": "nifti", ".nii.gz": "nifti", ".png": "png", ".nrrd": "nrrd", ".mha": "metaimage"}


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()


def _sniff(p: Path) -> str | None:
    """Recognise a file without a telling extension by its first bytes."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(352)
    except OSError as e:
        raise ImageReadError(p, f"cannot be opened ({e.strerror})") from e
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if head.startswith(b"NRRD"):
        return "nrrd"
    return None


def image_format(path: str | Path) -> str:
    """Name the format of ``path``: one of :data:`FORMATS`.

    Folders are DICOM series. Files are recognised by extension, else by content (DICOM files often have no
    extension: the DICM preamble identifies them).

    Raises:
        ImageReadError: the path does not exist or is not a format medlens reads.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    fmt = _SUFFIX_FORMATS.get(_suffix(p)) or _sniff(p)
    if fmt is None:
        raise ImageReadError(p, "is not an image format medlens reads", f"medlens reads {_READABLE}")
    return fmt


def read_image(
    path: str | Path,
    *,
    series: str | int | None = None,
    index: str | int | None = None,
    modality: str = "OT",
) -> Image:
    """Read any supported image file or DICOM folder into an :class:`Image`.

    Args:
        path: an image file, or a folder holding DICOM files (searched recursively).
        series: for a DICOM folder with several series: SeriesInstanceUID, SeriesNumber or position in
            :func:`medlens.io.dicom.list_series` (default: the series with the most slices).
        index: for a MedMNIST ``.npz``: which image, ``"train:12"``, ``"val:0"``, ``"test:3"`` (an int means the
            train split; default ``"train:0"``).
        modality: modality to record when the file does not store one (DICOM files do).

    Raises:
        ImageReadError: the file is missing, unreadable, damaged or not an image (the message names it).
        InputError: ``series``/``index`` given for a format that has none, or an unknown ``modality``.
    """
    p = Path(path)
    if modality not in MODALITIES:
        raise unknown_name("modality", modality, MODALITIES)
    fmt = image_format(p)
    if series is not None and not p.is_dir():
        raise InputError(f"{p}: series= chooses a series in a DICOM folder; this is a {fmt} file")
    if index is not None and fmt != "medmnist":
        raise InputError(f"{p}: index= chooses an image in a MedMNIST .npz; this is a {fmt} file")
    if fmt == "nifti":
        from medlens.io.nifti import read_nifti

        return read_nifti(p, modality=modality)
    if fmt in ("nrrd", "metaimage"):
        from medlens.io.itk import read_itk

        return read_itk(p, modality=modality)
    if fmt == "dicom":
        if p.is_dir():
            from medlens.io.dicom import read_dicom_series

            return read_dicom_series(p, series=series, modality=modality)
        from medlens.io.dicom_file import read_dicom_file

        return read_dicom_file(p, modality=modality)
    if fmt == "medmnist":
        from medlens.io.medmnist import read_medmnist_image

        return read_medmnist_image(p, index=index, modality=modality)
    from medlens.io.raster import read_raster

    return read_raster(p, modality=modality)


def write_image(image: Image, path: str | Path, *, window: tuple[float, float] | None = None) -> Path:
    """Write ``image`` to ``path`` atomically; the format follows the extension.

    Args:
        image: the image to write.
        path: ``.nii``/``.nii.gz`` (any image), ``.png`` (2D, 1 or 3 channels), ``.nrrd`` or ``.mha``.
        window: PNG only: the ``(low, high)`` intensities mapped to 0..255 (default: see
            :func:`medlens.io.raster.write_png`).

    Returns:
        The path written.

    Raises:
        InputError: an extension medlens cannot write, a 3D image to PNG, or ``window`` for a non-PNG file.
    """
    p = Path(path)
    fmt = _WRITABLE.get(_suffix(p))
    if fmt is None:
        raise InputError(
            f"{p}: cannot write {_suffix(p) or 'a file without extension'}; use .nii.gz, .png, .nrrd or .mha"
        )
    if window is not None and fmt != "png":
        raise InputError(f"{p}: window= applies to PNG output only")
    if fmt == "nifti":
        from medlens.io.nifti import write_nifti

        return write_nifti(image, p)
    if fmt == "png":
        from medlens.io.raster import write_png

        return write_png(image, p, window=window)
    from medlens.io.itk import write_itk

    return write_itk(image, p)
