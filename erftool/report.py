"""One self-contained HTML report: figures embedded as base64, the metrics table, the exact
command and the versions. It opens from disk in any browser, with no server and no
network (no external CSS, fonts or scripts)."""
from __future__ import annotations

import base64
import html
import math
import platform
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto;max-width:100%}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}
"""


def versions() -> dict[str, str]:
    """Versions of what shaped the numbers, for the record."""
    out = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version
    for mod in ("erftool", "torch", "numpy", "matplotlib", "click"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            # A source checkout (not pip-installed) still knows its own version.
            try:
                out[mod] = str(__import__(mod).__version__)
            except Exception:  # a missing package is recorded, not fatal
                out[mod] = "not installed"
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def metrics_table_html(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p>No metrics.</p>"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    # Wide tables scroll inside their own box instead of widening the page.
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def build_report(*, title: str, command: str, figures: Iterable[tuple[str, bytes]] = (),
                 metrics: Sequence[Mapping[str, object]] = (),
                 settings: Mapping[str, object] | None = None,
                 notes: Sequence[str] = (), version_info: Mapping[str, str] | None = None) -> str:
    """Return the HTML text. `figures` are (caption, PNG bytes) pairs."""
    vi = dict(version_info if version_info is not None else versions())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Command</h2>", f"<pre>{html.escape(command)}</pre>",
    ]
    if settings:
        parts.append("<h2>Settings</h2>")
        parts.append(metrics_table_html([{"setting": k, "value": _fmt(v)}
                                         for k, v in settings.items()]))
    parts.append("<h2>Metrics</h2>")
    parts.append(metrics_table_html(list(metrics)))
    figs = list(figures)
    if figs:
        parts.append("<h2>Figures</h2>")
        for caption, png in figs:
            parts.append(f"<figure>{_img_tag(png, caption)}"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts.append("<h2>Versions</h2>")
    parts.append(metrics_table_html([{"package": k, "version": v} for k, v in vi.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, **kwargs) -> Path:
    p = Path(path)
    p.write_text(build_report(**kwargs), encoding="utf-8")
    return p
