"""TESSY on the testbed arith task: predictors, synthesis, SFT of the student, over several seeds.

    python bench/bench_tessy.py                     # 3 seeds x 256 problems, SFT 120 steps, eval on 200 (seed 2)
    python bench/bench_tessy.py --tune-eval-seed 0 --sft-steps 120,240 --sft-lr 5e-4,1e-3  # choose on 0, report on 2
    python bench/bench_tessy.py --seeds 0 --n-synth 32 --eval-n 50 --json out.json        # a quick look

1. Boundary predictors: token-level precision/recall of the boundary class on held-out
   testbed traces (ground truth from the generator), for the lexicon fallback and for
   classifiers trained on ground-truth labels.
2. Synthesis (local backend, testbed teacher + student): TESSY traces vs the anchors
   measured in the same run, Teacher-Only and Student-Only traces (each model writes the
   whole completion): student token share, answer accuracy of the traces, problems/minute.
3. SFT: the testbed student fine-tuned with scrimp's own loop on (a) Teacher-Only, (b) TESSY,
   (c) Student-Only traces of the same problems, same steps/batch/lr; greedy exact-match
   accuracy on held-out problems (evaluation seed --eval-seed) against the base student.

Seed s (``--seeds``) draws its own problems (``tasks.arith(seed=(100 + s) * 1_000_003 + i)``, disjoint
from the evaluation sets ``seed * 1_000_003 + i`` for seeds < 100), samples its own traces and shuffles
its own SFT batches; every table gives the mean and the sample standard deviation over the seeds.
With ``--tune-eval-seed 0`` the SFT setting is chosen from the grid on evaluation seed 0 and the
reported table (evaluation seed 2) shows only that setting.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def predictor_rows(n_train, n_eval, seed=0):
    from scrimp.tessy import BoundaryPredictor, LexiconPredictor, evaluate_predictor, testbed_examples, train_predictor
    from scrimp.testbed import get_tokenizer
    rows, trained = [], {}
    for role in ("teacher", "student"):
        clf = BoundaryPredictor.new(role, tokenizer=get_tokenizer(), hidden=64, layers=2, seed=seed)
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


def synthesis_section(a, seeds, result):
    """Sections 1 and 2: the boundary predictors, then every seed's traces. Returns (rows, traces)."""
    from scrimp.testbed import tasks
    from scrimp.tessy import GenParams, LocalBackend, TessyConfig, run_synthesis

    # 1. predictors
    t0 = time.time()
    prow, trained = predictor_rows(a.pred_train, a.pred_eval, seed=a.pred_seed)
    result["predictors"] = prow
    print(f"== boundary predictors: token P/R of the boundary class on {a.pred_eval} held-out traces per style "
          f"({time.time() - t0:.0f} s) ==")
    print(f"{'predictor':<11} {'role':<8} {'text':<8} {'precision':>9} {'recall':>7} {'F1':>6} {'first-cut':>9}")
    for r in prow:
        print(f"{r['predictor']:<11} {r['role']:<8} {r['text_style']:<8} {r['precision']:9.3f} {r['recall']:7.3f} "
              f"{r['f1']:6.3f} {r['first_boundary']:9.3f}")

    # 2. synthesis, every seed
    teacher = LocalBackend.from_pretrained(f"testbed:{a.teacher}", name=a.teacher)
    student = LocalBackend.from_pretrained(f"testbed:{a.student}", name=a.student)
    tok = student.tokenizer
    params = GenParams(a.temperature, 0.8, 20)
    rows, traces = [], {}
    for seed in seeds:
        torch.manual_seed(seed)
        probs = []
        for i in range(a.n_synth):
            ex = tasks.arith(seed=(100 + seed) * 1_000_003 + i)
            probs.append({"id": f"s{seed}-{i}", "prompt": ex.problem, "reference": ex.answer})
        if a.traces_dir and os.path.isfile(os.path.join(a.traces_dir, f"seed{seed}.json")):
            # traces of an earlier run with the same seed, models and settings: reuse them (SFT grids)
            with open(os.path.join(a.traces_dir, f"seed{seed}.json")) as f:
                saved = json.load(f)
            for label, recs in saved["traces"].items():
                traces[seed, label] = recs
            rows += saved["rows"]
            _log(f"seed {seed}: traces loaded from {a.traces_dir}")
            continue
        t0 = time.time()
        traces[seed, "teacher-only"] = single_model_traces(teacher, probs, params)
        rows.append(dict(trace_summary("teacher-only", traces[seed, "teacher-only"], time.time() - t0, tok), seed=seed))
        t0 = time.time()
        traces[seed, "student-only"] = single_model_traces(student, probs, params)
        rows.append(dict(trace_summary("student-only", traces[seed, "student-only"], time.time() - t0, tok), seed=seed))
        runs = [("tessy", (a.teacher_step, a.student_step), student)]
        if a.extras and seed == seeds[0]:
            runs += [("tessy-k10/5", (10, 5), student),
                     # control: the teacher model in both roles (one model throughout)
                     ("control:T+T", (a.teacher_step, a.student_step), teacher)]
        for label, steps, stu in runs:
            recs = []
            cfg = TessyConfig(teacher_step=steps[0], student_step=steps[1], temperature=a.temperature,
                              max_total_tokens=400, answer_max_tokens=8, max_retries=a.max_retries,
                              concurrency=len(probs))
            t0 = time.time()
            run_synthesis(probs, teacher, stu, trained["teacher"], trained["student"], cfg, on_record=recs.append)
            traces[seed, label] = recs
            rows.append(dict(trace_summary(label, recs, time.time() - t0, tok), seed=seed))
        if a.traces_dir:
            os.makedirs(a.traces_dir, exist_ok=True)
            with open(os.path.join(a.traces_dir, f"seed{seed}.json"), "w") as f:
                json.dump({"rows": [r for r in rows if r["seed"] == seed],
                           "traces": {label: recs for (s, label), recs in traces.items() if s == seed}}, f)
        _log(f"seed {seed}: " + "; ".join(f"{r['traces']} {100 * r['answers_correct']:.1f}% correct"
                                           for r in rows if r["seed"] == seed))
    result["synthesis"] = rows
    print(f"\n== synthesis of {a.n_synth} problems per seed, seeds {seeds}, local backend, T={a.temperature}, "
          f"teacher {a.teacher}, student {a.student} (classifier predictors; {result['machine']}) ==")
    print(f"{'traces':<13} {'seeds':>5} {'ok':>6} {'ans.correct':>15} {'student share':>15} {'tokens':>7} "
          f"{'prob/min':>9} {'time vs teacher-only':>20}")
    anchor = _mean_sd([r["seconds"] for r in rows if r["traces"] == "teacher-only"])[0]
    for label in dict.fromkeys(r["traces"] for r in rows):
        rs = [r for r in rows if r["traces"] == label]
        c, cs = _mean_sd([r["answers_correct"] for r in rs])
        sh, shs = _mean_sd([r["student_share"] for r in rs])
        print(f"{label:<13} {len(rs):>5} {statistics.mean(r['ok'] for r in rs):6.1f} "
              f"{100 * c:8.1f} +-{100 * cs:4.1f}% {100 * sh:8.1f} +-{100 * shs:4.1f}% "
              f"{statistics.mean(r['mean_tokens'] for r in rs):7.1f} "
              f"{statistics.mean(r['problems_per_min'] for r in rs):9.0f} "
              f"{statistics.mean(r['seconds'] for r in rs) / anchor:19.2f}x")
    ex = next((r for r in traces[seeds[0], "tessy"] if r["status"] == "ok" and r["answer"] == r["reference"]), None)
    if ex:
        from scrimp.tessy.demo import render_spans
        print("example TESSY trace:", ex["prompt"], "->", render_spans(ex))

    return rows, traces


