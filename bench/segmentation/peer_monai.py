"""Peer (c): the MONAI spleen-tutorial loop (``monai_loop.py``), trained and applied as two measured processes."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from _common import Context, PeerFailed, PeerResult, require
from _measure import run_measured

log = logging.getLogger("bench.segmentation")


def write_file_lists(ctx: Context, path: Path) -> None:
    """The tutorial's ``train_files``/``val_files`` dict lists (fold 0), plus the test images."""
    from medlens.data.dataset import load_dataset

    ds = load_dataset(ctx.dataset_dir)

    def entry(cid: str, with_label: bool) -> dict[str, str]:
        case = ds.case(cid)
        d = {"image": str(ds.path(case.image[0])), "case": cid}
        if with_label:
            if not isinstance(case.label, str):
                raise PeerFailed(f"{ds.json_path}: case {cid} has no label map")
            d["label"] = str(ds.path(case.label))
        return d

    files = {
        "train": [entry(c, True) for c in ctx.train_ids],
        "val": [entry(c, True) for c in ctx.val_ids],
        "test": [entry(c, False) for c in ctx.test_ids],
    }
    path.write_text(json.dumps(files, indent=2))


def run(ctx: Context, *, workers: int) -> PeerResult:
    """Train the tutorial loop until ``start + budget``, then predict the test cases."""
    result = PeerResult("monai", "MONAI tutorial loop")
    try:
        _run(ctx, result, workers)
    except PeerFailed as e:
        result.error = str(e)
    return result


def _run(ctx: Context, result: PeerResult, workers: int) -> None:
    work = ctx.peer_dir("monai")
    script = str(Path(__file__).with_name("monai_loop.py"))
    files = work / "files.json"
    write_file_lists(ctx, files)
    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    result.train = require(
        run_measured(
            [
                ctx.python,
                script,
                "train",
                "--files",
                str(files),
                "--out",
                str(model_dir),
                "--deadline",
                f"{time.time() + ctx.budget_s:.3f}",
                "--workers",
                str(workers),
            ],
            log_path=work / "logs" / "train.log",
            timeout=ctx.budget_s * 2 + 900,
        ),
        "MONAI loop training",
    )
    summary = json.loads((model_dir / "train_summary.json").read_text())
    result.extra["trainer"] = {k: v for k, v in summary.items() if k != "history"}
    result.extra["history"] = summary["history"]
    result.iterations = int(summary["iterations"])
    result.train_samples = int(summary["train_samples"])
    result.sample_voxels = int(summary["sample_voxels"])
    result.setup = f"UNet 96x96x96 b2x4, {workers} workers"
    result.notes.append(
        f"MONAI loop: {summary['epochs']} epochs, {summary['iterations']} iterations; best validation Dice "
        f"{summary['best_metric']:.3f} at epoch {summary['best_epoch']}; setup before the first epoch "
        f"{summary['seconds_setup']:.0f} s"
    )
    pred_dir = work / "pred"
    shutil.rmtree(pred_dir, ignore_errors=True)
    result.predict = require(
        run_measured(
            [
                ctx.python,
                script,
                "predict",
                "--files",
                str(files),
                "--model",
                str(model_dir / "best_metric_model.pth"),
                "--out",
                str(pred_dir),
                "--workers",
                str(workers),
            ],
            log_path=work / "logs" / "predict.log",
            timeout=3600,
        ),
        "MONAI loop prediction",
    )
    result.pred_dir = pred_dir
