#!/usr/bin/env python
"""KV Packet benchmark: (1) packet store put/get throughput per tier against plain file I/O and memcpy
anchors, (2) fused assembly bandwidth against a plain copy of the same bytes, (3) accuracy / TTFT /
FLOPs of KV Packet and its baselines on the testbed ``recall`` task (when the model is shipped).

    python bench/bench_packets.py [--quick] [--json out.json] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

import scrimp
from scrimp.packets import PacketStore, assemble, packet_key


def _best(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def make_packets(n, layers, heads, tokens, dim, dtype):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(1, heads, tokens, dim, generator=g).to(dtype),
              torch.randn(1, heads, tokens, dim, generator=g).to(dtype)) for _ in range(layers)] for _ in range(n)]


def store_bench(args, out):
    L, H, T, D = args.layers, args.heads, args.tokens, args.head_dim
    n = args.packets
    kvs = make_packets(n, L, H, T, D, torch.float32)
    nbytes = L * 2 * H * T * D * 4
    total = n * nbytes
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ids = [[i * 100_000 + t for t in range(T)] for i in range(n)]
    rows = []

    # anchor: memcpy of the same bytes (torch copy into fresh tensors)
    flat = [torch.cat([torch.stack([k, v]) for k, v in kv]) for kv in kvs]
    t = _best(lambda: [f.clone() for f in flat], 3)
    memcpy_gbs = total / t / 1e9
    rows.append(("memcpy (anchor)", "host", memcpy_gbs, None))

    # host tier
    def host_put():
        s = PacketStore(host_bytes=2 * total)
        for kv, tid in zip(kvs, ids):
            s.put(kv, tid, model_fingerprint="bench", inv_freq=inv)
        return s
    t = _best(host_put, 3)
    rows.append(("put", "host", total / t / 1e9, n / t))
    s = host_put()
    keys = [packet_key(tid, "bench") for tid in ids]
    t = _best(lambda: [s.get(k).release() for k in keys], 5)
    rows.append(("get (zero-copy)", "host", total / t / 1e9, n / t))

    # disk tier
    d = tempfile.mkdtemp(prefix="scrimp_bench_")
    try:
        raw = os.path.join(d, "raw.bin")

        def plain_write():
            for f in flat:
                with open(raw, "wb") as fh:
                    fh.write(f.numpy().tobytes())
                    fh.flush()
                    os.fsync(fh.fileno())
        t = _best(plain_write, 2)
        rows.append(("file write+fsync (anchor)", "disk", total / t / 1e9, n / t))
        for fs in (False, True):
            def disk_put():
                shutil.rmtree(os.path.join(d, "pk"), ignore_errors=True)
                s = PacketStore(os.path.join(d, "pk"), host_bytes=0, disk_bytes=4 * total, fsync=fs)
                for kv, tid in zip(kvs, ids):
                    s.put(kv, tid, model_fingerprint="bench", inv_freq=inv)
            t = _best(disk_put, 2)
            rows.append((f"put fsync={fs}", "disk", total / t / 1e9, n / t))

        def plain_read():
            for _ in range(n):
                with open(raw, "rb") as fh:
                    fh.read()
        t = _best(plain_read, 3)
        rows.append(("file read (anchor, page cache)", "disk", nbytes * n / t / 1e9, n / t))
        s = PacketStore(os.path.join(d, "pk"), host_bytes=0, disk_bytes=4 * total)
        t = _best(lambda: [s.get(k).release() for k in keys], 3)
        rows.append(("get (read+crc32c, page cache)", "disk", total / t / 1e9, n / t))
    finally:
        shutil.rmtree(d, ignore_errors=True)

    if args.device == "cuda":
        s = PacketStore(gpu_bytes=2 * total, host_bytes=2 * total)
        t = _best(lambda: [s.put(kv, tid, model_fingerprint="bench-g", inv_freq=inv) for kv, tid in zip(kvs, ids)], 1)
        rows.append(("put (H2D)", "gpu", total / t / 1e9, n / t))
        gk = [packet_key(tid, "bench-g") for tid in ids]
        torch.cuda.synchronize()
        t = _best(lambda: [s.get(k, device="cuda").release() for k in gk], 5)
        rows.append(("get (zero-copy)", "gpu", total / t / 1e9, n / t))

    print(f"store: {n} packets of {nbytes / 1e6:.2f} MB ({L} layers x {H} kv heads x {T} tokens x {D}, float32)", file=out)
    hdr = f"{'operation':<32} {'tier':<5} {'GB/s':>8} {'packets/s':>10}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for op, tier, gbs, ps in rows:
        print(f"{op:<32} {tier:<5} {gbs:8.2f} {'' if ps is None else f'{ps:10.0f}'}", file=out)
    return [{"op": op, "tier": tier, "gb_per_s": gbs, "packets_per_s": ps} for op, tier, gbs, ps in rows]


def assembly_bench(args, out):
    L, H, T, D = args.layers, args.heads, args.tokens, args.head_dim
    dev = args.device
    res = []
    for dtype in (torch.float32, torch.bfloat16):
        s = PacketStore(host_bytes=1 << 31, gpu_bytes=(1 << 31) if dev == "cuda" else 0)
        kvs = make_packets(args.packets, L, H, T, D, dtype)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        pk = []
        for i, kv in enumerate(kvs):
            key = s.put(kv, [i * 100_000 + t for t in range(T)], model_fingerprint="bench", inv_freq=inv)
            pk.append(s.get(key, device=dev))
        S = T * len(pk)
        outs_k = [torch.empty(1, H, S, D, dtype=dtype, device=dev) for _ in range(L)]
        outs_v = [torch.empty(1, H, S, D, dtype=dtype, device=dev) for _ in range(L)]

        def plain_copy():  # same bytes, no rotation: the anchor
            for l in range(L):
                for i, p in enumerate(pk):
                    outs_k[l][:, :, i * T:(i + 1) * T].copy_(p.keys(l))
                    outs_v[l][:, :, i * T:(i + 1) * T].copy_(p.values(l))
            if dev == "cuda":
                torch.cuda.synchronize()

        flat_dst = torch.empty(len(pk), *pk[0].payload.shape, dtype=dtype, device=dev)

        def memcpy():  # the same bytes as one contiguous copy per packet: the bandwidth ceiling
            for i, p in enumerate(pk):
                flat_dst[i].copy_(p.payload)
            if dev == "cuda":
                torch.cuda.synchronize()

        def fused():
            assemble(pk, out=(outs_k, outs_v))
            if dev == "cuda":
                torch.cuda.synchronize()

        def fused_alloc():  # including the allocation of fresh outputs
            assemble(pk)
            if dev == "cuda":
                torch.cuda.synchronize()

        def rerotate_then_cat():  # unfused torch path: rotate each packet (separate op) then concatenate
            for l in range(L):
                ks = [scrimp.rerotate_keys(p.keys(l), i * T, inv) for i, p in enumerate(pk)]
                torch.cat(ks, dim=2)
                torch.cat([p.values(l) for p in pk], dim=2)
            if dev == "cuda":
                torch.cuda.synchronize()

        fused()
        plain_copy()
        nbytes = 2 * sum(p.payload.numel() * p.payload.element_size() for p in pk)  # read + write
        # interleave the candidates so machine-load swings hit all of them alike
        ts = {"memcpy": [], "copy": [], "fused": [], "alloc": [], "unf": []}
        for _ in range(args.reps):
            for k, fn in (("memcpy", memcpy), ("copy", plain_copy), ("fused", fused), ("alloc", fused_alloc),
                          ("unf", rerotate_then_cat)):
                ts[k].append(_best(fn, 1))
        t_mem, t_copy, t_fused, t_alloc, t_unf = (min(ts[k]) for k in ("memcpy", "copy", "fused", "alloc", "unf"))
        res.append({"dtype": str(dtype).replace("torch.", ""), "memcpy_gbs": nbytes / t_mem / 1e9,
                    "fused_vs_memcpy": t_mem / t_fused, "copy_gbs": nbytes / t_copy / 1e9,
                    "fused_gbs": nbytes / t_fused / 1e9, "fused_alloc_gbs": nbytes / t_alloc / 1e9,
                    "unfused_gbs": nbytes / t_unf / 1e9, "fused_vs_copy": t_copy / t_fused})
    print(f"assembly: {args.packets} packets x {T} tokens, {L} layers, {H} kv heads, head_dim {D} on {dev} "
          f"(bytes read + written; memcpy = one contiguous copy per packet, layer copy = torch copy_ into the "
          f"per-layer outputs without rotation; outputs preallocated except fused+alloc)", file=out)
    hdr = (f"{'dtype':<9} {'memcpy GB/s':>12} {'layer copy GB/s':>16} {'fused GB/s':>11} {'fused/memcpy':>13} "
           f"{'fused/layer copy':>17} {'fused+alloc GB/s':>17} {'rotate+cat GB/s':>16}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in res:
        print(f"{r['dtype']:<9} {r['memcpy_gbs']:12.2f} {r['copy_gbs']:16.2f} {r['fused_gbs']:11.2f} "
              f"{100 * r['fused_vs_memcpy']:12.0f}% {100 * r['fused_vs_copy']:16.0f}% {r['fused_alloc_gbs']:17.2f} "
              f"{r['unfused_gbs']:16.2f}", file=out)
    return res


def method_bench(args, out):
    """The method table: on ``--data`` (JSONL) with ``--model``, else on the testbed recall task."""
    from scrimp.packets.compare import DEFAULT_ADAPTERS, compare_methods, format_table, load_adapters
    from scrimp.packets.bench import compare_on_testbed

    try:
        model, tok = scrimp.load_model(args.model, device=args.device)
    except (FileNotFoundError, OSError) as e:
        print(f"method table skipped: model {args.model} is not available ({e})", file=out)
        return None
    path = args.adapters or (DEFAULT_ADAPTERS if args.model == "testbed:recall" else None)
    if path is None or not os.path.exists(path):
        print("method table skipped: no trained adapters (run `scrimp packets train`)", file=out)
        return None
    ad = load_adapters(model, path)
    if args.data:
        from scrimp.packets.data import read_examples
        from scrimp.packets.prompt import build_prompt

        prompts = [build_prompt(tok, e.documents, e.question, answer=e.answer) for e in read_examples(args.data)]
        prompts = prompts[: args.n]
        print(f"{args.data}: n={len(prompts)} prompts, accuracy = reference answer in the greedy output; TTFT = "
              f"median time from prompt to first token with packets already stored; prep FLOPs = FLOPs to "
              f"prepare the context cache (question prefill excluded, same for all)", file=out)
        rows = compare_methods(model, tok, ad, prompts, out=out)
    else:
        print(f"recall task: n={args.n} examples, context {args.context_tokens} tokens, greedy exact match; "
              f"TTFT = median time from prompt to first token with packets already stored; prep FLOPs = "
              f"FLOPs to prepare the context cache (question prefill excluded, same for all)", file=out)
        rows = compare_on_testbed(model, tok, ad, n=args.n, context_tokens=args.context_tokens, out=out)
    print(format_table(rows), file=out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and scrimp.build_info()["cuda_device_usable"] else "cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--packets", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--context-tokens", type=int, default=512)
    ap.add_argument("--adapters", default=None, help="adapter file (default for testbed:recall: the shipped one)")
    ap.add_argument("--model", default="testbed:recall", help="model spec for the method table")
    ap.add_argument("--data", default=None, help="JSONL prompts for the method table (default: testbed recall)")
    ap.add_argument("--skip-method", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.packets, args.reps, args.n = 8, 3, 10
    out = sys.stdout
    load = os.getloadavg()
    print(f"scrimp {scrimp.__version__}  torch threads {torch.get_num_threads()}  OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}  load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=out)
    result = {"store": store_bench(args, out)}
    print(file=out)
    result["assembly"] = assembly_bench(args, out)
    print(file=out)
    if not args.skip_method:
        result["method"] = method_bench(args, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
