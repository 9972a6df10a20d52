"""Class-per-folder images (``root/CLASS/*.png``) as a classification dataset.

Layouts: ``root/CLASS/<files>``, or with the source's own splits ``root/{train,val,test}/CLASS/<files>``
(``valid``/``validation`` mean ``val``). Files may sit in sub-folders of a class folder. PNG, JPEG, TIFF,
DICOM files, NIfTI, NRRD and MetaImage are read with :func:`medlens.io.read_image` and written as NIfTI, so
every later step reads one format. Classes are the folder names in sorted order (index 0, 1, ...).

A 2D dataset must have one image size and one channel count: a network batch needs them, and a silent resize
would hide a mix of sources. ``allow_mixed_sizes=True`` keeps mixed sizes for the plan to resample;
``channels=1`` or ``3`` converts colour to gray or gray to colour. Single-slice DICOM/NIfTI images count as 2D.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medlens._fs import atomic_dir
from medlens.data.dataset import Case, Dataset
from medlens.data.importers._common import reload, safe_id, squeeze_single_slice, write_json
from medlens.errors import DatasetError, InputError
from medlens.io import Image, read_image, write_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".dcm",
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".mha",
    ".mhd",
)
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}  # fmt: skip


def import_folder(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    allow_mixed_sizes: bool = False,
    channels: int | None = None,
    patient_pattern: str | None = None,
    modality: str = "OT",
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Import class-per-folder images.

    Args:
        src: the root folder (one sub-folder per class, or ``train``/``val``/``test`` folders of those).
        out: the dataset folder to create.
        overwrite: replace an existing ``out``.
        allow_mixed_sizes: keep 2D images of different sizes (default: an error naming the odd file).
        channels: convert every image to 1 (gray, ITU-R 601 luma) or 3 (gray repeated) channels.
        patient_pattern: regular expression whose first group (or whole match), searched in the file name,
            is the patient id, e.g. ``r"^(P\\d+)_"``; without it each image is its own patient.
        modality: modality code for formats that do not store one (PNG, JPEG, TIFF, NIfTI).
        name: dataset name (default: the folder name).
        progress: called as ``progress(done, total)`` after each image.

    Raises:
        DatasetError: no class folders, an empty class, images at the top level, mixed sizes, channel counts
            or dimensions (the file is named), a file name not matching ``patient_pattern``.
        ImageReadError: an unreadable image (named).
    """
    if not src.is_dir():
        raise DatasetError(f"{src}: is not a folder; the folder importer expects root/CLASS/image files")
    if channels not in (None, 1, 3):
        raise InputError(f"channels={channels!r}: use 1 (gray) or 3 (colour), or leave it out")
    pattern = _compile(patient_pattern)
    files = _collect(src)
    classes = sorted({cls for _, cls, _ in files})
    if len(classes) < 2:
        raise DatasetError(
            f"{src}: found {len(classes)} class folder(s) ({', '.join(classes)}); a classifier needs 2 or more"
        )
    index = {c: i for i, c in enumerate(classes)}
    sections: dict[str, list[Case]] = {"training": [], "test": []}
    ref: tuple[Path, Image] | None = None
    used: set[str] = set()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for n, (path, cls, split) in enumerate(files, 1):
            img = squeeze_single_slice(read_image(path, modality=modality))
            if channels is not None:
                img = _convert_channels(img, channels)
            if ref is None:
                ref = (path, img)
            _check_consistent(path, img, ref, allow_mixed_sizes)
            cid = _unique(safe_id(f"{split + '_' if split else ''}{cls}_{_stem(path)}"), used)
            rel = f"images/{safe_id(cls)}/{cid}.nii.gz"
            write_image(img, tmp / rel)
            meta: dict[str, str] = {"source": path.relative_to(src).as_posix()}
            if pattern is not None:
                meta["patient_id"] = _patient(pattern, path)
            case = Case(id=cid, image=[rel], label=index[cls], split=split, meta=meta)
            sections["test" if split == "test" else "training"].append(case)
            if progress is not None:
                progress(n, len(files))
        assert ref is not None  # files is non-empty
        img0 = ref[1]
        names = {1: ["gray"], 3: ["R", "G", "B"]}.get(img0.num_channels)
        chan_names = {k: names[k] if names else f"channel_{k}" for k in range(img0.num_channels)}
        ds = Dataset(
            root=tmp,
            name=name or src.name,
            task="classification",
            labels=index,
            channels=chan_names,
            modalities=dict.fromkeys(chan_names, img0.modality),
            training=sections["training"],
            test=sections["test"],
            classification_type="binary" if len(classes) == 2 else "multiclass",
            ndim=img0.ndim,
            description=f"Imported from class folders of {src}",
        )
        write_json(ds, tmp)
    return reload(out)


