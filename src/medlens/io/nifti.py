"""NIfTI reading and writing with nibabel (geometry preserved exactly).

NIfTI stores spatial axes first (``x, y, z[, t|c]``); medlens keeps channels first, so a 4D NIfTI's last axis
becomes the channel axis, and a 2D image is stored as ``(i, j, 1)`` with its 2D affine embedded in 3D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_path
from medlens.errors import ImageReadError
from medlens.io._reading import check_fits_in_memory, reading
from medlens.io.image import Image


def read_nifti(path: Path, modality: str = "OT") -> Image:
    """Read a ``.nii``/``.nii.gz`` file into a channel-first :class:`Image` (RAS+ affine from the header).

    Scaled data (``scl_slope``/``scl_inter``) is returned as float32; unscaled data keeps its stored dtype.

    Raises:
        ImageReadError: the file is not NIfTI, is truncated or damaged, or declares more data than it holds.
    """
    import nibabel as nib

    path = Path(path)
    with reading(path, "NIfTI file", "is it truncated or damaged?"):
        img: Any = nib.load(str(path), mmap=False)
        _check_data_size(path, img)
        data = np.asanyarray(img.dataobj)
        if data.dtype == np.float64 and img.get_data_dtype() != np.float64:
            data = data.astype(np.float32)  # nibabel scales in float64; the stored precision is lower
        data = np.asarray(data)
        affine = np.asarray(img.affine, dtype=np.float64)
        descrip = bytes(img.header.get("descrip", b"")).split(b"\0")[0].decode("ascii", "ignore")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(
            path,
            f"has a singular or non-finite affine {affine.round(4).tolist()}",
            "check pixdim and sform/qform",
        )
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        arr = data[None]
    elif data.ndim == 4:
        arr = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, 1, c) vector images
        arr = np.moveaxis(data[:, :, :, 0], -1, 0)
    else:
        raise ImageReadError(
            path, f"has {data.ndim} dimensions {data.shape}; medlens reads 2D, 3D or 4D NIfTI"
        )
    meta = {"source": str(path), "format": "nifti"}
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


def _check_data_size(path: Path, img: Any) -> None:
    """Refuse headers that declare more voxels than the file can hold (damaged dims must not allocate GBs)."""
    shape = img.header.get_data_shape()
    if any(int(d) < 0 for d in shape):
        raise ImageReadError(path, f"has negative dimensions {shape}", "the header is damaged")
    nbytes = int(np.prod([int(d) for d in shape], dtype=np.float64)) * img.get_data_dtype().itemsize
    offset = int(getattr(img.dataobj, "offset", 0))
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        # deflate never compresses better than ~1032:1; below 4 GiB the gzip trailer holds the exact size
        limit = size * 1032
        if limit < 1 << 32:
            with open(path, "rb") as fh:
                fh.seek(max(size - 4, 0))
                limit = int.from_bytes(fh.read(4), "little")
    else:
        limit = size
    if offset + nbytes > limit:
        raise ImageReadError(
            path,
            f"declares {shape} voxels of {img.get_data_dtype()} ({nbytes} bytes) but holds only {max(limit - offset, 0)}",
            "the file is truncated or its header is damaged",
        )
    check_fits_in_memory(path, nbytes, "NIfTI volume")


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
    if data.dtype in (np.int64, np.uint64):
        # nibabel refuses 64-bit integers without an explicit dtype; label maps fit in 32 bits
        narrow = np.int32 if data.dtype == np.int64 else np.uint32
        if data.size == 0 or (data.min() >= np.iinfo(narrow).min and data.max() <= np.iinfo(narrow).max):
            data = data.astype(narrow)
    nii = nib.Nifti1Image(data, aff, dtype=data.dtype)
    nii.header.set_qform(aff, code=1)
    nii.header.set_sform(aff, code=1)
    nii.header.set_xyzt_units("mm")
    nii.header["descrip"] = f"medlens:ndim={image.ndim};modality={image.modality}"[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(nii, str(tmp))
    return path
