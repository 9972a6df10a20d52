"""PNG/JPEG/TIFF reading (shape convention, bit depth, colour) and MedMNIST npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medlens.errors import ImageReadError, InputError
from medlens.io import read_image
from medlens.io.medmnist import load_medmnist


def _gradient(h: int = 5, w: int = 8) -> np.ndarray:
    """(H, W) with a distinct value per pixel: value = 10 * row + column."""
    return (10 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype(np.uint8)


def test_gray_png_is_channel_first_columns_first(tmp_path: Path) -> None:
    hw = _gradient()
    PILImage.fromarray(hw).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.array.shape == (1, 8, 5)  # (C, W, H)
    assert img.array[0, 3, 2] == hw[2, 3]  # i = column 3, j = row 2
    assert img.spacing == (1.0, 1.0) and img.meta["format"] == "png"


def test_16bit_png_keeps_its_values(tmp_path: Path) -> None:
    hw = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2700).astype(np.uint16)
    PILImage.fromarray(hw).save(tmp_path / "deep.png")
    img = read_image(tmp_path / "deep.png")
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array[0], hw.T)


def test_16bit_rgb_png_keeps_its_values(tmp_path: Path) -> None:
    import SimpleITK as sitk

    hwc = np.random.default_rng(0).integers(0, 65536, size=(4, 6, 3)).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(hwc, isVector=True), str(tmp_path / "deep_rgb.png"))
    img = read_image(tmp_path / "deep_rgb.png")
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array, np.transpose(hwc, (2, 1, 0)))


def test_rgb_and_rgba_give_three_channels(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 7
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    PILImage.fromarray(rgba[..., :3], "RGB").save(tmp_path / "c.png")
    for name in ("a.png", "c.png"):
        img = read_image(tmp_path / name)
        assert img.array.shape == (3, 6, 4)
        assert [int(img.array[c].mean()) for c in range(3)] == [200, 100, 50]


def test_jpeg_gray_and_colour(tmp_path: Path) -> None:
    hw = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (12, 1))
    PILImage.fromarray(hw).save(tmp_path / "g.jpg", quality=95)
    gray = read_image(tmp_path / "g.jpg")
    assert gray.array.shape == (1, 16, 12) and gray.meta["format"] == "jpeg"
    assert np.abs(gray.array[0].astype(int) - hw.T.astype(int)).max() <= 8  # lossy, same orientation
    rgb = np.zeros((12, 16, 3), dtype=np.uint8)
    rgb[..., 2] = 255  # blue
    PILImage.fromarray(rgb).save(tmp_path / "c.jpeg", quality=95)
    colour = read_image(tmp_path / "c.jpeg")
    assert colour.array.shape == (3, 16, 12)
    assert colour.array[2].mean() > 240 and colour.array[0].mean() < 15


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    hw = np.zeros((10, 20), dtype=np.uint8)
    hw[:, :10] = 255  # bright left half
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    PILImage.fromarray(hw).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = read_image(tmp_path / "phone.jpg")
    assert img.array.shape == (1, 10, 20)  # displayed upright: 10 wide, 20 tall
    assert img.array[0, :, :10].mean() > 200  # the bright half is now on top


def test_tiff_float_and_multipage(tmp_path: Path) -> None:
    hw = np.linspace(-1.5, 2.5, 20, dtype=np.float32).reshape(4, 5)
    PILImage.fromarray(hw).save(tmp_path / "f.tif")
    img = read_image(tmp_path / "f.tif")
    assert img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array[0], hw.T)
    pages = [PILImage.fromarray(_gradient() + k) for k in range(3)]
    pages[0].save(tmp_path / "stack.tiff", save_all=True, append_images=pages[1:])
    stack = read_image(tmp_path / "stack.tiff")
    assert stack.array.shape == (1, 8, 5, 3) and stack.meta["pages"] == 3
    np.testing.assert_array_equal(stack.array[0, :, :, 2], (_gradient() + 2).T)


def _medmnist(
    path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], drop: str = ""
) -> Path:
    arrays = {f"{s}_images": a for s, a in images.items()} | {f"{s}_labels": a for s, a in labels.items()}
    arrays.pop(drop, None)
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("stored_shape", "ndim", "channels", "to_medlens"),
    [
        ((28, 28), 2, 1, lambda a: a.T[None]),  # 2D gray: H x W -> (1, W, H)
        ((28, 28, 3), 2, 3, lambda a: np.transpose(a, (2, 1, 0))),  # 2D RGB: H x W x 3 -> (3, W, H)
        ((28, 28, 28), 3, 1, lambda a: np.transpose(a, (2, 1, 0))[None]),  # 3D: D x H x W -> (1, W, H, D)
    ],
)
def test_medmnist_layouts(
    tmp_path: Path, stored_shape: tuple[int, ...], ndim: int, channels: int, to_medlens
) -> None:
    rng = np.random.default_rng(0)
    counts = {"train": 6, "val": 3, "test": 4}
    images = {s: rng.integers(0, 256, size=(n, *stored_shape)).astype(np.uint8) for s, n in counts.items()}
    labels = {s: rng.integers(0, 5, size=(n, 1)).astype(np.uint8) for s, n in counts.items()}
    path = _medmnist(tmp_path / "x.npz", images, labels)
    arrays = load_medmnist(path)
    assert (arrays.ndim, arrays.num_channels, arrays.image_size) == (ndim, channels, 28)
    assert len(arrays.test) == 4 and arrays.num_labels == 1 and not arrays.multi_label
    np.testing.assert_array_equal(arrays.val.images, images["val"])
    img = read_image(path, index="test:3")
    assert img.ndim == ndim and img.num_channels == channels and img.spacing == (1.0,) * ndim
    np.testing.assert_array_equal(img.array, to_medlens(images["test"][3]))
    assert img.meta["label"] == [int(labels["test"][3, 0])] and img.meta["split"] == "test"
    np.testing.assert_array_equal(read_image(path).array, to_medlens(images["train"][0]))  # default train:0
    np.testing.assert_array_equal(arrays.image("val", 2).array, to_medlens(images["val"][2]))


def test_medmnist_multilabel_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = {s: rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8) for s in ("train", "val", "test")}
    labels = {s: rng.integers(0, 2, size=(3, 14)).astype(np.uint8) for s in ("train", "val", "test")}
    arrays = load_medmnist(_medmnist(tmp_path / "chest.npz", images, labels))
    assert arrays.multi_label and arrays.num_labels == 14
    missing = _medmnist(tmp_path / "nokey.npz", images, labels, drop="val_labels")
    with pytest.raises(ImageReadError, match=r"nokey.npz.*'val_labels'"):
        load_medmnist(missing)
    with pytest.raises(ImageReadError, match="index 9 is out of range"):
        read_image(tmp_path / "chest.npz", index="train:9")
    with pytest.raises(InputError, match="must look like 'train:12'"):
        read_image(tmp_path / "chest.npz", index="training:1")
    np.savez(tmp_path / "objects.npz", train_images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ImageReadError, match=r"objects.npz"):
        load_medmnist(tmp_path / "objects.npz")
    with pytest.raises(ImageReadError, match=r"objects.npz"):
        read_image(tmp_path / "objects.npz")
    bad = dict(labels, test=labels["test"][:2])
    with pytest.raises(ImageReadError, match="'test_labels' has shape"):
        load_medmnist(_medmnist(tmp_path / "short.npz", images, bad))
