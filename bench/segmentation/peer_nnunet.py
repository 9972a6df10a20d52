"""Peer (b): nnU-Net v2 from PyPI, in its own venv, on CPU, with a fixed wall-clock budget trainer.

Steps (each a measured subprocess):

1. ``venv``: ``WORK/nnunet-venv`` is made once (``python -m venv`` + ``pip install nnunetv2`` with a constraint
   file pinning ``torch==2.13.0``, so pip keeps the CPU build instead of pulling a CUDA one) and then reused.
   Two local patches, in that venv only: PyPI's torchvision beside the CPU torch fails to import
   (``operator torchvision::nms does not exist``) and nnU-Net imports it only through timm in the Primus
   trainers, which its trainer lookup imports; that import is wrapped so the Primus trainers are merely
   unavailable. And the benchmark's trainer (``nnunet_trainer.py``) is copied into nnU-Net's package, the
   only place nnU-Net looks for trainer classes.
2. ``export``: the training cases (fold 0's train + val) go to ``nnUNet_raw/Dataset501_BrainTissue`` in nnU-Net's
   raw format, the test images to its ``imagesTs``; medlens' five folds are written as ``splits_final.json``.
3. ``preprocess``: ``nnUNetv2_plan_and_preprocess`` (default planner), for the configuration used.
4. ``train``: ``nnUNetv2_train 501 CONFIG 0 -tr nnUNetTrainer_MedlensBench -device cpu`` with the deadline
   ``start + budget``.
5. ``predict``: ``nnUNetv2_predict`` on ``imagesTs`` with nnU-Net's default settings (mirroring TTA on, step
   size 0.5, the final checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from _common import Context, PeerFailed, PeerResult, require
from _measure import run_measured

log = logging.getLogger("bench.segmentation")

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_BrainTissue"
TRAINER = "nnUNetTrainer_MedlensBench"
TORCH_PIN = "torch==2.13.0"
_PRIMUS = "nnunetv2/training/nnUNetTrainer/primus/primus_trainers.py"
_PRIMUS_IMPORT = (
    "from dynamic_network_architectures.architectures.primus import Primus, PrimusV2B, PrimusV2L, "
    "PrimusV2M, PrimusV2S"
)
_PATCH_MARK = "# medlens-bench patch"


def ensure_venv(venv: Path, package: str, timeout: float, result: PeerResult) -> Path:
    """Build (or reuse) the nnU-Net venv; return its ``bin`` folder."""
    bin_dir = venv / "bin"
    marker = venv / "medlens-bench.json"
    if marker.is_file() and json.loads(marker.read_text()).get("package") == package:
        log.info("reusing the nnU-Net venv %s", venv)
    else:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        constraints = venv.parent / "nnunet-constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        logs = venv.parent / "nnunet-venv-logs"
        result.prepare["venv"] = require(
            run_measured([sys.executable, "-m", "venv", str(venv)], log_path=logs / "venv.log", timeout=300),
            "creating the nnU-Net venv",
        )
        m = run_measured(
            [str(bin_dir / "pip"), "install", "-c", str(constraints), package, "psutil"],
            log_path=logs / "pip.log",
            timeout=timeout,
        )
        result.prepare["pip"] = require(m, "pip install nnunetv2")
    _check_torch(bin_dir)
    _patch_primus(venv)
    _install_trainer(venv)
    _check_imports(bin_dir)
    versions = _versions(bin_dir)
    marker.write_text(json.dumps({"package": package, **versions}, indent=2))
    result.extra["versions"] = versions
    return bin_dir


def _site_packages(venv: Path) -> Path:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    if not found:
        raise PeerFailed(f"{venv}: no site-packages; delete the folder and rerun to rebuild the venv")
    return found[0]


def _check_torch(bin_dir: Path) -> None:
    import subprocess

    out = subprocess.run(
        [str(bin_dir / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    version = out.stdout.strip()
    if out.returncode != 0 or not version.startswith(TORCH_PIN.split("==")[1]) or "+cpu" not in version:
        raise PeerFailed(
            f"{bin_dir.parent}: torch is {version or 'not importable'}, expected {TORCH_PIN}+cpu; "
            "delete the venv and rerun (the constraint file keeps pip from pulling a CUDA build)"
        )


def _patch_primus(venv: Path) -> None:
    """Make the Primus trainers' imports optional (idempotent; the file is nnU-Net's, in the bench venv)."""
    path = _site_packages(venv) / _PRIMUS
    original = text = path.read_text()
    if _PATCH_MARK not in text:
        if _PRIMUS_IMPORT not in text:
            raise PeerFailed(
                f"{path}: the Primus import changed in this nnU-Net version; update peer_nnunet.py"
            )
        names = _PRIMUS_IMPORT.split(" import ", 1)[1]
        patched = (
            f"try:  {_PATCH_MARK}: PyPI torchvision fails beside the CPU torch; Primus needs it via timm\n"
            f"    {_PRIMUS_IMPORT}\n"
            "except (ImportError, RuntimeError):\n"
            f"    {' = '.join(n.strip() for n in names.split(','))} = None\n"
        )
        text = text.replace(_PRIMUS_IMPORT + "\n", patched, 1)
    # the optional PrimusV3 import below it fails the same way, with a RuntimeError
    text = text.replace("except ImportError:\n", "except (ImportError, RuntimeError):\n")
    if text != original:
        path.write_text(text)


def _check_imports(bin_dir: Path) -> None:
    """nnU-Net's trainer lookup imports every trainer module: the Primus one must now import cleanly."""
    import subprocess

    module = _PRIMUS.removesuffix(".py").replace("/", ".")
    out = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            f"import {module}; import nnunetv2.training.nnUNetTrainer.variants.benchmarking.{TRAINER}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise PeerFailed(
            f"{bin_dir.parent}: nnU-Net's trainers do not import after patching:\n{out.stderr[-3000:]}"
        )


