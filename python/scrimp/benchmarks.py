"""Benchmarks shared by ``bench/*.py`` and ``scrimp demo``: ratios against anchors run side by side.

A benchmark is not a test: it measures and prints; nothing here asserts a speed. :func:`demo_report`
is the token-scoring section of ``scrimp demo`` (see :mod:`scrimp.report`).
"""
from __future__ import annotations

import json
import resource
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .scoring import token_scores


def naive_scores(s: torch.Tensor, t: torch.Tensor):
    """The anchor: torch log_softmax, exp and sums (materialises several fp32 [N, V] tensors)."""
    ls = F.log_softmax(s.float(), -1)
    lt = F.log_softmax(t.float(), -1)
    ps, pt = ls.exp(), lt.exp()
    ent_s = -(ps * ls).sum(-1)
    ent_t = -(pt * lt).sum(-1)
    fkl = (pt * (lt - ls)).sum(-1)
    rkl = (ps * (ls - lt)).sum(-1)
    return ent_s, ent_t, fkl, rkl


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, min_time: float = 0.5, max_iters: int = 50) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra device memory one call needs beyond its inputs (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def scoring_benchmark(n: int = 256, v: int = 151936, dtypes=("float32", "bfloat16"), device: str = "cpu",
                      providers=("scrimp", "torch eager", "torch.compile", "liger"), min_time: float = 0.5) -> list:
    """Times token scoring of an [n, v] teacher + student pair with each provider.

    Returns one dict per (dtype, provider): ms, speedup of scrimp over it, extra memory where known.
    """
    dev = torch.device(device)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator(device="cpu").manual_seed(0)
        s = (torch.randn(n, v, generator=g) * 3).to(dtype).to(dev)
        t = (torch.randn(n, v, generator=g) * 3).to(dtype).to(dev)
        fns = {"scrimp": lambda: token_scores(s, t)}
        if "torch eager" in providers:
            fns["torch eager"] = lambda: naive_scores(s, t)
        if "torch.compile" in providers:
            try:
                compiled = torch.compile(naive_scores)
                compiled(s, t)
                fns["torch.compile"] = lambda: compiled(s, t)
            except Exception as e:  # inductor needs a working C++/Triton toolchain
                rows.append(dict(dtype=dtype_name, provider="torch.compile", error=f"{type(e).__name__}: {str(e)[:80]}"))
        if "liger" in providers:
            try:
                from liger_kernel.transformers import LigerKLDIVLoss  # KL only, on precomputed log-probs

                kl = LigerKLDIVLoss(reduction="none", log_target=True)
                ls, lt = F.log_softmax(s.float(), -1).to(dtype), F.log_softmax(t.float(), -1).to(dtype)
                fns["liger KLDiv (KL only, log-probs given)"] = lambda: kl(ls, lt)
            except Exception:
                pass
        timings = {}
        for name, fn in fns.items():
            if name not in providers and not name.startswith("liger"):
                continue
            sec = time_fn(fn, dev, min_time=min_time, max_iters=20 if name == "torch eager" else 50)
            timings[name] = sec
            rows.append(dict(dtype=dtype_name, provider=name, ms=sec * 1e3, extra_bytes=_peak_extra_bytes(fn, dev)))
        for r in rows:
            if r.get("dtype") == dtype_name and "ms" in r:
                r["scrimp_speedup"] = r["ms"] / (timings["scrimp"] * 1e3)
        read_gb = 2 * n * v * s.element_size() / 1e9
        rows.append(dict(dtype=dtype_name, provider="scrimp effective GB/s", ms=None,
                         gbps=read_gb / timings["scrimp"]))
    return rows


def format_rows(rows: list, title: str) -> str:
    lines = [title, f"{'dtype':<9} {'provider':<40} {'ms':>9} {'scrimp x faster':>15} {'extra MiB':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['dtype']:<9} {r['provider']:<40} {'failed: ' + r['error']}")
        elif r.get("ms") is None:
            lines.append(f"{r['dtype']:<9} {r['provider']:<40} {r['gbps']:>9.1f} GB/s")
        else:
            extra = "" if r.get("extra_bytes") is None else f"{r['extra_bytes'] / 2**20:.1f}"
            lines.append(f"{r['dtype']:<9} {r['provider']:<40} {r['ms']:>9.3f} {r['scrimp_speedup']:>15.2f} {extra:>10}")
    return "\n".join(lines)


def scoring_error(n: int = 16, v: int = 151936, dtype: str = "bfloat16", device: str = "cpu") -> dict:
    """Largest absolute difference of scrimp.token_scores from a float64 torch reference on the same
    ``[n, v]`` inputs: ``{"entropy", "kl_forward", "kl_reverse"}`` in nats."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    s = (torch.randn(n, v, generator=g) * 3).to(getattr(torch, dtype)).to(dev)
    t = (torch.randn(n, v, generator=g) * 3).to(getattr(torch, dtype)).to(dev)
    got = token_scores(s, t)
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    ps, pt = ls.exp(), lt.exp()
    ref = {"entropy": -(ps * ls).sum(-1), "kl_forward": (pt * (lt - ls)).sum(-1), "kl_reverse": (ps * (ls - lt)).sum(-1)}
    mine = {"entropy": got.student_entropy, "kl_forward": got.kl_forward, "kl_reverse": got.kl_reverse}
    return {k: float((mine[k].double() - ref[k]).abs().max()) for k in ref}


def demo_report(quick: bool = True, n: Optional[int] = None, progress: bool = True, device: str = "cpu") -> dict:
    """The token-scoring section of ``scrimp demo``: time per call of scrimp.token_scores vs torch eager and
    torch.compile on the same bfloat16 inputs, and its largest error against a float64 reference."""
    from . import report

    rows_n = 64 if quick else 256
    v = 151936
    steps = report.bar(total=2, desc="token scoring", progress=progress)
    rows = scoring_benchmark(n=rows_n, v=v, dtypes=("bfloat16",), device=device,
                             providers=("scrimp", "torch eager", "torch.compile"), min_time=0.2 if quick else 0.5)
    steps.update()
    err = scoring_error(device=device)
    steps.update()
    steps.close()
    timed = [r for r in rows if r.get("ms") is not None]
    ms = {r["provider"]: r["ms"] for r in timed}
    failed = [f"{r['provider']} failed: {r['error']}" for r in rows if "error" in r]
    gbps = next((r["gbps"] for r in rows if r.get("gbps")), None)
    best_torch = min((p for p in ms if p != "scrimp"), key=lambda p: ms[p], default=None)
    factor = ms[best_torch] / ms["scrimp"] if best_torch else None
    worst = max(err.values())
    others = ", ".join(f"{report.fmt(ms[p] / ms['scrimp'], 'x')} vs {p}" for p in ms if p != "scrimp")
    cols = [("provider", "text"), ("ms per call", "ms"), ("scrimp x faster", "x")]
    return {
        "title": report.SECTIONS["scoring"][0],
        "setting": f"entropy + forward/reverse KL of a bfloat16 teacher + student pair, N={rows_n} rows x V={v}, "
                   f"on {device} ({torch.get_num_threads()} threads); all timed in this run",
        "tables": [report.table("", cols, [[r["provider"], r["ms"], r.get("scrimp_speedup")] for r in timed]),
                   report.table("largest error against float64 torch (nats, N=16)", [("field", "text"), ("max |error|", "num")],
                                [[k, e] for k, e in err.items()])],
        "plots": [{"title": "Token scoring: time per call", "panels": [{
            "kind": "bar", "x": list(ms), "series": [{"label": None, "y": list(ms.values())}],
            "xlabel": f"provider (N={rows_n}, V={v}, bf16, {device})", "ylabel": "ms per call (log)", "logy": True}]}],
        "notes": failed + ([f"scrimp reads the logits at {gbps:.1f} GB/s"] if gbps else []),
        "summary": {
            "method": "token scoring", "saves": "scoring time",
            "factor": factor,
            "saving": f"{report.fmt(factor, 'x')} faster than {best_torch}" if factor else "-",
            "fidelity_metric": "max |error| (nats)", "fidelity_method": worst, "fidelity_baseline": 0.0,
            "fidelity": f"within {worst:.1e} nats (float64)",
            "detail": (f"{report.fmt(ms['scrimp'], 'ms')} per call; {others}" if factor else "; ".join(failed)),
            "paper": "none; target >= 1.2x torch.compile",
            "paper_detail": "no paper (scrimp's kernel); targets: >= 1.2x faster than torch.compile, >= 10x than "
                            "eager, O(N) extra memory",
            "recorded": False},
        "data": {"rows": rows, "max_abs_error": err, "n": rows_n, "v": v, "device": device},
    }


def dump_json(rows: list, path: str, **meta) -> None:
    with open(path, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
