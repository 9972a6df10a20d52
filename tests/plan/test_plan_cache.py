"""The preprocessed cache: built once, reused while valid, rebuilt when a file or the plan changes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medlens.data.dataset import load_dataset
from medlens.data.sampler import PatchSampler
from medlens.errors import PlanError
from medlens.io import read_image
from medlens.plan import Cache, build_cache, invert
from medlens.plan import cache as cache_mod
from medlens.plan.plan import freeze

PRE = {"preprocessing": {"target_spacing": [1.0, 1.0, 2.0], "normalization": {"0": {"scheme": "zscore"}}}}


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []
    real = cache_mod._build_one

    def spy(dataset, case_id, pre, stem):  # type: ignore[no-untyped-def]
        built.append(case_id)
        return real(dataset, case_id, pre, stem)

    monkeypatch.setattr(cache_mod, "_build_one", spy)
    return built


def test_build_then_read(make_dataset: Callable[..., Path], tmp_path: Path) -> None:
    root = make_dataset(n=3)
    ds = load_dataset(root)
    cache = build_cache(ds, PRE, tmp_path / "cache")
    assert cache.case_ids == ["case0", "case1", "case2"]
    data, seg = cache.data("case0"), cache.seg("case0")
    assert (
        isinstance(data, np.memmap) and data.dtype == np.float16 and seg is not None and seg.dtype == np.uint8
    )
    assert data.shape[1:] == seg.shape[1:] == cache.shape("case0")
    fg = cache.foreground("case0")
    assert set(fg) == {1, 2}
    for k, locs in fg.items():
        assert len(locs) <= 10_000 and np.all(seg[0][tuple(locs.T)] == k)
    # the stored info maps the cached label back onto the original file's grid
    original = read_image(root / "labelsTr/case0.nii.gz")
    np.testing.assert_array_equal(invert(seg[0], cache.info("case0"), True), original.array[0])
    # nothing half-written: only final files
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    # a sampler reads straight from the cache
    batch = PatchSampler(cache, cache.case_ids, [16, 16, 8], 2, 1.0, seed=0).batch(0, 0)
    assert tuple(batch["image"].shape) == (2, 1, 16, 16, 8) and (batch["label"] > 0).any()


def test_reuse_and_rebuild_on_change(
    make_dataset: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(make_dataset(n=3))
    build_cache(ds, PRE, tmp_path / "cache")
    built = count_builds(monkeypatch)
    build_cache(ds, PRE, tmp_path / "cache")
    assert built == []  # valid: reused
    label = ds.path("labelsTr/case1.nii.gz")
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    build_cache(ds, PRE, tmp_path / "cache")
    assert built == ["case1"]  # only the changed case
    built.clear()
    other = {"preprocessing": {**PRE["preprocessing"], "target_spacing": [2.0, 2.0, 2.0]}}
    cache = build_cache(ds, other, tmp_path / "cache")
    assert sorted(built) == ["case0", "case1", "case2"]  # a new plan invalidates every case
    assert cache.preprocessing["target_spacing"] == [2.0, 2.0, 2.0] and cache.shape("case0") == (8, 7, 8)


def test_interrupted_build_resumes(
    make_dataset: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(make_dataset(n=3))
    real = cache_mod._build_one

    def crash_on_case1(dataset, case_id, pre, stem):  # type: ignore[no-untyped-def]
        if case_id == "case1":
            raise RuntimeError("simulated crash")
        return real(dataset, case_id, pre, stem)

    monkeypatch.setattr(cache_mod, "_build_one", crash_on_case1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(ds, PRE, tmp_path / "cache")
    assert Cache(tmp_path / "cache").case_ids == ["case0"]  # the finished case is usable
    monkeypatch.undo()
    built = count_builds(monkeypatch)
    build_cache(ds, PRE, tmp_path / "cache")
    assert built == ["case1", "case2"]


def test_missing_cache_and_case(make_dataset: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no preprocessed cache here"):
        Cache(tmp_path / "nothing")
    build_cache(load_dataset(make_dataset(n=2)), PRE, tmp_path / "cache", case_ids=["case0"])
    with pytest.raises(PlanError, match=r"cases \['case1'\] are not in the cache"):
        Cache(tmp_path / "cache", ["case0", "case1"])


def test_parallel_workers_build_the_same_cache(make_dataset: Callable[..., Path], tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(n=2))
    serial = build_cache(ds, PRE, tmp_path / "serial")
    parallel = build_cache(ds, freeze(PRE), tmp_path / "parallel", workers=2)  # a resolved (frozen) config
    for cid in serial.case_ids:
        np.testing.assert_array_equal(serial.data(cid), parallel.data(cid))
        assert serial.foreground(cid).keys() == parallel.foreground(cid).keys()
