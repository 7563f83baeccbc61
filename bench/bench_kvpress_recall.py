"""kvpress's presses on the testbed recall prompts that bench_icecache_heldout.py scores IceCache on:
accuracy and device KV bytes at a given number of kept tokens per layer and KV head.

This script does not import scrimp: kvpress supports transformers < 5.3, scrimp >= 5.16.1, so it runs
in an environment of its own, e.g.

    python -m venv kvp && kvp/bin/pip install torch==2.13.0 'transformers>=5.2,<5.3' kvpress==0.5.5
    # in scrimp's environment: the held-out prompts, checked against the tuning seeds
    python bench/bench_icecache_heldout.py --model recall-8k --context 8192 --filler-share 0.5 --seeds 3 4 \
        --n 100 --tuning-seeds 0 --tuning-n 100 --dump-prompts prompts8k.jsonl
    OMP_NUM_THREADS=1 kvp/bin/python bench/bench_kvpress_recall.py --prompts prompts8k.jsonl \
        --configs snapkv+q@64 snapkv+q@256 snapkv@256 expected_attention@256 --json kvpress8k.json

Each prompt line is ``{"seed", "index", "prompt_ids", "question_start", "answer", "checkpoint"}``. A press
runs in one of two modes:

* query-agnostic (``NAME@B``): the context (``prompt_ids[:question_start]``) is prefilled under the
  press, then the question is fed uncompressed: what IceCache does (it never sees the question at prefill);
* question inside the prefill (``NAME+q@B``): everything but the prompt's last token is prefilled under
  the press, SnapKV's observation window set to the question's tokens, then the last token is fed.

Then greedy decoding of the answer's token count + 1 tokens at the true positions (the cache holds fewer
tokens than the positions say). Scoring is ``scrimp.icecache.answer_matches``'s rule: the stripped output
starts with the answer, not followed by a letter or digit. Device bytes: the keys and values the cache
holds at the end of the generation (every layer), the measure IceCache's ``device_bytes`` reports for its own.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = ("snapkv", "expected_attention", "knorm", "streaming_llm", "tova")


def make_press(name: str, ratio: float, window: int):
    """The press at ``ratio``; SnapKV observes the last ``window`` prefill tokens."""
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=window)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}; presses: {PRESSES}")


def parse_config(text: str):
    """'snapkv+q@256' -> ('snapkv', True, 256)."""
    name, _, budget = text.partition("@")
    with_question = name.endswith("+q")
    name = name[:-2] if with_question else name
    if name not in PRESSES or not budget.isdigit() or int(budget) < 1:
        raise ValueError(f"config {text!r}: expected PRESS[+q]@TOKENS with PRESS in {PRESSES}")
    return name, with_question, int(budget)


def answer_matches(output: str, answer: str) -> bool:
    out, ans = output.strip(), answer.strip()
    return out.startswith(ans) and not (len(out) > len(ans) and out[len(ans)].isalnum())


def run_one(model, tok, ex, press_name, with_question, budget):
    """(output text, device bytes of the compressed cache) for one prompt."""
    ids = torch.tensor([ex["prompt_ids"]])
    cut = ids.shape[1] - 1 if with_question else ex["question_start"]
    cache = DynamicCache()
    ratio = max(0.0, 1.0 - (budget + 0.5) / cut)  # kvpress keeps int(cut * (1 - ratio)) = budget tokens
    # SnapKV's observation window: the question's tokens when they are in the prefill, else its default 64
    window = max(cut - ex["question_start"], 1) if with_question else 64
    with torch.no_grad():
        with make_press(press_name, ratio, window)(model):
            model(ids[:, :cut], past_key_values=cache)
        n_new = len(tok(ex["answer"], add_special_tokens=False).input_ids) + 1
        pos = torch.arange(cut, ids.shape[1]).unsqueeze(0)
        logits = model(ids[:, cut:], past_key_values=cache, position_ids=pos).logits
        out = [int(logits[0, -1].argmax())]
        p = ids.shape[1]
        while len(out) < n_new and out[-1] != tok.eos_token_id:
            logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, position_ids=torch.tensor([[p]])).logits
            out.append(int(logits[0, -1].argmax()))
            p += 1
        nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True), nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="JSONL from bench_icecache_heldout.py --dump-prompts")
    ap.add_argument("--configs", nargs="+", required=True, help="PRESS[+q]@TOKENS (kept tokens per layer, KV head)")
    ap.add_argument("--n", type=int, default=None, help="first N prompts of each seed (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    configs = [(c, *parse_config(c)) for c in args.configs]
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.n:
        rows = [r for r in rows if r["index"] < args.n]
    if not rows:
        raise ValueError(f"{args.prompts}: no prompts")
    ckpt = rows[0]["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    seeds = sorted({r["seed"] for r in rows})
    result = {"prompts": args.prompts, "checkpoint": ckpt, "n": len(rows), "seeds": seeds,
              "full_correct": sum(r["full_correct"] for r in rows), "configs": []}
    print(f"{len(rows)} prompts (seeds {seeds}), full cache {result['full_correct']} correct", flush=True)
    # interleaved: every configuration on prompt i before prompt i + 1, so machine load hits every row alike
    stats = {c: {"correct": 0, "per_seed": {s: 0 for s in seeds}, "bytes": [], "same_as_full": 0}
             for c, *_ in configs}
    t0 = time.perf_counter()
    for i, ex in enumerate(rows):
        for c, name, with_q, budget in configs:
            out, nbytes = run_one(model, tok, ex, name, with_q, budget)
            ok = answer_matches(out, ex["answer"])
            st = stats[c]
            st["correct"] += ok
            st["per_seed"][ex["seed"]] += ok
            st["bytes"].append(nbytes)
            st["same_as_full"] += out.strip() == ex["full_output"].strip()
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(rows)} prompts ({time.perf_counter() - t0:.0f} s): "
                  + ", ".join(f"{c} {stats[c]['correct']}" for c, *_ in configs), flush=True)
    full_per_seed = {s: sum(r["full_correct"] for r in rows if r["seed"] == s) for s in seeds}
    print(f"{'config':<26} {'device KiB':>10} {'correct':>8} {'of full':>8} {'per seed':>20} {'same as full':>13}")
    for c, name, with_q, budget in configs:
        st = stats[c]
        kib = sum(st["bytes"]) / len(st["bytes"]) / 2**10
        rel = st["correct"] / max(result["full_correct"], 1)
        per = {s: st["per_seed"][s] / max(full_per_seed[s], 1) for s in seeds}
        result["configs"].append({"config": c, "press": name, "question_in_prefill": with_q, "budget": budget,
                                  "device_kib": kib, "correct": st["correct"], "per_seed": st["per_seed"],
                                  "relative": rel, "relative_per_seed": per, "same_as_full": st["same_as_full"]})
        print(f"{c:<26} {kib:>10.0f} {st['correct']:>8} {rel:>8.3f} "
              f"{' / '.join(f'{v:.3f}' for v in per.values()):>20} {st['same_as_full']:>9}/{len(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
