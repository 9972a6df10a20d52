"""2D raster images: PNG, JPEG and TIFF with Pillow; PNG writing.

Reading (shape ``(C, W, H)``: ``i`` runs along columns, see :mod:`medlens.io.image`):

* grayscale (8-bit, 16-bit, 32-bit integer, float TIFF) -> 1 channel, dtype preserved (16-bit PNG stays
  uint16); 1-bit -> uint8 0/1;
* RGB -> 3 channels; RGBA and LA drop alpha; palette, CMYK and YCbCr images are converted to RGB (a palette
  whose entries are all gray becomes 1 channel); 16-bit RGB PNG (which Pillow reduces to 8 bits) is read with
  SimpleITK so its precision is kept;
* the EXIF orientation of photographs is applied, so the array matches what a viewer shows;
* a multi-page TIFF whose pages share size and mode becomes a 3D stack (pages along ``k``).

Spacing is 1 (these formats carry no reliable physical pixel size).

Writing PNG: 2D images with 1 or 3 channels (a 3D image with a single slice is accepted). Integer images that
fit in uint8 (or, for 1 channel, uint16) are written as they are, so label maps survive; floats and other
integers are windowed to 0..255, from their min/max or from an explicit ``window=(low, high)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_path
from medlens.errors import ImageReadError, InputError
from medlens.io._reading import check_fits_in_memory, reading
from medlens.io.image import Image

log = logging.getLogger(__name__)

RASTER_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
#: More decoded bytes per file byte than any codec here achieves (deflate ~1032, LZW ~2700).
_MAX_EXPANSION = 4096
_GRAY_MODES = ("L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def read_raster(path: str | Path, modality: str = "OT") -> Image:
    """Read a PNG, JPEG or TIFF file into an :class:`Image` (``(C, W, H)``, or ``(C, W, H, pages)``).

    Raises:
        ImageReadError: not an image Pillow can decode, truncated, or pages of different sizes.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    path = Path(path)
    fmt = RASTER_SUFFIXES.get(path.suffix.lower(), "raster")
    what = f"{fmt.upper()} image" if fmt != "raster" else "PNG/JPEG/TIFF image"
    with reading(path, what, "is it truncated or damaged?"):
        if _is_16bit_colour_png(path):
            return _read_png_sitk(path, modality)
        with PILImage.open(path) as im:
            pages = int(getattr(im, "n_frames", 1) or 1)
            _check_size(path, im, pages)
            arrays = []
            for page in range(pages):
                im.seek(page)
                frame = ImageOps.exif_transpose(im) if pages == 1 else im
                arrays.append(_pixels(frame if frame is not None else im))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or len({a.dtype for a in arrays}) > 1:
        raise ImageReadError(
            path, f"has {pages} pages of different sizes or modes", "split it into single images"
        )
    meta: dict[str, Any] = {"source": str(path), "format": fmt}
    if pages == 1:
        return Image.from_spacing(arrays[0], modality=modality, meta=meta)
    meta["pages"] = pages
    return Image.from_spacing(np.stack(arrays, axis=-1), modality=modality, meta=meta)


def _check_size(path: Path, im: Any, pages: int) -> None:
    """Refuse a header that claims far more pixels than the file could encode (a damaged TIFF can claim
    gigapixels backed by a few bytes; decoding it would allocate gigabytes of zeros)."""
    width, height = im.size
    decoded = width * height * len(im.getbands()) * 4 * pages
    if decoded > _MAX_EXPANSION * path.stat().st_size + (1 << 20):
        raise ImageReadError(
            path,
            f"declares {width}x{height} pixels ({pages} page(s)) but holds only {path.stat().st_size} bytes",
            "the file is damaged or truncated",
        )
    check_fits_in_memory(path, decoded, "decoded image")


def _pixels(im: Any) -> np.ndarray:
    """One Pillow frame as a channel-first ``(C, W, H)`` array."""
    mode = im.mode
    if mode == "1":
        arr = np.asarray(im, dtype=np.uint8)
    elif mode in _GRAY_MODES:
        arr = np.asarray(im)
    elif mode in ("LA", "La") or (mode == "P" and _gray_palette(im)):
        arr = np.asarray(im.convert("L"))
    else:  # RGB, RGBA, RGBa, P, PA, CMYK, YCbCr, LAB, HSV
        arr = np.asarray(im.convert("RGB"))
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (H, W, C) -> (C, W, H)


def _gray_palette(im: Any) -> bool:
    if "transparency" in im.info:
        return False
    pal = np.asarray(im.getpalette() or [], dtype=np.int64)
    if pal.size < 3:
        return False
    rgb = pal[: pal.size // 3 * 3].reshape(-1, 3)
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def _is_16bit_colour_png(path: Path) -> bool:
    """PNG IHDR: bit depth 16 with colour type 2 (RGB) or 6 (RGBA)."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[24] == 16 and head[25] in (2, 6)


def _read_png_sitk(path: Path, modality: str) -> Image:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (H, W, C)
    if arr.ndim != 3:
        raise ImageReadError(path, f"decoded to an unexpected shape {arr.shape}")
    arr = np.ascontiguousarray(np.transpose(arr[..., :3], (2, 1, 0)))
    return Image.from_spacing(arr, modality=modality, meta={"source": str(path), "format": "png"})


def write_png(image: Image, path: str | Path, window: tuple[float, float] | None = None) -> Path:
    """Write a 2D image with 1 or 3 channels to ``path`` as PNG, atomically.

    Args:
        image: a 2D image (or a 3D image with one slice).
        path: the ``.png`` file to write.
        window: ``(low, high)`` intensity window mapped to 0..255; default: integers that fit are written as
            they are, anything else is windowed from its min/max.

    Raises:
        InputError: a 3D image with several slices, or a channel count other than 1 or 3.
    """
    from PIL import Image as PILImage

    path = Path(path)
    arr = image.array
    if image.ndim == 3:
        if image.spatial_shape[2] != 1:
            raise InputError(
                f"{path}: a PNG holds one 2D image, but this image is 3D {image.spatial_shape}; "
                "pick a 2D image (a slice) or write NIfTI (.nii.gz)"
            )
        arr = arr[..., 0]
    if arr.shape[0] not in (1, 3):
        raise InputError(f"{path}: a PNG holds 1 (gray) or 3 (RGB) channels, this image has {arr.shape[0]}")
    data = to_display_range(arr, window, allow_uint16=arr.shape[0] == 1)
    hwc = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # (C, W, H) -> (H, W, C)
    pil = PILImage.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc)  # uint8 -> L/RGB, uint16 -> I;16
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


def to_display_range(
    arr: np.ndarray, window: tuple[float, float] | None = None, allow_uint16: bool = True
) -> np.ndarray:
    """Map an array to uint8 (or uint16 for integer data that needs it) for an image file.

    Integers that fit in uint8 (or uint16 when ``allow_uint16``) are kept; anything else is windowed linearly
    to 0..255 from ``window`` or the finite min/max (NaN becomes 0).
    """
    if window is not None:
        low, high = float(window[0]), float(window[1])
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise InputError(f"window {window!r} must be two finite numbers (low, high) with low < high")
        return _window(arr, low, high)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535 and allow_uint16:
            return arr.astype(np.uint16)
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    log.debug("windowing %s values %.4g..%.4g to 0..255", arr.dtype, low, high)
    return _window(arr, low, high)


def _window(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(arr.astype(np.float64), nan=low) - low) * 255.0 / (high - low)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
