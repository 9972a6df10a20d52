"""``medlens evaluate``: one pass over the held-out cases gives every piece of evidence, consistent with itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate.run_eval import evaluate_run


def load(path: Any) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def test_segmentation_evaluation_has_every_section(seg_evaluated: Any) -> None:
    ds, _, path = seg_evaluated
    ev = load(path)
    assert ev["task"] == "segmentation" and ev["n_cases"] == len(ds.test) == 6
    # the headline mean Dice is the mean of the per-case Dice the table shows
    per_case = [np.mean([m["dice"] for m in rec["metrics"].values()]) for rec in ev["per_case"]]
    assert ev["metrics"]["foreground_mean"]["dice"]["mean"] == pytest.approx(np.mean(per_case), abs=1e-6)
    assert [c["performance"] for c in ev["cases"]] == pytest.approx(per_case, abs=1e-5)
    assert np.mean(per_case) > 0.5  # the tiny run learnt the blobs
    # calibration at voxel level, with the binning stated
    before = ev["calibration"]["before"]
    assert ev["calibration"]["kind"] == "voxel" and 0.0 <= before["ece"] <= 1.0 and before["n_bins"] > 0
    # subgroups: 6 cases in 3 sites / 2 sexes are all below the minimum size: no gap is claimed
    cols = ev["subgroups"]["columns"]
    assert {"site", "sex", "age"} <= set(cols)
    assert all(g["too_small"] for g in cols["site"]["groups"]) and cols["site"]["gap"] is None
    # shift: every test site was seen in training
    assert ev["shift"]["held_out_sites"] == [] and set(ev["shift"]["evaluated_sites"]) <= {"A", "B", "C"}
    # uncertainty per case and the deferral curve
    assert set(ev["uncertainty"]["scores"]) == {c.id for c in ds.test}
    assert ev["uncertainty"]["curve"]["auc"] is not None
    # robustness: every perturbation has a curve starting at the clean value
    curves = ev["robustness"]["curves"]
    assert {"noise", "blur", "contrast", "bias_field", "fgsm", "pgd"} <= set(curves)
    # explanations: every method has its sanity check; pictures hold the explained slices
    assert set(ev["explanations"]["sanity"]) == set(ev["explanations"]["methods"])
    pictures = np.load(Path(path).parent / "pictures.npz")
    for case in ev["explanations"]["cases"]:
        for m in case["methods"]:
            assert pictures[f"{case['id']}/explain/{m}"].ndim == 2
    for cid in ev["worst_cases"]:
        assert pictures[f"{cid}/image"].shape == pictures[f"{cid}/pred"].shape


def test_classification_evaluation_calibrates_and_compares_groups(cls_evaluated: Any) -> None:
    ds, _, path = cls_evaluated
    ev = load(path)
    assert ev["n_cases"] == len(ds.test) == 48
    assert ev["metrics"]["overall"]["auc"]["estimate"] > 0.75
    cal = ev["calibration"]
    assert cal["kind"] == "classification" and cal["temperature"] > 0
    assert cal["after"]["ece"] is not None and cal["n_validation"] > 0
    # sex splits the 48 cases in two groups of 24: a gap with a CI is reported
    sex = ev["subgroups"]["columns"]["sex"]
    assert {g["group"] for g in sex["groups"]} == {"F", "M"}
    low, high = sex["gap"]["ci"]
    assert low <= sex["gap"]["estimate"] <= high
    # correctness per case agrees with the stored threshold and the scores
    t = ev["threshold"]
    correct = [int((s[1] >= t) == y) for s, y in zip(ev["scores"], ev["targets"], strict=True)]
    assert [c["performance"] for c in ev["cases"]] == correct


def test_evaluate_refuses_a_dataset_of_another_task(seg_run: Any, cls_run: Any, tmp_path: Path) -> None:
    seg_ds, seg_dir = seg_run
    cls_ds, cls_dir = cls_run
    with pytest.raises(InputError, match=r"classification dataset.*segmentation model"):
        evaluate_run(seg_dir, cls_ds.root, tmp_path / "a")
    with pytest.raises(InputError, match=r"segmentation dataset.*classification model"):
        evaluate_run(cls_dir, seg_ds.root, tmp_path / "b")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_evaluate_refuses_other_classes_and_channels(seg_run: Any, tmp_path: Path) -> None:
    from medlens.data.dataset import load_dataset

    ds, run = seg_run
    for change, pattern in (
        (lambda d: d.labels.update({"cube": 2}), "has classes"),
        (lambda d: d.channels.update({1: "T2"}), "channel"),
    ):
        copy = load_dataset(ds.root)
        change(copy)
        copy.root = tmp_path / pattern.replace(" ", "_")
        copy.root.mkdir()
        for sub in ("imagesTr", "labelsTr"):
            (copy.root / sub).symlink_to(ds.root / sub)
        copy.save()
        with pytest.raises(InputError, match=pattern):
            evaluate_run(run, copy.root, tmp_path / "out")


def test_unknown_split_is_named(seg_run: Any, tmp_path: Path) -> None:
    ds, run = seg_run
    with pytest.raises(InputError, match="split"):
        evaluate_run(run, ds.root, tmp_path / "x", split="training")


def test_shift_names_a_site_never_seen_in_training() -> None:
    """A constructed run: sites A and B trained, the test cases come from A and from a new site C."""
    from types import SimpleNamespace

    from medlens.evaluate.evidence import shift
    from medlens.evaluate.run_eval import Collected

    training = [SimpleNamespace(id=f"t{i}", site="AB"[i % 2]) for i in range(8)]
    info = {"folds": [0], "splits": {"folds": [{"train": [c.id for c in training], "val": []}]}}
    sites = ["A"] * 6 + ["C"] * 6
    perf = np.array([0.9, 0.85, 0.88, 0.92, 0.87, 0.9, 0.6, 0.55, 0.62, 0.58, 0.65, 0.6])
    got = Collected(
        task="segmentation", ids=[f"c{i}" for i in range(12)], sites=sites, meta=[{}] * 12,  # type: ignore[arg-type]
        performance=perf, uncertainty=None, uncertainty_info={},
    )  # fmt: skip
    result = shift(info, SimpleNamespace(training=training), got, seed=0)
    assert result["training_sites"] == ["A", "B"] and result["held_out_sites"] == ["C"]
    held, seen = result["held_out"], result["seen"]
    assert held["n"] == seen["n"] == 6 and held["estimate"] == pytest.approx(perf[6:].mean())
    assert held["ci"][0] <= held["estimate"] <= held["ci"][1]
    assert seen["estimate"] == pytest.approx(perf[:6].mean())
    assert result["gap"]["excludes_zero"]  # 0.88 vs 0.60 on 6 cases each, tight spreads
    by_site = {g["group"]: g for g in result["per_site"]["groups"]}
    assert by_site["C"]["estimate"] == pytest.approx(perf[6:].mean())
