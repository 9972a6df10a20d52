"""NIfTI reading and writing with nibabel (geometry preserved exactly).

NIfTI stores spatial axes first (``x, y, z[, t|c]``); medlens keeps channels first, so a 4D NIfTI's last axis
becomes the channel axis, and a 2D image is stored as ``(i, j, 1)`` with its 2D affine embedded in 3D.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from medlens._fs import atomic_path
from medlens.errors import ImageReadError
from medlens.io.image import Image


def read_nifti(path: Path, modality: str = "OT") -> Image:
    """Read a ``.nii``/``.nii.gz`` file into a channel-first :class:`Image` (RAS+ affine from the header)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise ImageReadError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})", "is it truncated?") from None
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        arr = data[None]
    elif data.ndim == 4:
        arr = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, 1, c) vector images
        arr = np.moveaxis(data[:, :, :, 0], -1, 0)
    else:
        raise ImageReadError(path, f"has {data.ndim} dimensions {data.shape}; medlens reads 2D, 3D or 4D NIfTI")
    meta = {"source": str(path), "format": "nifti"}
    descrip = bytes(img.header.get("descrip", b"")).split(b"\0")[0].decode("ascii", "ignore")
    if descrip.startswith("medlens:"):
        # Images written by medlens record their dimensionality and modality.
        fields = dict(kv.split("=", 1) for kv in descrip[len("medlens:") :].split(";") if "=" in kv)
        modality = fields.get("modality", modality) if modality == "OT" else modality
        if fields.get("ndim") == "2" and arr.shape[-1] == 1:
            aff2 = np.eye(3)
            aff2[:2, :2] = affine[:2, :2]
            aff2[:2, 2] = affine[:2, 3]
            return Image(arr[..., 0], aff2, modality=modality, meta=meta)
    return Image(arr, affine, modality=modality, meta=meta)


def write_nifti(image: Image, path: str | Path) -> Path:
    """Write ``image`` to ``path`` (``.nii`` or ``.nii.gz``) atomically, with its affine as sform and qform."""
    import nibabel as nib

    path = Path(path)
    arr = image.array
    if image.ndim == 2:
        aff = np.eye(4)
        aff[:2, :2] = image.affine[:2, :2]
        aff[:2, 3] = image.affine[:2, 2]
        arr = arr[..., None]
    else:
        aff = image.affine
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    nii = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    nii.header.set_qform(aff, code=1)
    nii.header.set_sform(aff, code=1)
    nii.header.set_xyzt_units("mm")
    nii.header["descrip"] = f"medlens:ndim={image.ndim};modality={image.modality}"[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(nii, str(tmp))
    return path
