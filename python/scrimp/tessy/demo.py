"""``scrimp demo`` section: a short TESSY synthesis on the testbed arith models."""
from __future__ import annotations

import io
import time


def render_spans(rec: dict, width: int = 100) -> str:
    """One record's trace with every span tagged by its source: ``S[...]`` / ``T[...]``."""
    parts = []
    for s in rec.get("spans", []):
        tag = "S" if s["source"] == "student" else "T"
        parts.append(f"{tag}[{s['text']}]")
    return "".join(parts)


def demo_section(quick: bool = True) -> str:
    """Synthesize a handful of arith traces with the local backend (testbed teacher +
    student, lexicon boundary predictors) and report the student's token share."""
    import torch
    from scrimp import testbed
    from scrimp.testbed import tasks

    from .backends import LocalBackend
    from .predictor import LexiconPredictor
    from .synth import TessyConfig, run_synthesis

    out = io.StringIO()
    n = 6 if quick else 24
    torch.manual_seed(0)
    try:
        teacher = LocalBackend.from_pretrained("testbed:arith-teacher", name="arith-teacher")
        student = LocalBackend.from_pretrained("testbed:arith-student", name="arith-student")
    except (FileNotFoundError, OSError, ValueError) as e:
        return f"(TESSY demo unavailable: {e})"
    probs = []
    for i in range(n):
        ex = tasks.arith(seed=90_000 + i)
        probs.append({"id": f"demo-{i}", "prompt": ex.problem, "reference": ex.answer})
    recs = []
    cfg = TessyConfig(teacher_step=20, student_step=20, temperature=0.0, max_total_tokens=400,
                      answer_max_tokens=8, max_retries=1)
    # one intra-op thread: these models are tiny, and on a busy machine a 2-thread OpenMP
    # region spin-waits for a descheduled partner (measured here: 7 s vs 118 s for this demo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        summ = run_synthesis(probs, teacher, student, LexiconPredictor("teacher"), LexiconPredictor("student"), cfg,
                             on_record=recs.append)
        dt = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    ok = [r for r in recs if r["status"] == "ok"]
    correct = sum(1 for r in ok if r["answer"] == r.get("reference"))
    print(f"TESSY on {n} testbed arith problems (local backend, greedy, k=20/20, lexicon predictors)", file=out)
    print(f"  traces ok            {len(ok)}/{n}", file=out)
    print(f"  student token share  {100 * summ['student_token_share']:.1f}% "
          f"(paper, Qwen3-8B + GPT-OSS-120B: 22.4%)", file=out)
    print(f"  answers correct      {correct}/{len(ok)}", file=out)
    print(f"  throughput           {60 * n / dt:.0f} problems/min ({dt:.1f} s)", file=out)
    if ok:
        r = ok[0]
        print(f"  example: {r['prompt']}", file=out)
        print(f"    {render_spans(r)}", file=out)
    return out.getvalue().rstrip()
