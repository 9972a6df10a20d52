"""Classification images: each one preprocessed once into one float16 array, cached and memory-mapped.

Classification images are small, so a fold samples its batches from a single ``(N, C, *size)`` array instead
of reading files: 100,000 RGB images of 28 x 28 take 470 MB. Preprocessing, in the order training and
prediction share (:func:`prepare_image` for a file, :func:`prepare_arrays` for a stack such as a MedMNIST
split):

1. reorient 3D images to RAS (``preprocessing.orientation``; 2D images keep their pixel order);
2. resize to the plan's input size (``patch_size``) with ``torch.nn.functional.interpolate``: bilinear with
   antialiasing when shrinking 2D images, area averaging when shrinking volumes, (tri)linear when enlarging;
3. normalise each channel as the plan says (``ct``, ``zscore`` per image, ``rescale``, ``none``; the same
   formulas as :mod:`medlens.plan.preprocess`).

The cache (``CACHE/images_<key>.npy`` + ``.json`` with the case ids) is keyed by the preprocessing section,
the input size and the size and modification time of every file, so a changed plan or file rebuilds it; it is
written atomically, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_path, atomic_write_json
from medlens.data.dataset import Case, Dataset, read_case_image
from medlens.errors import DatasetError, InputError
from medlens.io.image import Image

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def resize_batch(x: Any, size: Sequence[int]) -> Any:
    """Resize a ``(B, C, *spatial)`` float tensor to ``size`` (see the module docstring)."""
    import torch.nn.functional as F

    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    down = all(o <= i for o, i in zip(size, x.shape[2:], strict=True))
    if x.ndim == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)
    if down:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def normalize(x: np.ndarray, normalization: Mapping[str, Any]) -> np.ndarray:
    """Normalise ``(B, C, *spatial)`` float32 in place, per channel, by the plan's schemes."""
    axes = tuple(range(2, x.ndim))
    for c in range(x.shape[1]):
        cfg = dict(normalization.get(str(c), {"scheme": "zscore"}))
        scheme = cfg.get("scheme")
        ch = x[:, c]
        if scheme == "ct":
            lo, hi = cfg["clip"]
            np.clip(ch, lo, hi, out=ch)
            ch -= float(cfg["mean"])
            ch /= max(float(cfg["std"]), 1e-8)
        elif scheme == "zscore":
            ax = tuple(a - 1 for a in axes)
            mean = ch.mean(axis=ax, keepdims=True)
            std = np.maximum(ch.std(axis=ax, keepdims=True), 1e-8)
            ch -= mean
            ch /= std
        elif scheme == "rescale":
            if "range" in cfg:
                lo, hi = (float(v) for v in cfg["range"])
                ch -= lo
                ch /= max(hi - lo, 1e-8)
            else:
                ax = tuple(a - 1 for a in axes)
                lo_a, hi_a = ch.min(axis=ax, keepdims=True), ch.max(axis=ax, keepdims=True)
                ch -= lo_a
                ch /= np.maximum(hi_a - lo_a, 1e-8)
        elif scheme != "none":
            raise InputError(f"plan.json: unknown normalisation scheme {scheme!r} for channel {c}")
    return x


