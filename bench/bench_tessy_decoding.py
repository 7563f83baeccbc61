"""TESSY synthesis throughput: incremental decoding (per-problem KV caches) against re-prefill.

    python bench/bench_tessy_decoding.py                       # testbed pair + a random-weight pair at ~4k tokens
    python bench/bench_tessy_decoding.py --device cuda --long-hidden 1024 --long-layers 16 --long-n 32

Two settings, each run with ``--decoding reprefill`` and ``incremental`` on the same problems, greedy:

1. the shipped testbed pair (arith-teacher + arith-student, lexicon predictors, k = 20/20): short traces;
2. a random-weight pair, Llama teacher (``--long-layers``) + 2-layer Qwen2 student of the same width, built
   with tests/python/hf_models.py, whose
   traces never close their thinking and run to ``--long-tokens`` tokens (``length`` failures: the work of a
   long trace without a trained model), lexicon predictors over frequent corpus words so that the roles
   switch every few spans.

Reported per run: problems/min, tokens prefilled / reused from the caches, and whether the greedy traces
(every span of every problem) are identical between the two decodings.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))


def _recording(backend):
    backend.log = []
    inner = backend.generate

    async def generate(prompt, max_tokens, params, **kw):
        r = await inner(prompt, max_tokens, params, **kw)
        backend.log.append((prompt, r.text))
        return r
    backend.generate = generate
    return backend


def run_pair(label, load, probs, cfg, predictors, decodings=("reprefill", "incremental")):
    from scrimp.tessy import run_synthesis
    rows, logs = [], {}
    for decoding in decodings:
        t, s = load(decoding)
        _recording(t), _recording(s)
        recs = []
        t0 = time.time()
        summ = run_synthesis(probs, t, s, *predictors, cfg, on_record=recs.append)
        dt = time.time() - t0
        logs[decoding] = sorted(t.log) + sorted(s.log)
        ok = [r for r in recs if r["status"] == "ok"]
        rows.append({"setting": label, "decoding": decoding, "problems": len(recs), "ok": len(ok),
                     "seconds": dt, "problems_per_min": 60 * len(recs) / dt,
                     "spans": len(t.log) + len(s.log),
                     "prefill_tokens": t.prefill_tokens + s.prefill_tokens,
                     "reused_tokens": t.reused_tokens + s.reused_tokens,
                     "device": t.describe()["device"]})
    same = len(set(map(lambda k: json.dumps(logs[k]), logs))) == 1
    for r in rows:
        r["traces_identical"] = same
        r["speedup"] = r["problems_per_min"] / rows[0]["problems_per_min"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--testbed-n", type=int, default=32, help="testbed problems")
    p.add_argument("--long-n", type=int, default=4, help="problems of the long-trace setting")
    p.add_argument("--long-tokens", type=int, default=4000, help="trace length of the long-trace setting")
    p.add_argument("--long-hidden", type=int, default=256, help="hidden size of the random teacher")
    p.add_argument("--long-layers", type=int, default=4, help="layers of the random teacher (student: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--skip-testbed", action="store_true", help="only the long-trace setting")
    p.add_argument("--json", metavar="PATH", help="also write the rows here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from scrimp.tessy import LexiconPredictor, LocalBackend, TessyConfig

    rows = []
    if not a.skip_testbed:
        from scrimp.testbed import tasks
        probs = []
        for i in range(a.testbed_n):
            ex = tasks.arith(seed=1_000_003 + i)
            probs.append({"id": f"t{i}", "prompt": ex.problem, "reference": ex.answer})
        cfg = TessyConfig(teacher_step=20, student_step=20, temperature=0.0, max_total_tokens=400,
                          answer_max_tokens=8, max_retries=0, concurrency=len(probs))

        def load_testbed(decoding):
            return (LocalBackend.from_pretrained("testbed:arith-teacher", device=a.device, decoding=decoding),
                    LocalBackend.from_pretrained("testbed:arith-student", device=a.device, decoding=decoding))
        rows += run_pair("testbed arith", load_testbed, probs, cfg,
                         (LexiconPredictor("teacher"), LexiconPredictor("student")))

    from hf_models import WORDS, make_checkpoint
    with tempfile.TemporaryDirectory() as root:
        big = dict(hidden_size=a.long_hidden, intermediate_size=3 * a.long_hidden, head_dim=a.long_hidden // 4,
                   max_position_embeddings=a.long_tokens + 256)
        tpath = make_checkpoint("llama3", root, name="teacher", num_hidden_layers=a.long_layers, **big)
        spath = make_checkpoint("qwen2", root, name="student", seed=1, **big)  # 2 layers
        probs = [{"id": f"l{i}", "prompt": " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(12))}
                 for i in range(a.long_n)]
        cfg = TessyConfig(teacher_step=20, student_step=20, temperature=0.0, max_total_tokens=a.long_tokens,
                          answer_max_tokens=8, max_retries=0, concurrency=len(probs))
        style = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by")

        def load_random(decoding):
            return (LocalBackend.from_pretrained(tpath, device=a.device, decoding=decoding),
                    LocalBackend.from_pretrained(spath, device=a.device, decoding=decoding))
        rows += run_pair(f"random Llama+Qwen2, {a.long_tokens} tokens", load_random, probs, cfg,
                         (LexiconPredictor("teacher", style), LexiconPredictor("student", style)))

    machine = f"{platform.processor() or 'cpu'}, {a.threads} thread(s), load {os.getloadavg()[0]:.1f}, device {a.device}"
    print(f"== TESSY decoding: problems/min, greedy ({machine}) ==")
    print(f"{'setting':<34} {'decoding':<12} {'problems':>8} {'spans':>6} {'prob/min':>9} {'speedup':>8} "
          f"{'prefilled':>10} {'reused':>10} {'identical':>9}")
    for r in rows:
        print(f"{r['setting']:<34} {r['decoding']:<12} {r['problems']:>8} {r['spans']:>6} {r['problems_per_min']:9.1f} "
              f"{r['speedup']:7.2f}x {r['prefill_tokens']:>10} {r['reused_tokens']:>10} {str(r['traces_identical']):>9}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
