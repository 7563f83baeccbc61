"""TIP benchmark: fused kl_loss speed, one distillation step's peak memory, and (optionally) student
accuracy on the testbed arith task before/after short TIP runs. Everything is measured in this run.

    python bench/bench_tip.py                       # kl_loss timing + step memory (CPU)
    python bench/bench_tip.py --arith --steps 30    # + accuracy table (needs the arith testbed models)
    python bench/bench_tip.py --no-kl --no-memory --arith --arith-memory --seeds 0,1,2 --eval-seed 2 --eval-n 200
                                                    # the seed-averaged selection table of docs/tip.md
    python bench/bench_tip.py --json out.json

kl_loss: forward+backward of scrimp.kl_loss vs the plain torch formula (eager) and torch.compile of it,
interleaved repetitions, median times and ratios. Memory: each configuration runs one training step
(forward + backward, no optimizer) in a fresh subprocess (scrimp.tip.memory): peak RSS during the step
minus RSS before it on CPU (MALLOC_MMAP_THRESHOLD_=65536), max_memory_allocated minus allocated-before
on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- kl_loss timing
def bench_kl(n, v, dtypes, device, reps, compile_too=True):
    import scrimp
    from scrimp.distill_loss import kl_loss_reference

    rows = []
    compiled = torch.compile(kl_loss_reference, dynamic=False) if compile_too else None
    for dt in dtypes:
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(0)
        s0 = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
        t0 = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
        for kind in ("reverse", "jsd"):
            def run_scrimp():
                s = s0.detach().requires_grad_()
                scrimp.kl_loss(s, t0, kind).backward()
                return s.grad

            def run_eager(fn=kl_loss_reference):
                s = s0.detach().requires_grad_()
                # the usual practice: upcast to float32 before the log-softmax
                fn(s.float(), t0.float(), kind).backward()
                return s.grad

            cands = {"scrimp.kl_loss": run_scrimp, "torch eager (fp32 upcast)": run_eager}
            if compiled is not None:
                cands["torch.compile (fp32 upcast)"] = lambda: run_eager(compiled)
            for f in cands.values():  # warm-up (and compile)
                f()
                f()
            times = {k: [] for k in cands}
            for _ in range(reps):
                for k, f in cands.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    f()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t)
            base = statistics.median(times["scrimp.kl_loss"])
            for k, ts in times.items():
                med = statistics.median(ts)
                rows.append({"section": "kl_loss fwd+bwd", "dtype": dt, "kind": kind, "impl": k,
                             "ms": 1e3 * med, "x_slower_than_scrimp": med / base})
    return rows


# ----------------------------------------------------------------------------- step memory
MEM_CONFIGS = [("plain", "all", 1.0), ("plain", "random", 0.5), ("plain", "random", 0.2), ("plain", "random", 0.1),
               ("lean", "all", 1.0), ("lean", "soft_or", 0.5), ("lean", "soft_or", 0.2), ("lean", "soft_or", 0.1)]


def bench_memory(a):
    from scrimp.tip.memory import measure_step_memory

    rows = []
    shape = dict(vocab=a.vocab, hidden=a.hidden, batch=a.batch, prompt=a.prompt, response=a.response, dtype=a.dtype,
                 device=a.device, threads=a.threads, chunk=a.chunk)
    for mode, rule, ratio in MEM_CONFIGS:
        rows.append(measure_step_memory(mode, rule, ratio, **shape))
    plain = rows[0]["peak_step_bytes"]
    for r in rows:
        r.update(section="step memory", peak_step_mb=r["peak_step_bytes"] / 2 ** 20,
                 x_of_plain=r["peak_step_bytes"] / plain, fp32_logits_mb=r.pop("fp32_logits_bytes") / 2 ** 20)
        r.pop("peak_step_bytes")
    return rows


# ----------------------------------------------------------------------------- arith accuracy
ARITH_CONFIGS = [("all", 1.0), ("entropy", 0.5), ("soft_or", 0.5), ("soft_or", 0.2), ("q3", 0.1), ("random", 0.2)]
# one training step's peak memory for each arith configuration is measured by --arith-memory (fresh process each)


def bench_arith(a):
    from scrimp import testbed
    from scrimp.tip import OnPolicyDistiller, arith_accuracy, arith_prompts

    torch.set_num_threads(a.threads)
    rows = []
    def load(which):
        if which == "student" and a.self_noise > 0:
            # sanity setting: the student is the teacher with Gaussian noise (scale * std of each tensor)
            # on every weight, so the teacher's distribution is meaningful on the student's rollouts
            t, tk = load("teacher")
            g = torch.Generator().manual_seed(a.seed)
            with torch.no_grad():
                for prm in t.parameters():
                    prm.add_(torch.randn(prm.shape, generator=g) * a.self_noise * prm.std())
            return t, tk
        path = getattr(a, f"{which}_path")
        if path:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        return testbed.load("arith-teacher" if which == "teacher" else "arith-student-teacher-style")

    student0, tok = load("student")
    teacher, _ = load("teacher")
    seeds = [int(x) for x in (a.seeds or str(a.seed)).split(",") if x.strip()]
    ev = a.eval_seed
    # batched greedy: the same examples and exact-match rule as testbed.evaluate (see arith_accuracy)
    base = arith_accuracy(student0, tok, n=a.eval_n, seed=ev)["accuracy"]
    t_acc = arith_accuracy(teacher, tok, n=a.eval_n, seed=ev)["accuracy"]
    rows.append({"section": "arith", "rule": "(teacher)", "ratio": None, "accuracy_after": t_acc})
    rows.append({"section": "arith", "rule": "(student before)", "ratio": None, "accuracy_after": base})
    for rule, ratio in ARITH_CONFIGS:
        mem = {}
        if a.arith_memory:
            from scrimp.tip.memory import measure_step_memory
            m = measure_step_memory("lean", rule, ratio, student=a.student_path or "arith-student-teacher-style",  # shipped TIP student
                                    teacher=a.teacher_path or "arith-teacher", batch=a.arith_batch,
                                    dtype="float32", threads=a.threads)
            mem = {"step_peak_mb": m["peak_step_bytes"] / 2 ** 20}
        for seed in seeds:
            student, _ = load("student")
            # seed s: its own rollouts and random choices, and the prompt stream of rank s (disjoint per seed)
            d = OnPolicyDistiller(student, teacher, tok, rule=rule, ratio=ratio, lr=a.lr, batch_size=a.arith_batch,
                                  max_new_tokens=a.max_new_tokens, seed=seed, progress=False)
            t = time.perf_counter()
            hist = d.train(a.steps, arith_prompts(tok, rank=seed))
            secs = time.perf_counter() - t
            acc = arith_accuracy(d.student, tok, n=a.eval_n, seed=ev)["accuracy"]
            rows.append({"section": "arith", "rule": rule, "ratio": ratio, "seed": seed, "eval_seed": ev,
                         "accuracy_before": base, "accuracy_after": acc, "steps": a.steps, "train_s": secs,
                         "mean_loss_last5": statistics.mean(r["loss"] for r in hist[-5:]),
                         "kept_fraction": statistics.mean(r["kept_fraction"] for r in hist),
                         "q3_share_kept": statistics.mean(r["q3_kept"] for r in hist),
                         "q3_share_all": statistics.mean(r["q3_all"] for r in hist), **mem})
            print(json.dumps(rows[-1]), flush=True)
    if len(seeds) > 1:
        rows += arith_summary(rows, seeds)
    return rows


def arith_summary(rows, seeds):
    """Mean, sample sd and range of the accuracy over seeds per selection, and the per-seed (paired)
    difference to all tokens: mean +- sd; a difference exceeds the spread when |mean difference| is
    larger than the sd of either row and every seed's difference has the same sign."""
    def mean_sd(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    acc = {}
    for r in rows:
        if r["section"] == "arith" and "seed" in r:
            acc.setdefault((r["rule"], r["ratio"]), {})[r["seed"]] = r
    out = []
    ref = acc.get(("all", 1.0), {})
    for (rule, ratio), per in acc.items():
        xs = [per[s]["accuracy_after"] for s in seeds]
        m, sd = mean_sd(xs)
        row = {"section": "arith over seeds", "rule": rule, "ratio": ratio, "seeds": len(xs), "mean": m, "sd": sd,
               "min": min(xs), "max": max(xs),
               "mean_loss_last5": statistics.mean(per[s]["mean_loss_last5"] for s in seeds),
               "step_peak_mb": per[seeds[0]].get("step_peak_mb")}
        if ref and (rule, ratio) != ("all", 1.0):
            diffs = [per[s]["accuracy_after"] - ref[s]["accuracy_after"] for s in seeds]
            dm, dsd = mean_sd(diffs)
            ref_sd = mean_sd([ref[s]["accuracy_after"] for s in seeds])[1]
            same_sign = all(x > 0 for x in diffs) or all(x < 0 for x in diffs)
            row.update(diff_vs_all=dm, diff_sd=dsd, exceeds_spread=bool(abs(dm) > max(sd, ref_sd) and same_sign))
        out.append(row)
    return out


def fmt(rows):
    out = []
    for sec in dict.fromkeys(r["section"] for r in rows):
        rs = [r for r in rows if r["section"] == sec]
        keys = [k for k in dict.fromkeys(k for r in rs for k in r) if k != "section"]
        out.append(f"== {sec} ==")
        out.append("  ".join(f"{k:>14}" for k in keys))
        for r in rs:
            out.append("  ".join(f"{(f'{r.get(k):.3f}' if isinstance(r.get(k), float) else str(r.get(k))):>14}"
                                 for k in keys))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    # kl_loss timing
    p.add_argument("--kl-n", type=int, default=512)
    p.add_argument("--kl-v", type=int, default=32000)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-kl", action="store_true")
    # step memory
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=448)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=256)
    # arith
    p.add_argument("--arith", action="store_true")
    p.add_argument("--arith-memory", action="store_true", help="also one step's peak memory per arith config")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--arith-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds for the arith runs (rollouts, random selection, prompt stream); "
                        "default: --seed; with several, a mean/sd table is added")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="arith evaluation set (testbed seed): settings were tuned on 0, report on another (2)")
    p.add_argument("--self-noise", type=float, default=0.0,
                   help="student = arith-teacher + this much Gaussian weight noise (a sanity setting)")
    p.add_argument("--student-path", default=None, help="HF directory instead of the testbed arith-student-teacher-style")
    p.add_argument("--teacher-path", default=None, help="HF directory instead of the testbed arith-teacher")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import scrimp

    rows = []
    if not a.no_kl:
        rows += bench_kl(a.kl_n, a.kl_v, a.dtypes.split(","), a.device, a.reps, not a.no_compile)
        print(fmt(rows), flush=True)
    if not a.no_memory:
        rows += bench_memory(a)
    if a.arith:
        rows += bench_arith(a)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.machine()} cpu, {a.threads} threads"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"TIP benchmark on {a.device} ({where}); load average {load}; build {scrimp.build_info()}")
    print(fmt(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "where": where, "load": load, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