def prepare_arrays(x: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """Resize and normalise a stack ``(B, C, *spatial)`` already in medlens axis order; float32 out."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = resize_batch(t, config["patch_size"]).numpy()
    out = np.array(out, dtype=np.float32, copy=True)
    return normalize(out, config["preprocessing"].get("normalization", {}))


def check_image(image: Image, config: Mapping[str, Any], num_channels: int, source: str) -> None:
    """Refuse an image the plan cannot take: another dimensionality or channel count."""
    nd = int(config["spatial_dims"])
    if image.ndim != nd:
        raise InputError(f"{source}: is a {image.ndim}D image; this model takes {nd}D images")
    if image.num_channels != num_channels:
        raise InputError(
            f"{source}: has {image.num_channels} channel(s); this model takes {num_channels} (convert the image, "
            "e.g. colour to gray, or re-import the dataset with the right channel count)"
        )


def prepare_image(image: Image, config: Mapping[str, Any]) -> np.ndarray:
    """One image -> ``(C, *input size)`` float32: reoriented, resized and normalised as the plan says."""
    from medlens.plan.preprocess import preprocess_case

    pre = config["preprocessing"]
    raw = {str(c): {"scheme": "none"} for c in range(image.num_channels)}
    reoriented, _, _ = preprocess_case(
        image,
        None,
        {
            "orientation": pre.get("orientation", "none"),
            "crop_nonzero": False,
            "target_spacing": None,
            "normalization": raw,
        },
        case_id=str(image.meta.get("source", "image")),
    )
    return prepare_arrays(reoriented[None], config)[0]


# ---- the cache ------------------------------------------------------------------------------------------------
def cache_key(config: Mapping[str, Any], sources: Sequence[Any]) -> str:
    """Hash of the preprocessing, the input size and a description of every source (ids, file stats)."""
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "pre": config["preprocessing"],
            "size": list(config["patch_size"]),
            "src": sources,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_array(
    path: Path,
    ids: Sequence[str],
    chunks: Iterable[np.ndarray],
    config: Mapping[str, Any],
    num_channels: int,
) -> np.ndarray:
    """Write preprocessed ``chunks`` (float32 ``(b, C, *size)``, in ``ids`` order) to ``path`` atomically, with
    ``<path>.json`` listing the ids; return the array memory-mapped read-only."""
    shape = (len(ids), num_channels, *[int(s) for s in config["patch_size"]])
    dtype = np.float16 if config["preprocessing"].get("cache_dtype", "float16") == "float16" else np.float32
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        done = 0
        for chunk in chunks:
            if dtype == np.float16:
                chunk = np.clip(chunk, -65000.0, 65000.0)
            arr[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(ids):
            raise InputError(f"{path}: {done} images prepared for {len(ids)} ids")
        arr.flush()
        del arr
    atomic_write_json(
        path.with_suffix(".json"), {"medlens_classification_cache": CACHE_VERSION, "ids": list(ids)}
    )
    return np.load(path, mmap_mode="r")


def open_cached(path: Path, ids: Sequence[str]) -> np.ndarray | None:
    """The cached array at ``path`` if it holds exactly ``ids``, else None."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        if json.loads(meta.read_text(encoding="utf-8")).get("ids") != list(ids):
            return None
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return arr if len(arr) == len(ids) else None


def dataset_images(
    dataset: Dataset,
    cases: Sequence[Case],
    config: Mapping[str, Any],
    cache_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The preprocessed images of ``cases`` (in that order), from the cache or built into it.

    Raises:
        InputError: an image of another dimensionality or channel count than the plan's (file named).
        ImageReadError: an unreadable file.
    """
    stats = []
    for c in cases:
        files = []
        for rel in c.image:
            try:
                st = dataset.path(rel).stat()
                files.append([rel, st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([rel, None, None])
        stats.append([c.id, files])
    path = Path(cache_dir) / f"images_{cache_key(config, stats)}.npy"
    ids = [c.id for c in cases]
    cached = open_cached(path, ids)
    if cached is not None:
        log.info("classification cache: %d images from %s", len(ids), path)
        return cached
    nch = dataset.num_channels

    def chunks() -> Iterable[np.ndarray]:
        for n, case in enumerate(cases, 1):
            image = read_case_image(dataset, case)
            source = str(dataset.path(case.image[0]))
            try:
                check_image(image, config, nch, source)
            except InputError as e:
                raise DatasetError(f"{e} (case {case.id!r} of {dataset.json_path})") from None
            yield prepare_image(image, config)[None]
            if progress is not None:
                progress(n, len(cases))

    log.info("preprocessing %d images into %s", len(ids), path)
    return build_array(path, ids, chunks(), config, nch)
