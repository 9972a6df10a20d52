"""Damaged files: whatever bytes are flipped or cut, reading gives an Image or an ImageReadError, nothing else.

Mutations are biased towards the first kilobyte, where the headers (and so the interesting parser paths)
are. The examples are derandomized so CI is repeatable; run with ``--hypothesis-seed=<n>`` and a larger
``max_examples`` to search further.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medlens.errors import ImageReadError
from medlens.io import Image, read_image, write_image

FORMATS = ("nii", "nii.gz", "png", "dcm", "npz")

_mutation = st.tuples(st.booleans(), st.integers(0, 2**31 - 1), st.integers(0, 255))
_damage = st.tuples(st.lists(_mutation, min_size=0, max_size=6), st.one_of(st.none(), st.floats(0.0, 1.0)))


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from pydicom.data import get_testdata_file

    folder = tmp_path_factory.mktemp("originals")
    rng = np.random.default_rng(0)
    volume = Image.from_spacing(
        rng.integers(-100, 100, size=(1, 8, 6, 4)).astype(np.int16), spacing=(1, 2, 3)
    )
    flat = Image.from_spacing(rng.integers(0, 255, size=(1, 12, 9)).astype(np.uint8))
    data = {
        "nii": write_image(volume, folder / "v.nii").read_bytes(),
        "nii.gz": write_image(volume, folder / "v.nii.gz").read_bytes(),
        "png": write_image(flat, folder / "f.png").read_bytes(),
    }
    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct is not None:
        data["dcm"] = Path(str(ct)).read_bytes()
    arrays = {
        f"{s}_images": rng.integers(0, 255, size=(3, 8, 8)).astype(np.uint8) for s in ("train", "val", "test")
    }
    arrays |= {f"{s}_labels": np.arange(3, dtype=np.uint8)[:, None] for s in ("train", "val", "test")}
    np.savez(folder / "m.npz", **arrays)
    data["npz"] = (folder / "m.npz").read_bytes()
    return data


def _damaged(original: bytes, mutations: list[tuple[bool, int, int]], cut: float | None) -> bytes:
    data = bytearray(original)
    for in_header, where, value in mutations:
        span = min(len(data), 1024) if in_header else len(data)
        data[where % span] = value
    if cut is not None:
        data = data[: int(len(data) * cut)]
    return bytes(data)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(damage=_damage)
def test_damaged_file_gives_image_or_image_read_error(
    fmt: str,
    damage: tuple[list[tuple[bool, int, int]], float | None],
    originals: dict[str, bytes],
    tmp_path: Path,
) -> None:
    if fmt not in originals:
        pytest.skip(f"no {fmt} original available")
    path = tmp_path / f"damaged.{fmt}"
    path.write_bytes(_damaged(originals[fmt], *damage))
    try:
        img = read_image(path)
    except ImageReadError as e:
        assert str(path) in str(e)  # the message names the file
    else:
        assert isinstance(img, Image) and img.array.size > 0
