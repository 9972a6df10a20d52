"""Helpers shared by the importers: copying files, safe case ids, destination paths, finishing up."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from medlens.data.dataset import Dataset, load_dataset
from medlens.errors import DatasetError
from medlens.io.image import Image

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str) -> str:
    """A case id usable as a file name: runs of other characters become ``_``."""
    out = _UNSAFE.sub("_", str(text).strip()).strip("._")
    return out or "case"


def dest_rel(rel: str, folder: str) -> str:
    """Where a file listed as ``rel`` goes in the new dataset: the same relative path, normalised
    (``./imagesTr/a.nii.gz`` -> ``imagesTr/a.nii.gz``); absolute paths and paths leaving the source folder
    go to ``folder/<file name>``."""
    p = PurePosixPath(rel.replace("\\", "/"))
    parts = [x for x in p.parts if x not in (".", "")]
    if p.is_absolute() or ".." in parts or not parts:
        return f"{folder}/{p.name}"
    return "/".join(parts)


def copy_file(src: Path, dst: Path, link: bool = False) -> None:
    """Copy ``src`` to ``dst`` (a hard link instead when ``link`` and both are on one file system)."""
    if dst.exists():
        raise DatasetError(
            f"{src}: would overwrite {dst.name}, already imported from another file; rename one"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            log.debug("cannot hard-link %s, copying", src)
    shutil.copyfile(src, dst)


def write_json(ds: Dataset, tmp: Path) -> None:
    """Write ``dataset.json`` of ``ds`` into the temporary output folder ``tmp``."""
    ds.root = tmp
    ds.save()


def reload(out: Path) -> Dataset:
    """Load the finished dataset from its final folder."""
    ds = load_dataset(out)
    log.info("imported %s: %d training and %d test cases (%s)", out, len(ds.training), len(ds.test), ds.task)
    return ds


def first_image_ndim(path: Path) -> int:
    """Spatial dimension of one image (read in full; raises ImageReadError naming the file)."""
    from medlens.io import read_image

    return read_image(path).ndim


def squeeze_single_slice(img: Image) -> Image:
    """A 3D image with one slice (a DICOM radiograph, a 2D NIfTI) as 2D, keeping its pixel spacing."""
    if img.ndim == 3 and img.spatial_shape[2] == 1:
        return Image.from_spacing(
            img.array[..., 0], spacing=img.spacing[:2], modality=img.modality, meta=img.meta
        )
    return img