def _mean_sd(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="arith-teacher-robust", help="testbed teacher model name")
    p.add_argument("--student", default="arith-student", help="testbed student model name")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated pipeline seeds (problems, sampling, SFT order)")
    p.add_argument("--n-synth", type=int, default=256, help="problems synthesized per trace source and seed")
    p.add_argument("--sft-steps", default="120", help="SFT optimizer steps (comma-separated: a grid)")
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", default="5e-4", help="SFT peak learning rate (comma-separated: a grid)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--eval-seed", type=int, default=2,
                   help="evaluation set of the reported results (testbed seed)")
    p.add_argument("--tune-eval-seed", type=int, default=None,
                   help="evaluation set for choosing the SFT setting from the --sft-steps x --sft-lr grid (best "
                        "mean accuracy over the three SFT sources there); the reported table shows only the "
                        "chosen setting, on --eval-seed")
    p.add_argument("--pred-train", type=int, default=400)
    p.add_argument("--pred-eval", type=int, default=100)
    p.add_argument("--pred-seed", type=int, default=1, help="seed of the boundary predictors' data and init")
    p.add_argument("--teacher-step", type=int, default=20)
    p.add_argument("--student-step", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--extras", action="store_true",
                   help="also TESSY k=10/5 (the official code's sizes) and the control (teacher in both roles), first seed")
    p.add_argument("--traces-dir", default=None,
                   help="save each seed's traces here, and reuse them when present (a later SFT grid on the same traces)")
    p.add_argument("--oracle-rows", action="store_true",
                   help="also SFT on the generator's own student-style and teacher-style traces of the same problems")
    p.add_argument("--no-synthesis", action="store_true",
                   help="with --oracle-rows: skip the predictors and synthesis, SFT on the generator's traces only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seeds, steps_grid, lr_grid = _ints(a.seeds), _ints(a.sft_steps), _floats(a.sft_lr)

    from scrimp import testbed
    from scrimp.testbed import tasks
    from scrimp.tessy import GenParams, LocalBackend, TessyConfig, run_synthesis
    from scrimp.tessy.sft import sft
    from scrimp.tip import arith_accuracy   # batched greedy, the same examples and rule as testbed.evaluate

    load = os.getloadavg()
    result = {"machine": f"{platform.processor() or 'cpu'}, {a.threads} threads, load {load[0]:.2f}",
              "args": vars(a)}

    rows, traces = [], {}
    if a.no_synthesis:
        if not a.oracle_rows:
            raise SystemExit("--no-synthesis needs --oracle-rows (SFT on the generator's traces only)")
    else:
        rows, traces = synthesis_section(a, seeds, result)

    # 3. SFT, every seed and grid point; each model evaluated on the tuning set and on the reporting set
    if not a.skip_sft:
        base_model, base_tok = testbed.load(a.student)
        ev_seeds = [a.eval_seed] if a.tune_eval_seed is None else [a.tune_eval_seed, a.eval_seed]

        def accuracy(model):
            return {ev: arith_accuracy(model, base_tok, n=a.eval_n, seed=ev)["accuracy"] for ev in ev_seeds}

        base = accuracy(base_model)
        sources = [] if a.no_synthesis else ["teacher-only", "tessy", "student-only"]
        if a.oracle_rows:
            # the generator's own traces of the same problems: correct steps in exactly one style. SFT on the
            # student-style ones is what TESSY traces can at best be (the student's style, the teacher's steps)
            sources += ["generator student-style", "generator teacher-style"]
            for seed in seeds:
                for style in ("student", "teacher"):
                    traces[seed, f"generator {style}-style"] = [
                        {"prompt": ex.problem, "completion": ex.completion, "status": "ok"}
                        for ex in (tasks.arith(seed=(100 + seed) * 1_000_003 + i, style=style) for i in range(a.n_synth))]
        srows = []
        for steps in steps_grid:
            for lr in lr_grid:
                for seed in seeds:
                    for label in sources:
                        recs = [r for r in traces[seed, label] if r["status"] == "ok"]
                        if not recs:
                            srows.append({"sft_data": label, "seed": seed, "steps": steps, "lr": lr, "records": 0,
                                          "accuracy": {ev: float("nan") for ev in ev_seeds}, "final_loss": None})
                            continue
                        model, m = sft(base_model, base_tok, recs, steps=steps, batch_size=a.sft_batch, lr=lr,
                                       seed=seed, trainer="loop")
                        acc = accuracy(model)
                        srows.append({"sft_data": label, "seed": seed, "steps": steps, "lr": lr,
                                      "records": len(recs), "accuracy": acc, "final_loss": m["final_loss"],
                                      "seconds": m["seconds"]})
                        _log(f"sft {label} seed {seed} steps {steps} lr {lr}: "
                             + ", ".join(f"eval seed {ev} {100 * x:.1f}%" for ev, x in acc.items()))
        result["sft"] = srows
        result["sft_base"] = base
        grid = [(st, lr) for st in steps_grid for lr in lr_grid]
        chosen = grid
        if a.tune_eval_seed is not None and len(grid) > 1:
            # the setting with the best mean accuracy over the three SFT sources on the tuning set
            def tune_score(g):
                return statistics.mean(r["accuracy"][a.tune_eval_seed] for r in srows
                                       if (r["steps"], r["lr"]) == g and not r["sft_data"].startswith("generator") and r["accuracy"][a.tune_eval_seed] == r["accuracy"][a.tune_eval_seed])
            chosen = [max(grid, key=tune_score)]
            result["sft_chosen"] = {"steps": chosen[0][0], "lr": chosen[0][1]}
        for ev in ev_seeds:
            shown = grid if ev == a.tune_eval_seed else chosen
            what = "tuning set" if ev == a.tune_eval_seed else "reported"
            print(f"\n== student accuracy after SFT (batch {a.sft_batch}); greedy exact match on {a.eval_n} held-out "
                  f"problems, evaluation seed {ev} ({what}); mean +- sd over seeds {seeds} [min, max] ==")
            print(f"{'SFT data':<24} {'steps':>5} {'lr':>7} {'records':>7} {'accuracy':>16} {'range':>13} "
                  f"{'vs base':>8} {'final loss':>10}")
            print(f"{'none (base student)':<24} {'-':>5} {'-':>7} {0:>7} {100 * base[ev]:8.1f}        ")
            for steps, lr in shown:
                for label in sources:
                    rs = [r for r in srows if r["sft_data"] == label and r["steps"] == steps and r["lr"] == lr]
                    accs = [r["accuracy"][ev] for r in rs if r["accuracy"][ev] == r["accuracy"][ev]]
                    acc, sd = _mean_sd(accs)
                    loss = _mean_sd([r["final_loss"] for r in rs if r["final_loss"] is not None])[0]
                    print(f"{label:<24} {steps:>5} {lr:>7.0e} {statistics.mean(r['records'] for r in rs):7.0f} "
                          f"{100 * acc:8.1f} +-{100 * sd:4.1f}% "
                          f"[{100 * min(accs, default=float('nan')):4.1f}, {100 * max(accs, default=float('nan')):4.1f}] "
                          f"{100 * (acc - base[ev]):+8.1f} {loss:10.3f}")
    result["load_after"] = os.getloadavg()[0]
    print(f"\nmachine: {result['machine']} -> load {result['load_after']:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
