"""One exception hierarchy for medlens.

Every error a user can cause is a :class:`MedlensError`. Its message says what was wrong (naming the file or
value), and what to do about it. The command line prints the message on one line and exits non-zero; with
``--debug`` it shows the traceback too. Code below the CLI never catches these to print them.
"""

from __future__ import annotations

from pathlib import Path


class MedlensError(Exception):
    """Base class of every error medlens raises on purpose."""

    exit_code = 1


class InputError(MedlensError):
    """A value or file the user gave us is wrong (bad option, unknown name, unreadable file)."""

    exit_code = 2


class ImageReadError(InputError):
    """An image file or DICOM folder cannot be read as an image."""

    def __init__(self, path: str | Path, problem: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        msg = f"{path}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class DatasetError(InputError):
    """A dataset folder or its ``dataset.json`` is malformed."""


class PlanError(InputError):
    """A ``plan.json`` is malformed or cannot be executed on this machine."""


class RunError(InputError):
    """A run directory is missing something needed to use the model."""


class TrainingError(MedlensError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


def did_you_mean(value: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a ' Did you mean X?' suffix for an unknown name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, value: str, choices: list[str] | tuple[str, ...] | set[str]) -> InputError:
    """Build the standard error for an unknown option value, listing what is accepted."""
    accepted = ", ".join(sorted(str(c) for c in choices))
    return InputError(f"unknown {kind} {value!r}.{did_you_mean(value, choices)} Accepted: {accepted}.")
