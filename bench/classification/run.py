"""Benchmark (not CI): medlens vs the MedMNIST reference recipe on brain-lesion 2D, at the same CPU budget.

Both methods get the same data in one run: the brain-lesion sample (2D axial slices, lesion or not), preprocessed
once by medlens's plan (input size, per-image z-score), the same patient-level fold 0 (train / validation) and
the same held-out test slices; both train for the same wall-clock budget on the same cores and threads.

* medlens: the planner's network, loss, augmentation, precision, schedule, batch size and model selection for the
  budget, trained by :func:`medlens.tasks.classify_train.fit` (the engine).
* medlens (previous rules): the same plan without the small-data rules (:func:`previous_rules`), an ablation.
* reference: the MedMNIST v2 recipe (Yang et al. 2023): cross-entropy, Adam lr 1e-3, batch 128, no
  augmentation, fp32, learning rate x0.1 at 50% and 75% of training (of the time budget here, since training is
  bounded by time), validated every epoch, best validation AUC kept; in its two published forms (MONAI's
  ResNet-18, no torchvision here): "ResNet-18 (28)", images resized to 28^2 and the CIFAR-style stem (3x3
  stride 1, no max-pool), and "ResNet-18 (224)", the standard ImageNet stem (7x7/2 + max-pool) at full
  resolution (here medlens's planned input size, not 224).

Each method trains in its own process, so its peak RAM (``ru_maxrss``) is its own. Test metrics follow
MedMNIST's definitions (AUC of the positive score; ACC at score > 0.5), with bootstrap 95% CIs.

Usage (from the repository root)::

    .venv/bin/python bench/classification/run.py --budget 3m --work bench/_work/classification --seeds 0 1 2

``--seeds`` repeats every method with each training seed (the data, its fold and the plan stay the same: the
plan is made once, before the first seed), then reports each method's test AUC per seed, mean and range. The
tables are printed and saved as ``WORK/results.json``; record them in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.classification")
NAMES = ["no lesion", "lesion"]


# ---- shared data -------------------------------------------------------------------------------------------
def prepare(
    work: Path, budget: str, subjects: int | None, seed: int, threads: int | None = None
) -> dict[str, Any]:
    """Build (or reuse) brain-lesion 2D, plan medlens for the budget, save both methods' arrays in ``work``."""
    from medlens.data.dataset import load_dataset, read_case_image
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.data.samples import build_sample
    from medlens.data.splits import make_folds
    from medlens.plan.planner import make_plan
    from medlens.tasks.classify import targets
    from medlens.tasks.classify_data import dataset_images, prepare_image

    data_dir = work / "brain-lesion"
    if (data_dir / "dataset.json").is_file():
        dataset = load_dataset(data_dir)
    else:
        dataset = build_sample("brain-lesion", data_dir, subjects=subjects, seed=seed)
    t0 = time.perf_counter()
    overrides = {"threads": threads} if threads else None
    plan = make_plan(compute_fingerprint(dataset), task="classification", budget=budget, overrides=overrides)
    plan_seconds = time.perf_counter() - t0
    plan.save(work / "plan.json")
    config = plan.configuration()
    cases = sorted((c for c in dataset.training if c.split != "test"), key=lambda c: c.id)
    images = dataset_images(dataset, cases, config, work / "cache")
    fold = make_folds(dataset, n_folds=5, seed=int(config["training"].get("seed", 0)))[0]
    row = {c.id: i for i, c in enumerate(cases)}
    test_x = np.stack([prepare_image(read_case_image(dataset, c), config) for c in dataset.test])
    np.savez(
        work / "arrays.npz",
        images=images,
        y=targets(dataset, cases),
        train_rows=np.array([row[c] for c in fold.train]),
        val_rows=np.array([row[c] for c in fold.val]),
        test_x=test_x,
        test_y=targets(dataset, dataset.test),
    )
    return {
        "plan_reasons": plan.reasons,
        "plan_seconds": round(plan_seconds, 1),
        "threads": config["training"].get("threads"),
        "n_train": len(fold.train),
        "n_val": len(fold.val),
        "n_test": len(dataset.test),
        "input_size": list(config["patch_size"]),
    }


