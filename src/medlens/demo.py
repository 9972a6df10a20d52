"""The main job (``medlens demo``, what ``make demo`` runs).

Builds the ``brain-tissue`` sample dataset, plans a segmentation model within a short budget, trains it,
predicts the held-out subjects in their original geometry, evaluates them (Dice, Jaccard, HD95, ASD, surface
Dice with bootstrap 95% CIs, per site) and writes a self-contained HTML report. Re-running it reuses the
dataset and retrains the model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.errors import DatasetError, RunError

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """Where the demo put its results, and the headline number."""

    report: Path
    metrics: Path
    run: Path
    mean_dice: float
    num_test: int
    seconds: float


def _step(n: int, total: int, text: str) -> None:
    log.info("[bold]step %d/%d[/bold] %s", n, total, text, extra={"markup": True})


def run_demo(
    out: str | Path, *, budget: str = "4m", subjects: int | None = None, seed: int = 0
) -> DemoResult:
    """Run the main job into folder ``out`` (``data/``, ``plan.json``, ``run/``, ``metrics.json``, ``report.html``).

    Args:
        out: the demo folder.
        budget: training budget for the segmentation model (the whole job takes about twice this).
        subjects: simulated subjects (default: the sample's default).
        seed: seed of the data, the split and the training.
    """
    from medlens.data.check import check_dataset
    from medlens.data.dataset import load_dataset
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.data.samples import build_sample
    from medlens.plan.planner import make_plan
    from medlens.tasks.run import train

    t0 = time.perf_counter()
    out = Path(out)
    data_dir = out / "data" / "brain-tissue"
    total = 6
    _step(1, total, f"sample dataset brain-tissue -> {data_dir}")
    if (data_dir / "dataset.json").is_file():
        dataset = load_dataset(data_dir)
        log.info(
            "reusing %s (%d training, %d test cases)", data_dir, len(dataset.training), len(dataset.test)
        )
    else:
        dataset = build_sample("brain-tissue", data_dir, subjects=subjects, seed=seed)
    report = check_dataset(data_dir)
    if not report.ok:
        raise DatasetError(f"{data_dir}: the sample dataset fails its check:\n{report.to_text()}")

    _step(2, total, f"fingerprint and plan within {budget}")
    fingerprint = compute_fingerprint(dataset)
    plan = make_plan(fingerprint, task=dataset.task, budget=budget)
    plan_path = plan.save(out / "plan.json")
    for reason in plan.reasons:
        log.info("  plan: %s", reason)

    _step(3, total, "train (fold 0 of 5; the other folds validate)")
    run_dir = out / "run"
    if run_dir.exists():
        ours = {"run.json", "plan.json", "cache", "fold_0"}
        if any(run_dir.iterdir()) and not ours & {p.name for p in run_dir.iterdir()}:
            raise RunError(
                f"{run_dir}: exists and is not a medlens run; move it away or choose another --out"
            )
        shutil.rmtree(run_dir)
    trained = train(data_dir, plan_path, run_dir, fold=0)[0]

    _step(4, total, f"predict the {len(dataset.test)} held-out subjects")
    per_case, pictures, seconds = predict_and_score(run_dir, dataset)

    _step(5, total, "evaluate with bootstrap confidence intervals")
    from medlens.evaluate.summary import summarise, write_metrics

    summary = summarise(per_case, seed=seed)
    metrics_path, _ = write_metrics(out / "metrics.json", per_case, summary)

    _step(6, total, "write the report")
    report_path = write_segmentation_report(
        out / "report.html", run_dir, plan, summary, per_case, pictures, seconds, trained
    )
    mean_dice = float(summary["foreground_mean"]["dice"]["mean"])
    return DemoResult(report_path, metrics_path, run_dir, mean_dice, len(per_case), time.perf_counter() - t0)


def predict_and_score(
    run_dir: Path, dataset: Any
) -> tuple[list[dict[str, Any]], list[tuple[str, Any]], dict[str, float]]:
    """Predict every test case of ``dataset`` with the run and score it against its reference in mm.

    Returns:
        Per-case records (for :func:`medlens.evaluate.summarise`), overlay figures of the first cases, and the
        prediction time of each case in seconds.
    """
    import numpy as np

    from medlens.data.dataset import read_case_image
    from medlens.evaluate.segmentation import segmentation_metrics
    from medlens.evaluate.summary import case_record
    from medlens.io import read_image
    from medlens.report.figures import overlay_figure
    from medlens.serve.predictor import Predictor

    predictor = Predictor.from_run(run_dir)
    classes = {n: v for n, v in dataset.labels.items() if v != 0}
    per_case: list[dict[str, Any]] = []
    pictures: list[tuple[str, Any]] = []
    seconds: dict[str, float] = {}
    for case in dataset.test:
        image = read_case_image(dataset, case)
        truth = read_image(dataset.path(str(case.label))).array[0]
        result = predictor.predict(image)
        pred = result.label.array[0]
        metrics = segmentation_metrics(pred, truth, image.spacing, classes)
        meta = {k: v for k, v in case.meta.items() if k in ("sex", "age", "patient_id")}
        per_case.append(case_record(case.id, metrics, site=case.site, meta=meta))
        seconds[case.id] = round(result.seconds, 2)
        fg = float(np.mean([m["dice"] for m in metrics.values()]))
        log.info("  %s: mean Dice %.3f (%.1f s)", case.id, fg, result.seconds)
        if len(pictures) < 3:
            fig = overlay_figure(
                image.array[0], truth, pred, dataset.labels, spacing=image.spacing, title=case.id
            )
            pictures.append((case.id, fig))
    return per_case, pictures, seconds


def write_segmentation_report(
    path: Path,
    run_dir: Path,
    plan: Any,
    summary: dict[str, Any],
    per_case: list[dict[str, Any]],
    pictures: list[tuple[str, Any]],
    seconds: dict[str, float],
    trained: Any,
) -> Path:
    """The segmentation report: metrics with CIs, per-case table, overlays, training curve and the plan."""
    from medlens.report import Report
    from medlens.report.figures import per_case_bar_figure, training_curve_figure

    info = json.loads((run_dir / "run.json").read_text())
    rep = Report("medlens: brain tissue segmentation", subtitle=f"run {run_dir}")
    rep.section(
        "What this is",
        "A U-Net planned and trained by medlens on the brain-tissue sample dataset (subjects simulated from the "
        "MNI ICBM152 template: background, CSF, grey matter, white matter), evaluated on held-out subjects in "
        "their original geometry. Intervals are 95% percentile-bootstrap confidence intervals over cases.",
    )
    rep.metric_table_with_ci(summary, title="Held-out test metrics")
    rows = []
    for rec in per_case:
        row: dict[str, Any] = {"case": rec["id"], "site": rec.get("site")}
        for cls, m in rec["metrics"].items():
            row[f"{cls} Dice"] = m.get("dice")
            row[f"{cls} HD95 (mm)"] = m.get("hd95")
        row["prediction seconds"] = seconds.get(rec["id"])
        rows.append(row)
    rep.table("Per case", rows)
    rep.figure("Dice per case", per_case_bar_figure(per_case, metric="dice"))
    for case_id, fig in pictures:
        rep.figure(f"Overlay: {case_id}", fig, caption="image, reference, prediction")
    history_path = trained.run_dir / "history.json"
    if history_path.is_file():
        rep.figure("Training", training_curve_figure(json.loads(history_path.read_text())))
    rep.section("How the model was made", "The planner's decisions, in its own words:")
    rep.table("Plan", [{"decision": r} for r in plan.reasons])
    rep.table(
        "Post-processing (decided on validation)",
        [{"decision": r} for r in info.get("postprocessing_reasons", [])],
    )
    return rep.write(path)
