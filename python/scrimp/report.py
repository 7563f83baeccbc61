"""The ``scrimp demo`` report: runs each method's demo section, then renders one summary table and the
sections as text, JSON-ready data and a self-contained HTML page (matplotlib plots as data URIs).

A section is produced by ``demo_report(quick, n, progress) -> dict`` in the module named in
:data:`SECTIONS`, with these keys (every number raw, never pre-formatted):

- ``title`` (str), ``setting`` (str: data, sizes, models), ``notes`` (list of str);
- ``tables``: ``[{"title", "columns": [[name, kind], ...], "rows": [[value, ...], ...]}]`` where
  ``kind`` (see :func:`fmt`) says how each value is shown: ``pct`` (a fraction shown as a percent),
  ``x`` (a ratio), ``mib`` (bytes), ``ms``, ``s``, ``flops``, ``int``, ``num``, ``text``, ``ci`` (a
  ``[low, high]`` pair of fractions shown as a percent interval), ``pts`` (a difference of fractions
  shown in percentage points);
- ``plots``: ``[{"title", "panels": [panel, ...]}]``, a panel being ``{"kind": "line" | "bar" |
  "scatter", "xlabel", "ylabel", "x", "series": [{"label", "y", "x" (optional)}], "logx", "logy",
  "ypct" (fractions shown as %), "hline": {"y", "label"}}``;
- ``summary``: ``None`` or one row of the summary table: ``{"method", "saves", "factor" (baseline /
  method, > 1 is a saving), "saving", "fidelity", "paper" (short texts for the table), "detail" (the
  measured values behind them), "paper_detail" (the paper's claim in full), "fidelity_metric",
  "fidelity_method", "fidelity_baseline" (numbers), "recorded" (bool: the numbers come from shipped
  recorded metrics rather than this run)}``.

The report adds ``key``, ``seconds`` and, when a section fails, ``error`` (the other sections still run).

Every accuracy is shown with its 95% Wilson score interval (:func:`wilson`); a difference between two
methods measured on the same prompts with the 95% interval of a paired difference (:func:`paired_diff`).
"""
from __future__ import annotations

import base64
import datetime
import html
import importlib
import io
import math
import platform
import sys
import time
import traceback
from typing import Dict, Iterable, List, Optional, Tuple

#: section key -> (title, module with demo_report), in report order
SECTIONS: Dict[str, Tuple[str, str]] = {
    "testbed": ("Testbed: the shipped models against their recorded accuracy", "scrimp.testbed.demo"),
    "scoring": ("Token scoring: fused entropy / KL / log-probs vs torch", "scrimp.benchmarks"),
    "tip": ("TIP: token-selective on-policy distillation", "scrimp.tip.demo"),
    "tessy": ("TESSY: teacher-student cooperative synthesis of SFT data", "scrimp.tessy.demo"),
    "packets": ("KV Packet: recomputation-free document KV caches", "scrimp.packets.demo"),
    "icecache": ("IceCache: clustered KV pages in host memory, a device token budget", "scrimp.icecache.demo"),
}

#: the summary table's row order
SUMMARY_ORDER = ["tip", "tessy", "packets", "icecache", "scoring"]

SUMMARY_COLUMNS = [("method", "method"), ("saves", "saves"), ("saving", "by how much"),
                   ("fidelity", "fidelity vs the baseline"), ("paper", "the paper's claim")]


# ----------------------------------------------------------------------------- formatting

