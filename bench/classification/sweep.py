"""Measure classifier recipes on brain-lesion 2D over several seeds (the evidence behind the planner's rules).

Uses the arrays and plan that ``bench/classification/run.py`` prepared in ``WORK`` (same patient-level fold 0,
same 90 held-out test slices). Each candidate is the plan's configuration with a few keys changed
(``CANDIDATES``), trained by :func:`medlens.tasks.classify_train.fit` (the engine) for a wall-clock budget, once
per training seed, each run in its own process (``--jobs`` at a time, one torch thread each).

Besides the test AUC of the weights the run keeps, every validation also scores the test slices (logged only, never
used for selection), so one run shows what other checkpoint rules would have given: the best raw validation
AUC, the best mean of the last 3 validations, and the last weights.

Usage (repository root; after ``run.py`` has prepared WORK)::

    .venv/bin/python bench/classification/sweep.py --work bench/_work/classification --budget 90 \\
        --seeds 0 1 2 --jobs 2 --candidates base strong_aug ...

Results: ``WORK/sweep/<candidate>_s<seed>.json`` and a summary table on stdout (``--summary`` reprints it).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NAMES = ["no lesion", "lesion"]

STRONG_AUG: dict[str, Any] = {
    "mirror": {"p": 0.5, "axes": [0]},
    "rotation": {"p": 0.5, "degrees": 20.0},
    "scaling": {"p": 0.5, "range": [0.8, 1.2]},
    "gamma": {"p": 0.3},
    "noise": {"p": 0.2, "std": [0.0, 0.1]},
    "brightness": {"p": 0.3},
    "contrast": {"p": 0.3},
}

#: name -> changes to the configuration (deep-merged); "_size" resizes the arrays (a different input size).
CANDIDATES: dict[str, dict[str, Any]] = {
    "base": {},
    "strong_aug": {"augmentation": STRONG_AUG},
    "wd05": {"training": {"optimizer": {"weight_decay": 0.05}}},
    "ls01": {"loss": {"label_smoothing": 0.1}},
    "mixup": {"augmentation": {"mixup": {"p": 0.5, "alpha": 0.4}}},
    "lr3e-4": {"training": {"optimizer": {"lr": 3e-4}}},
    "width0125": {"network": {"widen_factor": 0.125}, "_speed": 1.54},
    "width05": {"network": {"widen_factor": 0.5}, "_speed": 0.43},
    "combo": {
        "augmentation": {**STRONG_AUG, "mixup": {"p": 0.5, "alpha": 0.4}},
        "training": {"optimizer": {"weight_decay": 0.05}},
        "loss": {"label_smoothing": 0.1},
    },
    "aug_wd": {"augmentation": STRONG_AUG, "training": {"optimizer": {"weight_decay": 0.05}}},
    "aug_mixup": {"augmentation": {**STRONG_AUG, "mixup": {"p": 0.5, "alpha": 0.4}}},
    "aug_mixup_wd": {
        "augmentation": {**STRONG_AUG, "mixup": {"p": 0.5, "alpha": 0.4}},
        "training": {"optimizer": {"weight_decay": 0.05}},
    },
    "mixup_wd": {
        "augmentation": {"mixup": {"p": 0.5, "alpha": 0.4}},
        "training": {"optimizer": {"weight_decay": 0.05}},
    },
    # mixup + weight decay with the final weights kept (the "last weights" column of "mixup" is what the new
    # rules plan for this budget: mixup, final weights kept)
    "mixup_wd_last": {
        "_selection": "last",
        "augmentation": {"mixup": {"p": 0.5, "alpha": 0.4}},
        "training": {"optimizer": {"weight_decay": 0.05}},
    },
    "size64": {
        "_size": 64,
        "_speed": 2.9,
        "network": {"conv1_kernel": 3, "conv1_stride": 2, "no_max_pool": False},
    },
}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = (
            merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def run_one(
    work: Path, name: str, seed: int, budget: float, steps_per_second: float | None
) -> dict[str, Any]:
    """One candidate, one seed, in this process."""
    import torch
    from sklearn.metrics import roc_auc_score

    import medlens.tasks.classify as classify
    from medlens.plan.plan import Plan, thaw
    from medlens.tasks.classify import predict_scores
    from medlens.tasks.classify_data import resize_batch
    from medlens.tasks.classify_train import fit

    torch.set_num_threads(1)
    config = thaw(Plan.load(work / "plan.json").configuration())
    change = dict(CANDIDATES[name])
    size = change.pop("_size", None)
    selection = change.pop("_selection", None)
    speed = float(change.pop("_speed", 1.0))  # step-cost ratio to the base network, so the same budget
    config = merge(config, change)
    with np.load(work / "arrays.npz") as z:
        a = {k: z[k] for k in z.files}
    if size is not None:
        for k in ("images", "test_x"):
            a[k] = resize_batch(torch.from_numpy(a[k].astype(np.float32)), [size, size]).numpy()
        config["patch_size"] = [size, size]
    if selection is not None:
        config.setdefault("validation", {})["selection"] = selection
    tr = config["training"]
    tr.update(seed=seed, time_limit_seconds=float(budget), threads=1)
    if steps_per_second:  # the iterations a plan for this budget would set (85% of it for training)
        tr["iterations"] = int(0.85 * budget * steps_per_second * speed)
    tr["val_every"] = tr["checkpoint_every"] = max(1, tr["iterations"] // 20)
    tr["schedule"]["warmup_iterations"] = min(
        tr["schedule"].get("warmup_iterations", 0), tr["iterations"] // 20
    )
    trace: list[dict[str, float]] = []
    base_validate = classify.ClassificationTask.validate

    def validate(self: Any, model: Any) -> dict[str, float]:
        out = base_validate(self, model)
        s = predict_scores(model, a["test_x"], None, "binary", self.loss_fn.name, 128)
        trace.append({"val_auc": out["auc"], "test_auc": float(roc_auc_score(a["test_y"], s[:, 1]))})
        return out

    classify.ClassificationTask.validate = validate  # type: ignore[method-assign]
    run_dir = work / "sweep" / f"{name}_s{seed}"
    t0 = time.perf_counter()
    res = fit(
        a["images"], a["y"], a["train_rows"], a["val_rows"], config, ctype="binary", class_names=NAMES,
        run_dir=run_dir, progress=False, device="cpu",
    )  # fmt: skip
    s = predict_scores(res.model, a["test_x"], None, "binary", str(config["loss"]["name"]), 128)
    s_tta = predict_scores(
        res.model, a["test_x"], None, "binary", str(config["loss"]["name"]), 128, mirror_axes=[0]
    )
    train_loss = [h["loss"] for h in res.history.get("train", [])]
    return {
        "candidate": name,
        "seed": seed,
        "test_auc": float(roc_auc_score(a["test_y"], s[:, 1])),
        "test_auc_tta": float(roc_auc_score(a["test_y"], s_tta[:, 1])),
        "best_val": res.trained.best_score,
        "iterations": res.trained.iterations,
        "planned_iterations": tr["iterations"],
        "seconds": res.trained.seconds,
        "wall": time.perf_counter() - t0,
        "final_train_loss": float(np.mean(train_loss[-5:])) if train_loss else None,
        "trace": trace,
    }


def selections(trace: list[dict[str, float]]) -> dict[str, float]:
    """Test AUC of the checkpoint each rule would keep (first maximum, as the engine)."""
    val = [t["val_auc"] for t in trace]
    test = [t["test_auc"] for t in trace]
    sm3 = [float(np.mean(val[max(0, i - 2) : i + 1])) for i in range(len(val))]
    return {
        "best_val": test[int(np.argmax(val))],
        "smooth3": test[int(np.argmax(sm3))],
        "last": test[-1],
    }


def summary(work: Path, names: list[str] | None) -> str:
    rows = []
    results: dict[str, list[dict[str, Any]]] = {}
    for f in sorted((work / "sweep").glob("*_s*.json")):
        r = json.loads(f.read_text())
        results.setdefault(r["candidate"], []).append(r)
    order = names or list(results)
    rows.append(
        "| candidate | test AUC kept, per seed | mean | range | +flip TTA mean | best-val / smooth3 / last (means) "
        "| last weights, per seed | iterations | final train loss |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for n in order:
        rs = sorted(results.get(n, []), key=lambda r: r["seed"])
        if not rs:
            continue
        auc = [r["test_auc"] for r in rs]
        sel = [selections(r["trace"]) for r in rs if r["trace"]]
        m = {k: np.mean([s[k] for s in sel]) for k in ("best_val", "smooth3", "last")} if sel else {}
        rows.append(
            f"| {n} | {' / '.join(f'{v:.3f}' for v in auc)} | {np.mean(auc):.3f} | {min(auc):.3f}-{max(auc):.3f} "
            f"| {np.mean([r['test_auc_tta'] for r in rs]):.3f} "
            f"| {m.get('best_val', float('nan')):.3f} / {m.get('smooth3', float('nan')):.3f} / "
            f"{m.get('last', float('nan')):.3f} | {' / '.join(format(x['last'], '.3f') for x in sel)} "
            f"| {np.mean([r['iterations'] for r in rs]):.0f} "
            f"| {np.mean([r['final_train_loss'] or np.nan for r in rs]):.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench/_work/classification")
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--steps-per-second", type=float, default=None, help="set iterations for the budget")
    p.add_argument("--summary", action="store_true", help="only print the table of what is in WORK/sweep")
    p.add_argument("--one", nargs=2, metavar=("CANDIDATE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.summary:
        print(summary(work, args.candidates if "--candidates" in sys.argv else None))
        return
    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING)
        out = run_one(work, args.one[0], int(args.one[1]), args.budget, args.steps_per_second)
        path = work / "sweep" / f"{args.one[0]}_s{args.one[1]}.json"
        path.write_text(json.dumps(out, indent=1))
        print(
            f"{args.one[0]} seed {args.one[1]}: test AUC {out['test_auc']:.3f} in {out['wall']:.0f} s",
            flush=True,
        )
        return
    (work / "sweep").mkdir(parents=True, exist_ok=True)
    queue = [(n, s) for n in args.candidates for s in args.seeds]
    running: list[subprocess.Popen[bytes]] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            n, s = queue.pop(0)
            cmd = [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--budget",
                str(args.budget),
                "--one",
                n,
                str(s),
            ]
            if args.steps_per_second:
                cmd += ["--steps-per-second", str(args.steps_per_second)]
            running.append(subprocess.Popen(cmd))
        time.sleep(1.0)
        running = [r for r in running if r.poll() is None]
    print(summary(work, args.candidates))


if __name__ == "__main__":
    main()
