"""Building blocks of the self-contained HTML report: escaping, tables, embedded PNGs, the page's styles.

Every value from the data goes through :func:`e` (``html.escape``); nothing is fetched.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;margin:0;background:#f4f6f8}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:1.6em;margin:.4em 0} h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
h3{margin-bottom:.3em} table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #d0d7de;padding:3px 8px}
th{background:#f0f3f6;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff4e5;border-left:6px solid #e8a33d;padding:8px 12px;margin:.6em 0}
.bad{background:#fdecea;border-left:6px solid #d93025;padding:8px 12px;margin:.6em 0}
.good{background:#e7f5ea;border-left:6px solid #1e8e3e;padding:8px 12px;margin:.6em 0}
.plots img{max-width:48%;margin:4px;vertical-align:top} .muted{color:#57606a;font-size:.92em}
.tiles{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;width:304px} figure img{display:block;width:304px}
figcaption{font-size:.85em} figcaption b{word-break:break-all} nav a{margin-right:.8em}
.bar{display:inline-block;height:.9em;background:#3b73b9;vertical-align:middle}
.legend{display:inline-block;width:160px;height:.9em;vertical-align:middle;
background:linear-gradient(to right,#00007f,#0000ff,#00ffff,#ffff00,#ff0000,#7f0000)}
code{background:#f0f3f6;padding:0 3px}
"""


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else e(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Cells: numbers are formatted, strings are HTML already (escape data before); no header when empty."""
    head = f"<tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{num(c)}</td>' if isinstance(c, (int, float)) else f"<td>{c}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def png(data: bytes | Path, alt: str) -> str:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(raw).decode()}">'


def items(lines: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>"
