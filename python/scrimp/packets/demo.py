"""``demo_section``: KV Packet vs full recompute on the testbed (accuracy, TTFT, FLOPs) plus the store."""
from __future__ import annotations

import io
import os
import tempfile
import time


def _store_lines() -> list:
    import torch

    from .rope import assemble
    from .store import PacketStore

    lines = []
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
        lines.append(f"store: 6 packets of {pk[0].payload.numel() * 4 / 1e6:.1f} MB, host tier holds 2 -> "
                     f"{st['packets_host']} host / {st['packets_disk']} disk, {st['evictions_host']} evictions, "
                     f"{st['hits_disk']} disk hits promoted; get x4 + assemble {a.keys[0].shape[2]} tokens in "
                     f"{1000 * dt:.1f} ms")
        for p in pk:
            p.release()
    return lines


def demo_section(quick: bool = True) -> str:
    """A short printable report (well under a minute with ``quick``)."""
    out = io.StringIO()
    print("== KV Packet: recomputation-free packets vs recompute (testbed recall) ==", file=out)
    try:
        from .compare import DEFAULT_ADAPTERS, RECALL_CONTEXT, compare_methods, format_table, load_adapters
        from .. import testbed

        model, tok = testbed.load("recall")
    except (FileNotFoundError, OSError, ImportError) as e:
        print(f"(testbed recall model unavailable: {e})", file=out)
        model = None
    if model is not None:
        if not os.path.exists(DEFAULT_ADAPTERS):
            print("(no trained adapters shipped: run `scrimp packets train`)", file=out)
        else:
            try:
                ad = load_adapters(model)
            except ValueError as e:
                print(f"(shipped adapters do not match the shipped model: {e})", file=out)
            else:
                n = 10 if quick else 40
                methods = ["full", "none", "kvpacket"] + ([] if quick else ["cacheblend-10", "cacheblend-30", "epic"])
                rows = compare_methods(model, tok, ad, n=n, context_tokens=RECALL_CONTEXT, methods=methods,
                                       out=io.StringIO())
                print(f"n={n} examples, {RECALL_CONTEXT}-token contexts, greedy exact match; prep FLOPs exclude the "
                      "question", file=out)
                print(format_table(rows), file=out)
    try:
        for line in _store_lines():
            print(line, file=out)
    except Exception as e:  # pragma: no cover - the demo must print, not crash
        print(f"(store demo failed: {e})", file=out)
    return out.getvalue().rstrip()