def _load(work: Path) -> dict[str, np.ndarray]:
    with np.load(work / "arrays.npz") as z:
        return {k: z[k] for k in z.files}


def _test_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    from medlens.evaluate.classification import classification_metrics, medmnist_acc, medmnist_auc

    m = classification_metrics(y, scores, classification_type="binary", class_names=NAMES, n_resamples=2000)
    return {
        "auc": medmnist_auc(y, scores, "binary-class"),
        "acc": medmnist_acc(y, scores, "binary-class"),
        "auc_ci": [m["overall"]["auc"]["low"], m["overall"]["auc"]["high"]],
        "acc_ci": [m["medmnist"]["acc"]["low"], m["medmnist"]["acc"]["high"]],
    }


def _peak_ram_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- the two methods (each in its own process) ---------------------------------------------------------------
def previous_rules(config: dict[str, Any]) -> dict[str, Any]:
    """The same plan with the rules it had before the small-data rules (issue 4, 2026-11-22): best validation AUC
    kept, no label smoothing or mixup, weight decay 1e-4, the modality's plain augmentation (MR's here). The
    network, batch, iterations and runtime stay as planned, so only those rules differ."""
    config["validation"]["selection"] = "best"
    config["loss"].pop("label_smoothing", None)
    config["training"]["optimizer"]["weight_decay"] = 1e-4
    aug = config["augmentation"]
    aug.pop("mixup", None)
    aug["rotation"].update(p=0.2, degrees=15.0)
    aug["scaling"].update(p=0.2, range=[0.85, 1.15])
    aug["noise"].update(p=0.1, std=[0.0, 0.05])
    for k in ("brightness", "contrast"):
        aug[k].update(p=0.15, range=[0.8, 1.2])
    return config


def run_medlens(work: Path, seed: int, previous: bool = False) -> dict[str, Any]:
    """medlens as planned (training seed ``seed``): the engine trains and keeps the planned checkpoint;
    ``previous``: with :func:`previous_rules`."""
    from medlens.plan.plan import Plan, thaw
    from medlens.tasks.classify import predict_scores
    from medlens.tasks.classify_train import fit

    config = thaw(Plan.load(work / "plan.json").configuration())
    config["training"]["seed"] = int(seed)
    if previous:
        config = previous_rules(config)
    a = _load(work)
    shutil.rmtree(work / "medlens_run", ignore_errors=True)  # the previous benchmark's run
    res = fit(
        a["images"], a["y"], a["train_rows"], a["val_rows"], config, ctype="binary", class_names=NAMES,
        run_dir=work / "medlens_run", progress=False,
    )  # fmt: skip
    scores = predict_scores(
        res.model, a["test_x"], None, "binary", str(config["loss"]["name"]), 2 * int(config["batch_size"])
    )
    seen = res.trained.iterations * int(config["batch_size"])
    return {
        "method": "medlens (previous rules)" if previous else "medlens",
        "seed": int(seed),
        "network": f"{config['network']['name']} x{config['network'].get('widen_factor', 1)}",
        "train_seconds": res.trained.seconds,
        "iterations": res.trained.iterations,
        "batch_size": int(config["batch_size"]),
        "images_per_second": seen / max(res.trained.seconds, 1e-9),
        "best_val_auc": res.trained.best_score,
        **_test_metrics(a["test_y"], scores),
    }


