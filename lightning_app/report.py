"""A self-contained HTML report (images embedded), readable in a browser without a server."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:0.9em}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
"""


def fmt(value: Any, digits: int = 4) -> str:
    """Format numbers for tables; other values as text."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


class Report:
    """Accumulates sections of HTML and writes one file.

    Args:
        title: Page title.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        """Start a section."""
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, note: bool = False) -> None:
        """Add a paragraph of plain text."""
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Add a table; floats are printed with 4 decimals."""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def image(self, png: bytes, alt: str) -> None:
        """Embed a PNG."""
        data = base64.b64encode(png).decode("ascii")
        self.parts.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')

    def write(self, path: str | Path) -> Path:
        """Write the page."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "\n".join(self.parts)
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>",
            encoding="utf-8",
        )
        return path
