"""The typer application every command module registers on, and the helpers commands share (echo, progress)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

app = typer.Typer(
    name="medlens",
    help="Self-configuring deep learning for medical imaging: DICOM in, validated and explained models out.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Import, check and fingerprint datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
bench_app = typer.Typer(help="Benchmarks against published results.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_state = {"debug": False}
log = logging.getLogger("medlens")


def _echo(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False).print(msg)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar with ETA, driven by the ``progress(done, total)`` callbacks of the library."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False, disable=logging.getLogger().level > logging.INFO) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _state["debug"] = debug
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("PIL", "matplotlib", "h5py", "numexpr", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