def run_reference(
    work: Path, budget_seconds: float, threads: int | None, seed: int, size: int | None
) -> dict[str, Any]:
    """The MedMNIST recipe within ``budget_seconds`` of training (validation included, as for medlens).

    ``size`` 28: ResNet-18 (28) on images resized to 28^2; None: ResNet-18 (224) at the arrays' own size.
    """
    import copy

    import torch
    from monai.networks.nets import resnet18
    from sklearn.metrics import roc_auc_score

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    a = _load(work)
    x = torch.from_numpy(a["images"]).float()
    test_x = torch.from_numpy(a["test_x"]).float()
    if size is not None:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        test_x = torch.nn.functional.interpolate(test_x, size=(size, size), mode="area")
    y = torch.from_numpy(a["y"]).long()
    tr, va = a["train_rows"], a["val_rows"]
    model = resnet18(
        spatial_dims=2, n_input_channels=x.shape[1], num_classes=2, conv1_t_size=3 if size else 7,
        conv1_t_stride=1 if size else 2, no_max_pool=bool(size),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)

    def scores_of(inputs: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = [torch.softmax(model(inputs[i : i + 256]), 1) for i in range(0, len(inputs), 256)]
        return torch.cat(out).numpy()

    best_auc, best_state, seen, epochs, steps = -1.0, copy.deepcopy(model.state_dict()), 0, 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_seconds:
        model.train()
        order = rng.permutation(tr)
        for start in range(0, len(order), 128):
            frac = (time.perf_counter() - t0) / budget_seconds
            if frac >= 1.0:
                break
            for g in opt.param_groups:  # MultiStepLR at 50% and 75% of training, gamma 0.1
                g["lr"] = 1e-3 * (0.1 if frac >= 0.5 else 1.0) * (0.1 if frac >= 0.75 else 1.0)
            idx = torch.from_numpy(order[start : start + 128])
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            seen, steps = seen + len(idx), steps + 1
        epochs += 1
        auc = float(roc_auc_score(a["y"][va], scores_of(x[va])[:, 1]))
        if auc > best_auc:
            best_auc, best_state = auc, copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    scores = scores_of(test_x)
    return {
        "method": f"MedMNIST ResNet-18 ({size or 224})",
        "seed": int(seed),
        "network": f"resnet18 {'28^2, 3x3 stem' if size else f'{x.shape[-1]}^2, 7x7/2 stem'}, fp32",
        "train_seconds": seconds,
        "iterations": steps,
        "epochs": epochs,
        "batch_size": 128,
        "images_per_second": seen / max(seconds, 1e-9),
        "best_val_auc": best_auc,
        **_test_metrics(a["test_y"], scores),
    }


# ---- driver --------------------------------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.worker in ("medlens", "medlens_previous"):
        out = run_medlens(work, args.seed, previous=args.worker == "medlens_previous")
    else:
        from medlens.plan.budget import parse_budget

        size = 28 if args.worker == "reference28" else None
        out = run_reference(work, parse_budget(args.budget), args.threads, args.seed, size)
    out["peak_ram_mb"] = _peak_ram_mb()
    (work / f"{args.worker}_s{args.seed}.json").write_text(json.dumps(out, indent=1))


def _spawn(
    work: Path, worker: str, args: argparse.Namespace, threads: int | None, seed: int
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", worker, "--work", str(work), "--budget", args.budget,
           "--seed", str(seed)]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    log.info("running %s, seed %d", worker, seed)
    subprocess.run(cmd, check=True)
    out: dict[str, Any] = json.loads((work / f"{worker}_s{seed}.json").read_text())
    out["load_average_after"] = os.getloadavg()[0]
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    def ci(r: dict[str, Any], k: str) -> str:
        lo, hi = r[f"{k}_ci"]
        return f"{r[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        "| method | network | test AUC [95% CI] | test ACC [95% CI] | best val AUC | train s | iterations x batch "
        "| train images/s | peak RAM MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['network']} | {ci(r, 'auc')} | {ci(r, 'acc')} | {r['best_val_auc']:.3f} "
            f"| {r['train_seconds']:.0f} | {r['iterations']} x {r['batch_size']} | {r['images_per_second']:.1f} "
            f"| {r['peak_ram_mb']:.0f} |"
        )
    m = rows[0]
    lines.append("")
    for ref in rows[1:]:
        lines.append(
            f"ratios medlens / {ref['method']}: AUC {m['auc'] / ref['auc']:.3f}, ACC {m['acc'] / ref['acc']:.3f}, "
            f"throughput {m['images_per_second'] / ref['images_per_second']:.2f}x, "
            f"peak RAM {m['peak_ram_mb'] / ref['peak_ram_mb']:.2f}x"
        )
    return "\n".join(lines)


