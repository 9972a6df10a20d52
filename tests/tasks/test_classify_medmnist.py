"""``medlens bench medmnist``: recognition, the published table, a run on a generated file, the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.tasks.medmnist import PUBLISHED, BenchResult, bench_medmnist, recognise
from medlens.tasks.medmnist_synthetic import synthetic_medmnist

TINY = {"network": {"name": "test_classifier", "width": 8}, "threads": 1, "precision": "fp32", "memory_gb": 4}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pathmnist.npz", ("pathmnist", 28)),
        ("/data/PathMNIST_64.npz", ("pathmnist", 64)),
        ("organmnist3d_64.npz", ("organmnist3d", 64)),
        ("chestmnist_224.npz", ("chestmnist", 224)),
        ("my_scans.npz", (None, None)),
    ],
)
def test_files_are_recognised_by_name(name: str, expected: tuple) -> None:
    assert recognise(name) == expected


def test_the_published_table_is_complete() -> None:
    assert len(PUBLISHED) == 18  # 12 2D and 6 3D datasets
    for name, row in PUBLISHED.items():
        methods = [k for k in row if k not in ("type", "classes")]
        assert len(methods) == 2, name
        # unverified published values are None (printed "n/a"), a whole entry or one value of its pair
        values = [v for m in methods if row[m] is not None for v in row[m] if v is not None]
        assert all(0.4 < v <= 1.0 for v in values), name
        assert row["type"] in ("binary", "multiclass", "multilabel", "ordinal")
    assert PUBLISHED["pathmnist"]["ResNet-18 (28)"] == (0.983, 0.907)
    assert PUBLISHED["chestmnist"]["type"] == "multilabel" and PUBLISHED["retinamnist"]["type"] == "ordinal"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResult, Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    npz = synthetic_medmnist(root / "pneumoniamnist.npz", classification_type="binary", size=16,
                             n_train=96, n_val=32, n_test=64)  # fmt: skip
    result = bench_medmnist(
        npz, budget="1m", measure=False, progress=False, out=root / "run", n_resamples=300,
        overrides={**TINY, "iterations": 60, "batch_size": 16},
    )  # fmt: skip
    return result, root / "run", npz


def test_bench_trains_on_train_and_reports_test_next_to_the_paper(
    bench: tuple[BenchResult, Path, Path],
) -> None:
    result, run, _ = bench
    assert result.dataset == "pneumoniamnist" and result.classification_type == "binary"
    assert result.medmnist_auc > 0.9
    # after 60 steps the probabilities are not calibrated yet: MedMNIST's fixed 0.5 says little, the threshold
    # chosen on val (Youden) classifies well
    assert result.metrics["overall"]["accuracy"]["estimate"] > 0.8
    assert result.metrics["decision"]["threshold"] != 0.5
    assert 0.0 <= result.medmnist_acc <= 1.0
    rows = result.table()
    assert rows[0][0] == "medlens (16)"
    assert rows[1] == ["ResNet-18 (28)", "0.944", "0.854"] and rows[2] == [
        "ResNet-18 (224)",
        "0.956",
        "0.864",
    ]
    m = result.metrics["medmnist"]["auc"]
    assert m["low"] <= result.medmnist_auc <= m["high"] and m["n"] == 64
    saved = json.loads((run / "bench_result.json").read_text())
    assert saved["published_source"].startswith("MedMNIST v2") and saved["seconds"]["train"] > 0


def test_the_bench_run_is_a_run_predict_applies(
    bench: tuple[BenchResult, Path, Path], tmp_path: Path
) -> None:
    from medlens.io.medmnist import read_medmnist_image
    from medlens.serve import load_predictor

    _, run, npz = bench
    labels = np.load(npz)["test_labels"][:, 0]
    pred = load_predictor(run, device="cpu")
    got = [pred.predict(read_medmnist_image(npz, f"test:{i}")).prediction for i in range(12)]
    assert np.mean([g == f"class_{y}" for g, y in zip(got, labels[:12], strict=True)]) > 0.7


def test_an_unknown_multilabel_file_is_benchmarked_without_a_reference(tmp_path: Path) -> None:
    npz = synthetic_medmnist(tmp_path / "scans.npz", classification_type="multilabel", num_classes=3, size=16,
                             n_train=48, n_val=16, n_test=32)  # fmt: skip
    result = bench_medmnist(
        npz, budget="1m", measure=False, progress=False, n_resamples=50,
        overrides={**TINY, "iterations": 20, "batch_size": 16},
    )  # fmt: skip
    assert result.classification_type == "multilabel" and result.published == {}
    assert len(result.table()) == 1 and result.run_dir is None
    assert 0.0 <= result.medmnist_acc <= 1.0


def test_labels_outside_a_known_datasets_classes_name_the_key(tmp_path: Path) -> None:
    from medlens.errors import DatasetError

    path = tmp_path / "breastmnist.npz"
    synthetic_medmnist(
        path, classification_type="multiclass", num_classes=3, size=8, n_train=6, n_val=3, n_test=3
    )
    with pytest.raises(DatasetError, match=r"train_labels\[\d+\] = 2 is outside the 2 declared classes"):
        bench_medmnist(path, budget="5s", measure=False)


def test_bench_command_prints_the_comparison(
    monkeypatch: pytest.MonkeyPatch, bench: Any, capsys: Any
) -> None:
    import medlens.tasks.medmnist as mm
    from medlens.cli import main

    result, _, npz = bench
    calls: dict[str, Any] = {}

    def fake(path: Path, **kwargs: Any) -> BenchResult:
        calls.update(path=path, **kwargs)
        return result

    monkeypatch.setattr(mm, "bench_medmnist", fake)
    monkeypatch.setattr(
        sys, "argv", ["medlens", "bench", "medmnist", "--npz", str(npz), "--budget", "2m", "--size", "28"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "ResNet-18 (224)" in out and "0.956" in out and "MedMNIST v2" in out
    assert calls["budget"] == "2m" and calls["size"] == 28


def test_bench_command_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    from medlens.cli import main

    npz = synthetic_medmnist(
        tmp_path / "dermamnist.npz", size=8, n_train=4, n_val=2, n_test=2, omit=("test_images",)
    )
    monkeypatch.setattr(sys, "argv", ["medlens", "bench", "medmnist", "--npz", str(npz)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "has no 'test_images' array" in err[0]