def _collect(src: Path) -> list[tuple[Path, str, str | None]]:
    """(file, class, split) for every image below ``src``, in a stable order."""
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in src.iterdir() if p.is_file() and _is_image(p)]
    if loose:
        raise DatasetError(f"{loose[0]}: images must sit in class sub-folders (root/CLASS/{loose[0].name})")
    if not subdirs:
        raise DatasetError(f"{src}: has no sub-folders; put each class's images in root/CLASS/")
    roots: list[tuple[Path, str | None]]
    if all(p.name.lower() in _SPLIT_NAMES for p in subdirs):
        roots = [(p, _SPLIT_NAMES[p.name.lower()]) for p in subdirs]
    else:
        roots = [(src, None)]
    out: list[tuple[Path, str, str | None]] = []
    skipped = 0
    for root, split in roots:
        for cdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = 0
            for f in sorted(cdir.rglob("*")):
                if any(part.startswith(".") for part in f.relative_to(cdir).parts) or not f.is_file():
                    continue
                if _is_image(f):
                    out.append((f, cdir.name, split))
                    found += 1
                else:
                    skipped += 1
            if not found:
                raise DatasetError(f"{cdir}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if skipped:
        log.warning("%s: skipped %d files that are not images", src, skipped)
    return out


def _is_image(p: Path) -> bool:
    return p.name.lower().endswith(IMAGE_SUFFIXES)


def _stem(p: Path) -> str:
    name = p.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else p.stem


def _unique(cid: str, used: set[str]) -> str:
    out, k = cid, 1
    while out in used:
        k += 1
        out = f"{cid}_{k}"
    used.add(out)
    return out


def _convert_channels(img: Image, channels: int) -> Image:
    arr = img.array
    if arr.shape[0] == channels:
        return img
    if channels == 1 and arr.shape[0] == 3:
        gray = np.tensordot(np.array([0.299, 0.587, 0.114]), arr.astype(np.float32), axes=1)[None]
        if np.issubdtype(arr.dtype, np.integer):
            gray = np.round(gray).astype(arr.dtype)
        return img.with_array(gray)
    if channels == 3 and arr.shape[0] == 1:
        return img.with_array(np.repeat(arr, 3, axis=0))
    raise DatasetError(f"{img.meta.get('source')}: has {arr.shape[0]} channels; cannot convert to {channels}")


def _check_consistent(path: Path, img: Image, ref: tuple[Path, Image], allow_mixed_sizes: bool) -> None:
    rpath, rimg = ref
    if img.ndim != rimg.ndim:
        raise DatasetError(
            f"{path}: is {img.ndim}D but {rpath} is {rimg.ndim}D; a dataset is all 2D or all 3D"
        )
    if img.num_channels != rimg.num_channels:
        raise DatasetError(
            f"{path}: has {img.num_channels} channel(s) but {rpath} has {rimg.num_channels}; "
            "pass channels=1 or channels=3 to convert"
        )
    if img.ndim == 2 and img.spatial_shape != rimg.spatial_shape and not allow_mixed_sizes:
        w, h = img.spatial_shape
        rw, rh = rimg.spatial_shape
        raise DatasetError(
            f"{path}: is {w}x{h} pixels but {rpath} is {rw}x{rh}; images of a 2D dataset must share one size "
            "(resize them, or pass allow_mixed_sizes=True to let the plan resample)"
        )


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(f"patient_pattern {pattern!r} is not a valid regular expression ({e})") from None


def _patient(pattern: re.Pattern[str], path: Path) -> str:
    m = pattern.search(path.name)
    if m is None:
        raise DatasetError(f"{path}: file name does not match patient_pattern {pattern.pattern!r}")
    return m.group(1) if m.groups() else m.group(0)
