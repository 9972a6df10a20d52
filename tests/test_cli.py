"""The command line: errors are one line with a non-zero exit, help is cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MEDLENS = [sys.executable, "-m", "medlens.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDLENS, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; import medlens.cli as c;"
        "r = CliRunner().invoke(c.app, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'monai', 'pydicom', 'SimpleITK', 'nibabel', 'scipy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "command", ["convert", "info", "sample", "dataset", "plan", "train", "predict", "demo"]
)
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    if command != "dataset":
        assert "Example" in out.stdout


def test_user_error_is_one_line_and_nonzero(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    out = run("info", str(missing))
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [f"medlens: error: {missing}: no such file or folder"]
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    out = run("--debug", "info", str(tmp_path / "nope.nii.gz"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr


def test_unknown_sample_name_suggests(tmp_path: Path) -> None:
    out = run("sample", "brain-tisue", "--out", str(tmp_path / "x"))
    assert out.returncode == 2
    assert "brain-tissue" in out.stderr
    assert not (tmp_path / "x").exists()
