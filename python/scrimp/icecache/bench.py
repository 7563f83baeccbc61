"""IceCache vs baselines on the testbed `recall` model, all in one harness and one process.

Tables:
  1. accuracy at budgets 64/128/256/512 relative to the full KV cache, and the attention mass each
     method's attended set captures relative to the oracle (pages holding the top q.k scores);
  2. device memory held by the cache vs context length (full KV vs IceCache at budget 256);
  3. CPU decode time per token, IceCache vs full cache, at the longest context, measured
     alternately in the same process (ratios; the machine is shared, see the load line).

    python bench/bench_icecache.py [--n 40] [--context 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import scrimp
from scrimp import testbed
from scrimp.icecache import IceCache, cache_argument, make_generate_fn

METHODS = ("icecache", "quest", "oracle", "random", "streaming")


#: page size of the testbed tables (the library default). The recall model's records are 7 tokens: a
#: 16-token page holds two to three of them, so at budget 64 the right record competes with its page mates.
TESTBED_PAGE_SIZE = 8


#: the paper's selection (bounds only, unselected pages left out): the "icecache" rows and the baselines
PLAIN = dict(summaries=False, rerank=0)
#: the paper's page geometry (memory and timing tables)
PAPER_GEOMETRY = dict(page_size=16, sink_pages=2, window_pages=2, **PLAIN)


def geometry(budget: int, page_size: int = TESTBED_PAGE_SIZE) -> dict:
    """sink/window pages per budget: 2 + 2 pages, except budget 64 (1 + 1)."""
    sink, window = (1, 1) if budget <= 64 else (2, 2)
    return {"page_size": page_size, "sink_pages": sink, "window_pages": window}


def accuracy_table(model, tok, n, context, budgets, dense_layers, page_size=TESTBED_PAGE_SIZE,
                   reuse_selection=0, methods=METHODS, summaries=False, rerank=0):
    """With ``reuse_selection`` > 0 a row ``icecache+reuseN`` is added per budget: IceCache whose
    selecting layers hand their pages to the next N sparse layers. With ``summaries`` a row
    ``icecache+summaries``: the unselected pages take part through their summary rows (exact masses). With
    ``rerank`` > 0 a row ``icecache+rerankN`` (bound candidates re-scored by their exact max q.k),
    and with both, ``icecache+summaries+rerankN``."""
    rows = []
    variants = [(m, m, dict(PLAIN)) for m in methods]
    if summaries:
        variants.append(("icecache+summaries", "icecache", {"summaries": True, "rerank": 0}))
    if rerank:
        variants.append((f"icecache+rerank{rerank}", "icecache", {"summaries": False, "rerank": rerank}))
        if summaries:
            variants.append((f"icecache+summaries+rerank{rerank}", "icecache", {"summaries": True, "rerank": rerank}))
    if reuse_selection:
        variants.append((f"icecache+reuse{reuse_selection}", "icecache", {"reuse_selection": reuse_selection, **PLAIN}))
    full = testbed.evaluate(model, tok, "recall", n=n, context_tokens=context,
                            generate_fn=make_generate_fn("full", budget=64, max_context=context + 64))
    full_acc = full["accuracy"]
    rows.append({"method": "full", "budget": None, "accuracy": full_acc, "rel_accuracy": 1.0, "mass": 1.0,
                 "rel_mass": None})
    for budget in budgets:
        per = {}
        for name, method, extra in variants:
            rec = []
            fn = make_generate_fn(method, budget=budget, record=rec, measure=True, dense_layers=dense_layers,
                                  max_context=context + 64, **geometry(budget, page_size), **extra)
            res = testbed.evaluate(model, tok, "recall", n=n, context_tokens=context, generate_fn=fn)
            masses = [r["attention_mass"] for r in rec if r["attention_mass"] is not None]
            hits = sum(r["hits"] for r in rec)
            misses = sum(r["misses"] for r in rec)
            per[name] = {"method": name, "budget": budget, "accuracy": res["accuracy"],
                           "rel_accuracy": res["accuracy"] / full_acc if full_acc else float("nan"),
                           "mass": statistics.mean(masses) if masses else float("nan"),
                           "page_cache_hit_rate": hits / (hits + misses) if hits + misses else None}
        for name, _, _ in variants:
            oracle = per["oracle"]["mass"] if "oracle" in per else float("nan")
            per[name]["rel_mass"] = per[name]["mass"] / oracle
            rows.append(per[name])
    return rows


#: budget 64 with 8-token pages, sink 1 + window 1 page, page summaries and exact reranking of 4 bound
#: candidates per selected page (memory and timing tables)
SMALL_BUDGET = dict(budget=64, **geometry(64), summaries=True, rerank=4)


def memory_table(model, tok, lengths, dense_layers):
    rows = []
    variants = (("full", dict(budget=256, method="full", dense_layers=dense_layers)),
                ("icecache", dict(budget=256, dense_layers=dense_layers, **PAPER_GEOMETRY)),
                ("icecache0", dict(budget=256, dense_layers=0, **PAPER_GEOMETRY)),
                ("icecache+summaries", dict(budget=256, dense_layers=dense_layers,
                                            **{**PAPER_GEOMETRY, "summaries": True})),
                ("small_budget", dict(dense_layers=dense_layers, **SMALL_BUDGET)))
    for L in lengths:
        ex = testbed.tasks.recall(seed=123, context_tokens=L, tokenizer=tok)
        ids = torch.tensor([ex.prompt_ids])
        out = {}
        for name, kw in variants:
            cache = IceCache(model.config, max_context=ids.shape[1] + 64, **kw)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), **{cache_argument(model): cache}, max_new_tokens=4,
                               do_sample=False, pad_token_id=tok.pad_token_id)
            out[name] = cache.device_bytes()
            if name == "icecache":
                out["host_pool"] = cache.stats()["host_pool_bytes"]
                sparse = [l for l in cache.layers if hasattr(l, "device_bytes")]
                out["sparse_layer"] = sparse[0].device_bytes() if sparse else 0
        rows.append({"prompt_tokens": int(ids.shape[1]), "full_bytes": out["full"], "icecache_bytes": out["icecache"],
                     "icecache_no_dense_bytes": out["icecache0"], "icecache_summaries_bytes": out["icecache+summaries"],
                     "small_budget_bytes": out["small_budget"],
                     "icecache_sparse_layer_bytes": out["sparse_layer"], "host_pool_bytes": out["host_pool"]})
    return rows


def decode_ms(model, ids, dense_layers, steps=16, **cache_kw):
    """Milliseconds per decode step after a prefill of `ids`, timing only the decode forwards."""
    cache = IceCache(model.config, dense_layers=dense_layers, max_context=ids.shape[1] + steps + 16,
                     **{"budget": 256, **cache_kw})
    with torch.no_grad():
        out = model(ids, **{cache_argument(model): cache})
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, **{cache_argument(model): cache})
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / steps * 1e3


def timing_table(model, tok, context, dense_layers, reps=5):
    ex = testbed.tasks.recall(seed=7, context_tokens=context, tokenizer=tok)
    ids = torch.tensor([ex.prompt_ids])
    variants = {"full": dict(method="full"), "icecache": PAPER_GEOMETRY,
                "icecache+summaries": {**PAPER_GEOMETRY, "summaries": True},
                "small_budget": SMALL_BUDGET}
    times = {name: [] for name in variants}
    for _ in range(reps):  # anchor and candidates alternate in the same process
        for name, kw in variants.items():
            times[name].append(decode_ms(model, ids, dense_layers, **kw))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"prompt_tokens": int(ids.shape[1]), "full_ms_per_token": med["full"],
            "icecache_ms_per_token": med["icecache"], "ratio_icecache_over_full": med["icecache"] / med["full"],
            "icecache_summaries_ms_per_token": med["icecache+summaries"],
            "ratio_summaries_over_full": med["icecache+summaries"] / med["full"],
            "small_budget_ms_per_token": med["small_budget"],
            "ratio_small_budget_over_full": med["small_budget"] / med["full"], "samples_ms": times}


def arith_table(n=30, budgets=(48, 64, 96), methods=("icecache", "quest", "oracle", "random", "streaming")):
    """Greedy accuracy on the testbed arith task (Qwen3 arith-teacher; prompts ~30 tokens, traces
    ~100-200): tokens move from the window into the index during decoding, so small budgets select
    among evicted pages. sink 1 + window 1 page; dense_layers 1."""
    model, tok = testbed.load("arith-teacher")
    full = testbed.evaluate(model, tok, "arith", n=n)
    rows = [{"method": "full", "budget": None, "accuracy": full["accuracy"], "same_output": n}]
    for budget in budgets:
        for method in methods:
            fn = make_generate_fn(method, budget=budget, page_size=16, sink_pages=1, window_pages=1, dense_layers=1,
                                  max_context=1024, **PLAIN)
            r = testbed.evaluate(model, tok, "arith", n=n, generate_fn=fn)
            same = sum(a["output"] == b["output"] for a, b in zip(r["results"], full["results"]))
            rows.append({"method": method, "budget": budget, "accuracy": r["accuracy"], "same_output": same})
    return rows


def synthetic_table(N=4096, D=64, topics=64, pages=(4, 8, 16), trials=20, seed=0):
    """Attention mass captured on synthetic keys: `topics` directions scattered over time, queries
    aimed at one topic. Page selection only (no model), same index code as the cache."""
    from scrimp import _C

    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(topics, D, generator=g), dim=-1)
    topic = torch.randint(0, topics, (N,), generator=g)
    keys = dirs[topic] * 4 + 0.5 * torch.randn(N, D, generator=g)
    k4 = keys.view(1, 1, N, D).contiguous()
    variants = {"icecache": (True, "bounds"), "quest": (False, "bounds"), "oracle": (False, "oracle"),
                "random": (False, "random")}
    idx = {}
    for name, (cluster, score) in variants.items():
        idx[name] = _C.ClusteredCache(1, 1, 1, D, 16, N // 16 + 8, max(pages), "float32", cluster, score)
        idx[name].build(k4, k4, torch.arange(N))
    rows = []
    for k in pages:
        mass = {name: [] for name in variants}
        for t in range(trials):
            q = dirs[t % topics] * 8 + 0.5 * torch.randn(D, generator=g)
            p = torch.softmax(keys @ q / math.sqrt(D), 0)
            for name, ix in idx.items():
                sel = torch.empty(1, 1, k, dtype=torch.int32)
                ix.select(q.view(1, 1, D).contiguous(), k, sel)
                pos = torch.empty(1, 1, k, 16, dtype=torch.long)
                ix.page_positions(sel, k, pos)
                pos = pos.flatten()
                mass[name].append(float(p[pos[pos >= 0]].sum()))
        rows.append({"pages": k, **{name: statistics.mean(v) for name, v in mass.items()}})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--context", type=int, default=2048, help="recall context in tokens")
    ap.add_argument("--page-size", type=int, default=TESTBED_PAGE_SIZE, help="tokens per page (accuracy table)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    # 0 for the 4-layer testbed model: with its first 2 layers dense, the key look-up happens there and
    # every method - streaming included - reproduces the full cache, so the budget is never tested
    ap.add_argument("--dense-layers", type=int, default=0,
                    help="first layers kept dense (default 0: the testbed model has only 4 layers)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--reuse-selection", type=int, default=0,
                    help="also measure IceCache with each selection reused by the next N sparse layers")
    ap.add_argument("--summaries", action="store_true",
                    help="also measure IceCache with page summaries for the unselected pages (scrimp's extension)")
    ap.add_argument("--rerank", type=int, default=0,
                    help="also measure IceCache whose bound candidates (N per selected page) are re-scored by "
                         "their exact max q.k (scrimp's extension)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="methods of the accuracy table (the oracle is the reference of 'rel.oracle')")
    ap.add_argument("--skip-arith", action="store_true")
    ap.add_argument("--random-weights", action="store_true",
                    help="the recall model's architecture with random weights (memory and timing only; no accuracy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    result = {}
    syn = synthetic_table()
    print("0. attention mass captured by the selected pages on synthetic keys (64 topics scattered over 4096 "
          "tokens, queries aimed at one topic; no model)")
    print(f"  {'pages':>5} " + " ".join(f"{m:>9}" for m in ("icecache", "quest", "oracle", "random")))
    for r in syn:
        print(f"  {r['pages']:>5} " + " ".join(f"{r[m]:>9.3f}" for m in ("icecache", "quest", "oracle", "random")))
    print()

    if not args.skip_arith:
        try:
            ar = arith_table(n=args.n)
        except FileNotFoundError as e:
            ar = None
            print(f"(arith table skipped: {e})")
        if ar:
            result["arith"] = ar
            print(f"1b. testbed arith (Qwen3 arith-teacher), n={args.n}, sink 1 + window 1 page, dense_layers 1: "
                  "accuracy and outputs identical to the full cache's")
            print(f"  {'method':<10} {'budget':>6} {'accuracy':>8} {'same output':>11}")
            for r in ar:
                print(f"  {r['method']:<10} {str(r['budget'] or 'all'):>6} {r['accuracy']:>8.3f} "
                      f"{r['same_output']:>8d}/{args.n}")
            print()

    if args.random_weights:
        from scrimp.testbed import train
        from scrimp.testbed.tokenizer import get_tokenizer

        tok = get_tokenizer()
        model = train.build_model(train.RECIPES[("recall", "teacher")], tok, seed=0).eval()
        model.config._attn_implementation = "sdpa"
        args.skip_accuracy = True
        print("(random weights with the recall model's architecture: accuracy is skipped)")
    else:
        model, tok = testbed.load("recall")
    cfg = model.config
    load = os.getloadavg()
    print(f"scrimp {scrimp.__version__}; recall model: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
          f"q heads / {cfg.num_key_value_heads} KV heads, dim {cfg.hidden_size}; dense_layers={args.dense_layers}; "
          f"torch threads {torch.get_num_threads()}; load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    result.update({"synthetic": syn, "n": args.n, "context": args.context, "dense_layers": args.dense_layers,
                   "page_size": args.page_size,
                   "load_avg": load})

    if not args.skip_accuracy:
        t0 = time.perf_counter()
        rows = accuracy_table(model, tok, args.n, args.context, args.budgets, args.dense_layers, args.page_size,
                              args.reuse_selection, tuple(args.methods), args.summaries, args.rerank)
        result["accuracy"] = rows
        print(f"\n1. recall accuracy, n={args.n}, context {args.context}, page size {args.page_size} "
              f"({time.perf_counter() - t0:.0f} s)")
        print(f"  {'method':<18} {'budget':>6} {'sink+win':>8} {'accuracy':>8} {'rel.full':>8} {'mass':>7} "
              f"{'rel.oracle':>10} {'hit rate':>8}")
        for r in rows:
            g = geometry(r["budget"], args.page_size) if r["budget"] else None
            sw = f"{g['sink_pages']}+{g['window_pages']}" if g else "-"
            hr = r.get("page_cache_hit_rate")
            print(f"  {r['method']:<18} {str(r['budget'] or 'all'):>6} {sw:>8} {r['accuracy']:>8.3f} "
                  f"{r['rel_accuracy']:>8.3f} {r['mass']:>7.3f} "
                  f"{(r['rel_mass'] if r['rel_mass'] is not None else float('nan')):>10.3f} "
                  f"{(hr if hr is not None else float('nan')):>8.3f}")

    mem = memory_table(model, tok, args.lengths, args.dense_layers)
    result["memory"] = mem
    print("\n2. device memory held by the KV cache (budget 256; the first dense_layers layers stay full)")
    print(f"  {'prompt':>7} {'full KiB':>10} {'IceCache KiB':>13} {'ratio':>6} {'dense_layers=0 KiB':>19} "
          f"{'per sparse layer KiB':>21} {'host pool KiB':>14} {'+summaries KiB':>15} {'64/8+summ+rerank KiB':>21}")
    for r in mem:
        print(f"  {r['prompt_tokens']:>7} {r['full_bytes'] / 1024:>10.1f} {r['icecache_bytes'] / 1024:>13.1f} "
              f"{r['icecache_bytes'] / r['full_bytes']:>6.3f} {r['icecache_no_dense_bytes'] / 1024:>19.1f} "
              f"{r['icecache_sparse_layer_bytes'] / 1024:>21.1f} {r['host_pool_bytes'] / 1024:>14.1f} "
              f"{r['icecache_summaries_bytes'] / 1024:>15.1f} {r['small_budget_bytes'] / 1024:>21.1f}")

    t = timing_table(model, tok, max(args.lengths), args.dense_layers)
    result["timing"] = t
    print(f"\n3. CPU decode time per token at {t['prompt_tokens']} prompt tokens (median of alternating runs)")
    print(f"  full {t['full_ms_per_token']:.2f} ms, IceCache {t['icecache_ms_per_token']:.2f} ms "
          f"(ratio {t['ratio_icecache_over_full']:.2f}), with summaries {t['icecache_summaries_ms_per_token']:.2f} ms "
          f"(ratio {t['ratio_summaries_over_full']:.2f}), budget 64 with 8-token pages, summaries and rerank 4 "
          f"{t['small_budget_ms_per_token']:.2f} ms (ratio {t['ratio_small_budget_over_full']:.2f}); "
          f"load avg now {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
