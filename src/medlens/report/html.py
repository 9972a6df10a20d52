"""A small, self-contained HTML report builder.

One ``.html`` file, no external assets: the CSS is inline and pictures are embedded as base64 PNG, so a
report can be mailed, archived with a run directory or opened offline. All text (titles, cells, captions,
case ids) is HTML-escaped; there is no way to inject raw markup through the public API.

The builder is generic: a report is a list of blocks (sections with text, tables, key-value lists, figures),
rendered in the order they were added. Task-specific pages (segmentation results now; calibration, fairness,
robustness, explanations later) are built from these blocks. Example::

    report = Report("Brain tissue segmentation")
    report.section("Data", "40 test cases from 2 sites.")
    report.metric_table_with_ci(summary)
    report.figure("Example cases", overlay_figure(image, truth, pred, class_names))
    report.write(run_dir / "report.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medlens._fs import atomic_write_text
from medlens.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Display names for metric keys (anything else is shown as its key).
METRIC_LABELS = {
    "dice": "Dice",
    "jaccard": "Jaccard",
    "hd95": "HD95 (mm)",
    "asd": "ASD (mm)",
    "nsd": "NSD",
}
_LOWER_IS_BETTER = {"hd95", "asd"}

_CSS = """
:root { --fg: #1d2430; --muted: #5b6678; --line: #d8dde6; --stripe: #f5f7fa; --accent: #2459a8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0 0 18px; }
h2 { font-size: 1.3em; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 22px 0 6px; }
p { margin: 6px 0 10px; max-width: 80ch; }
nav { background: var(--stripe); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
      margin: 10px 0 18px; }
nav ol { margin: 4px 0; padding-left: 22px; }
nav a { color: var(--accent); text-decoration: none; }
.table-wrap { overflow-x: auto; margin: 6px 0 4px; }
table { border-collapse: collapse; font-size: 0.92em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #e9edf3; font-weight: 600; }
tbody tr:nth-child(even) { background: var(--stripe); }
td.num { text-align: right; white-space: nowrap; }
.ci { color: var(--muted); font-size: 0.9em; }
.caption { color: var(--muted); font-size: 0.88em; margin: 4px 0 14px; max-width: 90ch; }
figure { margin: 8px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 6px 0 14px; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; }
footer { color: var(--muted); font-size: 0.8em; margin-top: 40px; }
"""


class Report:
    """A self-contained HTML report built block by block.

    Every method returns the report, so calls can be chained. Nothing is written until :meth:`write`.

    Args:
        title: the page title (also the ``<title>``).
        subtitle: an optional line under the title (e.g. the run name and date).
    """

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = str(title)
        self.subtitle = subtitle
        self._blocks: list[str] = []
        self._toc: list[tuple[str, str]] = []
        self._ids: set[str] = set()

    # ---- blocks ----------------------------------------------------------------------------------------------
    def section(self, title: str, text: str = "") -> Report:
        """Start a section (listed in the table of contents), with optional text.

        Args:
            title: the section heading.
            text: plain text; blank lines separate paragraphs.
        """
        anchor = self._anchor(title)
        self._toc.append((anchor, str(title)))
        self._blocks.append(f'<h2 id="{anchor}">{_esc(title)}</h2>\n{_paragraphs(text)}')
        return self

    def text(self, text: str) -> Report:
        """Add plain text paragraphs (blank lines separate paragraphs) to the current section."""
        self._blocks.append(_paragraphs(text))
        return self

    def key_values(self, title: str | None, items: Mapping[str, Any]) -> Report:
        """Add a two-column list of facts (e.g. the run configuration or a model card field)."""
        body = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_fmt(v))}</dd>" for k, v in items.items())
        self._blocks.append(f'{_h3(title)}<dl class="kv">{body}</dl>')
        return self

    def table(
        self,
        title: str | None,
        rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
        columns: Sequence[str] | None = None,
        caption: str | None = None,
    ) -> Report:
        """Add a table.

        Args:
            title: heading above the table (``None`` for none).
            rows: a list of dicts (cells looked up by column name) or a list of sequences (cells in column
                order). Floats are shown with 4 significant digits, NaN and ``None`` as an en dash.
            columns: column names; for dict rows the default is every key in first-seen order.
            caption: text under the table.
        """
        row_list: list[Any] = list(rows)
        if columns is None:
            if row_list and not all(isinstance(r, Mapping) for r in row_list):
                raise InputError(f"table {title!r}: rows that are lists need explicit column names")
            seen: dict[str, None] = {}
            for r in row_list:
                seen.update(dict.fromkeys(str(k) for k in r))
            columns = list(seen)
        columns = [str(c) for c in columns]
        body = []
        for i, r in enumerate(row_list):
            if isinstance(r, Mapping):
                cells = [r.get(c) for c in columns]
            else:
                cells = list(r)
                if len(cells) != len(columns):
                    raise InputError(
                        f"table {title!r}: row {i} has {len(cells)} cells but there are {len(columns)} columns"
                    )
            body.append("<tr>" + "".join(_td(v) for v in cells) + "</tr>")
        self._blocks.append(_table_html(title, columns, body, caption))
        return self

    def metric_table_with_ci(
        self,
        summary: Mapping[str, Any],
        title: str = "Metrics",
        metrics: Sequence[str] | None = None,
        groups: bool = True,
    ) -> Report:
        """Add the tables of a :func:`medlens.evaluate.summarise` summary: mean [CI] per class and metric.

        One table has a row per class plus the foreground mean; then, when ``groups`` is true, one table per
        grouping column (site, sex, ...) with the foreground mean per level and its case count.

        Args:
            summary: the dict returned by ``summarise`` (or read back from ``metrics.json``).
            title: heading of the first table.
            metrics: metric keys to show (default: all in the summary).
            groups: also add the per-group tables.
        """
        for key in ("per_class", "foreground_mean", "metrics", "n_cases"):
            if key not in summary:
                raise InputError(
                    f"metric_table_with_ci needs a summary from medlens.evaluate.summarise; key {key!r} is missing"
                )
        shown = list(metrics) if metrics is not None else list(summary["metrics"])
        unknown = [m for m in shown if m not in summary["metrics"]]
        if unknown:
            raise InputError(f"metrics {unknown} are not in the summary (it has {list(summary['metrics'])})")
        conf = summary.get("confidence", 0.95)
        header = ["class", "n", *(_metric_header(m) for m in shown)]
        body = []
        per_class = summary["per_class"]
        rows = [(c, per_class[c]) for c in per_class]
        if len(per_class) > 1:
            rows.append(("mean over classes", summary["foreground_mean"]))
        for name, stats in rows:
            cells = [f"<td>{_esc(name)}</td>", _td(int(summary["n_cases"]))]
            cells += [_ci_td(stats.get(m)) for m in shown]
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption = (
            f"Mean over {summary['n_cases']} cases with the {conf:.0%} percentile bootstrap interval in brackets "
            f"({summary.get('n_resamples', '?')} resamples of cases). ↑ higher is better, ↓ lower is better. "
            + str(summary.get("missing_rule", ""))
        )
        self._blocks.append(_table_html(title, header, body, caption))
        if groups:
            for column, levels in (summary.get("groups") or {}).items():
                header = [str(column), "n", *(_metric_header(m) for m in shown)]
                body = []
                for level, tab in levels.items():
                    cells = [f"<td>{_esc(level)}</td>", _td(int(tab["n_cases"]))]
                    cells += [_ci_td(tab["foreground_mean"].get(m)) for m in shown]
                    body.append("<tr>" + "".join(cells) + "</tr>")
                cap = f"Mean over foreground classes per {column} with the {conf:.0%} bootstrap interval."
                self._blocks.append(_table_html(f"By {column}", header, body, cap))
        return self

    def figure(self, title: str | None, fig_or_png: Any, caption: str | None = None) -> Report:
        """Embed a picture as a base64 PNG.

        Args:
            title: heading above the picture (also its alt text).
            fig_or_png: a matplotlib ``Figure`` (rendered here at 110 dpi) or PNG bytes.
            caption: text under the picture.
        """
        png = _png_bytes(fig_or_png)
        data = base64.b64encode(png).decode("ascii")
        alt = _esc(title or caption or "figure")
        cap = f'<figcaption class="caption">{_esc(caption)}</figcaption>' if caption else ""
        self._blocks.append(
            f'{_h3(title)}<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'
        )
        return self

    # ---- output ----------------------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The whole page as a string."""
        sub = f'<p class="subtitle">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        toc = ""
        if len(self._toc) > 1:
            items = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in self._toc)
            toc = f"<nav><strong>Contents</strong><ol>{items}</ol></nav>"
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{_esc(self.title)}</h1>\n{sub}\n{toc}\n"
            + "\n".join(self._blocks)
            + f"\n<footer>Generated by medlens {_esc(_version())}.</footer>\n</main>\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the report to ``path`` atomically and return the path."""
        path = Path(path)
        atomic_write_text(path, self.to_html())
        return path

    def _anchor(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", str(title).lower()).strip("-") or "section"
        anchor, i = base, 2
        while anchor in self._ids:
            anchor, i = f"{base}-{i}", i + 1
        self._ids.add(anchor)
        return anchor


# ---- rendering helpers -----------------------------------------------------------------------------------


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medlens")
    except Exception:  # not installed (running from a source tree)
        return "(development)"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _h3(title: str | None) -> str:
    return f"<h3>{_esc(title)}</h3>" if title else ""


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", str(text or "")) if p.strip()]
    return "".join(f"<p>{_esc(p)}</p>" for p in parts)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    try:  # numpy scalars
        import numpy as np

        if isinstance(v, np.floating):
            return _fmt(float(v))
        if isinstance(v, np.integer):
            return str(int(v))
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def _td(v: Any) -> str:
    numeric = isinstance(v, int | float) and not isinstance(v, bool)
    cls = ' class="num"' if numeric else ""
    return f"<td{cls}>{_esc(_fmt(v))}</td>"


def _ci_td(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        missing = f" ({stat.get('n_missing', 0)} missing)" if stat else ""
        return f'<td class="num">–{_esc(missing)}</td>'
    ci = f"[{_fmt_metric(stat.get('low'))}, {_fmt_metric(stat.get('high'))}]"
    extra = f", {stat['n_missing']} missing" if stat.get("n_missing") else ""
    mean = _fmt_metric(stat["mean"])
    return f'<td class="num">{_esc(mean)} <span class="ci">{_esc(ci)}{_esc(extra)}</span></td>'


def _fmt_metric(v: Any) -> str:
    """A metric value with a fixed number of decimals by magnitude (0.912, 12.35, 123.5), so columns align."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    x = float(v)
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}"


def _metric_header(m: str) -> str:
    arrow = "↓" if m in _LOWER_IS_BETTER else "↑" if m in METRIC_LABELS else ""
    return f"{METRIC_LABELS.get(m, m)} {arrow}".strip()


def _table_html(title: str | None, columns: Sequence[str], body: list[str], caption: str | None) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"
    cap = f'<p class="caption">{_esc(caption)}</p>' if caption else ""
    return (
        f'{_h3(title)}<div class="table-wrap"><table><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{cap}"
    )


def _png_bytes(fig_or_png: Any) -> bytes:
    if isinstance(fig_or_png, bytes | bytearray | memoryview):
        png = bytes(fig_or_png)
        if not png.startswith(PNG_SIGNATURE):
            raise InputError(
                "figure bytes are not a PNG image; pass a matplotlib Figure or PNG-encoded bytes"
            )
        return png
    if hasattr(fig_or_png, "savefig"):
        buf = io.BytesIO()
        fig_or_png.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
        return buf.getvalue()
    raise InputError(
        f"cannot embed a {type(fig_or_png).__name__} as a figure; pass a matplotlib Figure or PNG bytes"
    )
