"""The main job (``medlens demo``, what ``make demo`` runs).

Two models, one report. Segmentation: builds the ``brain-tissue`` sample dataset, plans a U-Net within a short
budget, trains it, predicts the held-out subjects in their original geometry and evaluates them (Dice, Jaccard,
HD95, ASD, surface Dice with bootstrap 95% CIs, per site). Classification: builds ``brain-lesion`` (2D axial
slices, lesion or not), plans a classifier within its own budget, trains it (the decision threshold is chosen
on validation), predicts the held-out test slices and evaluates them (AUC, sensitivity and specificity at the
stored threshold, ... with bootstrap 95% CIs). Both land in one self-contained ``report.html``. Re-running it
reuses the datasets and retrains the models.

Folder layout: ``data/brain-tissue``, ``plan.json``, ``run/``, ``metrics.json`` (segmentation);
``data/brain-lesion``, ``classification/{plan.json,run/,metrics.json}``; ``report.html``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.errors import DatasetError, RunError

log = logging.getLogger(__name__)

_STEPS = 11


@dataclass
class DemoResult:
    """Where the demo put its results, and the headline numbers."""

    report: Path
    metrics: Path
    run: Path
    mean_dice: float
    num_test: int
    seconds: float
    lesion_auc: float = float("nan")
    lesion_metrics: Path | None = None
    lesion_run: Path | None = None
    lesion_num_test: int = 0


@dataclass
class LesionResult:
    """The brain-lesion classifier's evaluation on its held-out test slices."""

    run: Path
    metrics: Path
    summary: dict[str, Any]
    y: Any
    scores: Any
    plan_reasons: list[str]
    decision_reasons: list[str]

    @property
    def auc(self) -> float:
        value = self.summary["overall"]["auc"]["estimate"]
        return float("nan") if value is None else float(value)


def _step(n: int, text: str) -> None:
    log.info("[bold]step %d/%d[/bold] %s", n, _STEPS, text, extra={"markup": True})


def run_demo(
    out: str | Path,
    *,
    budget: str = "3m30s",
    subjects: int | None = None,
    seed: int = 0,
    lesion_budget: str = "90s",
    lesion_subjects: int | None = None,
) -> DemoResult:
    """Run the main job into folder ``out`` (layout in the module docstring).

    Args:
        out: the demo folder.
        budget: training budget of the segmentation model (that part takes about twice this).
        subjects: simulated subjects in brain-tissue (default: the sample's default).
        seed: seed of the data, the splits and the training.
        lesion_budget: training budget of the lesion classifier (that part takes about twice this, plus about
            a minute to simulate the dataset the first time).
        lesion_subjects: simulated subjects in brain-lesion (default: the sample's default, ~410 slices).
    """
    from medlens.evaluate.summary import summarise, write_metrics
    from medlens.report import Report
    from medlens.report.classification import add_classification_section
    from medlens.report.segmentation import add_segmentation_section
    from medlens.tasks.run import read_run, train

    t0 = time.perf_counter()
    out = Path(out)
    _step(1, "sample dataset brain-tissue")
    dataset = _sample(out / "data" / "brain-tissue", "brain-tissue", subjects, seed)
    _step(2, f"fingerprint and plan the segmentation model within {budget}")
    plan, plan_path = _plan(dataset, budget, out / "plan.json")
    _step(3, "train the segmentation model (fold 0 of 5; the other folds validate)")
    run_dir = _fresh_run_dir(out / "run")
    trained = train(dataset.root, plan_path, run_dir, fold=0)[0]
    _step(4, f"predict the {len(dataset.test)} held-out subjects")
    per_case, pictures, seconds = predict_and_score(run_dir, dataset)
    _step(5, "evaluate the segmentation with bootstrap confidence intervals")
    summary = summarise(per_case, seed=seed)
    metrics_path, _ = write_metrics(out / "metrics.json", per_case, summary)

    lesion = run_lesion_classifier(
        out, budget=lesion_budget, subjects=lesion_subjects, seed=seed, first_step=6
    )

    _step(11, "write the report")
    rep = Report("medlens: brain tissue segmentation and lesion classification", subtitle=f"demo {out}")
    add_segmentation_section(
        rep, summary, per_case, pictures, seconds, history_path=trained.run_dir / "history.json",
        plan_reasons=plan.reasons,
        postprocessing_reasons=read_run(run_dir).get("postprocessing_reasons", []),
    )  # fmt: skip
    add_classification_section(
        rep, lesion.summary, lesion.y, lesion.scores, description=_LESION_TEXT,
        plan_reasons=lesion.plan_reasons, decision_reasons=lesion.decision_reasons,
    )  # fmt: skip
    report_path = rep.write(out / "report.html")
    mean_dice = float(summary["foreground_mean"]["dice"]["mean"])
    return DemoResult(
        report_path, metrics_path, run_dir, mean_dice, len(per_case), time.perf_counter() - t0,
        lesion_auc=lesion.auc, lesion_metrics=lesion.metrics, lesion_run=lesion.run,
        lesion_num_test=int(lesion.summary["n_cases"]),
    )  # fmt: skip


