"""TESSY synthesis throughput: models in process vs behind vLLM OpenAI servers, at several concurrencies.

    python bench/bench_tessy_vllm.py                              # 32 problems, 1 / 8 / 32 in flight, 2 reps
    python bench/bench_tessy_vllm.py --n 16 --concurrency 8 --reps 1 --json out.json

Run it in an environment with vLLM. Two servers are started on 127.0.0.1 (teacher
``testbed:arith-teacher-robust`` and student ``testbed:arith-student-h32``, the shipped student with
32-dim heads that vLLM's CPU attention runs; ``--dtype float32 --enforce-eager --max-model-len 512``) and
stay up for the whole run. Three setups synthesize the same problems with ``scrimp tessy synth
--sampling greedy --threads 1``:

* ``in process``: both models in this process (micro-batched ``generate``),
* ``teacher on vLLM``: the teacher behind its server, the student in process,
* ``two vLLM servers``: both behind their servers (TESSY's authors' set-up).

For each concurrency the setups run in turn, their order reversed at every repetition (A/B/C, C/B/A, ...),
so load on a shared machine hits them alike. ``seconds`` is the synthesis time the command reports (model
loading and server start excluded; the median over repetitions), tokens/s counts the tokens of the written
traces. Greedy traces are the same in every setup (tests/vllm/test_tessy_vllm.py), so the rows do the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

TEACHER = "testbed:arith-teacher-robust"
STUDENT = "testbed:arith-student-h32"


def _synth(out: str, args, n: int, concurrency: int) -> dict:
    from scrimp.cli import main

    rep = out + ".json"
    rc = main(["tessy", "synth", "--testbed-arith", str(n), "--seed", "0", "--out", out, "--quiet", "--threads", "1",
               "--device", "cpu", "--sampling", "greedy", "--concurrency", str(concurrency), "--json", rep] + args)
    if rc != 0:
        raise SystemExit(f"scrimp tessy synth exited with {rc} ({args})")
    with open(rep) as f:
        return json.load(f)["summary"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="testbed arith problems per run")
    ap.add_argument("--concurrency", default="1,8,32", help="problems in flight (comma list)")
    ap.add_argument("--reps", type=int, default=2, help="runs per setup and concurrency")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from scrimp.integrations.vllm.openai_server import VLLMServer

    levels = [int(x) for x in a.concurrency.split(",")]
    if a.n < 1 or a.reps < 1 or not levels or min(levels) < 1:
        raise SystemExit("--n, --reps and --concurrency must be positive")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scrimp-bench-tessy-vllm-") as tmp:
        teacher = VLLMServer(TEACHER, "teacher", max_model_len=512, log_path=os.path.join(tmp, "teacher.log"),
                             startup_timeout=400, role="teacher")
        student = VLLMServer(STUDENT, "student", max_model_len=512, log_path=os.path.join(tmp, "student.log"),
                             startup_timeout=400, role="student")
        try:
            teacher.start()
            student.start()
            t_url = ["--teacher-url", teacher.url, "--teacher-model-name", "teacher", "--teacher-tokenizer", TEACHER]
            s_url = ["--student-url", student.url, "--student-model-name", "student", "--student-tokenizer", STUDENT]
            setups = {"in process": ["--teacher", TEACHER, "--student", STUDENT],
                      "teacher on vLLM": t_url + ["--student", STUDENT],
                      "two vLLM servers": t_url + s_url}
            names = list(setups)
            _synth(os.path.join(tmp, "warm.jsonl"), setups["two vLLM servers"], 4, 4)  # first requests: warm-up
            for c in levels:
                samples = {k: [] for k in names}
                for r in range(a.reps):
                    for name in (names if r % 2 == 0 else names[::-1]):
                        out = os.path.join(tmp, f"{name.replace(' ', '_')}-{c}-{r}.jsonl")
                        samples[name].append(_synth(out, setups[name], a.n, c))
                for name in names:
                    s = samples[name]
                    sec = statistics.median(x["seconds"] for x in s)
                    row = dict(setup=name, concurrency=c, n=a.n, ok=min(x["ok"] for x in s), seconds=sec,
                               seconds_all=[x["seconds"] for x in s], tokens=s[0]["tokens"],
                               problems_per_min=60.0 * a.n / sec, tokens_per_s=s[0]["tokens"] / sec)
                    rows.append(row)
                    print(f"{name:17s} {c:3d} in flight: ok {row['ok']}/{a.n}, {sec:6.1f} s, "
                          f"{row['problems_per_min']:7.1f} problems/min, {row['tokens_per_s']:7.1f} tokens/s", flush=True)
        finally:
            student.stop()
            teacher.stop()
    import vllm
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), vllm=vllm.__version__,
                date=time.strftime("%Y-%m-%d"), load_average=os.getloadavg(),
                command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    print(json.dumps(meta))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
