"""SSL-initialised vs from-scratch lesion classification with 10% of the training labels (not a CI check).

On the brain-lesion sample (2D axial slices, lesion or not): SimCLR-pretrain the planned classifier's backbone
once on every training slice without labels (``medlens pretrain``), then for each seed train the classifier on
a stratified 10% of fold 0's training slices, twice (from scratch, and ``--init`` from the SimCLR run with
discriminative learning rates), for the same fixed number of iterations (no model selection: the last
weights), and evaluate both on the held-out test slices: AUC with bootstrap 95% CIs.

    .venv/bin/python bench/ssl_experiment.py --out bench/_work/ssl --record
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ssl_experiment")
ROOT = Path(__file__).resolve().parent


def run(out: Path, *, seeds: int, fraction: float, pretrain_budget: str, train_budget: str) -> dict[str, Any]:
    import torch

    from medlens.data.dataset import load_dataset
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.data.samples import build_sample
    from medlens.data.splits import make_folds
    from medlens.evaluate.classification import classification_metrics
    from medlens.plan.planner import make_plan
    from medlens.tasks.classify import check_loss, predict_scores, targets
    from medlens.tasks.classify_data import dataset_images
    from medlens.tasks.classify_train import fit
    from medlens.tasks.pretrain import pretrain

    torch.set_num_threads(2)
    data = out / "brain-lesion"
    if not (data / "dataset.json").is_file():
        build_sample("brain-lesion", data, task="classification", dim=2, seed=0)
    ds = load_dataset(data)
    plan = make_plan(compute_fingerprint(ds), task="classification", budget=train_budget, device="cpu")
    plan.save(out / "plan.json")
    config = plan.configuration(plan.default_configuration)
    ssl_dir = out / "ssl"
    t0 = time.perf_counter()
    if not (ssl_dir / "run.json").is_file():
        pretrain(
            data, ssl_dir, budget=pretrain_budget, plan_path=out / "plan.json", device="cpu", progress=False
        )
    pre_seconds = time.perf_counter() - t0
    ssl_info = json.loads((ssl_dir / "run.json").read_text())

    cases = sorted((c for c in ds.training if c.split != "test"), key=lambda c: c.id)
    y = targets(ds, cases)
    images = dataset_images(ds, cases, config, out / "cache")
    x_test = dataset_images(ds, ds.test, config, out / "cache")
    y_test = targets(ds, ds.test)
    fold = make_folds(ds, n_folds=5, seed=0)[0]
    row = {c.id: i for i, c in enumerate(cases)}
    train_all = np.array([row[c] for c in fold.train])
    val_rows = np.array([row[c] for c in fold.val])
    ctype, names = ds.classification_type or "binary", ds.class_names
    loss = check_loss(ctype, config.get("loss", {}))
    results: list[dict[str, Any]] = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        chosen = [
            rng.choice(
                train_all[y[train_all] == k],
                max(2, round(fraction * np.sum(y[train_all] == k))),
                replace=False,
            )
            for k in np.unique(y[train_all])
        ]
        rows = np.sort(np.concatenate(chosen))
        cfg = json.loads(json.dumps(config))
        iters = int(cfg["training"]["iterations"])
        cfg["training"].update(
            seed=seed, val_every=iters, checkpoint_every=iters, early_stopping_patience=None
        )
        arms: list[tuple[str, Path | None, np.ndarray]] = [("scratch", None, rows), ("simclr", ssl_dir, rows)]
        if seed == 0:  # the reference: every training label, from scratch
            arms.append(("all_labels", None, train_all))
        for arm, init, train_rows in arms:
            t = time.perf_counter()
            res = fit(
                images, y, train_rows, val_rows, cfg, ctype=ctype, class_names=names, run_dir=out / f"{arm}_{seed}",
                progress=False, device="cpu", init=init, finetune="full", backbone_lr=0.1,
            )  # fmt: skip
            res.model.eval()
            scores = predict_scores(res.model, x_test, None, ctype, loss, 64)
            m = classification_metrics(
                y_test, scores, classification_type=ctype, class_names=names, seed=seed
            )
            auc = m["overall"]["auc"]
            results.append({
                "seed": seed, "arm": arm, "labels": len(train_rows), "auc": auc["estimate"], "low": auc["low"],
                "high": auc["high"], "seconds": round(time.perf_counter() - t, 1), "iterations": iters,
            })  # fmt: skip
            log.info(
                "seed %d %-7s AUC %.3f [%.3f, %.3f]", seed, arm, auc["estimate"], auc["low"], auc["high"]
            )
    return {
        "results": results, "train_slices": len(train_all), "test_slices": len(y_test),
        "pretrain": {"iterations": ssl_info["iterations"], "seconds": round(pre_seconds, 1),
                     "best_ntxent": -float(ssl_info["best_score"]),
            "knn_acc": ssl_info["validation"][-1].get("knn_acc")},
        "network": config["network"], "input_size": config.get("patch_size"),
    }  # fmt: skip


def table(summary: dict[str, Any], command: str) -> str:
    rows = summary["results"]
    lines = [
        "### Self-supervised pretraining (SimCLR) vs from scratch, brain-lesion 2D, 10% of the labels",
        "",
        f"Command: `{command}`",
        "",
        f"{summary['train_slices']} fold-0 training slices (10% labelled: {rows[0]['labels']}), "
        f"{summary['test_slices']} test slices; network {summary['network'].get('name')}, input "
        f"{summary['input_size']}. SimCLR: {summary['pretrain']['iterations']} iterations on all unlabelled "
        f"training slices ({summary['pretrain']['seconds']:.0f} s, held-out NT-Xent "
        f"{summary['pretrain']['best_ntxent']:.3f}, final held-out kNN accuracy "
        f"{summary['pretrain']['knn_acc']}). Fine-tuning: {rows[0]['iterations']} iterations, last weights, "
        "backbone lr x0.1 when initialised. 2-core CPU, other engineers' jobs running (busy machine).",
        "",
        "| seed | scratch AUC [95% CI] | SimCLR-init AUC [95% CI] | difference |",
        "|---:|---|---|---:|",
    ]
    diffs = []
    for seed in sorted({r["seed"] for r in rows}):
        a = next(r for r in rows if r["seed"] == seed and r["arm"] == "scratch")
        b = next(r for r in rows if r["seed"] == seed and r["arm"] == "simclr")
        diffs.append(b["auc"] - a["auc"])
        lines.append(
            f"| {seed} | {a['auc']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | {b['auc']:.3f} [{b['low']:.3f}, "
            f"{b['high']:.3f}] | {diffs[-1]:+.3f} |"
        )
    ref = [r for r in rows if r["arm"] == "all_labels"]
    mean = {arm: np.mean([r["auc"] for r in rows if r["arm"] == arm]) for arm in ("scratch", "simclr")}
    lines += [
        f"| mean | {mean['scratch']:.3f} | {mean['simclr']:.3f} | {np.mean(diffs):+.3f} |",
        "",
    ]
    if ref:
        r = ref[0]
        lines += [
            f"Reference, every training label ({r['labels']} slices), from scratch, seed 0: AUC {r['auc']:.3f} "
            f"[{r['low']:.3f}, {r['high']:.3f}].",
            "",
        ]
    return "\n".join(lines)


def record(text: str) -> None:
    path = ROOT / "RESULTS.md"
    body = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    block = f"<!-- ssl -->\n{text}\n<!-- /ssl -->"
    if "<!-- ssl -->" in body:
        body = re.sub(r"<!-- ssl -->.*?<!-- /ssl -->", lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    from medlens._fs import atomic_write_text

    atomic_write_text(path, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "_work" / "ssl")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--pretrain-budget", default="3m")
    p.add_argument("--train-budget", default="45s")
    p.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    summary = run(a.out, seeds=a.seeds, fraction=a.fraction, pretrain_budget=a.pretrain_budget,
                  train_budget=a.train_budget)  # fmt: skip
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    command = (
        f".venv/bin/python bench/ssl_experiment.py --seeds {a.seeds} --fraction {a.fraction} "
        f"--pretrain-budget {a.pretrain_budget} --train-budget {a.train_budget}"
        + (" --record" if a.record else "")
    )
    text = table(summary, command)
    print(text)
    if a.record:
        record(text)


if __name__ == "__main__":
    main()
