"""A self-contained HTML report: headings, text, tables and images embedded as data URIs (no external assets)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medistill.engine.distributed import main_only

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:220px}
.gallery img{width:220px;image-rendering:pixelated;border:1px solid #999}
.gallery.grid{display:grid;grid-template-columns:repeat(var(--columns),220px)}
figcaption{font-size:.8em;line-height:1.3}.note{color:#555;font-size:.9em}
pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}
"""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return "n/a" if value is None else str(value)


def summary_cell(summary: dict[str, Any] | None, *, percent: bool = False) -> str:
    """A mean with its 95% interval (`metrics.summary.mean_ci`), as a fraction or in percent."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    ci = summary.get("ci95")
    interval = f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]" if ci else ""
    return f"{scale * summary['mean']:.{digits}f}{interval}"


class HtmlReport:
    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, *, note: bool = False) -> None:
        css = ' class="note"' if note else ""
        self.parts.append(f"<p{css}>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
                       for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def gallery(self, items: Sequence[tuple[bytes, str]], columns: int | None = None) -> None:
        """Images with captions; with `columns`, a fixed grid so that each row reads as one case."""
        figures = "".join(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>" for png, caption in items)
        layout = f' class="gallery grid" style="--columns:{columns}"' if columns else ' class="gallery"'
        self.parts.append(f"<div{layout}>{figures}</div>")

    def image(self, png: bytes, alt: str) -> None:
        self.parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')

    def render(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}"
                "</body></html>\n")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path


@main_only
def write_section_report(run_dir: str | Path, title: str, section: Callable[[HtmlReport, Path], None]) -> Path:
    """`run_dir/report.html` holding one method's section, titled `title: <run name>` (rank 0 writes)."""
    run_dir = Path(run_dir)
    report = HtmlReport(f"{title}: {run_dir.name}")
    section(report, run_dir)
    return report.write(run_dir / "report.html")