def _seed_table(rows: list[dict[str, Any]]) -> str:
    """Per method over the seeds: test AUC per seed, mean and range; ACC mean; throughput; peak RAM."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    agg = {}
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        auc = [r["auc"] for r in rs]
        agg[m] = {
            "auc": auc, "acc": [r["acc"] for r in rs], "ips": float(np.mean([r["images_per_second"] for r in rs])),
            "ram": max(r["peak_ram_mb"] for r in rs), "seeds": [r["seed"] for r in rs],
            "its": float(np.mean([r["iterations"] for r in rs])), "batch": rs[0]["batch_size"],
        }  # fmt: skip
    lines = [
        "| method | test AUC per seed | AUC mean | AUC range | ACC mean | iterations x batch (mean) "
        "| train images/s (mean) | peak RAM MB (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, a in agg.items():
        lines.append(
            f"| {m} | {' / '.join(f'{v:.3f}' for v in a['auc'])} (seeds {', '.join(map(str, a['seeds']))}) "
            f"| {np.mean(a['auc']):.3f} | {min(a['auc']):.3f}-{max(a['auc']):.3f} | {np.mean(a['acc']):.3f} "
            f"| {a['its']:.0f} x {a['batch']} | {a['ips']:.1f} | {a['ram']:.0f} |"
        )
    lines.append("")
    m0 = agg[methods[0]]
    for ref in methods[1:]:
        r = agg[ref]
        lines.append(
            f"ratios {methods[0]} / {ref} (means over seeds): AUC {np.mean(m0['auc']) / np.mean(r['auc']):.3f}, "
            f"ACC {np.mean(m0['acc']) / np.mean(r['acc']):.3f}, throughput {m0['ips'] / r['ips']:.2f}x, "
            f"peak RAM {m0['ram'] / r['ram']:.2f}x"
        )
    return "\n".join(lines)


PEERS = ("medlens", "medlens_previous", "reference28", "reference")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="3m", help="training budget of each method (90s, 3m, 10m)")
    p.add_argument("--work", default="bench/_work/classification", help="work folder (data, runs, results)")
    p.add_argument("--subjects", type=int, default=None, help="simulated subjects (default: the sample's)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the simulated dataset and its folds")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (each method runs once per seed)"
    )
    p.add_argument(
        "--peers", nargs="+", choices=PEERS, default=list(PEERS), help="methods to run (medlens first)"
    )
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a worker's training seed
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch threads for every method (a plan override); default: the planner's choice",
    )  # fmt: skip
    p.add_argument("--worker", choices=PEERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        _worker(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info = prepare(work, args.budget, args.subjects, args.data_seed, args.threads)
    for reason in info["plan_reasons"]:
        log.info("plan: %s", reason)
    rows: list[dict[str, Any]] = []
    tables = []
    for seed in args.seeds:
        seed_rows = [
            _spawn(work, w, args, None if w.startswith("medlens") else info["threads"], seed)
            for w in PEERS
            if w in args.peers
        ]
        rows += seed_rows
        tables.append(f"seed {seed}\n" + _table(seed_rows))
        print(tables[-1], flush=True)
    summary = _seed_table(rows)
    print(summary)
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget": args.budget,
        "data": {k: v for k, v in info.items() if k != "plan_reasons"},
        "plan_reasons": info["plan_reasons"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "tables": tables,
        "summary": summary,
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"load average before {load_before}, after {os.getloadavg()}; details in {work / 'results.json'}")


if __name__ == "__main__":
    main()
