"""IceCache kernels on one device: page gather bandwidth and one decode step of one layer.

1. Gather: `recall` of n scattered pages (all misses) from the pinned host pool into the device page
   store (CUDA: one kernel reading mapped pinned memory on a copy stream), vs one large contiguous
   host->device copy of the same bytes (the anchor), for 4 KiB and 64 KiB pages.
2. Decode step, one layer: L context tokens, Hq query / Hkv KV heads, head dim D: full-KV SDPA (the
   anchor) vs IceCache (select on host + recall + paged attention over sink + selected + window).

    python bench/bench_icecache_gpu.py --device cuda [--L 131072] [--json out.json]
    python bench/bench_icecache_gpu.py --device cpu --L 8192      # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from scrimp import _C


def timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            return statistics.median(ts)
    else:
        def run(fn, reps):
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
    return run


def gather_bench(device, page_kib, total_mib, reps):
    dtype = torch.bfloat16
    D = 128
    ps = page_kib * 1024 // (D * 2)  # tokens per page so that one page of keys is page_kib KiB
    n = total_mib * 1024 // page_kib // 2  # pages per recall (keys + values = total_mib)
    pool_pages = 4 * n
    idx = _C.ClusteredCache(1, 1, 1, D, ps, pool_pages, n, "bfloat16", False, "random")
    k = torch.randn(1, 1, pool_pages * ps, D).to(dtype)
    idx.build(k, k, None)
    store_k = torch.empty(n, ps, D, dtype=dtype, device=device)
    store_v = torch.empty_like(store_k)
    slots = torch.empty(1, 1, n, dtype=torch.int32)
    lens = torch.empty_like(slots)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    order = torch.randperm(pool_pages).int()
    perm = [order[:n].view(1, 1, n).contiguous(), order[n:2 * n].view(1, 1, n).contiguous()]  # disjoint: all misses
    state = {"i": 0}

    def recall():  # alternate two disjoint-ish selections so every page is a miss
        state["i"] ^= 1
        idx.recall(perm[state["i"]], n, store_k, store_v, slots, lens, stream)

    run = timer(device)
    ms = run(recall, reps)
    nbytes = 2 * n * ps * D * 2
    host = torch.empty(nbytes // 2, dtype=dtype).pin_memory() if device.type == "cuda" else torch.empty(nbytes // 2,
                                                                                                        dtype=dtype)
    dev = torch.empty_like(host, device=device)
    big = run(lambda: dev.copy_(host, non_blocking=True), reps)
    hits = idx.stats()
    assert hits["hits"] == 0, "the gather benchmark must measure misses only"
    return {"page_kib": page_kib, "pages": n, "bytes": nbytes, "gather_ms": ms, "gather_GBps": nbytes / ms / 1e6,
            "one_copy_ms": big, "one_copy_GBps": nbytes / big / 1e6, "pool_pinned": hits["pool_pinned"]}


def decode_bench(device, L, Hq, H, D, budget, reps):
    dtype = torch.bfloat16
    ps, sink, window = 16, 32, 32
    k_sel = (budget - sink - window) // ps
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, H, L, D, generator=g).to(dtype)
    v = torch.randn(1, H, L, D, generator=g).to(dtype)
    q = torch.randn(1, Hq, D, generator=g).to(dtype)
    scale = 1 / math.sqrt(D)
    kd, vd, qd = k.to(device), v.to(device), q.to(device)

    def full():
        return torch.nn.functional.scaled_dot_product_attention(qd[:, :, None], kd, vd, scale=scale,
                                                                enable_gqa=True)

    run = timer(device)
    full_ms = run(full, reps)
    mid = L - sink - window
    idx = _C.ClusteredCache(1, H, Hq, D, ps, mid // ps + 64, 2 * k_sel, "bfloat16", True, "bounds")
    t0 = time.perf_counter()
    idx.build(k[:, :, sink:L - window].contiguous(), v[:, :, sink:L - window].contiguous(), None)
    build_s = time.perf_counter() - t0
    dense_k = torch.cat([k[:, :, :sink], k[:, :, L - window:]], 2).contiguous().to(device)
    dense_v = torch.cat([v[:, :, :sink], v[:, :, L - window:]], 2).contiguous().to(device)
    mask = torch.ones(1, sink + window, dtype=torch.uint8, device=device)
    store_k = torch.zeros(H * 2 * k_sel, ps, D, dtype=dtype, device=device)
    store_v = torch.zeros_like(store_k)
    pages = torch.empty(1, H, k_sel, dtype=torch.int32)
    slots, lens = torch.empty_like(pages), torch.empty_like(pages)
    out = torch.empty_like(qd)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    qf = q.float().contiguous()

    def step():
        idx.select(qf, k_sel, pages)
        idx.recall(pages, k_sel, store_k, store_v, slots, lens, stream)
        _C.paged_decode_attention(qd, store_k, store_v, slots.to(device), lens.to(device), dense_k, dense_v, mask, H,
                                  scale, out, stream)

    def attend_only():
        _C.paged_decode_attention(qd, store_k, store_v, slots.to(device), lens.to(device), dense_k, dense_v, mask, H,
                                  scale, out, stream)

    # Device-side scoring of the page bounds (what IceCache does on CUDA by default).
    S, P = H, idx.num_pages()
    lo_h = torch.empty(S, P, D)
    hi_h = torch.empty(S, P, D)
    lens_h = torch.empty(S, P, dtype=torch.int32)
    idx.export_bounds(0, P, lo_h, hi_h, lens_h)
    lo_d, hi_d = lo_h.to(device), hi_h.to(device)
    G = Hq // H

    def step_device_select():
        qg = qd.float().view(H, G, D)
        sc = torch.matmul(qg.clamp(min=0), hi_d.transpose(-1, -2)) + torch.matmul(qg.clamp(max=0),
                                                                                  lo_d.transpose(-1, -2))
        sc = (sc - sc.amax(-1, keepdim=True)).amax(1)
        sel = sc.topk(k_sel, -1).indices.to(torch.int32).cpu().view(1, H, k_sel).contiguous()
        idx.recall(sel, k_sel, store_k, store_v, slots, lens, stream)
        _C.paged_decode_attention(qd, store_k, store_v, slots.to(device), lens.to(device), dense_k, dense_v, mask, H,
                                  scale, out, stream)

    step_ms = run(step, reps)
    step_dev_ms = run(step_device_select, reps)
    attn_ms = run(attend_only, reps)
    t0 = time.perf_counter()
    for _ in range(reps):
        idx.select(qf, k_sel, pages)
    select_ms = (time.perf_counter() - t0) / reps * 1e3
    return {"L": L, "Hq": Hq, "H": H, "D": D, "budget": budget, "full_sdpa_ms": full_ms, "icecache_step_ms": step_ms,
            "select_ms_host": select_ms, "icecache_step_device_select_ms": step_dev_ms, "paged_attention_ms": attn_ms, "speedup": full_ms / step_ms,
            "index_build_s_host": build_s}


def cluster_bench(device, L, Hq, H, D, tokens_per_group, reps):
    """Prefill clustering's device part at L tokens (one layer, all H KV heads): the coarse k-means
    assignment (keys x centroids + argmax, `nearest_centroid`: CUTLASS tensor cores for bf16 when built
    with them) for ceil(L / tokens_per_group) centroids, vs the anchor, the same layer's causal
    prefill attention (SDPA over L tokens, Hq / H heads). The 10% target is for the whole clustering
    at 32k tokens; this row is its assignment step (the host tree is `index_build_s_host` above)."""
    dtype = torch.bfloat16
    C = max(1, -(-L // tokens_per_group))
    keys = torch.randn(H * L, D, dtype=dtype, device=device)
    cen = torch.randn(H * C, D, dtype=dtype, device=device)[:C]
    out = torch.empty(H * L, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    run = timer(device)
    assign_ms = run(lambda: _C.nearest_centroid(keys, cen, out, stream), reps)
    q = torch.randn(1, Hq, L, D, dtype=dtype, device=device)
    k = torch.randn(1, H, L, D, dtype=dtype, device=device)
    attn_ms = run(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True),
                  max(1, reps // 2))
    return {"L": L, "centroids": C, "assign_ms": assign_ms, "prefill_attention_ms": attn_ms,
            "ratio": assign_ms / attn_ms, "cutlass": bool(_C.build_info()["cutlass"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--gather-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cluster-L", type=int, default=32768)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    res = {"device": str(device), "gather": [], "decode": None}
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("1. page gather, pinned host pool -> device page store (keys + values)")
    for kib in (4, 16, 64):
        r = gather_bench(device, kib, args.gather_mib, args.reps)
        res["gather"].append(r)
        print(f"  {kib:>3} KiB pages x {r['pages']:>5}: {r['gather_GBps']:7.2f} GB/s ({r['gather_ms']:.3f} ms); one "
              f"large copy {r['one_copy_GBps']:7.2f} GB/s; ratio {r['gather_GBps'] / r['one_copy_GBps']:.2f}; "
              f"pinned={r['pool_pinned']}")
    d = decode_bench(device, args.L, 32, 8, 128, 256, args.reps)
    res["decode"] = d
    print(f"2. decode step, one layer, L={d['L']}, {d['Hq']}/{d['H']} heads, d={d['D']}, bf16, budget {d['budget']}")
    print(f"  full-KV SDPA {d['full_sdpa_ms']:.3f} ms; IceCache select+recall+attention {d['icecache_step_ms']:.3f} ms "
          f"(select on host {d['select_ms_host']:.3f} ms, paged attention {d['paged_attention_ms']:.3f} ms); "
          f"speedup {d['speedup']:.2f}x; with selection on the device {d['icecache_step_device_select_ms']:.3f} ms; "
          f"index build on host {d['index_build_s_host']:.2f} s")
    c = cluster_bench(device, args.cluster_L, 32, 8, 128, 1024, args.reps)
    res["cluster"] = c
    print(f"3. prefill clustering, one layer, L={c['L']}, 8 KV heads, d=128, bf16: coarse assignment to "
          f"{c['centroids']} centroids {c['assign_ms']:.3f} ms vs the layer's prefill attention "
          f"{c['prefill_attention_ms']:.3f} ms: ratio {c['ratio']:.3f} (CUTLASS kernel: {c['cutlass']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
