"""Decode time per token at long context (CPU, or ``--device cuda``): IceCache (its defaults) vs transformers'
DynamicCache, in the same run, steps interleaved (one step of each in turn), on a random-weight
decoder with Llama-3.1-8B's attention layout (head dim 128, 4 query heads per KV head).

    OMP_NUM_THREADS=1 python bench/bench_icecache_decode.py --lengths 8192 32768 --steps 16
    python bench/bench_icecache_decode.py --device cuda --lengths 32768 131072    # bench/gpu_check.sh

Prints per length the median ms/token of each cache and their ratio (IceCache / dynamic); ``--json``
writes the rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import scrimp
from scrimp.icecache import cache_argument


def model_for_bench(layers: int, seed: int = 0):
    """~60M-parameter Llama: hidden 1024, 8 query heads and 2 KV heads of 128, vocab 8192, float32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=140000,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def prefill(model, ids, cache, chunk):
    arg = cache_argument(model)
    out = None
    with torch.no_grad():
        for a in range(0, ids.shape[1], chunk):
            out = model(ids[:, a:a + chunk], **{arg: cache}, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="prompt lengths in tokens")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per cache and length")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random-weight model")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (both caches)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model, the full cache and IceCache's "
                                                    "device pages there)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for name in ("steps", "layers", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    model = model_for_bench(args.layers).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters, {args.layers} layers; {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = []
    arg = cache_argument(model)
    for n in args.lengths:
        ids = torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        caches = {"dynamic": DynamicCache(config=model.config),
                  "icecache": scrimp.IceCache(model, prefill_chunk=args.chunk)}
        nxt = {}
        for name, cache in caches.items():
            t0 = time.perf_counter()
            nxt[name] = prefill(model, ids, cache, args.chunk)
            sync()
            print(f"{n} {name}: prefill {time.perf_counter() - t0:.0f} s", flush=True)
        times = {name: [] for name in caches}
        with torch.no_grad():
            for _ in range(args.steps + 1):  # the first step of each is a warm-up
                for name, cache in caches.items():
                    sync()
                    t0 = time.perf_counter()
                    out = model(nxt[name], **{arg: cache}, use_cache=True)
                    sync()
                    times[name].append(time.perf_counter() - t0)
                    nxt[name] = out.logits[:, -1:].argmax(-1)
        ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
        row = {"tokens": n, "device": str(device), "dynamic_ms": ms["dynamic"], "icecache_ms": ms["icecache"],
               "ratio": ms["icecache"] / ms["dynamic"], "steps": args.steps,
               "icecache_device_bytes": caches["icecache"].device_bytes()}
        rows.append(row)
        del caches, nxt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{n} tokens: dynamic {ms['dynamic']:.1f} ms/token, icecache {ms['icecache']:.1f} ms/token, "
              f"ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params, "layers": args.layers, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
