"""Commands for the trust report: ``medlens evaluate`` (compute the evidence) and ``medlens report`` (render it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens.cli._app import _echo, app


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory from 'medlens train'.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder (same task, classes, channels).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for evaluation.json (default RUN/evaluation).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="test (the dataset's test cases) or val (the run's validation).")
    ] = "test",
    seed: Annotated[int, typer.Option(help="Seed of every bootstrap and perturbation.")] = 0,
    fast: Annotated[
        bool, typer.Option(help="Fewer cases and draws for robustness and explanations.")
    ] = False,
    report: Annotated[bool, typer.Option(help="Also write RUN/report.html and the model card.")] = True,
) -> None:
    """Evaluate a run on held-out cases: metrics with CIs, calibration, subgroups, domain shift, robustness,
    explanations with sanity checks, uncertainty and deferral; then write the trust report and model card.

    Example: medlens evaluate runs/bt --data data/brain-tissue
    """
    import logging

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from medlens.evaluate.run_eval import STAGES, evaluate_run

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=logging.getLogger().level > logging.INFO) as bar:
        task = bar.add_task("evaluate", total=len(STAGES) + 1)

        counted: list[str] = []

        def stage(text: str) -> None:
            if not text.startswith("decide"):  # the referral decision comes before the counted stages
                bar.advance(task, 1 if counted else 0)
                counted.append(text)
            bar.update(task, description=text)

        path = evaluate_run(run, data, out, split=split, seed=seed, fast=fast, progress=stage)
        bar.update(task, completed=len(STAGES) + 1)
    _echo(f"wrote {path}")
    if report:
        from medlens.report.trust import build_report

        _echo(f"report: {build_report(run, evaluation_dir=path.parent)}")
        _echo(f"model card: {run / 'model_card.md'}")


@app.command("report")
def report_command(
    run: Annotated[Path, typer.Argument(help="An evaluated run (see 'medlens evaluate').")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file (default RUN/report.html).")
    ] = None,
    evaluation: Annotated[
        Path | None, typer.Option(help="Folder of evaluation.json (default RUN/evaluation).")
    ] = None,
) -> None:
    """Write the trust report (one self-contained HTML file) and the model card of an evaluated run.

    Example: medlens report runs/bt
    """
    from medlens.report.trust import build_report

    _echo(f"report: {build_report(run, evaluation_dir=evaluation, out=out)}")
    _echo(f"model card: {run / 'model_card.md'}")
