"""IceCache fidelity on the testbed recall model, per example seed: settings are chosen on tuning seeds
and reported on held-out seeds whose prompts no choice saw.

Example ``i`` of seed ``s`` is ``testbed.tasks.recall(seed=s * 1_000_003 + i, context_tokens=...)`` (the
numbering of ``testbed.evaluate`` and ``scrimp icecache eval``). Before anything runs, the prompts of
every ``--seeds`` seed are checked to share no prompt with the first ``--tuning-n`` prompts of each
``--tuning-seeds`` seed (ValueError otherwise). Per seed the full cache runs once; every configuration's
greedy answers are scored by ``scrimp.icecache.answer_matches`` and compared with the full cache's.

Configurations (``--configs``, names from CONFIGS): the library default, the paper's algorithm with
8-token pages, and scrimp's extensions (page summaries, exact rerank), at budgets 256 and 64.

    OMP_NUM_THREADS=1 python bench/bench_icecache_heldout.py --seeds 1 2 --n 100 --json heldout.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time

import torch

from scrimp import testbed
from scrimp.icecache import answer_matches, make_generate_fn

#: name -> IceCache options (dense_layers 0 everywhere: the recall model has 4 layers, and with its
#: first 2 dense the look-up happens there, so the budget would not be tested). "paper" names spell out
#: the sink and window (2 + 2 pages, the paper's; "sink1win1": 1 + 1) so that they do not follow the
#: library defaults; "default" is whatever the library's defaults are.
CONFIGS = {
    "default@256": dict(budget=256),
    "paper16@256": dict(budget=256, sink_pages=2, window_pages=2, page_size=16, summaries=False, rerank=0),
    "paper8@256": dict(budget=256, sink_pages=2, window_pages=2, page_size=8, summaries=False, rerank=0),
    "paper8+rerank4@256": dict(budget=256, sink_pages=2, window_pages=2, page_size=8, summaries=False, rerank=4),
    "paper8+summaries@256": dict(budget=256, sink_pages=2, window_pages=2, page_size=8, summaries=True, rerank=0),
    "paper8+summaries+rerank4@256": dict(budget=256, sink_pages=2, window_pages=2, page_size=8, summaries=True, rerank=4),
    "default@64": dict(budget=64),
    "paper8@64": dict(budget=64, sink_pages=2, window_pages=2, page_size=8, summaries=False, rerank=0),
    "paper8+sink1win1@64": dict(budget=64, page_size=8, sink_pages=1, window_pages=1, summaries=False, rerank=0),
    "paper8+summaries+sink1win1@64": dict(budget=64, page_size=8, sink_pages=1, window_pages=1, summaries=True,
                                          rerank=0),
    "paper8+summaries+rerank4@64": dict(budget=64, sink_pages=2, window_pages=2, page_size=8, summaries=True, rerank=4),
    "paper8+summaries+rerank4+sink1win1@64": dict(budget=64, page_size=8, sink_pages=1, window_pages=1,
                                                  summaries=True, rerank=4),
    "paper8+rerank4+sink1win1@64": dict(budget=64, page_size=8, sink_pages=1, window_pages=1, summaries=False,
                                        rerank=4),
    "paper8+summaries+rerank8+sink1win1@64": dict(budget=64, page_size=8, sink_pages=1, window_pages=1,
                                                  summaries=True, rerank=8),
    "paper8+summaries+rerank8+sink1win1@256": dict(budget=256, page_size=8, sink_pages=1, window_pages=1,
                                                   summaries=True, rerank=8),
    "paper8+summaries+rerank4+sink1win1@256": dict(budget=256, page_size=8, sink_pages=1, window_pages=1,
                                                   summaries=True, rerank=4),
}
#: the defaults with another number of summary rows per KV head (the fixed stand-ins' size; default 64),
#: named by the count so that they do not follow the library default: the frontier
for _rows in (16, 32, 64, 128, 256, 512):
    for _budget in (256, 64):
        CONFIGS[f"rows{_rows}@{_budget}"] = dict(budget=_budget, summary_rows=_rows)
#: the defaults with the mean-key estimate of each summary row's mass (``summary_mass="mean"``)
for _budget in (256, 64):
    CONFIGS[f"mean@{_budget}"] = dict(budget=_budget, summary_mass="mean")
    for _rows in (64, 512, 2**20):
        CONFIGS[f"rows{'-per-page' if _rows == 2**20 else _rows}+mean@{_budget}"] = dict(
            budget=_budget, summary_rows=_rows, summary_mass="mean")
#: one summary row per page at any length up to 8M tokens (the unbounded reference of the frontier)
for _budget in (256, 64):
    CONFIGS[f"rows-per-page@{_budget}"] = dict(budget=_budget, summary_rows=2**20)


def examples(tok, seed, n, context, filler_share=0.0):
    out = []
    for i in range(n):
        ex = testbed.tasks.recall(seed=seed * 1_000_003 + i, context_tokens=context, tokenizer=tok,
                                  filler_share=filler_share)
        out.append((list(ex.prompt_ids), ex.answer, ex.question_span[0]))
    return out


def digest(ids) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def check_disjoint(tok, seeds, n, tuning_seeds, tuning_n, context, filler_share=0.0):
    """ValueError when a reporting seed shares a prompt with the tuning prompts (or another reporting seed)."""
    tuned = {digest(ids) for s in tuning_seeds for ids, _, _ in examples(tok, s, tuning_n, context, filler_share)}
    seen = set()
    for s in seeds:
        got = {digest(ids) for ids, _, _ in examples(tok, s, n, context, filler_share)}
        if got & tuned:
            raise ValueError(f"seed {s} shares {len(got & tuned)} prompts with the tuning seeds {tuning_seeds}")
        if got & seen:
            raise ValueError(f"seed {s} shares prompts with another reporting seed")
        seen |= got
    return len(tuned), len(seen)


def run(model, tok, exs, options, max_context):
    """(greedy answers, mean device bytes of the cache at the end of each prompt's generation)."""
    record = []
    fn = make_generate_fn(max_context=max_context, record=record, **options)
    outs = []
    with torch.no_grad():
        for ids, answer, _ in exs:
            new = fn(model, tok, torch.tensor([ids]), len(tok(answer, add_special_tokens=False).input_ids) + 1)
            cut = []
            for t in new.tolist():
                if t == tok.eos_token_id:
                    break
                cut.append(t)
            outs.append(tok.decode(cut, skip_special_tokens=True))
    return outs, statistics.mean(r["device_bytes"] for r in record)


def dump_prompts(path, seed, exs, full, full_ok, checkpoint, append):
    """One JSONL line per prompt: what bench_kvpress_recall.py (another environment) needs to score the
    same prompts against the same full-cache answers."""
    with open(path, "a" if append else "w") as f:
        for i, ((ids, answer, q0), out, ok) in enumerate(zip(exs, full, full_ok)):
            f.write(json.dumps({"seed": seed, "index": i, "prompt_ids": ids, "question_start": q0, "answer": answer,
                                "full_output": out, "full_correct": bool(ok), "checkpoint": checkpoint}) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="reporting (held-out) example seeds")
    ap.add_argument("--n", type=int, default=100, help="prompts per seed")
    ap.add_argument("--tuning-seeds", type=int, nargs="+", default=[0], help="example seeds settings were chosen on")
    ap.add_argument("--tuning-n", type=int, default=100, help="prompts per tuning seed")
    ap.add_argument("--context", type=int, default=2048, help="recall prompt length in tokens")
    ap.add_argument("--filler-share", type=float, default=0.0,
                    help="share of each context given to filler lines (8,192-token prompts need 0.5)")
    ap.add_argument("--model", default="recall", help="testbed recall checkpoint (recall, recall-8k)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every configuration)")
    ap.add_argument("--dump-prompts", default=None,
                    help="write every reporting prompt with the full cache's answer here (JSONL, the input of "
                         "bench_kvpress_recall.py)")
    args = ap.parse_args(argv)

    model, tok = testbed.load(args.model)
    model.config._attn_implementation = "sdpa"
    n_tuned, n_held = check_disjoint(tok, args.seeds, args.n, args.tuning_seeds, args.tuning_n, args.context,
                                    args.filler_share)
    print(f"{n_held} reporting prompts (seeds {args.seeds}) share none of the {n_tuned} tuning prompts "
          f"(seeds {args.tuning_seeds}, first {args.tuning_n} each); load avg {os.getloadavg()[0]:.2f}", flush=True)
    result = {"seeds": args.seeds, "n": args.n, "tuning_seeds": args.tuning_seeds, "tuning_n": args.tuning_n,
              "context": args.context, "filler_share": args.filler_share, "model": args.model,
              "dense_layers": 0, "rows": []}
    max_context = args.context + 64
    for seed in args.seeds:
        exs = examples(tok, seed, args.n, args.context, args.filler_share)
        t0 = time.perf_counter()
        full, full_bytes = run(model, tok, exs, dict(method="full"), max_context)
        full_ok = [answer_matches(o, a) for o, (_, a, _) in zip(full, exs)]
        if args.dump_prompts:
            dump_prompts(args.dump_prompts, seed, exs, full, full_ok, testbed.path(args.model),
                         append=seed != args.seeds[0])
        result["rows"].append({"seed": seed, "config": "full", "correct": sum(full_ok), "n": len(exs),
                               "same_as_full": len(exs), "device_bytes": full_bytes,
                               "seconds": time.perf_counter() - t0})
        print(f"seed {seed} full: {sum(full_ok)}/{len(exs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name in args.configs:
            t0 = time.perf_counter()
            outs, device_bytes = run(model, tok, exs, {"dense_layers": 0, **CONFIGS[name]}, max_context)
            ok = [answer_matches(o, a) for o, (_, a, _) in zip(outs, exs)]
            row = {"seed": seed, "config": name, "options": CONFIGS[name], "correct": sum(ok), "n": len(exs),
                   "full_correct": sum(full_ok), "relative": sum(ok) / max(sum(full_ok), 1),
                   "same_as_full": sum(a == b for a, b in zip(outs, full)),
                   "lost": sum(f and not o for f, o in zip(full_ok, ok)),
                   "gained": sum(o and not f for f, o in zip(full_ok, ok)), "device_bytes": device_bytes,
                   "seconds": time.perf_counter() - t0}
            result["rows"].append(row)
            print(f"seed {seed} {name}: {row['correct']}/{row['n']} (relative {row['relative']:.3f}, same as full "
                  f"{row['same_as_full']}, lost {row['lost']}, gained {row['gained']}; "
                  f"{device_bytes / 2**10:.0f} device KiB; {row['seconds']:.0f} s)",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
    print("\nconfig                                    " + " ".join(f"seed {s:>3}" for s in args.seeds)
          + "   pooled  relative  spread  device KiB")
    names = ["full"] + list(args.configs)
    for name in names:
        rows = [r for r in result["rows"] if r["config"] == name]
        corr, n = sum(r["correct"] for r in rows), sum(r["n"] for r in rows)
        fulls = sum(r["correct"] for r in result["rows"] if r["config"] == "full")
        rel = [r["correct"] / max(r.get("full_correct", r["correct"]), 1) for r in rows]
        spread = max(rel) - min(rel) if len(rel) > 1 else 0.0
        kib = statistics.mean(r["device_bytes"] for r in rows) / 2**10
        print(f"{name:<41} " + " ".join(f"{r['correct']:>4}/{r['n']:<3}" for r in rows)
              + f"  {corr / n:>7.3f}  {corr / max(fulls, 1):>8.3f}  {spread:>6.3f}  {kib:>10.0f}")
        result.setdefault("pooled", {})[name] = {"correct": corr, "n": n, "relative": corr / max(fulls, 1),
                                                 "relative_per_seed": rel, "spread": spread, "device_kib": kib}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
