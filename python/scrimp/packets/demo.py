"""The KV Packet section of ``scrimp demo``: KV Packet against full recompute and the recompute baselines
on the testbed recall task (accuracy, KL to full, time to first token, prefill FLOPs), plus the tiered
packet store at work."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

#: the paper's claim (arXiv 2604.13226), quoted beside the measured numbers
PAPER = ("Llama-3.1-8B NIAH F1 0.804 vs 0.830 full recompute (0.387 without adapters), at ~1e8-1e9 FLOPs vs "
         "~1e12-1e14 for CacheBlend")


def store_demo() -> dict:
    """Six 128-token packets through a store whose host tier holds two: tier counts, evictions, disk hits
    promoted, and the time of four gets plus one assembly."""
    import torch

    from .rope import assemble
    from .store import PacketStore

    kv = [(torch.randn(1, 4, 128, 64), torch.randn(1, 4, 128, 64)) for _ in range(8)]
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    with tempfile.TemporaryDirectory() as d:
        s = PacketStore(d, host_bytes=2 * 2 * 8 * 4 * 128 * 64 * 4, disk_bytes=1 << 28, fsync=False)
        keys = [s.put(kv, [i * 1000 + t for t in range(128)], model_fingerprint="demo", inv_freq=inv) for i in range(6)]
        t = time.perf_counter()
        pk = [s.get(k) for k in keys[:4]]
        a = assemble(pk)
        dt = time.perf_counter() - t
        st = s.stats()
        res = {"packets": 6, "packet_bytes": pk[0].payload.numel() * 4, "packets_host": st["packets_host"],
               "packets_disk": st["packets_disk"], "evictions_host": st["evictions_host"],
               "hits_disk": st["hits_disk"], "assembled_tokens": int(a.keys[0].shape[2]), "get4_assemble_ms": 1e3 * dt}
        for p in pk:
            p.release()
    return res


def demo_report(quick: bool = True, n: Optional[int] = None, progress: bool = True) -> dict:
    """The KV Packet section of the demo report (see :mod:`scrimp.report`)."""
    import io

    from .. import report, testbed
    from .compare import DEFAULT_ADAPTERS, load_adapters
    from .bench import RECALL_CONTEXT, compare_on_testbed

    n = n or (10 if quick else 30)
    methods = ["full", "none", "kvpacket", "cacheblend-10", "epic"] + ([] if quick else ["cacheblend-30"])
    if not os.path.exists(DEFAULT_ADAPTERS):
        raise FileNotFoundError(f"no shipped adapters at {DEFAULT_ADAPTERS}: run `scrimp packets train`")
    bar = report.bar(total=len(methods) + 1, desc="KV Packet", progress=progress)
    model, tok = testbed.load("recall")
    adapters = load_adapters(model)
    rows = []
    for m in methods:
        rows += compare_on_testbed(model, tok, adapters, n=n, context_tokens=RECALL_CONTEXT, methods=[m],
                                   out=io.StringIO())
        bar.update()
    store = store_demo()
    bar.update()
    bar.close()
    by = {r["method"]: r for r in rows}
    full, kvp = by["full"], by["kvpacket"]
    cols = [("method", "text"), ("accuracy", "pct"), ("KL to full", "num"), ("top-1 = full", "pct"),
            ("TTFT", "ms"), ("TTFT x full", "x"), ("prep FLOPs", "flops"), ("FLOPs @ Llama-3.1-8B", "flops"),
            ("packets stored", "mib")]
    table_rows = [[r["method"], r["accuracy"], r["kl"], r["agree"], r["ttft_ms"], r["ttft_ms"] / full["ttft_ms"],
                   r["flops"], r["flops_llama8b"], r.get("packet_bytes")] for r in rows]
    return {
        "title": report.SECTIONS["packets"][0],
        "setting": (f"testbed recall model with the shipped adapters, n={n} prompts of {RECALL_CONTEXT}-token "
                    "contexts, greedy exact match; prep FLOPs: preparing the documents' cache (question "
                    "prefill excluded), also at Llama-3.1-8B's shape"),
        "tables": [report.table("", cols, table_rows),
                   report.table("packet store (host tier holds 2 of 6 packets)",
                                [("packets", "int"), ("each", "mib"), ("on host", "int"), ("on disk", "int"),
                                 ("host evictions", "int"), ("disk hits promoted", "int"),
                                 ("4 gets + assemble", "ms")],
                                [[store["packets"], store["packet_bytes"], store["packets_host"], store["packets_disk"],
                                  store["evictions_host"], store["hits_disk"], store["get4_assemble_ms"]]])],
        "plots": [{"title": "KV Packet: accuracy vs time to first token, FLOPs per method", "panels": [
            {"kind": "scatter", "xlabel": "median time to first token (ms)", "ylabel": f"accuracy (n={n})",
             "ypct": True, "series": [{"label": r["method"], "x": [r["ttft_ms"]], "y": [r["accuracy"]]} for r in rows]},
            {"kind": "bar", "x": [r["method"] for r in rows], "xlabel": "method",
             "ylabel": "FLOPs to prepare the context (log)", "logy": True,
             "series": [{"label": "testbed model", "y": [r["flops"] for r in rows]},
                        {"label": "at Llama-3.1-8B shape", "y": [r["flops_llama8b"] for r in rows]}]}]}],
        "notes": [],
        "summary": {
            "method": "KV Packet", "saves": "prefill FLOPs, TTFT",
            "factor": full["flops"] / kvp["flops"],
            "saving": (f"{report.fmt(full['flops'] / kvp['flops'], 'x')} fewer FLOPs, "
                       f"{report.fmt(full['ttft_ms'] / kvp['ttft_ms'], 'x')} lower TTFT"),
            "fidelity_metric": "accuracy", "fidelity_method": kvp["accuracy"], "fidelity_baseline": full["accuracy"],
            "fidelity": f"{report.fmt(kvp['accuracy'], 'pct')} vs {report.fmt(full['accuracy'], 'pct')} (full)",
            "detail": (f"against full recompute: TTFT {report.fmt(kvp['ttft_ms'], 'ms')} vs "
                       f"{report.fmt(full['ttft_ms'], 'ms')}, KL to full {kvp['kl']:.3f}; n={n}"),
            "paper": "F1 0.804 vs 0.830; ~1e8-1e9 FLOPs", "paper_detail": PAPER, "recorded": False},
        "data": {"rows": rows, "store": store, "n": n, "context_tokens": RECALL_CONTEXT},
    }


def demo_section(quick: bool = True) -> str:
    """The KV Packet section as printable text."""
    from .. import report

    return report.section_text("packets", quick=quick)
