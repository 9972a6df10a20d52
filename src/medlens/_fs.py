"""Atomic file-system helpers: nothing medlens writes is ever half-written.

Outputs are written to a temporary sibling (same directory, so the final rename is atomic on POSIX) and
renamed into place only once complete. A crash leaves either the previous file or the new one, never a
truncated one; the temporary is removed on error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` when the block succeeds.

    Args:
        final: where the file must end up.
        suffix: suffix of the temporary file (defaults to the final name's, so writers that dispatch on
            extension, e.g. ``.nii.gz``, still work).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give outputs the usual umask-based mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (fsync'd before the rename)."""
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(final: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; move it onto ``final`` when the block succeeds.

    Used for whole outputs such as a dataset folder: an interrupted command leaves no half-built dataset.

    Args:
        final: the directory to create.
        overwrite: replace an existing ``final``; otherwise an existing non-empty ``final`` is an error.
    """
    from medlens.errors import InputError

    final = Path(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise InputError(
            f"{final}: already exists and is not empty (choose another --out or pass --overwrite)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
