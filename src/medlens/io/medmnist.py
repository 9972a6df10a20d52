"""MedMNIST ``.npz`` files (v2 and MedMNIST+ sizes 28/64/128/224).

A MedMNIST file holds ``{train,val,test}_images`` and ``{train,val,test}_labels``. Images are stored
``N x H x W`` (2D gray), ``N x H x W x 3`` (2D RGB) or ``N x D x H x W`` (3D); labels ``N x 1`` (one class
index) or ``N x K`` (multi-label 0/1). Files are always opened with ``allow_pickle=False``: an npz a user hands
us can never run code.

:func:`load_medmnist` loads and validates everything; :func:`read_medmnist_image` reads a single image
(``"train:12"``) by seeking inside the zip member, so taking one image from a multi-GB 224-pixel file does not
load the whole split.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ImageReadError, InputError
from medlens.io._reading import reading
from medlens.io.image import Image

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))
_KEYS_HINT = "a MedMNIST npz holds " + ", ".join(REQUIRED_KEYS)


@dataclass(frozen=True)
class MedMNISTSplit:
    """One split: ``images`` as stored (see module docstring) and ``labels`` as ``(N, K)`` integers."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MedMNISTArrays:
    """The validated content of a MedMNIST ``.npz``.

    Attributes:
        source: the file it came from.
        train, val, test: the three splits.
    """

    source: str
    train: MedMNISTSplit
    val: MedMNISTSplit
    test: MedMNISTSplit

    def split(self, name: str) -> MedMNISTSplit:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise InputError(f"unknown MedMNIST split {name!r}; choose train, val or test")
        split: MedMNISTSplit = getattr(self, name)
        return split

    @property
    def ndim(self) -> int:
        """2 for 2D images, 3 for volumes."""
        return _layout(self.train.images.shape, self.source, "train_images")[0]

    @property
    def num_channels(self) -> int:
        """1 (gray) or 3 (RGB)."""
        return _layout(self.train.images.shape, self.source, "train_images")[1]

    @property
    def image_size(self) -> int:
        """Edge length in pixels (28, 64, 128 or 224 for the published files)."""
        return int(self.train.images.shape[1])

    @property
    def num_labels(self) -> int:
        """Width ``K`` of the label arrays (1 for single-label tasks)."""
        return int(self.train.labels.shape[1])

    @property
    def multi_label(self) -> bool:
        """True when each image carries ``K > 1`` binary labels (e.g. ChestMNIST)."""
        return self.num_labels > 1

    def image(self, split: str, index: int) -> Image:
        """Image ``index`` of ``split`` as a medlens :class:`Image` (spacing 1, label in ``meta``)."""
        s = self.split(split)
        if not 0 <= index < len(s):
            raise InputError(f"{self.source}: {split} has {len(s)} images, index {index} is out of range")
        return to_image(s.images[index], self.source, split, index, s.labels[index])


def load_medmnist(path: str | Path) -> MedMNISTArrays:
    """Load and validate a MedMNIST ``.npz``.

    Raises:
        ImageReadError: not a readable npz, a missing key (named), images that are not ``N x H x W``,
            ``N x H x W x 3`` or ``N x D x H x W``, labels that are not ``N x K`` integers, or splits whose
            image shapes or label widths disagree.
    """
    path = Path(path)
    splits: dict[str, MedMNISTSplit] = {}
    with reading(path, "MedMNIST .npz file", "is it truncated?"), np.load(path, allow_pickle=False) as npz:
        for key in REQUIRED_KEYS:
            if key not in npz.files:
                raise ImageReadError(path, f"has no {key!r} array", _KEYS_HINT)
        for split in SPLITS:
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"])
            splits[split] = MedMNISTSplit(images, _check_labels(labels, len(images), path, f"{split}_labels"))
    layouts = {}
    for split, s in splits.items():
        if not np.issubdtype(s.images.dtype, np.number) and s.images.dtype != np.bool_:
            raise ImageReadError(path, f"'{split}_images' has dtype {s.images.dtype}, expected numbers")
        _layout(s.images.shape, path, f"{split}_images")
        layouts[split] = s.images.shape[1:]
    if len(set(layouts.values())) > 1:
        raise ImageReadError(
            path, f"splits have different image shapes {layouts}", "is it a mix of two files?"
        )
    widths = {split: s.labels.shape[1] for split, s in splits.items()}
    if len(set(widths.values())) > 1:
        raise ImageReadError(path, f"splits have different label widths {widths}")
    return MedMNISTArrays(str(path), splits["train"], splits["val"], splits["test"])


