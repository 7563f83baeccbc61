"""Token scoring benchmark: scrimp.token_scores vs the anchors, measured side by side.

    python bench/bench_scoring.py                      # CPU, N=256, V=151936, float32 + bfloat16
    python bench/bench_scoring.py --device cuda --n 4096 --json out.json

Anchors: on the CPU, torch eager and torch.compile are timed in the same run (the ratio columns);
targets: >= 1.2x faster than torch.compile, >= 10x faster than eager, O(N) extra memory.
GPU (H200, N=4096, bf16; bench/anchors/h200-anchors.json and h200-anchors2.json): torch.compile
2.55 ms, one-pass Triton 1.15 ms, read floor 0.60 ms; target <= 0.70 ms.
"""
import argparse
import platform

import torch

import scrimp
from scrimp.benchmarks import dump_json, format_rows, scoring_benchmark


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=None, help="rows (default 256 on cpu, 4096 on cuda)")
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtypes", default=None, help="comma list (default float32,bfloat16 on cpu, bfloat16 on cuda)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    n = a.n or (256 if a.device == "cpu" else 4096)
    dtypes = tuple((a.dtypes or ("float32,bfloat16" if a.device == "cpu" else "bfloat16")).split(","))
    rows = scoring_benchmark(n=n, v=a.v, dtypes=dtypes, device=a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(format_rows(rows, f"token scoring N={n} V={a.v} teacher+student on {a.device} ({where}); build {scrimp.build_info()}"))
    if a.json:
        dump_json(rows, a.json, n=n, v=a.v, device=a.device, where=where, build=scrimp.build_info())


if __name__ == "__main__":
    main()