def _install_trainer(venv: Path) -> None:
    dest = _site_packages(venv) / "nnunetv2/training/nnUNetTrainer/variants/benchmarking" / f"{TRAINER}.py"
    shutil.copyfile(Path(__file__).with_name("nnunet_trainer.py"), dest)


def _versions(bin_dir: Path) -> dict[str, str]:
    import subprocess

    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in ('nnunetv2', 'torch', 'dynamic_network_architectures', "
        "'batchgeneratorsv2')}))"
    )
    out = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise PeerFailed(f"{bin_dir}: cannot read package versions:\n{out.stderr[-2000:]}")
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def export_raw(ctx: Context, raw: Path, preprocessed: Path) -> Path:
    """Write the dataset in nnU-Net's raw format and medlens' folds as ``splits_final.json``."""
    from medlens.data.dataset import load_dataset

    ds = load_dataset(ctx.dataset_dir)
    folder = raw / DATASET_NAME
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    training = [*ctx.train_ids, *ctx.val_ids]
    for cid in training:
        case = ds.case(cid)
        if len(case.image) != 1 or not isinstance(case.label, str):
            raise PeerFailed(f"{ds.json_path}: case {cid} is not a one-channel image with a label map")
        shutil.copyfile(ds.path(case.image[0]), folder / "imagesTr" / f"{cid}_0000.nii.gz")
        shutil.copyfile(ds.path(case.label), folder / "labelsTr" / f"{cid}.nii.gz")
    for cid in ctx.test_ids:
        shutil.copyfile(ds.path(ds.case(cid).image[0]), folder / "imagesTs" / f"{cid}_0000.nii.gz")
    dataset_json = {
        "channel_names": {str(k): v for k, v in sorted(ds.channels.items())},
        "labels": dict(sorted(ds.labels.items(), key=lambda kv: kv[1])),
        "numTraining": len(training),
        "file_ending": ".nii.gz",
        "name": ds.name,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    pre = preprocessed / DATASET_NAME
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "splits_final.json").write_text(json.dumps(ctx.folds, indent=2))
    return folder


