"""TESSY on the testbed arith task: predictors, synthesis, SFT of the student.

    python bench/bench_tessy.py                     # defaults: 96 problems, 120 SFT steps, eval on 100
    python bench/bench_tessy.py --n-synth 32 --sft-steps 60 --eval-n 50 --json out.json

1. Boundary predictors: token-level precision/recall of the boundary class on held-out
   testbed traces (ground truth from the generator), for the lexicon fallback and for
   classifiers trained on ground-truth labels.
2. Synthesis (local backend, testbed teacher + student): TESSY traces vs the anchors
   measured in the same run, Teacher-Only and Student-Only traces (each model writes the
   whole completion): student token share, answer accuracy of the traces, problems/minute.
3. SFT: the testbed student fine-tuned with scrimp's own loop on (a) Teacher-Only, (b) TESSY,
   (c) Student-Only traces of the same problems, same steps/batch/lr; greedy exact-match
   accuracy on held-out problems (seed 0) against the base student.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def predictor_rows(n_train, n_eval, seed=0):
    from scrimp.tessy import BoundaryPredictor, LexiconPredictor, evaluate_predictor, testbed_examples, train_predictor
    rows, trained = [], {}
    for role in ("teacher", "student"):
        clf = BoundaryPredictor.new(role, hidden=64, layers=2, seed=seed)
        m = train_predictor(clf, testbed_examples(n_train, role, seed=seed + 1), epochs=3, lr=2e-3)
        trained[role] = clf
        for name, pred in (("lexicon", LexiconPredictor(role)), ("classifier", clf)):
            for style in ("teacher", "student"):
                ev = evaluate_predictor(pred, testbed_examples(n_eval, style, seed=seed + 99))
                rows.append({"predictor": name, "role": role, "text_style": style,
                             "precision": ev["precision"], "recall": ev["recall"], "f1": ev["f1"],
                             "first_boundary": ev["first_boundary_agreement"],
                             "train_s": m["train_seconds"] if name == "classifier" else 0.0})
    return rows, trained


def single_model_traces(backend, probs, params, max_tokens=128, batch=64):
    from scrimp.tessy.sft import baseline_records
    out = []
    for i in range(0, len(probs), batch):
        out += baseline_records(backend, probs[i:i + batch], max_tokens=max_tokens, params=params)
    return out


def trace_summary(name, recs, seconds, tok):
    ok = [r for r in recs if r["status"] == "ok"]
    correct = sum(1 for r in ok if r["answer"] == r.get("reference"))
    if "n_tokens" in (ok[0] if ok else {}):
        tot = sum(r["n_tokens"]["total"] for r in ok)
        stu = sum(r["n_tokens"]["student"] for r in ok)
        share = stu / tot if tot else 0.0
        mean_tok = tot / len(ok) if ok else 0.0
    else:
        share = 1.0 if name.startswith("student") else 0.0  # noqa
        mean_tok = sum(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in ok) / max(1, len(ok))
    return {"traces": name, "problems": len(recs), "ok": len(ok), "answers_correct": correct / max(1, len(ok)),
            "student_share": share, "mean_tokens": mean_tok, "seconds": seconds,
            "problems_per_min": 60 * len(recs) / seconds if seconds else 0.0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-synth", type=int, default=96, help="problems synthesized per trace source")
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=5e-4)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--pred-train", type=int, default=400)
    p.add_argument("--pred-eval", type=int, default=100)
    p.add_argument("--teacher-step", type=int, default=20)
    p.add_argument("--student-step", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from scrimp import testbed
    from scrimp.testbed import tasks
    from scrimp.tessy import GenParams, LocalBackend, TessyConfig, run_synthesis
    from scrimp.tessy.sft import sft

    load = os.getloadavg()
    result = {"machine": f"{platform.processor() or 'cpu'}, {a.threads} threads, load {load[0]:.2f}",
              "args": vars(a)}

    # 1. predictors
    t0 = time.time()
    prow, trained = predictor_rows(a.pred_train, a.pred_eval, seed=a.seed)
    result["predictors"] = prow
    print(f"== boundary predictors: token P/R of the boundary class on {a.pred_eval} held-out traces per style "
          f"({time.time() - t0:.0f} s) ==")
    print(f"{'predictor':<11} {'role':<8} {'text':<8} {'precision':>9} {'recall':>7} {'F1':>6} {'first-cut':>9}")
    for r in prow:
        print(f"{r['predictor']:<11} {r['role']:<8} {r['text_style']:<8} {r['precision']:9.3f} {r['recall']:7.3f} "
              f"{r['f1']:6.3f} {r['first_boundary']:9.3f}")

    # 2. synthesis
    teacher = LocalBackend.from_pretrained("testbed:arith-teacher", name="arith-teacher")
    student = LocalBackend.from_pretrained("testbed:arith-student", name="arith-student")
    tok = student.tokenizer
    probs = []
    for i in range(a.n_synth):
        ex = tasks.arith(seed=a.seed * 1_000_003 + i)
        probs.append({"id": f"s{a.seed}-{i}", "prompt": ex.problem, "reference": ex.answer})
    params = GenParams(a.temperature, 0.8, 20)
    rows, traces = [], {}
    t0 = time.time()
    traces["teacher-only"] = single_model_traces(teacher, probs, params)
    rows.append(trace_summary("teacher-only", traces["teacher-only"], time.time() - t0, tok))
    t0 = time.time()
    traces["student-only"] = single_model_traces(student, probs, params)
    rows.append(trace_summary("student-only", traces["student-only"], time.time() - t0, tok))
    runs = [("tessy", (a.teacher_step, a.student_step), student),
            ("tessy-k10/5", (10, 5), student),
            # control: the teacher model in both roles (one style throughout): isolates the loop
            # from the style mismatch between the two testbed models
            ("control:T+T", (a.teacher_step, a.student_step), teacher)]
    for label, steps, stu in runs:
        recs = []
        cfg = TessyConfig(teacher_step=steps[0], student_step=steps[1], temperature=a.temperature,
                          max_total_tokens=400, answer_max_tokens=8, max_retries=a.max_retries,
                          concurrency=len(probs))
        t0 = time.time()
        run_synthesis(probs, teacher, stu, trained["teacher"], trained["student"], cfg, on_record=recs.append)
        traces[label] = recs
        rows.append(trace_summary(label, recs, time.time() - t0, tok))
    result["synthesis"] = rows
    anchor = rows[0]["seconds"]
    print(f"\n== synthesis of {a.n_synth} problems, local backend, T={a.temperature} "
          f"(classifier predictors; {result['machine']}) ==")
    print(f"{'traces':<13} {'ok':>4} {'ans.correct':>11} {'student share':>13} {'tokens':>7} {'prob/min':>9} "
          f"{'time vs teacher-only':>20}")
    for r in rows:
        print(f"{r['traces']:<13} {r['ok']:>4} {100 * r['answers_correct']:10.1f}% {100 * r['student_share']:12.1f}% "
              f"{r['mean_tokens']:7.1f} {r['problems_per_min']:9.0f} {r['seconds'] / anchor:19.2f}x")
    ex = next((r for r in traces["tessy"] if r["status"] == "ok"), None)
    if ex:
        from scrimp.tessy.demo import render_spans
        print("example TESSY trace:", ex["prompt"], "->", render_spans(ex))

    # 3. SFT
    if not a.skip_sft:
        base_model, base_tok = testbed.load("arith-student")
        t0 = time.time()
        base = testbed.evaluate(base_model, base_tok, "arith", n=a.eval_n, seed=0)["accuracy"]
        srows = [{"sft_data": "none (base student)", "records": 0, "accuracy": base, "final_loss": None,
                  "seconds": time.time() - t0}]
        for label in ("teacher-only", "tessy", "student-only"):
            recs = [r for r in traces[label] if r["status"] == "ok"]
            if not recs:
                srows.append({"sft_data": label, "records": 0, "accuracy": float("nan"), "final_loss": None,
                              "seconds": 0.0})
                continue
            t0 = time.time()
            model, m = sft(base_model, base_tok, recs, steps=a.sft_steps, batch_size=a.sft_batch, lr=a.sft_lr,
                           seed=a.seed)
            acc = testbed.evaluate(model, base_tok, "arith", n=a.eval_n, seed=0)["accuracy"]
            srows.append({"sft_data": label, "records": len(recs), "accuracy": acc, "final_loss": m["final_loss"],
                          "seconds": time.time() - t0})
        result["sft"] = srows
        print(f"\n== student accuracy after SFT ({a.sft_steps} steps x {a.sft_batch}, lr {a.sft_lr}); "
              f"greedy exact match on {a.eval_n} held-out problems ==")
        print(f"{'SFT data':<20} {'records':>7} {'accuracy':>9} {'vs base':>8} {'final loss':>10}")
        for r in srows:
            loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
            print(f"{r['sft_data']:<20} {r['records']:>7} {100 * r['accuracy']:8.1f}% "
                  f"{100 * (r['accuracy'] - base):+7.1f} {loss:>10}")
    result["load_after"] = os.getloadavg()[0]
    print(f"\nmachine: {result['machine']} -> load {result['load_after']:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
