"""NRRD (``.nrrd``/``.nhdr``) and MetaImage (``.mha``/``.mhd``) reading and writing with SimpleITK.

ITK describes geometry as origin + spacing + a direction matrix in **LPS+**; medlens folds them into one RAS+
affine: ``affine = flip @ [[D * spacing, origin], [0, 1]]`` with ``flip = diag(-1, -1, 1, 1)``. ITK's index
``(x, y, z)`` is medlens's ``(i, j, k)``, while ``sitk.GetArrayFromImage`` returns ``(z, y, x[, c])``, so
arrays are transposed on the way in and out. Multi-component pixels (vector/RGB images) and the fourth axis of
a 4D scalar image become channels.

2D images carry no patient orientation: their 3x3 affine is ITK's plane geometry as it is (no LPS/RAS flip),
which is also what the PNG reader and the 2D DICOM reader return, so 2D images agree across formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_path
from medlens.errors import ImageReadError
from medlens.io._reading import reading
from medlens.io.image import Image, lps_to_ras

#: File suffixes this module handles, and the name used in messages.
ITK_SUFFIXES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def read_itk(path: str | Path, modality: str = "OT") -> Image:
    """Read an NRRD or MetaImage file into a channel-first :class:`Image` with a RAS+ affine.

    Args:
        path: a ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file (detached headers find their data file).
        modality: the modality to record (these formats do not store one).

    Raises:
        ImageReadError: the file cannot be parsed, or its dimensionality is not 2D, 3D or 4D.
    """
    import SimpleITK as sitk

    path = Path(path)
    what = ITK_SUFFIXES.get(path.suffix.lower(), "ITK image") + " file"
    with reading(path, what, "is it truncated, or is its data file missing?"):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        dim = img.GetDimension()
        ncomp = img.GetNumberOfComponentsPerPixel()
        spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
        origin = np.asarray(img.GetOrigin(), dtype=np.float64)
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if ncomp == 1:
        arr = arr[..., None]  # uniform layout: (reversed spatial..., components)
    if dim == 4:
        if ncomp > 1:
            raise ImageReadError(
                path, "is a 4D image with vector pixels", "medlens reads 4D images as channels"
            )
        arr = np.moveaxis(arr[..., 0], 0, -1)  # (t, z, y, x) -> (z, y, x, t): the 4th axis becomes channels
        dim = 3
        spacing, origin, direction = spacing[:3], origin[:3], direction[:3, :3]
    if dim not in (2, 3):
        raise ImageReadError(path, f"has {dim} dimensions; medlens reads 2D, 3D and 4D images")
    # (z, y, x, c) -> (c, x, y, z)
    arr = np.transpose(arr, (dim, *reversed(range(dim))))  # a Fortran-ordered view, no copy
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction * spacing[None, :]
    affine[:dim, dim] = origin
    if dim == 3:
        affine = lps_to_ras(affine)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:dim, :dim])) < 1e-12:
        raise ImageReadError(
            path, f"has a singular geometry (spacing {spacing.tolist()})", "check its header"
        )
    meta: dict[str, Any] = {"source": str(path), "format": "nrrd" if what.startswith("NRRD") else "metaimage"}
    return Image(arr, affine, modality=modality, meta=meta)


def write_itk(image: Image, path: str | Path) -> Path:
    """Write ``image`` atomically as ``.nrrd`` or ``.mha`` (single-file formats), compressed.

    Channels are written as vector pixels, so a multichannel image reads back with the same channels.

    Raises:
        ImageReadError: ``path`` is a detached-header format (``.nhdr``/``.mhd``), which cannot be written
            atomically because SimpleITK names the data file after the temporary header.
    """
    import SimpleITK as sitk

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".nrrd", ".mha"):
        raise ImageReadError(
            path, f"cannot write {suffix or 'this format'} with SimpleITK", "use .nrrd or .mha"
        )
    nd = image.ndim
    arr = image.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    data = np.transpose(arr, (0, *reversed(range(1, nd + 1))))  # (c, x, y, z) -> (c, z, y, x)
    vector = data.shape[0] > 1
    data = np.moveaxis(data, 0, -1) if vector else data[0]
    itk_img = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    affine = lps_to_ras(image.affine) if nd == 3 else image.affine
    linear = affine[:nd, :nd]
    spacing = np.linalg.norm(linear, axis=0)
    itk_img.SetSpacing([float(s) for s in spacing])
    itk_img.SetDirection([float(v) for v in (linear / spacing[None, :]).ravel()])
    itk_img.SetOrigin([float(v) for v in affine[:nd, nd]])
    with atomic_path(path) as tmp:
        sitk.WriteImage(itk_img, str(tmp), True)
    return path
