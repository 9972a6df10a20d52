"""The trust report in a real browser (Debian's headless Chromium): it loads with no console errors, every
section and picture is there, and a screenshot is saved."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from medlens.report.trust import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Appended to a copy of the report only: counts the pictures the browser decoded.
PROBE = (
    "<script>window.addEventListener('load',()=>{document.body.dataset.decoded="
    "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
    "document.body.dataset.total=document.images.length;});</script>"
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("which", ["seg_evaluated", "cls_evaluated"])
def test_report_renders_in_chromium_without_console_errors(which: str, request: Any, tmp_path: Path) -> None:
    from test_report_trust import SECTIONS

    _, run, _ = request.getfixturevalue(which)
    report = build_report(run, out=tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    res = chromium(
        ["--enable-logging=stderr", "--v=0", "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
        tmp_path / "p1",
    )
    dom = res.stdout
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    for title in SECTIONS:
        assert f">{title}<" in dom, title
    decoded = re.search(r'data-decoded="(\d+)"', dom)
    total = re.search(r'data-total="(\d+)"', dom)
    assert decoded and total, "the page's load event did not run"
    assert int(decoded.group(1)) == int(total.group(1)) >= 8
    shot = tmp_path / "report.png"
    chromium(["--screenshot=" + str(shot), "--window-size=1280,1600", report.as_uri()], tmp_path / "p2")
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    from PIL import Image

    with Image.open(shot) as im:
        colours = len(set(im.convert("RGB").resize((160, 200)).getdata()))
    assert colours > 50  # text, tables and figures, not an empty white page
