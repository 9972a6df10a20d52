"""The ``medlens`` command line: parse, call one function, print. Nothing below the CLI imports this package.

Heavy libraries (torch, MONAI, pydicom, SimpleITK) are imported inside the commands, so ``medlens --help``
answers at once. A :class:`~medlens.errors.MedlensError` is printed as one line and exits non-zero;
``medlens --debug ...`` shows the traceback instead.

One module per group of commands registers on the shared :data:`app` (``_app.py``): ``commands`` (data, plan,
train, predict, export, demo, bench), ``trust`` (evaluate, report), ``clinical`` (deid), ``pacs``
(echo, find, pull, push, run), ``service`` (serve).
"""

from __future__ import annotations

import sys

from medlens.cli import (  # noqa: F401  (registers the commands)
    clinical,
    commands,
    pacs,
    service,
    trust,
)
from medlens.cli._app import _state, app
from medlens.errors import MedlensError

__all__ = ["app", "main"]


# ---- entry point -----------------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning medlens errors into one line and an exit code."""
    try:
        app()  # standalone: usage errors, --help and Ctrl-C (exit 130) are handled by typer
    except MedlensError as e:
        if _state["debug"]:
            raise
        print(f"medlens: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
