"""End to end: `model.generate` of a Llama-3.1-8B-shaped model (random bf16 weights) at long context,
the default dynamic cache (the anchor) vs IceCache (budget 256) with its defaults and with the
paper's configuration (``scrimp.icecache.PAPER``), same run; time per output token and peak device
memory. Mirrors bench/anchors/gpu_e2e.py decode, whose H200 numbers
(bench/anchors/h200-e2e-decode.json) also have transformers' offloaded cache. Without a GPU it runs
a tiny model on the CPU as a smoke test.

    python bench/bench_icecache_e2e.py [--lengths 32768 131072] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import scrimp
from scrimp.icecache import cache_argument


def config(small):
    if small:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    small = not torch.cuda.is_available()
    dev = "cpu" if small else "cuda"
    cfg = config(small)
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    weights = torch.cuda.memory_allocated() / 2**30 if not small else 0.0
    lengths = args.lengths or ([1024] if small else [32768, 131072])
    new = 8 if small else args.new
    res = {"device": dev, "weights_GiB": weights, "rows": []}
    print(f"device {dev}; weights {weights:.1f} GiB")
    for L in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
        for impl in ("dynamic", "icecache", "icecache-paper"):
            gc.collect()
            if not small:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            def gen(n):
                kw = {}
                if impl != "dynamic":
                    extra = scrimp.icecache.PAPER if impl == "icecache-paper" else {}
                    kw[cache_argument(model)] = scrimp.IceCache(model.config, budget=args.budget, device=dev,
                                                                max_context=L + n + 16, **extra)
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0, **kw)
                if not small:
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            try:
                t1 = gen(1)
                tn = gen(new)
                tpot = (tn - t1) / (new - 1)
                peak = torch.cuda.max_memory_allocated() / 2**30 if not small else float("nan")
                row = {"L": L, "cache": impl, "prefill_s": t1, "tpot_ms": tpot * 1e3, "peak_GiB": peak}
                print(f"L={L:>6} {impl:<14} prefill {t1:7.2f} s  TPOT {tpot * 1e3:8.1f} ms  peak {peak:6.1f} GiB")
            except Exception as e:  # report and go on (e.g. out of memory)
                row = {"L": L, "cache": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"L={L:>6} {impl:<14} failed: {row['error']}")
            res["rows"].append(row)
        dyn, ice = (next((r for r in res["rows"] if r["L"] == L and r["cache"] == c and "error" not in r), None)
                    for c in ("dynamic", "icecache"))
        if dyn and ice:  # what IceCache adds to the prefill: clustering and the index build
            over = (ice["prefill_s"] - dyn["prefill_s"]) / dyn["prefill_s"]
            res.setdefault("prefill_overhead", {})[L] = over
            print(f"L={L:>6} IceCache prefill overhead (clustering + index) {100 * over:+.1f}% of the dynamic "
                  f"cache's prefill (target <= 10% at 32k)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
