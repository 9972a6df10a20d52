"""The main job (``medlens demo``, what ``make demo`` runs).

Two models, one trust report. Segmentation: builds the ``brain-tissue`` sample dataset, plans a U-Net within a
short budget, trains it, and evaluates it on the held-out subjects in their original geometry
(:func:`medlens.evaluate.run_eval.evaluate_run`: Dice, HD95, ... with bootstrap CIs, voxel calibration,
subgroups, per site, robustness, explanations with their sanity check, uncertainty and deferral).
Classification: builds ``brain-lesion`` (2D axial slices, lesion or not), plans a classifier within its own
budget, trains it (the decision threshold is chosen on validation) and evaluates it the same way (AUC,
sensitivity and specificity at the stored threshold, ECE before and after temperature scaling, ...). Both land
in one self-contained ``report.html``; each run gets its model card. Re-running it reuses the datasets and
retrains the models.

Folder layout: ``data/brain-tissue``, ``plan.json``, ``run/`` (with ``evaluation/``, ``model_card.md``);
``data/brain-lesion``, ``classification/{plan.json,run/}``; ``report.html``.
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

_STEPS = 9


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
    fast_evidence: bool = True,
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
        fast_evidence: the evaluation's costly parts (robustness, explanations, uncertainty) on a few cases.
    """
    from medlens.evaluate.run_eval import evaluate_run
    from medlens.report import Report
    from medlens.report.model_card import write_model_card
    from medlens.report.trust import add_trust_sections, load_evaluation
    from medlens.tasks.run import train

    t0 = time.perf_counter()
    out = Path(out)
    _step(1, "sample dataset brain-tissue")
    dataset = _sample(out / "data" / "brain-tissue", "brain-tissue", subjects, seed)
    _step(2, f"fingerprint and plan the segmentation model within {budget}")
    _, plan_path = _plan(dataset, budget, out / "plan.json")
    _step(3, "train the segmentation model (fold 0 of 5; the other folds validate)")
    run_dir = _fresh_run_dir(out / "run")
    train(dataset.root, plan_path, run_dir, fold=0)
    _step(4, f"evaluate it on the {len(dataset.test)} held-out subjects (metrics, calibration, subgroups, "
          "robustness, explanations, uncertainty)")  # fmt: skip
    seg_eval = evaluate_run(run_dir, dataset.root, seed=seed, fast=fast_evidence, progress=_substep)

    n = 5
    _step(n, "sample dataset brain-lesion (2D slices, lesion or not)")
    lesion_data = _sample(out / "data" / "brain-lesion", "brain-lesion", lesion_subjects, seed)
    folder = out / "classification"
    _step(n + 1, f"fingerprint and plan the lesion classifier within {lesion_budget}")
    _, lesion_plan = _plan(lesion_data, lesion_budget, folder / "plan.json")
    _step(n + 2, "train the lesion classifier (fold 0 of 5; threshold chosen on validation)")
    lesion_run = _fresh_run_dir(folder / "run")
    train(lesion_data.root, lesion_plan, lesion_run, fold=0)
    _step(n + 3, f"evaluate it on the {len(lesion_data.test)} held-out test slices")
    cls_eval = evaluate_run(lesion_run, lesion_data.root, seed=seed, fast=fast_evidence, progress=_substep)

    _step(9, "write the trust report and the model cards")
    rep = Report(
        "medlens: brain tissue segmentation and lesion classification, with their evidence",
        subtitle=f"demo {out}",
    )
    seg_ev, seg_pictures = load_evaluation(run_dir)
    cls_ev, cls_pictures = load_evaluation(lesion_run)
    rep.section("About this demo", _DEMO_TEXT)
    add_trust_sections(rep, run_dir, seg_ev, seg_pictures, prefix="Segmentation: ")
    add_trust_sections(rep, lesion_run, cls_ev, cls_pictures, prefix="Lesion classifier: ")
    report_path = rep.write(out / "report.html")
    write_model_card(run_dir, seg_ev)
    write_model_card(lesion_run, cls_ev)
    auc = cls_ev["metrics"]["overall"]["auc"]["estimate"]
    return DemoResult(
        report_path, seg_eval, run_dir, float(seg_ev["metrics"]["foreground_mean"]["dice"]["mean"]),
        int(seg_ev["n_cases"]), time.perf_counter() - t0,
        lesion_auc=float("nan") if auc is None else float(auc), lesion_metrics=cls_eval, lesion_run=lesion_run,
        lesion_num_test=int(cls_ev["n_cases"]),
    )  # fmt: skip


def _substep(text: str) -> None:
    log.info("  %s", text)


_DEMO_TEXT = (
    "Two models planned and trained by medlens within a CPU budget, each followed by its evidence. "
    "Segmentation: a U-Net on the brain-tissue sample dataset (subjects simulated from the MNI ICBM152 template: "
    "background, CSF, grey matter, white matter), evaluated on held-out subjects in their original geometry. "
    "Classification: a 2D classifier on the brain-lesion sample dataset: axial T1 slices of simulated subjects, "
    "labelled 'lesion' when the slice holds any white-matter lesion voxel (lesions range from obvious to near the "
    "visibility limit); its decision threshold was chosen on validation slices and stored in the run. Both "
    "datasets are simulated: these numbers show what the system reports, not performance on patients."
)


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
