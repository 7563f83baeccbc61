"""The testbed section of ``scrimp demo`` and ``scrimp testbed eval``: accuracy of every shipped model
measured now, beside the accuracy recorded in its ``metrics.json`` when it was trained."""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence


def eval_rows(n: int = 50, recall_lengths: Sequence[int] = (512, 2048), seed: int = 0,
              models: Optional[Sequence[str]] = None, device=None, dtype=None, progress: bool = True,
              out=None, filler_share: float = 0.0) -> list:
    """Evaluate shipped testbed models (all of :data:`scrimp.testbed.MODELS` by default).

    ``filler_share`` > 0 evaluates the recall models with that share of each context in filler lines
    (``tasks.recall(filler_share=)``; the recorded value is the checkpoint's ``accuracy@{L}f``, measured
    at half filler).

    Returns rows ``{"model", "task", "setting", "n", "accuracy", "recorded", "seconds"}``; ``recorded``
    is the accuracy in the checkpoint's ``metrics.json`` (None when it has none for that setting).
    With ``out`` (a text stream) each row is also printed as it is measured.
    """
    from .. import report, testbed
    from ..models import resolve_device, resolve_dtype

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    names = list(testbed.MODELS) if models is None else list(models)
    for name in names:
        if name not in testbed.MODELS:
            raise ValueError(f"unknown testbed model {name!r}; valid names: {', '.join(testbed.MODELS)}")
    jobs = []
    for name in names:
        _, task, style = testbed.MODELS[name]
        if task == "recall" and filler_share:
            jobs += [(name, task, f"context {L}, filler {filler_share:g}",
                      dict(context_tokens=int(L), filler_share=filler_share),
                      f"accuracy@{L}f" if filler_share == 0.5 else None) for L in recall_lengths]
        elif task == "recall":
            jobs += [(name, task, f"context {L} tokens", dict(context_tokens=int(L)), f"accuracy@{L}")
                     for L in recall_lengths]
        else:
            jobs.append((name, task, f"{style} style", dict(style=style), "accuracy"))
    line = "{:<28} {:<7} {:<20} {:>5} {:>9} {:>9} {:>8}"
    if out is not None:
        print(line.format("model", "task", "setting", "n", "accuracy", "recorded", "time"), file=out)
        print("-" * 92, file=out, flush=True)
    rows, loaded = [], {}
    for name, task, label, kw, key in report.bar(jobs, desc="testbed", progress=progress):
        if name not in loaded:
            loaded.clear()
            loaded[name] = testbed.load(name, dtype=dtype, device=device)
        model, tok = loaded[name]
        try:
            recorded = testbed.shipped_metrics(name).get(key) if key else None
        except OSError:
            recorded = None
        t0 = time.perf_counter()
        res = testbed.evaluate(model, tok, task, n=n, seed=seed, **kw)
        row = {"model": name, "task": task, "setting": label, "n": n, "accuracy": res["accuracy"],
               "recorded": recorded, "seconds": time.perf_counter() - t0}
        rows.append(row)
        if out is not None:
            print(line.format(name, task, label, n, report.fmt(row["accuracy"], "pct"),
                              report.fmt(recorded, "pct"), report.fmt(row["seconds"], "s")), file=out, flush=True)
    return rows


def demo_report(quick: bool = True, n: Optional[int] = None, progress: bool = True) -> dict:
    """The testbed section of the demo report (see :mod:`scrimp.report`)."""
    from .. import report

    n = n or (10 if quick else 20)
    rows = eval_rows(n=n, progress=progress)
    cols = [("model", "text"), ("task", "text"), ("setting", "text"), ("n", "int"), ("accuracy now", "pct"),
            ("95% interval", "ci"), ("recorded", "pct")]
    return {
        "title": report.SECTIONS["testbed"][0],
        "setting": f"greedy exact match on n={n} examples per row (seed 0); 'recorded' is the accuracy in the "
                   "checkpoint's metrics.json (measured on more examples when it was trained); a recorded value inside the 95% Wilson "
                   "interval of the measured one agrees with it",
        "tables": [report.table("", cols, [[r["model"], r["task"], r["setting"], r["n"], r["accuracy"],
                                            report.wilson(round(r["accuracy"] * r["n"]), r["n"]), r["recorded"]]
                                           for r in rows])],
        "plots": [], "notes": [], "summary": None, "data": {"rows": rows},
    }
