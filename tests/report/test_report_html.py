"""The HTML report: parsed back, its tables and embedded PNGs checked, escaping and atomic writes."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medlens.errors import InputError
from medlens.evaluate import case_record, summarise
from medlens.report import Report

EVIL = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


class Page(HTMLParser):
    """Collects tags, visible text, table cells and image sources of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.data.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def images(self) -> list[str]:
        return [str(a.get("src")) for t, a in self.tags if t == "img"]


def small_summary() -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    recs = [
        case_record(
            f"case{i}" if i else EVIL,
            {"liver": {"dice": float(rng.uniform(0.8, 0.95)), "hd95": float(rng.uniform(1, 5))}},
            site="AB"[i % 2],
        )
        for i in range(8)
    ]
    return recs, summarise(recs, n_resamples=200)


def png_figure():  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1, 2], [1, 0, 1])
    return fig


def build(tmp_path: Path) -> tuple[Path, list[dict], dict]:
    recs, s = small_summary()
    buf = io.BytesIO()
    PILImage.new("RGB", (7, 5), (200, 10, 10)).save(buf, format="PNG")
    report = (
        Report("Segmentation <report>", subtitle=EVIL)
        .section("Data", f"Cases:\n\n{EVIL}")
        .table(
            "Cases", [{"id": r["id"], "site": r["site"], "dice": r["metrics"]["liver"]["dice"]} for r in recs]
        )
        .metric_table_with_ci(s)
        .figure("A matplotlib figure", png_figure(), caption=EVIL)
        .figure("PNG bytes", buf.getvalue())
        .section("Data", "a second section with the same title")
        .key_values("Run", {"seed": 0, "spacing": (1.0, 2.0), "note": EVIL})
    )
    return report.write(tmp_path / "report.html"), recs, s


def test_report_has_tables_and_decodable_pngs(tmp_path: Path) -> None:
    path, recs, s = build(tmp_path)
    page = Page(path.read_text(encoding="utf-8"))
    cases, metrics, by_site = page.tables
    assert cases[0] == ["id", "site", "dice"] and len(cases) == 1 + len(recs)
    assert cases[2] == ["case1", "B", f"{recs[1]['metrics']['liver']['dice']:.4g}"]
    assert metrics[0] == ["class", "n", "Dice ↑", "HD95 (mm) ↓"]
    liver = s["per_class"]["liver"]["dice"]
    assert metrics[1][:2] == ["liver", "8"]
    assert metrics[1][2] == f"{liver['mean']:.3f} [{liver['low']:.3f}, {liver['high']:.3f}]"
    assert [row[0] for row in by_site] == ["site", "A", "B"] and by_site[1][1] == "4"
    images = page.images()
    assert len(images) == 2
    sizes = []
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with PILImage.open(io.BytesIO(png)) as im:
            sizes.append(im.size)
    assert sizes[1] == (7, 5) and sizes[0][0] > 100
    # Self-contained: no external resources of any kind.
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object")
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith(("data:image/png;base64,", "#"))
    # Two sections with one title get distinct anchors, both in the table of contents.
    anchors = [a["href"] for t, a in page.tags if t == "a"]
    assert anchors == ["#data", "#data-2"]


def test_text_is_escaped_everywhere(tmp_path: Path) -> None:
    path, _, _ = build(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text and "<img src=x" not in text
    page = Page(text)
    visible = "".join(page.data)
    assert visible.count(EVIL) == 5  # subtitle, section text, the case table's id cell, caption, key-value
    assert "Segmentation <report>" in visible
    assert [t for t, _ in page.tags].count("img") == 2  # the evil <img> stayed text


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Report("first").section("S", "kept").write(tmp_path / "report.html")
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        Report("second").write(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_bad_blocks_are_clear_errors() -> None:
    r = Report("x")
    with pytest.raises(InputError, match="not a PNG"):
        r.figure("f", b"GIF89a....")
    with pytest.raises(InputError, match="matplotlib Figure or PNG"):
        r.figure("f", "picture.png")
    with pytest.raises(InputError, match="explicit column names"):
        r.table("t", [[1, 2]])
    with pytest.raises(InputError, match="row 0 has 2 cells"):
        r.table("t", [[1, 2]], columns=["a"])
    with pytest.raises(InputError, match="summarise"):
        r.metric_table_with_ci({"per_class": {}})
    _, s = small_summary()
    with pytest.raises(InputError, match="not in the summary"):
        r.metric_table_with_ci(s, metrics=["auc"])


def test_list_rows_nan_and_none_cells() -> None:
    page = Page(
        Report("t").table(None, [[1, float("nan"), None, "x"]], columns=["a", "b", "c", "d"]).to_html()
    )
    assert page.tables[0] == [["a", "b", "c", "d"], ["1", "–", "–", "x"]]