def fmt(value, kind: str = "num") -> str:
    """One value as the report shows it; ``None`` / NaN -> ``-``.

    kinds: ``pct`` 0.858 -> ``85.8%``; ``x`` 3.14 -> ``3.1x``; ``mib`` bytes -> ``12.3 MiB``;
    ``kib`` bytes -> ``12.3 KiB``; ``ms`` milliseconds -> ``12.3 ms``; ``s`` seconds -> ``1.2 s``;
    ``flops`` -> ``1.2e+09``; ``int`` -> ``1,234``; ``num`` -> 4 significant digits; ``text`` -> str.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "text" or isinstance(value, str):
        return str(value)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x" if value < 10 else f"{value:,.0f}x"
    if kind == "mib":
        return f"{value / 2 ** 20:,.1f} MiB"
    if kind == "kib":
        return f"{value / 2 ** 10:,.1f} KiB"
    if kind == "ms":
        return f"{value:,.1f} ms" if value >= 1 else f"{value:.3f} ms"
    if kind == "s":
        return f"{value:,.1f} s"
    if kind == "flops":
        return f"{value:.2e}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "ci":
        lo, hi = value
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    if kind == "pts":
        return f"{100 * value:+.1f}"
    if kind == "bool":
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: z of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``successes / n`` (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    if successes in (0, n):  # closed forms: one end of the interval is exact
        edge = (z * z / n) / (1 + z * z / n)
        return (0.0, edge) if successes == 0 else (1.0 - edge, 1.0)
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def paired_diff(a: List[bool], b: List[bool], z: float = Z95) -> Tuple[float, float, float]:
    """``(d, low, high)``: accuracy of ``a`` minus accuracy of ``b`` on the same items, with the 95%
    interval for a difference of paired proportions (Newcombe 1998, method 10: Wilson intervals of
    both, combined through the phi correlation of the pairs)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_diff: two non-empty lists of the same length")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    den = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    cross = both * neither - only_a * only_b
    cross = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)  # Newcombe's continuity correction
    phi = cross / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (d, max(-1.0, lo), min(1.0, hi))


def pct_ci(successes: int, n: int) -> str:
    """``85.0% [76.7, 90.7]`` (n=100): an accuracy with its 95% Wilson interval, as the report writes it."""
    return f"{fmt(successes / n, 'pct')} {fmt(wilson(successes, n), 'ci')}"


def bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", progress: bool = True):
    """A tqdm progress bar on stderr for one section's steps (disabled with ``progress=False``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def table(title: str, columns: List[Tuple[str, str]], rows: List[list]) -> dict:
    """A section table: ``columns`` are ``(name, kind)`` pairs; ``rows`` hold raw values."""
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"table {title!r}: row {r!r} has {len(r)} values for {len(columns)} columns")
    return {"title": title, "columns": [list(c) for c in columns], "rows": [list(r) for r in rows]}


def format_table(t: dict, indent: str = "  ") -> str:
    """A table as aligned text (text columns left-aligned, numbers right-aligned)."""
    head = [c[0] for c in t["columns"]]
    left = [i == 0 or c[1] == "text" for i, c in enumerate(t["columns"])]
    body = [[fmt(v, c[1]) for v, c in zip(r, t["columns"])] for r in t["rows"]]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return indent + "  ".join(c.ljust(w) if lf else c.rjust(w)
                                  for c, w, lf in zip(cells, widths, left)).rstrip()

    out = [indent + t["title"]] if t.get("title") else []
    out += [line(head), indent + "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(r) for r in body]
    return "\n".join(out)


# ----------------------------------------------------------------------------- building

def machine() -> dict:
    """Where the report ran: CPU, threads, torch / scrimp versions, GPU if usable."""
    import os

    import torch

    import scrimp

    info = scrimp.build_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "scrimp": scrimp.__version__,
            "cpu_simd": info.get("cpu_simd"), "gpu": gpu}


def section_text(key: str, quick: bool = True, n: Optional[int] = None) -> str:
    """One section run on its own and rendered as text (no progress bars); errors propagate."""
    if key not in SECTIONS:
        raise ValueError(f"unknown section {key!r}; valid sections: {', '.join(SECTIONS)}")
    title, module = SECTIONS[key]
    sec = importlib.import_module(module).demo_report(quick=quick, n=n, progress=False)
    return render_section_text(dict({"tables": [], "notes": [], "setting": ""}, **sec, key=key))


def run_section(key: str, quick: bool = True, n: Optional[int] = None, progress: bool = True) -> dict:
    """Run one section's ``demo_report``; an exception becomes the section's ``error`` (with traceback)."""
    if key not in SECTIONS:
        raise ValueError(f"unknown section {key!r}; valid sections: {', '.join(SECTIONS)}")
    title, module = SECTIONS[key]
    t0 = time.perf_counter()
    try:
        sec = importlib.import_module(module).demo_report(quick=quick, n=n, progress=progress)
    except Exception as e:  # the report still shows the other sections; the CLI exits non-zero
        sec = {"title": title, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
               "tables": [], "plots": [], "notes": [], "summary": None, "setting": ""}
    sec = dict(sec)
    sec["key"] = key
    sec.setdefault("title", title)
    for k, default in (("tables", []), ("plots", []), ("notes", []), ("summary", None), ("setting", "")):
        sec.setdefault(k, default)
    sec["seconds"] = time.perf_counter() - t0
    return sec


def build_report(quick: bool = True, sections: Optional[List[str]] = None, n: Optional[int] = None,
                 progress: bool = True) -> dict:
    """Run the sections (all by default) and return the report: ``{"summary": [rows], "sections": [...],
    "machine", "date", "quick", "n", "seconds"}``; JSON-serialisable."""
    for k in sections or ():
        if k not in SECTIONS:
            raise ValueError(f"unknown section {k!r}; valid sections: {', '.join(SECTIONS)}")
    keys = [k for k in SECTIONS if sections is None or k in sections]  # always in report order
    t0 = time.perf_counter()
    secs = []
    outer = bar(keys, desc="scrimp demo", progress=progress)
    for k in outer:
        outer.set_postfix_str(k)
        secs.append(run_section(k, quick=quick, n=n, progress=progress))
    return assemble_report(secs, quick=quick, n=n, seconds=time.perf_counter() - t0)


def assemble_report(sections: List[dict], quick: bool, n: Optional[int] = None,
                    seconds: Optional[float] = None) -> dict:
    """The report dict of already-run sections (the summary rows in :data:`SUMMARY_ORDER`)."""
    by_key = {s["key"]: s for s in sections}
    summary = [dict(by_key[k]["summary"], section=k) for k in SUMMARY_ORDER
               if k in by_key and by_key[k].get("summary")]
    return {"title": "scrimp demo report", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": bool(quick), "n": n, "machine": machine(),
            "seconds": seconds if seconds is not None else sum(s.get("seconds", 0.0) for s in sections),
            "summary": summary, "sections": sections}


def failed_sections(rep: dict) -> List[str]:
    """Keys of the sections that raised."""
    return [s["key"] for s in rep["sections"] if s.get("error")]


# ----------------------------------------------------------------------------- text

def _summary_table(rep: dict, details: bool = False) -> dict:
    cols = SUMMARY_COLUMNS + ([("detail", "measured"), ("paper_detail", "the paper, in full")] if details else [])
    rows = [[r.get(k) for k, _ in cols] for r in rep["summary"]]
    for row, r in zip(rows, rep["summary"]):
        if r.get("recorded"):
            row[0] = f"{row[0]} (recorded)"
    return table("", [(name, "text") for _, name in cols], rows)


def _header(rep: dict) -> str:
    m = rep["machine"]
    where = f"{m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)"
    if m.get("gpu"):
        where += f", {m['gpu']}"
    mode = "quick" if rep["quick"] else "full"
    return (f"scrimp {m['scrimp']} demo report ({mode}), {rep['date']}, {where}; "
            f"{rep['seconds']:.0f} s in all")


QUICK_NOTE = ("--quick: fewer prompts and settings per section, so the numbers are noisy: the 95% intervals "
              "are wide and most differences between a method and its baseline are not resolved; the full "
              "`scrimp demo` measures at the sizes the docs report.")


def render_section_text(sec: dict) -> str:
    """One section as text: its header once, the setting, the tables, the notes."""
    lines = [f"== {sec['title']} =="]
    if sec.get("error"):
        lines.append(f"  FAILED: {sec['error']}")
        return "\n".join(lines)
    if sec.get("setting"):
        lines.append(f"  {sec['setting']}")
    for t in sec["tables"]:
        lines.append(format_table(t))
    for note in sec["notes"]:
        lines.append(f"  {note}")
    if "seconds" in sec:
        lines.append(f"  ({sec['seconds']:.0f} s)")
    return "\n".join(lines)


def render_text(rep: dict) -> str:
    """The whole report as text: the header, the summary table first, then every section."""
    out = [_header(rep)] + ([QUICK_NOTE] if rep["quick"] else []) + [
        "", "== Summary: what each method saves, at what fidelity =="]
    if rep["summary"]:
        out.append(format_table(_summary_table(rep)))
    else:
        out.append("  (no method section ran)")
    for sec in rep["sections"]:
        out += ["", render_section_text(sec)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots and HTML

def render_plot(spec: dict) -> bytes:
    """One plot spec (see the module docstring) as PNG bytes, drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = spec["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        kind = p.get("kind", "line")
        series = p.get("series", [])
        if kind == "bar":
            cats = [str(c) for c in p["x"]]
            width = 0.8 / max(len(series), 1)
            for i, s in enumerate(series):
                pos = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cats))]
                ys = [float("nan") if y is None else y for y in s["y"]]
                ax.bar(pos, ys, width=width, label=s.get("label"))
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=20 if max(map(len, cats), default=0) > 8 else 0, ha="right"
                               if max(map(len, cats), default=0) > 8 else "center", fontsize=8)
        else:
            for s in series:
                xs = s.get("x", p.get("x"))
                ys = [float("nan") if y is None else y for y in s["y"]]
                if kind == "scatter":
                    ax.scatter(xs, ys, label=s.get("label"), s=40)
                    for x, y, t in zip(xs, ys, s.get("point_labels", [])):
                        ax.annotate(str(t), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                else:
                    ax.plot(xs, ys, marker="o", label=s.get("label"))
        if p.get("hline"):
            ax.axhline(p["hline"]["y"], color="gray", linestyle="--", linewidth=1, label=p["hline"].get("label"))
        if p.get("logx"):
            ax.set_xscale("log")
            ticks = sorted({x for s in series for x in s.get("x", p.get("x")) or [] if x is not None})
            if ticks:
                from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

                ax.xaxis.set_major_locator(FixedLocator(ticks))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(ScalarFormatter())
        if p.get("logy"):
            from matplotlib.ticker import NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        if p.get("ypct"):
            top = max([1.0] + [y for s in series for y in s["y"] if y is not None])
            ax.set_ylim(0, 1.05 * top)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        if p.get("title"):
            ax.set_title(p["title"], fontsize=9)
        ax.grid(alpha=0.3)
        if any(s.get("label") for s in series) or p.get("hline"):
            ax.legend(fontsize=7)
    fig.suptitle(spec.get("title", ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _html_table(t: dict, cls: str = "") -> str:
    def align(c):
        return ' class="l"' if c[1] == "text" else ""

    head = "".join(f"<th{align(c)}>{html.escape(c[0])}</th>" for c in t["columns"])
    body = "".join("<tr>" + "".join(f"<td{align(c)}>{html.escape(fmt(v, c[1]))}</td>" for v, c in zip(r, t["columns"]))
                   + "</tr>" for r in t["rows"])
    cap = f"<caption>{html.escape(t['title'])}</caption>" if t.get("title") else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right;vertical-align:top}
th:first-child,td:first-child,th.l,td.l{text-align:left} th{background:#f3f3f3}
table.summary td{text-align:left} table.summary td:nth-child(n+6){color:#555;font-size:.85em}
.meta{color:#666;font-size:.9em} .error{color:#b00}
img{max-width:100%;display:block;margin:.6em 0} .note{color:#444;font-size:.9em}
"""


def render_html(rep: dict) -> str:
    """The report as one self-contained HTML page: header, summary table, sections with embedded plots."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(rep['title'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(rep['title'])}</h1>", f'<p class="meta">{html.escape(_header(rep))}</p>']
    if rep["quick"]:
        parts.append(f'<p class="note">{html.escape(QUICK_NOTE)}</p>')
    parts.append("<h2>Summary: what each method saves, at what fidelity</h2>")
    if rep["summary"]:
        parts.append(_html_table(_summary_table(rep, details=True), cls="summary")
                     .replace("<table ", '<table id="summary" ', 1))
        if any(r.get("recorded") for r in rep["summary"]):
            parts.append('<p class="note">Rows marked recorded show shipped recorded metrics, not this run.</p>')
    else:
        parts.append('<p id="summary">No method section ran.</p>')
    for sec in rep["sections"]:
        parts.append(f'<h2 id="section-{html.escape(sec["key"])}">{html.escape(sec["title"])}</h2>')
        if sec.get("error"):
            parts.append(f'<p class="error">Failed: {html.escape(sec["error"])}</p>')
            continue
        if sec.get("setting"):
            parts.append(f'<p class="meta">{html.escape(sec["setting"])} ({sec.get("seconds", 0):.0f} s)</p>')
        for spec in sec["plots"]:
            png = base64.b64encode(render_plot(spec)).decode("ascii")
            parts.append(f'<img class="plot" alt="{html.escape(spec.get("title", "plot"))}" '
                         f'src="data:image/png;base64,{png}">')
        for t in sec["tables"]:
            parts.append(_html_table(t))
        for note in sec["notes"]:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str, rep: dict) -> None:
    """Write :func:`render_html` of ``rep`` to ``path``."""
    import os

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(rep))
