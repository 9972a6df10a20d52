"""Turning third-party failures into one readable :class:`~medlens.errors.ImageReadError`.

pydicom, nibabel, Pillow, SimpleITK and numpy fail on a damaged file with whatever exception their parser
happens to hit (``struct.error``, ``KeyError``, ``zlib.error``, ``RuntimeError`` with an ITK stack...). Readers
run their third-party calls inside :func:`reading`, which re-raises medlens errors untouched and turns
anything else into an ``ImageReadError`` naming the file, so a user never sees a traceback from deep inside a
parser. The original exception stays chained (``--debug`` shows it).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medlens.errors import ImageReadError, MedlensError

log = logging.getLogger(__name__)

#: Longest part of a third-party message quoted in an error (ITK messages run to many lines).
_MAX_DETAIL = 240


def short_message(exc: BaseException) -> str:
    """The first meaningful line of an exception message, shortened; ITK's file/line prefixes removed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK: "Exception thrown in SimpleITK ReadImage: /path/itkImageFileReader.hxx:135:\nITK ERROR: ..."
    useful = [ln for ln in lines if not ln.endswith(":") and ".hxx" not in ln and ".cxx" not in ln]
    text = (useful or lines or [type(exc).__name__])[0]
    text = text.removeprefix("ITK ERROR: ")
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


@contextmanager
def reading(path: str | Path, what: str, hint: str | None = None) -> Iterator[None]:
    """Run a block that parses ``path`` as ``what``; any non-medlens failure becomes an ``ImageReadError``.

    Third-party warnings raised in the block (pydicom's "invalid value for VR", Pillow's EXIF notes) are logged
    at debug level instead of being printed once per file.

    Args:
        path: the file or folder being read (named in the error).
        what: the format, as a noun phrase ("NIfTI file", "DICOM file").
        hint: what the user can do, appended to the message.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            log.debug("%s: %s", path, w.message)
    except MedlensError:
        raise
    except MemoryError as e:
        raise ImageReadError(
            path, f"is too large to read as a {what} into memory", hint or "is its header damaged?"
        ) from e
    except RecursionError as e:
        raise ImageReadError(path, f"is not a readable {what} (nested too deeply)", hint) from e
    except Exception as e:
        raise ImageReadError(
            path, f"is not a readable {what} ({type(e).__name__}: {short_message(e)})", hint
        ) from e


def check_fits_in_memory(path: str | Path, nbytes: int, what: str) -> None:
    """Refuse to allocate an array the machine cannot hold (a damaged header can claim terabytes)."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except (ImportError, OSError):  # pragma: no cover - psutil is a dependency
        available = 1 << 36
    if nbytes < 0 or nbytes > available:
        raise ImageReadError(
            path,
            f"declares a {what} of {nbytes / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB of free memory",
            "is the header damaged? otherwise crop or downsample it with another tool first",
        )
