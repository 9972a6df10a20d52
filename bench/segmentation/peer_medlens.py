"""Peer (a): medlens, through its command line exactly as a user runs it: ``plan``, ``train``, ``predict``."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from _common import Context, PeerFailed, PeerResult, require
from _measure import run_measured

log = logging.getLogger("bench.segmentation")


def run(ctx: Context) -> PeerResult:
    """Plan with the benchmark budget, train fold 0, predict the test images folder."""
    result = PeerResult("medlens", "medlens")
    try:
        _run(ctx, result)
    except PeerFailed as e:
        result.error = str(e)
    return result


def _run(ctx: Context, result: PeerResult) -> None:
    work = ctx.peer_dir("medlens")
    plan_path, run_dir, pred_dir = work / "plan.json", work / "run", work / "pred"
    for stale in (plan_path, run_dir, pred_dir):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    result.prepare["plan"] = require(
        run_measured(
            [ctx.medlens, "plan", str(ctx.dataset_dir), "--budget", ctx.budget_text, "--out", str(plan_path)],
            log_path=work / "logs" / "plan.log",
            timeout=1800,
        ),
        "medlens plan",
    )
    result.train = require(
        run_measured(
            [
                ctx.medlens,
                "train",
                str(ctx.dataset_dir),
                "--plan",
                str(plan_path),
                "--fold",
                "0",
                "--out",
                str(run_dir),
            ],
            log_path=work / "logs" / "train.log",
            timeout=ctx.budget_s * 2 + 1800,
        ),
        "medlens train",
    )
    info = json.loads((run_dir / "run.json").read_text())
    _check_split(ctx, info, run_dir)
    fold = (info.get("fold_results") or {}).get("0") or {}
    from medlens.plan import Plan

    plan = Plan.load(run_dir / "plan.json")
    name = info.get("configuration") or plan.default_configuration
    config: dict[str, Any] = dict(plan.configuration(name))  # resolved: a variant inherits from another
    batch, patch = int(config["batch_size"]), [int(p) for p in config["patch_size"]]
    iterations = fold.get("iterations")
    result.iterations = int(iterations) if iterations is not None else None
    result.train_samples = result.iterations * batch if result.iterations is not None else None
    result.sample_voxels = math.prod(patch)
    result.setup = f"{name} {'x'.join(map(str, patch))} b{batch}"
    result.extra["run"] = {k: info.get(k) for k in ("configuration", "fold_results", "postprocessing")}
    result.extra["plan"] = {k: config.get(k) for k in ("training", "inference", "network", "estimates")}
    result.extra["inference_backend"] = info.get("inference_backend")
    result.notes.append(
        f"medlens: configuration {name}, {iterations} iterations in {fold.get('seconds')} s of fit loop, "
        f"best validation score {fold.get('best_score')}"
    )
    images = _test_images_folder(ctx)
    result.predict = require(
        run_measured(
            [ctx.medlens, "predict", str(run_dir), str(images), "--out", str(pred_dir)],
            log_path=work / "logs" / "predict.log",
            timeout=3600,
        ),
        "medlens predict",
    )
    result.pred_dir = pred_dir


def _check_split(ctx: Context, info: dict[str, Any], run_dir: Path) -> None:
    """The run must have trained on the benchmark's fold 0 (the other peers use the same one)."""
    folds = (info.get("splits") or {}).get("folds") or []
    f0 = next((f for f in folds if f.get("fold") == 0), None)
    if f0 is None:
        raise PeerFailed(f"{run_dir}/run.json records no fold 0 split; cannot check the peers share it")
    if sorted(f0["train"]) != sorted(ctx.train_ids) or sorted(f0["val"]) != sorted(ctx.val_ids):
        raise PeerFailed(
            f"{run_dir}/run.json: medlens trained fold 0 on a different split than make_folds(dataset, 5, "
            f"seed=0) gives the other peers (train {f0['train']} vs {list(ctx.train_ids)})"
        )


def _test_images_folder(ctx: Context) -> Path:
    """A folder holding exactly the test images (the dataset's ``imagesTs``, checked)."""
    from medlens.data.dataset import load_dataset

    ds = load_dataset(ctx.dataset_dir)
    paths = [ds.path(ds.case(c).image[0]) for c in ctx.test_ids]
    folder = paths[0].parent
    listed = sorted(p.name for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if any(p.parent != folder for p in paths) or listed != sorted(p.name for p in paths):
        raise PeerFailed(f"{folder}: does not hold exactly the {len(paths)} test images")
    return folder