def parse_index(index: str | int | None) -> tuple[str, int]:
    """``"test:3"`` -> ``("test", 3)``; an int or ``"12"`` means the train split; None means ``train:0``."""
    if index is None:
        return "train", 0
    if isinstance(index, int | np.integer):
        split, num = "train", str(int(index))
    else:
        split, _, num = str(index).strip().rpartition(":")
        split = split.strip() or "train"
    if split not in SPLITS or not num.strip().isdigit():
        raise InputError(
            f"index {index!r} must look like 'train:12' (split train, val or test; a number >= 0)"
        )
    return split, int(num)


def read_medmnist_image(path: str | Path, index: str | int | None = None, modality: str = "OT") -> Image:
    """Read one image of a MedMNIST ``.npz`` (default ``train:0``) without loading the whole split.

    Raises:
        ImageReadError: a missing key, an out-of-range index, a truncated file.
    """
    path = Path(path)
    split, num = parse_index(index)
    with reading(path, "MedMNIST .npz file", "is it truncated?"):
        image = _read_row(path, f"{split}_images", num)
        label = _read_row(path, f"{split}_labels", num)
    _layout((1, *image.shape), path, f"{split}_images")
    return to_image(image, str(path), split, num, label, modality)


def to_image(
    stored: np.ndarray, source: str, split: str, index: int, label: Any, modality: str = "OT"
) -> Image:
    """One stored MedMNIST image (``H x W``, ``H x W x 3`` or ``D x H x W``) as a channel-first Image."""
    if stored.ndim == 2:
        arr = stored.T[None]  # (H, W) -> (1, W, H)
    elif stored.shape[-1] == 3:
        arr = np.transpose(stored, (2, 1, 0))  # (H, W, 3) -> (3, W, H)
    else:
        arr = np.transpose(stored, (2, 1, 0))[None]  # (D, H, W) -> (1, W, H, D)
    labels = np.asarray(label).reshape(-1)
    meta = {"source": source, "format": "medmnist", "split": split, "index": index, "label": labels.tolist()}
    return Image.from_spacing(np.ascontiguousarray(arr), modality=modality, meta=meta)


def _layout(shape: tuple[int, ...], path: str | Path, key: str) -> tuple[int, int]:
    """(spatial dims, channels) of a stored image array, or an error naming the key."""
    if len(shape) == 3:
        return 2, 1
    if len(shape) == 4 and shape[-1] == 3:
        return 2, 3
    if len(shape) == 4:
        return 3, 1
    raise ImageReadError(
        path,
        f"{key!r} has shape {tuple(shape)}",
        "expected N x H x W (gray), N x H x W x 3 (RGB) or N x D x H x W (3D)",
    )


def _check_labels(labels: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n:
        raise ImageReadError(path, f"{key!r} has shape {labels.shape}", f"expected {n} x 1 or {n} x K labels")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ImageReadError(
            path, f"{key!r} has dtype {labels.dtype}", "labels must be integer class indices or 0/1"
        )
    return labels


def _read_row(path: Path, key: str, index: int) -> np.ndarray:
    """Row ``index`` of array ``key`` read straight from the zip member (C order), else from a full load."""
    with zipfile.ZipFile(path) as zf:
        member = f"{key}.npy"
        if member not in zf.namelist():
            raise ImageReadError(path, f"has no {key!r} array", _KEYS_HINT)
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                shape, fortran, dtype = None, True, np.dtype(np.uint8)
            if shape is not None:
                if dtype.hasobject:
                    raise ImageReadError(
                        path, f"{key!r} holds Python objects", "medlens never unpickles data"
                    )
                if len(shape) == 0 or not 0 <= index < shape[0]:
                    n = shape[0] if shape else 0
                    raise ImageReadError(path, f"{key!r} has {n} entries; index {index} is out of range")
            if not fortran and shape is not None:
                row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                fh.seek(index * row, 1)
                data = fh.read(row)
                if len(data) != row:
                    raise ImageReadError(path, f"{key!r} is truncated", "re-download the file")
                return np.frombuffer(data, dtype=dtype).reshape(shape[1:]).copy()
    with np.load(path, allow_pickle=False) as npz:  # Fortran order or a newer header version: rare
        arr = npz[key]
    if not 0 <= index < len(arr):
        raise ImageReadError(path, f"{key!r} has {len(arr)} entries; index {index} is out of range")
    return np.asarray(arr[index])
