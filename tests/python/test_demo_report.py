"""The ``scrimp demo`` report: value formatting, plot rendering, and the HTML page of a real
``scrimp demo --quick --html`` run (two sections, smallest sizes) rendered in headless Chromium, where
every plot must load and the summary table must be present."""
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from scrimp import report

PY = sys.executable


def test_fmt_is_consistent():
    assert report.fmt(0.858, "pct") == "85.8%"
    assert report.fmt(1.0, "pct") == "100.0%"
    assert report.fmt(None, "pct") == "-"
    assert report.fmt(float("nan"), "x") == "-"
    assert report.fmt(3.14159, "x") == "3.14x"
    assert report.fmt(1234.0, "x") == "1,234x"
    assert report.fmt(3 * 2 ** 20, "mib") == "3.0 MiB"
    assert report.fmt(1536, "kib") == "1.5 KiB"
    assert report.fmt(0.5, "ms") == "0.500 ms"
    assert report.fmt(1.2e9, "flops") == "1.20e+09"
    assert report.fmt(12345, "int") == "12,345"
    assert report.fmt("abc", "pct") == "abc"
    assert report.fmt((0.767, 0.907), "ci") == "[76.7, 90.7]"
    assert report.fmt(-0.045, "pts") == "-4.5"


def test_intervals():
    lo, hi = report.wilson(85, 100)
    assert abs(lo - 0.7672) < 1e-4 and abs(hi - 0.9069) < 1e-4  # Wilson score interval, z = 1.96
    assert report.wilson(0, 10)[0] == 0.0 and report.wilson(10, 10)[1] == 1.0
    assert abs(report.wilson(0, 10)[1] - 0.2775) < 1e-4 and abs(report.wilson(10, 10)[0] - 0.7225) < 1e-4
    lo, hi = report.wilson(9, 10)
    assert abs(lo - 0.5958) < 1e-4 and abs(hi - 0.9821) < 1e-4
    assert report.pct_ci(85, 100) == "85.0% [76.7, 90.7]"
    # paired difference: the estimate inside its interval, and pairs that agree give a narrower interval
    # than pairs that disagree for the same two accuracies
    a = [True] * 80 + [True] * 10 + [False] * 2 + [False] * 8
    b = [True] * 80 + [False] * 10 + [True] * 2 + [False] * 8
    d, lo, hi = report.paired_diff(a, b)
    assert abs(d - 0.08) < 1e-9 and lo < d < hi and lo > 0
    shuffled = b[50:] + b[:50]
    d2, lo2, hi2 = report.paired_diff(a, shuffled)
    assert abs(d2 - d) < 1e-9 and hi2 - lo2 > hi - lo
    d, lo, hi = report.paired_diff(a, a)
    assert d == 0 and lo <= 0 <= hi
    with pytest.raises(ValueError):
        report.paired_diff([True], [True, False])


def test_table_checks_rows():
    t = report.table("t", [("a", "text"), ("b", "pct")], [["x", 0.5]])
    text = report.format_table(t)
    assert "50.0%" in text and text.splitlines()[0].strip() == "t"
    with pytest.raises(ValueError, match="2 columns"):
        report.table("t", [("a", "text"), ("b", "pct")], [["x"]])
    with pytest.raises(ValueError, match="unknown section"):
        report.run_section("nonsense")
    with pytest.raises(ValueError, match="unknown section"):
        report.build_report(sections=["nonsense"])


def test_every_section_module_has_demo_report():
    for key, (title, module) in report.SECTIONS.items():
        assert title and callable(importlib.import_module(module).demo_report), key
    assert set(report.SUMMARY_ORDER) <= set(report.SECTIONS)


def test_render_plot_every_kind():
    import matplotlib.image as mpimg

    spec = {"title": "t", "panels": [
        {"kind": "line", "x": [32, 64, 256], "series": [{"label": "a", "y": [0.5, None, 0.9]}], "logx": True,
         "ypct": True, "hline": {"y": 1.0, "label": "full"}, "xlabel": "x", "ylabel": "y"},
        {"kind": "bar", "x": ["a long category", "b"], "series": [{"label": "s1", "y": [1e3, 1e9]},
                                                                  {"label": "s2", "y": [2e3, None]}], "logy": True},
        {"kind": "scatter", "series": [{"label": "m", "x": [1.0], "y": [0.5]}, {"label": "n", "x": [2.0], "y": [0.7]}]},
    ]}
    png = report.render_plot(spec)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 3 * 100


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`scrimp demo --quick` on the two cheapest sections at the smallest size, with --json and --html."""
    d = tmp_path_factory.mktemp("demo")
    html, js = d / "report.html", d / "report.json"
    r = subprocess.run([PY, "-m", "scrimp.cli", "demo", "--quick", "--n", "1", "--sections", "testbed", "icecache",
                        "--quiet", "--json", str(js), "--html", str(html)],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, json.loads(js.read_text()), html


def test_demo_text_and_json(demo_run):
    text, rep, _ = demo_run
    # the summary table first, each section header once
    assert text.index("== Summary") < text.index("== Testbed") < text.index("== IceCache")
    for title, _ in report.SECTIONS.values():
        assert text.count(f"== {title} ==") <= 1
    assert [s["key"] for s in rep["sections"]] == ["testbed", "icecache"]
    assert [r["method"] for r in rep["summary"]] == ["IceCache"]
    row = rep["summary"][0]
    assert row["factor"] > 1.0 and 0.0 <= row["fidelity_method"] <= 1.0
    ice = rep["sections"][1]
    assert ice["data"]["rows"][0]["cache"] == "full KV cache" and ice["plots"]
    # the library's defaults, named, on the reporting seeds of docs/icecache.md, each accuracy with its interval
    assert {r["cache"] for r in ice["data"]["rows"]} == {"full KV cache", "IceCache defaults", "paper configuration"}
    assert ice["data"]["seeds"][0][0] == 3 and all(len(r["ci"]) == 2 for r in ice["data"]["rows"])
    assert "--quick" in text.splitlines()[1]
    # accuracy is always shown as a percentage
    ice_text = text[text.index("== IceCache"):]
    assert re.search(r"\b\d{1,3}\.\d%", ice_text) and not re.search(r"\b0\.\d{3}\b", ice_text.split("\n", 2)[2])


_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var d = document.createElement('div');
  d.id = 'img-check';
  d.textContent = 'images=' + imgs.length + ' loaded=' + ok +
                  ' summary_rows=' + document.querySelectorAll('#summary tbody tr').length;
  document.body.appendChild(d);
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_chromium(demo_run, tmp_path):
    _, rep, html = demo_run
    page = html.read_text()
    assert "<script" not in page  # the report itself is static: one file, images as data URIs
    n_plots = sum(len(s["plots"]) for s in rep["sections"])
    assert n_plots >= 1 and page.count('src="data:image/png;base64,') == n_plots
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", _CHECK_SCRIPT + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True,
                         timeout=120)
    m = re.search(r'<div id="img-check">images=(\d+) loaded=(\d+) summary_rows=(\d+)</div>', dom.stdout)
    assert m, dom.stderr[-2000:]
    images, loaded, summary_rows = map(int, m.groups())
    assert images == n_plots and loaded == images  # no broken image
    assert summary_rows == len(rep["summary"]) >= 1
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", checked.as_uri()],
                   capture_output=True, text=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # a page with a rendered plot is not one flat colour
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[:2] == (2400, 1200) and float(img[..., :3].std()) > 0.01