def run(
    ctx: Context,
    *,
    configuration: str,
    iters_per_epoch: int,
    val_iters: int,
    package: str,
    venv: Path,
) -> PeerResult:
    """Run the nnU-Net peer end to end (see the module docstring)."""
    result = PeerResult("nnunet", "nnU-Net v2")
    try:
        _run(ctx, result, configuration, iters_per_epoch, val_iters, package, venv)
    except PeerFailed as e:
        result.error = str(e)
    return result


def _run(
    ctx: Context,
    result: PeerResult,
    configuration: str,
    iters_per_epoch: int,
    val_iters: int,
    package: str,
    venv: Path,
) -> None:
    bin_dir = ensure_venv(venv, package, timeout=1800, result=result)
    work = ctx.peer_dir("nnunet")
    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    shutil.rmtree(pre, ignore_errors=True)
    shutil.rmtree(res, ignore_errors=True)
    raw_folder = export_raw(ctx, raw, pre)
    env = {
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "MPLBACKEND": "Agg",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
    }
    result.prepare["preprocess"] = require(
        run_measured(
            [
                str(bin_dir / "nnUNetv2_plan_and_preprocess"),
                "-d",
                str(DATASET_ID),
                "-c",
                configuration,
                "--verify_dataset_integrity",
                "-npfp",
                "2",
                "-np",
                "2",
            ],
            log_path=work / "logs" / "plan_and_preprocess.log",
            timeout=1800,
            env=env,
        ),
        "nnUNetv2_plan_and_preprocess",
    )
    plans = json.loads((pre / DATASET_NAME / "nnUNetPlans.json").read_text())
    planned = sorted(plans["configurations"])
    result.extra["planned_configurations"] = planned
    conf = plans["configurations"][configuration]
    result.extra["plan"] = {
        k: conf.get(k) for k in ("patch_size", "batch_size", "spacing", "normalization_schemes")
    }
    summary_path = work / "trainer_summary.json"
    summary_path.unlink(missing_ok=True)
    train_env = {
        **env,
        "BENCH_DEADLINE": f"{time.time() + ctx.budget_s:.3f}",
        "BENCH_ITERS_PER_EPOCH": str(iters_per_epoch),
        "BENCH_VAL_ITERS": str(val_iters),
        "BENCH_SUMMARY": str(summary_path),
    }
    result.train = require(
        run_measured(
            [
                str(bin_dir / "nnUNetv2_train"),
                str(DATASET_ID),
                configuration,
                "0",
                "-tr",
                TRAINER,
                "-device",
                "cpu",
            ],
            log_path=work / "logs" / "train.log",
            timeout=ctx.budget_s * 2 + 1800,
            env=train_env,
        ),
        "nnUNetv2_train",
    )
    summary = json.loads(summary_path.read_text())
    result.extra["trainer"] = summary
    result.iterations = int(summary["train_iterations"])
    result.train_samples = result.iterations * int(summary["batch_size"])
    patch = [int(p) for p in summary["patch_size"]]
    result.sample_voxels = math.prod(patch)
    result.setup = f"{configuration} {'x'.join(map(str, patch))} b{summary['batch_size']}"
    result.notes.append(
        f"nnU-Net planned {', '.join(planned)}; ran {configuration} for {summary['epochs']} epoch(s) of "
        f"{iters_per_epoch} iterations (+{val_iters} pseudo-Dice iteration(s) each), "
        f"{summary['train_iterations']} iterations in all; setup before the first epoch "
        f"{summary['seconds_setup']:.0f} s"
    )
    pred_dir = work / "pred"
    shutil.rmtree(pred_dir, ignore_errors=True)
    result.predict = require(
        run_measured(
            [
                str(bin_dir / "nnUNetv2_predict"),
                "-i",
                str(raw_folder / "imagesTs"),
                "-o",
                str(pred_dir),
                "-d",
                str(DATASET_ID),
                "-c",
                configuration,
                "-f",
                "0",
                "-tr",
                TRAINER,
                "-device",
                "cpu",
            ],
            log_path=work / "logs" / "predict.log",
            timeout=3600,
            env=env,
        ),
        "nnUNetv2_predict",
    )
    result.pred_dir = pred_dir
