"""The IceCache section of ``scrimp demo``: accuracy and device memory vs the full KV cache on the testbed."""
from __future__ import annotations

from .evaluate import make_generate_fn


def demo_section(quick: bool = True) -> str:
    """Accuracy and device memory of IceCache vs the full KV cache on the testbed: the recall model at
    context 2048 and budget 256; without the recall checkpoint, the arith model at budget 64."""
    from .. import testbed

    n = 12 if quick else 50
    try:
        model, tok = testbed.load("recall")
        # no dense layers: the recall model has 4, and with 2 dense the look-up happens there (every method,
        # streaming included, then reproduces the full cache and the budget is not tested)
        # page size 8: records are 7 tokens (see bench.TESTBED_PAGE_SIZE)
        task, budget, ctx = "recall", 256, 2048
        geo = dict(page_size=8, sink_pages=2, window_pages=2, dense_layers=0)
    except FileNotFoundError:
        try:
            model, tok = testbed.load("arith-teacher")
        except FileNotFoundError as e:
            return f"IceCache: no testbed model available ({e})"
        task, budget, geo, ctx = "arith", 64, dict(page_size=16, sink_pages=1, window_pages=1, dense_layers=1), None
    rows = []
    # icecache+summaries: scrimp's extension (unselected pages count through their mean key and value)
    for name, method, extra in (("full", "full", {}), ("icecache", "icecache", {}),
                                ("icecache+summaries", "icecache", {"summaries": True})):
        rec = []
        kw = dict(context_tokens=ctx) if ctx else {}
        res = testbed.evaluate(model, tok, task, n=n, generate_fn=make_generate_fn(method, budget=budget, record=rec,
                                                                                  max_context=4096, **geo, **extra),
                               **kw)
        dev = sum(r["device_bytes"] for r in rec) / max(len(rec), 1)
        rows.append((name, res["accuracy"], dev))
    full_acc, full_mem = rows[0][1], rows[0][2]
    where = f"context {ctx}" if ctx else "prompt + generated trace"
    lines = [f"IceCache on testbed {task} (n={n}, {where}, budget {budget}, page {geo['page_size']}, sink {geo['sink_pages']}, "
             f"window {geo['window_pages']}, dense layers {geo['dense_layers']}):",
             f"  {'cache':<18} {'accuracy':>9} {'rel. acc':>9} {'device KV KiB':>14} {'rel. mem':>9}"]
    for m, acc, mem in rows:
        rel = acc / full_acc if full_acc else float("nan")
        lines.append(f"  {m:<18} {acc:>9.3f} {rel:>9.3f} {mem / 2**10:>14.1f} {mem / full_mem:>9.3f}")
    if task == "arith":
        lines.append("  (the recall checkpoint is missing; arith sequences are about as long as the budget, so the "
                     "fixed-size IceCache buffers hold no less than the full cache here: memory savings need long "
                     "contexts, see docs/icecache.md)")
    return "\n".join(lines)
