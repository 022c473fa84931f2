"""report.html: self-contained, escaped, complete."""
import base64
import re

from erftool import plotting as P
from erftool import report

import numpy as np


def _png():
    return P.png_bytes(P.comparison_grid({"a": np.eye(8)}))


def test_report_embeds_figures_and_needs_no_server(tmp_path):
    png = _png()
    path = report.write_report(tmp_path / "report.html", title="ERF comparison",
                               command="erftool compare a.pt", figures=[("grid", png)],
                               metrics=[{"model": "a", "std_y": 1.5, "rf": "11x11"}],
                               settings={"rule": "abs", "images": 4},
                               notes=["2 images skipped"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched from anywhere: no src/href to a URL or another file
    assert not re.search(r'(src|href)="(?!data:)', text)
    data = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(data) == png
    for needle in ("erftool compare a.pt", "<td class=\"num\">1.5</td>", "11x11", "rule",
                   "2 images skipped", "torch", "matplotlib"):
        assert needle in text


def test_report_escapes_html():
    text = report.build_report(title="<b>x</b>", command="erftool compare '<script>'",
                               metrics=[{"model": "<img>", "v": float("nan")}],
                               version_info={"erftool": "0"})
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<img>" not in text and ">nan<" in text


def test_metrics_table_union_of_columns():
    html = report.metrics_table_html([{"a": 1}, {"b": 2.0}])
    assert html.count("<th>") == 2 and html.count("<tr>") == 3
    assert report.metrics_table_html([]) == "<p>No metrics.</p>"


def test_versions_lists_packages():
    v = report.versions()
    assert {"python", "torch", "numpy", "matplotlib", "erftool"} <= set(v)