_LESION_TEXT = (
    "A 2D classifier planned and trained by medlens on the brain-lesion sample dataset: axial T1 slices of "
    "simulated subjects, labelled 'lesion' when the slice holds any white-matter lesion voxel (lesions range "
    "from obvious to near the visibility limit). The decision threshold was chosen on the validation slices "
    "(Youden's J) and stored in the run; the test slices come from held-out subjects."
)


def run_lesion_classifier(
    out: Path, *, budget: str = "90s", subjects: int | None = None, seed: int = 0, first_step: int = 1
) -> LesionResult:
    """Build brain-lesion (2D), plan within ``budget``, train fold 0, predict and evaluate the test slices.

    Writes ``out/data/brain-lesion`` (reused when present) and ``out/classification/`` (``plan.json``,
    ``run/``, ``metrics.json``: :func:`medlens.evaluate.classification.classification_metrics` of the test
    slices plus their targets and scores).
    """
    import numpy as np

    from medlens._fs import atomic_write_json
    from medlens.data.dataset import read_case_image
    from medlens.evaluate.classification import classification_metrics
    from medlens.report.classification import ci_text
    from medlens.serve.classify import ClassificationPredictor
    from medlens.tasks.classify import targets
    from medlens.tasks.classify_data import prepare_image
    from medlens.tasks.run import train

    n = first_step
    _step(n, "sample dataset brain-lesion (2D slices, lesion or not)")
    dataset = _sample(out / "data" / "brain-lesion", "brain-lesion", subjects, seed)
    folder = out / "classification"
    _step(n + 1, f"fingerprint and plan the lesion classifier within {budget}")
    plan, plan_path = _plan(dataset, budget, folder / "plan.json")
    _step(n + 2, "train the lesion classifier (fold 0 of 5; threshold chosen on validation)")
    run_dir = _fresh_run_dir(folder / "run")
    train(dataset.root, plan_path, run_dir, fold=0)
    _step(n + 3, f"predict the {len(dataset.test)} held-out test slices")
    predictor = ClassificationPredictor.from_run(run_dir)
    t0 = time.perf_counter()
    x = np.stack([prepare_image(read_case_image(dataset, c), predictor.config) for c in dataset.test])
    scores = predictor.probabilities(x)
    log.info("  %d slices in %.1f s", len(x), time.perf_counter() - t0)
    _step(n + 4, "evaluate the classifier with bootstrap confidence intervals")
    y = targets(dataset, dataset.test)
    threshold = predictor.decision.get("threshold")
    summary = classification_metrics(
        y, scores, classification_type=predictor.ctype, class_names=predictor.class_names,
        threshold=threshold, seed=seed,
    )  # fmt: skip
    metrics_path = folder / "metrics.json"
    atomic_write_json(metrics_path, {
        "summary": summary, "threshold": threshold,
        "cases": [{"id": c.id, "target": int(t), "scores": [round(float(v), 6) for v in s]}
                  for c, t, s in zip(dataset.test, y, scores, strict=True)],
    })  # fmt: skip
    log.info("  lesion AUC %s on %d slices", ci_text(summary["overall"]["auc"]), len(y))
    return LesionResult(
        run_dir, metrics_path, summary, y, scores, list(plan.reasons),
        list(predictor.decision.get("reasons", [])),
    )  # fmt: skip


def _sample(data_dir: Path, name: str, subjects: int | None, seed: int) -> Any:
    """The sample dataset ``name`` in ``data_dir``: reused when present, built otherwise, then checked."""
    from medlens.data.check import check_dataset
    from medlens.data.dataset import load_dataset
    from medlens.data.samples import build_sample

    if (data_dir / "dataset.json").is_file():
        dataset = load_dataset(data_dir)
        log.info(
            "reusing %s (%d training, %d test cases)", data_dir, len(dataset.training), len(dataset.test)
        )
    else:
        log.info("building %s -> %s", name, data_dir)
        dataset = build_sample(name, data_dir, subjects=subjects, seed=seed)
    report = check_dataset(data_dir)
    if not report.ok:
        raise DatasetError(f"{data_dir}: the sample dataset fails its check:\n{report.to_text()}")
    return dataset


def _plan(dataset: Any, budget: str, path: Path) -> tuple[Any, Path]:
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.plan.planner import make_plan

    plan = make_plan(compute_fingerprint(dataset), task=dataset.task, budget=budget)
    plan_path = plan.save(path)
    for reason in plan.reasons:
        log.info("  plan: %s", reason)
    return plan, plan_path


def _fresh_run_dir(run_dir: Path) -> Path:
    """Remove a previous demo run in ``run_dir``; refuse to remove a folder that is not a medlens run."""
    if run_dir.exists():
        ours = {"run.json", "plan.json", "cache", "fold_0"}
        if any(run_dir.iterdir()) and not ours & {p.name for p in run_dir.iterdir()}:
            raise RunError(
                f"{run_dir}: exists and is not a medlens run; move it away or choose another --out"
            )
        shutil.rmtree(run_dir)
    return run_dir


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
