"""Patch sampler (shapes, padding, foreground oversampling, reproducibility) and batched augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlens.data.augment import BatchAugment, make_augment, parse_augmentation
from medlens.data.sampler import PatchSampler
from medlens.errors import InputError


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class MemorySource:
    """A PatchSource over in-memory arrays: each case has a tiny foreground cube (class 1) in a big volume
    and, in case 'b', an even smaller class-2 cube."""

    def __init__(self, shape: tuple[int, ...] = (40, 40, 30)) -> None:
        rng = np.random.default_rng(0)
        self.arrays = {}
        for cid in ("a", "b"):
            seg = np.zeros((1, *shape), np.uint8)
            seg[(0, *(slice(s // 2, s // 2 + 3) for s in shape))] = 1
            if cid == "b":
                seg[(0, *(slice(2, 4) for _ in shape))] = 2
            data = rng.normal(size=(2, *shape)).astype(np.float16)
            self.arrays[cid] = (data, seg)

    def data(self, case_id: str) -> np.ndarray:
        return self.arrays[case_id][0]

    def seg(self, case_id: str) -> np.ndarray | None:
        return self.arrays[case_id][1]

    def foreground(self, case_id: str) -> dict[int, np.ndarray]:
        seg = self.arrays[case_id][1][0]
        return {int(k): np.argwhere(seg == k) for k in np.unique(seg) if k}


def has_fg(batch: dict[str, torch.Tensor]) -> np.ndarray:
    return (batch["label"].flatten(1) > 0).any(dim=1).numpy()


def test_shapes_dtypes_and_padding() -> None:
    src = MemorySource()
    s = PatchSampler(src, ["a", "b"], [16, 16, 8], 3, seed=0)
    b = s.batch(0, 0)
    assert b["image"].shape == (3, 2, 16, 16, 8) and b["image"].dtype == torch.float32
    assert b["label"].shape == (3, 1, 16, 16, 8) and b["label"].dtype == torch.int64
    big = PatchSampler(src, ["a"], [48, 48, 32], 2, oversample_foreground=0.0, seed=0).batch(0, 0)
    # the case (40x40x30) is smaller than the patch: zero padding around it
    zero_rows = (big["image"][:, 0].abs().sum(dim=(2, 3)) == 0).sum(dim=1)
    assert (zero_rows >= 8).all()
    two_d = PatchSampler(src, ["a", "b"], [24, 24], 4, seed=0).batch(0, 0)
    assert two_d["image"].shape == (4, 2, 24, 24) and two_d["label"].shape == (4, 1, 24, 24)
    flat = MemorySource(shape=(30, 30))
    assert PatchSampler(flat, ["a"], [16, 16], 2).batch(0, 0)["image"].shape == (2, 2, 16, 16)


@pytest.mark.parametrize(
    ("p", "patch"), [(0.33, [8, 8, 8]), (1.0, [8, 8, 8]), (0.0, [8, 8, 8]), (0.5, [8, 8])]
)
def test_foreground_fraction_matches_oversampling(p: float, patch: list[int]) -> None:
    s = PatchSampler(MemorySource(), ["a", "b"], patch, 2, oversample_foreground=p, seed=3)
    hits = np.concatenate([has_fg(b) for _, b in zip(range(300), s.batches(), strict=False)])
    # random 8^3 crops of a 40x40x30 volume hit the 3^3 cube rarely (~3%)
    assert abs(hits.mean() - p) < 0.07, hits.mean()


def test_foreground_classes_are_sampled_when_present() -> None:
    s = PatchSampler(MemorySource(), ["b"], [4, 4, 4], 2, oversample_foreground=1.0, seed=0)
    labels = torch.cat([b["label"] for _, b in zip(range(100), s.batches(), strict=False)])
    centre = labels[:, 0, 2, 2, 2]
    assert {1, 2} <= set(centre.tolist())


def test_reproducible_per_seed_and_start() -> None:
    aug = make_augment({"mirror": {}, "rotation": {"p": 0.5}, "noise": {"p": 0.5}}, 3)
    s = PatchSampler(MemorySource(), ["a", "b"], [12, 12, 8], 2, seed=5, augment=aug)
    first = [b for _, b in zip(range(4), s.batches(7, 0), strict=False)]
    resumed = next(s.batches(7, 3))
    for key in ("image", "label"):
        assert torch.equal(first[3][key], resumed[key])
        assert torch.equal(first[0][key], s.batch(7, 0)[key])
    other = next(s.batches(8, 0))
    assert not torch.equal(first[0]["image"], other["image"])
    assert torch.equal(next(s.batches())["image"], s.batch(5, 0)["image"])  # the constructor's seed


def test_sampler_rejects_bad_arguments() -> None:
    src = MemorySource()
    with pytest.raises(InputError, match="does not fit 3D data"):
        PatchSampler(src, ["a"], [8], 2)
    with pytest.raises(InputError, match="oversample_foreground"):
        PatchSampler(src, ["a"], [8, 8, 8], 2, oversample_foreground=1.5)
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        next(PatchSampler(src, ["a"], [8, 8, 8], 2).batches(-1))


def label_volume(nd: int, b: int = 4) -> torch.Tensor:
    shape = (b, 1, *([24] * nd))
    lab = torch.zeros(shape, dtype=torch.int64)
    idx = (slice(None), 0, *(slice(5, 14) for _ in range(nd)))
    lab[idx] = 1
    lab[(slice(None), 0, *(slice(14, 19) for _ in range(nd)))] = 2
    lab[(slice(None), 0, *([slice(3, 8)] + [slice(15, 20)] * (nd - 1)))] = 3
    return lab


@pytest.mark.parametrize("nd", [2, 3])
def test_spatial_augmentation_keeps_image_and_label_aligned(nd: int) -> None:
    lab = label_volume(nd)
    batch = {"image": lab.float(), "label": lab.clone()}
    aug = BatchAugment(
        {"mirror": {"p": 0.5}, "rotation": {"p": 1.0, "degrees": 40}, "scaling": {"p": 1.0}}, nd
    )
    out = aug(batch, torch.Generator().manual_seed(0))
    assert out["label"].shape == lab.shape and out["label"].dtype == torch.int64
    assert not torch.equal(out["label"], lab)  # the batch was really transformed
    # bilinear image vs nearest label: they agree everywhere except at some class boundaries
    agree = (out["image"].round().long() == out["label"]).float().mean().item()
    assert agree > 0.95
    assert set(out["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(batch["label"], lab)  # the input batch is not modified


@pytest.mark.parametrize("nd", [2, 3])
def test_mirror_flips_image_and_label_together(nd: int) -> None:
    lab = label_volume(nd, b=8)
    out = BatchAugment({"mirror": {"p": 0.5}}, nd)(
        {"image": lab.float(), "label": lab}, torch.Generator().manual_seed(1)
    )
    assert torch.equal(out["image"].long(), out["label"])
    assert not torch.equal(out["label"], lab)


def test_intensity_augmentation_changes_only_the_image() -> None:
    torch.manual_seed(0)
    img = torch.randn(6, 2, 16, 16, 16)
    lab = label_volume(3, b=6)[:, :, :16, :16, :16]
    cfg = {k: {"p": 1.0} for k in ("gamma", "noise", "brightness", "contrast")}
    out = BatchAugment(cfg, 3)({"image": img, "label": lab}, torch.Generator().manual_seed(0))
    assert torch.equal(out["label"], lab) and out["image"].shape == img.shape
    assert torch.isfinite(out["image"]).all()
    assert not torch.allclose(out["image"], img)
    again = BatchAugment(cfg, 3)({"image": img, "label": lab}, torch.Generator().manual_seed(0))
    assert torch.equal(again["image"], out["image"])


def test_augmentation_config_errors() -> None:
    with pytest.raises(
        InputError, match=r"augmentation\.rotation\.degres: unknown key\. Did you mean 'degrees'"
    ):
        parse_augmentation({"rotation": {"degres": 10}}, 3)
    with pytest.raises(
        InputError, match=r"augmentation\.mirror\.axes: expected distinct spatial axes in 0\.\.1"
    ):
        parse_augmentation({"mirror": {"axes": [0, 2]}}, 2)
    with pytest.raises(InputError, match=r"gamma\.range: expected \[low, high\]"):
        parse_augmentation({"gamma": {"range": [2, 1]}}, 3)
    assert make_augment({"mirror": {"p": 0.0}}, 3) is None
