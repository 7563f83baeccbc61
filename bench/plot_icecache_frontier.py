"""The IceCache frontier plot: device KiB of the whole cache against accuracy relative to the full cache,
one line per budget, one point per summary-row setting, from the JSON files of
``bench/bench_icecache_heldout.py --json`` (their rows pooled over every seed in every file).

    python bench/plot_icecache_frontier.py heldout8k_s3.json heldout8k_s4.json --out frontier.png
"""
from __future__ import annotations

import argparse
import json
import re

#: the frontier's configurations: label -> config name prefix (the budget follows after "@")
SETTINGS = {"16 rows": "rows16", "32 rows": "rows32", "64 rows (default)": "rows64", "128 rows": "rows128",
            "256 rows": "rows256", "512 rows": "rows512", "one row per page": "rows-per-page"}


def pooled(paths):
    """{config: (correct, n, full_correct, mean device bytes)} pooled over the files' rows."""
    out = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in data["rows"]:
            prev = out.setdefault(row["config"], [0, 0, 0, []])
            prev[0] += row["correct"]
            prev[1] += row["n"]
            prev[2] += row.get("full_correct", row["correct"])
            prev[3].append(row["device_bytes"])
    return {k: (v[0], v[1], v[2], sum(v[3]) / len(v[3])) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="bench_icecache_heldout.py --json files")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--title", default="IceCache frontier")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = pooled(args.json)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for budget in (256, 64):
        pts = []
        for label, prefix in SETTINGS.items():
            name = f"{prefix}@{budget}"
            if name in res:
                correct, n, full_correct, nbytes = res[name]
                pts.append((nbytes / 2**10, correct / max(full_correct, 1), label))
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"budget {budget}")
        for i, (x, y, label) in enumerate(pts):  # labels alternate above / below: neighbours can be close
            ax.annotate(re.sub(r" \(default\)", "*", label), (x, y), textcoords="offset points",
                        xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7)
    if "full" in res:
        ax.axvline(res["full"][3] / 2**10, color="gray", linestyle="--", label="full cache")
    ax.set_xscale("log")
    ax.set_xlabel("device KiB of the whole cache (log scale)")
    ax.set_ylabel("correct answers / full cache's (* default)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
