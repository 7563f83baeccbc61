"""Where IceCache loses accuracy: page selection or the summary of unselected pages, per layer and head?

A torch re-implementation of one IceCache decode step on the testbed `recall` model, with the same
pages (the library's clustering and index) but interchangeable parts:

* selection: how the pages are chosen - ``bound`` (the library's min/max bound), ``rerank`` (bound
  candidates, ``--rerank`` per selected page, re-scored by their exact max q.k: what
  ``IceCache(rerank=N)`` does), ``exact`` (the oracle: the pages with the largest exact max q.k
  among all pages, i.e. the pages holding the true top attention), ``centroid`` (q . mean key),
  ``mass`` (q . mean key + log(page tokens));
* summary: what the unselected pages contribute - ``none`` (nothing, the paper), ``mean`` (mean key +
  log count, mean value: ``IceCache(summaries=True)``), ``lse`` (the page's exact attention mass, mean
  value), ``var`` (mean key + a diagonal Gaussian correction 1/2 q^2 . var * scale^2), ``candlse``
  (the exact mass of the unselected pages among the bound's rerank candidates, whose keys rerank
  reads anyway; mean key + log count for the others), ``pcal`` (mean key + log count + a per-page,
  per-query-head correction calibrated once on the prompt's last query q0: lse_q0(page) - log n -
  q0 . mean_k, i.e. exact for q0), ``pcalkv`` (the same correction averaged over the query heads of
  each KV head: one bias per row, as the library's rows hold), ``ratioall`` / ``ratiocand`` /
  ``ratiorand`` (mean key + log count, every row shifted per query head by one constant c, the log
  ratio of exact to estimated mass over a sample of the unselected pages: all of them, the rerank
  candidates, or as many random ones as there are candidates; ``ratioallkv``: all of them, c averaged
  over the query heads of each KV head, one shift per row as the library's rows hold), ``cov`` (mean
  key + log count + 1/2 Var_t(q . k_t) over the page: the Gaussian correction with the page's full
  covariance).

``--runs SELECT:SUMMARY ...`` are evaluated end to end (greedy accuracy; the generation follows that
run's attention in every layer). ``--oracle-layers L ...`` switches the selection to ``exact`` in
those layers only (per-layer attribution of the selection error). During the first run every decode
step also computes, per layer and query head and on that run's state, the softmax attention mass
the attended tokens hold and the relative error ``|o - o_full| / |o_full|`` of the attention output
for every selection in (bound, rerank, exact) x summary in (none, mean), and exact + lse (the exact
mass of every unselected page: what is left is the mean value's error), against the full attention
over every cached token. The step reads every key and value (a full copy kept for the analysis), so
it is slow and for measurement only. Results are in docs/icecache.md.

Prompts: example ``i`` of seed ``s`` is ``testbed.tasks.recall(seed=s * 1_000_003 + i)``, as in
``testbed.evaluate`` (exact match of the stripped output) and ``scrimp icecache eval``.

    python bench/icecache_selection_analysis.py --seeds 1 2 --n 50 --budget 64 \\
        --runs bound:none bound:mean rerank:mean exact:none exact:mean --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import torch

from scrimp import testbed
from scrimp.icecache import make_generate_fn
from scrimp.icecache.cache import IceCacheLayer

SELECTIONS = ("bound", "rerank", "exact", "centroid", "mass")
SUMMARIES = ("none", "mean", "lse", "var", "candlse", "pcal", "pcalkv", "ratioall", "ratioallkv", "ratiocand",
             "ratiorand", "cov")
#: the (selection, summary) pairs whose output error and attended mass are recorded per layer and head
PROBES = [(sel, summ) for sel in ("bound", "rerank", "exact") for summ in ("none", "mean")] + [("exact", "lse")]


class Analysis:
    """The replacement decode step and its per-layer / per-head records."""

    def __init__(self, rerank: int):
        self.rerank = rerank
        self.select, self.summary, self.oracle_layers = "bound", "mean", set()
        self.probe = False
        # (layer, query head) -> {"mass:<sel>": [...], "err:<sel>:<summ>": [...]}
        self.records = defaultdict(lambda: defaultdict(list))

    def attend(self, qh, s, k, v, pos, valid, cnt, base, chosen, summary, scale, cand=None, q0=None):
        """Attention output [G, D] over base tokens + chosen pages exactly and `summary` for the rest.
        s [G, L] scores; pos/valid [P, ps]; cnt [P]; base [L] bool (sink + window); chosen [P] bool;
        cand [P] bool: the rerank candidates (``candlse``)."""
        tok = base.clone()
        tok[pos[chosen][valid[chosen]]] = True
        logits, values = [s[:, tok]], [v[tok]]
        rest = ~chosen & (cnt > 0)
        if summary != "none" and bool(rest.any()):
            pr, vr, cr = pos[rest], valid[rest][..., None], cnt[rest][:, None]
            mk = (k[pr] * vr).sum(1) / cr  # [R, D]
            mv = (v[pr] * vr).sum(1) / cr

            def page_lse(scores):  # [G, R]: each unselected page's exact log mass under `scores` [G, L]
                return torch.logsumexp(scores[:, pr].masked_fill(~valid[rest], float("-inf")), -1)

            if summary == "lse":
                lg = page_lse(s)
            else:
                lg = (qh @ mk.T) * scale + torch.log(cr.T.float())
                if summary == "var":
                    var = (((k[pr] - mk[:, None]) ** 2) * vr).sum(1) / cr
                    lg = lg + 0.5 * scale ** 2 * ((qh ** 2) @ var.T)
                if summary == "candlse":
                    lg = torch.where(cand[rest][None, :], page_lse(s), lg)
                if summary == "cov":  # second order with the page's full covariance: 1/2 Var_t(s_t)
                    sp = s[:, pr]  # [G, R, ps]
                    w = valid[rest].float()
                    mu = (sp * w).sum(-1) / cr.T
                    lg = lg + 0.5 * (((sp - mu[..., None]) ** 2) * w).sum(-1) / cr.T
                if summary.startswith("ratio"):
                    exact = page_lse(s)
                    if summary in ("ratioall", "ratioallkv"):
                        pick = torch.ones(exact.shape[1], dtype=torch.bool)
                    elif summary == "ratiocand":
                        pick = cand[rest]
                    else:
                        gen = torch.Generator().manual_seed(int(s.shape[1]))
                        m = int(cand.sum())
                        pick = torch.zeros(exact.shape[1], dtype=torch.bool)
                        pick[torch.randperm(exact.shape[1], generator=gen)[:m]] = True
                    if bool(pick.any()):
                        c = torch.logsumexp(exact[:, pick], -1) - torch.logsumexp(lg[:, pick], -1)  # [G]
                        lg = lg + (c.mean() if summary == "ratioallkv" else c[:, None])
                if summary in ("pcal", "pcalkv"):
                    s0 = q0 @ k.T * scale  # [G, L]: the calibration query's scores
                    delta = page_lse(s0) - ((q0 @ mk.T) * scale + torch.log(cr.T.float()))  # [G, R] >= 0 (Jensen)
                    lg = lg + (delta.mean(0, keepdim=True) if summary == "pcalkv" else delta)
            logits.append(lg)
            values.append(mv)
        w = torch.softmax(torch.cat(logits, 1), -1)
        return w @ torch.cat(values, 0), tok

    def decode_attention(self, layer, module, query, scaling):
        o = layer.owner
        B, Hq, _, D = query.shape
        H, ps = layer.H, o.page_size
        G = Hq // H
        scale = float(scaling if scaling is not None else 1 / math.sqrt(D))
        q = query[:, :, -1, :].float()
        k_sel = o.selected_pages
        P = layer.index.num_pages()
        kc = k_sel * self.rerank
        cand = torch.empty((B, H, kc), dtype=torch.int32)
        layer.index.select(q.cpu().contiguous(), kc, cand)
        every = torch.arange(P, dtype=torch.int32).expand(B, H, P).clone()
        for st in range(B * H):
            every[st // H, st % H, layer.index.num_pages(st):] = -1
        pos_all = torch.empty((B, H, P, ps), dtype=torch.long)
        layer.index.page_positions(every, P, pos_all)
        out = torch.empty((B, Hq, D))
        K, V = layer.full_k.float(), layer.full_v.float()
        for b in range(B):
            for h in range(H):
                k, v = K[b, h], V[b, h]
                qh = q[b, h * G:(h + 1) * G]  # [G, D]
                s = qh @ k.T * scale  # [G, L]
                n_pages = layer.index.num_pages(b * H + h)
                pos = pos_all[b, h, :n_pages]  # [P, ps], -1 = empty slot
                valid = pos >= 0
                pos = pos.clamp(min=0)
                cnt = valid.sum(-1)
                page_max = s[:, pos].masked_fill(~valid, float("-inf")).amax(-1)  # [G, P]
                mean_k = (k[pos] * valid[..., None]).sum(1) / cnt.clamp(min=1)[:, None]

                def top(score, among):  # GQA merge as in ClusteredCache::select; score [G, P]
                    sc = score[:, among]
                    merged = (sc - sc.amax(-1, keepdim=True)).amax(0)
                    keep = among[merged.topk(min(k_sel, len(among))).indices]
                    m = torch.zeros(n_pages, dtype=torch.bool)
                    m[keep] = True
                    return m

                bound_cand = torch.tensor([int(p) for p in cand[b, h] if p >= 0], dtype=torch.long)
                everything = torch.arange(n_pages)

                def choose(sel):
                    if sel == "bound":
                        m = torch.zeros(n_pages, dtype=torch.bool)
                        m[bound_cand[:k_sel]] = True
                        return m
                    if sel == "rerank":
                        return top(page_max, bound_cand)
                    if sel == "exact":
                        return top(page_max, everything)
                    bias = torch.log(cnt.clamp(min=1).float()) if sel == "mass" else 0.0
                    return top((qh @ mean_k.T) * scale + bias, everything)

                base = torch.zeros(k.shape[0], dtype=torch.bool)
                base[layer.sink_pos[b][layer.sink_pos[b] >= 0]] = True
                base[layer.ws:layer.length] = True
                sel = "exact" if layer.layer_idx in self.oracle_layers else self.select
                cand_mask = torch.zeros(n_pages, dtype=torch.bool)
                cand_mask[bound_cand] = True
                q0 = layer.calibration_query[b, h * G:(h + 1) * G] if hasattr(layer, "calibration_query") else None
                o_run, _ = self.attend(qh, s, k, v, pos, valid, cnt, base, choose(sel), self.summary, scale,
                                       cand_mask, q0)
                out[b, h * G:(h + 1) * G] = o_run
                if self.probe:
                    p_full = torch.softmax(s, -1)  # [G, L]
                    o_full = p_full @ v
                    norm = o_full.norm(dim=-1).clamp(min=1e-12)
                    chosen = {name: choose(name) for name in ("bound", "rerank", "exact")}
                    for name, m in chosen.items():
                        for summ in [x for sel_, x in PROBES if sel_ == name]:
                            o_x, tok = self.attend(qh, s, k, v, pos, valid, cnt, base, m, summ, scale)
                            err = (o_x - o_full).norm(dim=-1) / norm  # [G]
                            for g in range(G):
                                rec = self.records[(layer.layer_idx, h * G + g)]
                                rec[f"err:{name}:{summ}"].append(float(err[g]))
                                if summ == "none":
                                    rec[f"mass:{name}"].append(float(p_full[g, tok].sum()))
        return out.to(query.dtype).unsqueeze(1)

    def install(self):
        orig_build, orig_append = IceCacheLayer._build, IceCacheLayer._append

        def build(layer, valid):
            v = layer._prefill_v
            orig_build(layer, valid)
            layer.full_v = v.clone()  # with measure=True the layer keeps full_k; the analysis also needs V

        def append(layer, k, v):
            orig_append(layer, k, v)
            layer.full_v = torch.cat([layer.full_v, v], dim=-2)

        IceCacheLayer._build, IceCacheLayer._append = build, append
        # the prompt's last query per layer (post-RoPE, [B, Hq, D] float32): the ``pcal`` calibration query
        from transformers import AttentionInterface
        from scrimp.icecache.attention import ATTN_NAME, _register_attention, _take_mark

        _register_attention()
        inner = AttentionInterface._global_mapping[ATTN_NAME]

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            _take_mark(module, kwargs)
            layer = kwargs.get("icecache_prefill")
            if layer is not None:
                layer.calibration_query = query[:, :, -1, :].float().cpu()
            return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

        AttentionInterface._global_mapping[ATTN_NAME] = attention
        IceCacheLayer.decode_attention = lambda layer, module, query, scaling: self.decode_attention(
            layer, module, query, scaling)

    def table(self):
        rows = []
        for (layer, head), rec in sorted(self.records.items()):
            row = {"layer": layer, "head": head, "steps": len(rec["mass:bound"])}
            for key, vals in rec.items():
                row[key] = sum(vals) / len(vals)
            rows.append(row)
        return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["bound:mean"],
                    help=f"SELECT:SUMMARY pairs to evaluate (SELECT in {SELECTIONS}, SUMMARY in {SUMMARIES})")
    ap.add_argument("--rerank", type=int, default=8, help="candidates per selected page for rerank (default 8, the library's)")
    ap.add_argument("--oracle-layers", type=int, nargs="*", default=[],
                    help="layers whose selection is exact in every run (per-layer attribution)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="example seeds")
    ap.add_argument("--n", type=int, default=100, help="prompts per seed")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=8)
    ap.add_argument("--sink-pages", type=int, default=None, help="default: 1 at budget <= 64, else 2")
    ap.add_argument("--window-pages", type=int, default=None, help="default: 1 at budget <= 64, else 2")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--filler-share", type=float, default=0.0,
                    help="share of each context given to filler lines (recall-8k at 8,192 tokens: 0.5)")
    ap.add_argument("--model", default="recall", help="testbed recall checkpoint (recall, recall-8k)")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-layer / per-head records")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs = [tuple(r.split(":")) for r in args.runs]
    for r in runs:
        if len(r) != 2 or r[0] not in SELECTIONS or r[1] not in SUMMARIES:
            ap.error(f"--runs takes SELECT:SUMMARY with SELECT in {SELECTIONS} and SUMMARY in {SUMMARIES}")

    an = Analysis(args.rerank)
    an.oracle_layers = set(args.oracle_layers)
    an.install()
    model, tok = testbed.load(args.model)
    small = args.budget <= 64
    sink = args.sink_pages if args.sink_pages is not None else (1 if small else 2)
    window = args.window_pages if args.window_pages is not None else (1 if small else 2)
    fn = make_generate_fn("icecache", budget=args.budget, measure=True, dense_layers=0, max_context=args.context + 64,
                          page_size=args.page_size, sink_pages=sink, window_pages=window, select_on_device=False)
    full = {s: testbed.evaluate(model, tok, "recall", n=args.n, seed=s, context_tokens=args.context,
                                filler_share=args.filler_share)
            for s in args.seeds}
    n_full = sum(sum(r["correct"] for r in full[s]["results"]) for s in args.seeds)
    result = {"budget": args.budget, "page_size": args.page_size, "sink_pages": sink, "window_pages": window,
              "seeds": args.seeds, "n": args.n, "oracle_layers": args.oracle_layers, "rerank": args.rerank,
              "full_correct": n_full, "full_per_seed": {s: sum(r["correct"] for r in full[s]["results"])
                                                        for s in args.seeds}, "runs": []}
    head = (f"budget={args.budget} page={args.page_size} sink {sink} + window {window} pages, seeds {args.seeds} x "
            f"n={args.n}, oracle layers {sorted(an.oracle_layers) or 'none'}")
    print(f"{head}: full {n_full}/{len(args.seeds) * args.n}", flush=True)
    for i, (select, summary) in enumerate(runs):
        an.select, an.summary, an.probe = select, summary, (i == 0 and not args.no_probe)
        t0 = time.perf_counter()
        per_seed = {}
        for s in args.seeds:
            res = testbed.evaluate(model, tok, "recall", n=args.n, seed=s, context_tokens=args.context,
                                   filler_share=args.filler_share, generate_fn=fn)
            per_seed[s] = sum(r["correct"] for r in res["results"])
        corr = sum(per_seed.values())
        result["runs"].append({"select": select, "summary": summary, "correct": corr, "per_seed": per_seed,
                               "relative": corr / max(n_full, 1),
                               "relative_per_seed": {s: per_seed[s] / max(result["full_per_seed"][s], 1)
                                                     for s in args.seeds}})
        print(f"select={select}{args.rerank if select == 'rerank' else ''} summary={summary}: "
              f"{corr}/{len(args.seeds) * args.n} per seed {per_seed}, relative {corr / max(n_full, 1):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if an.probe:
            result["per_head"] = an.table()
            print(f"  per layer / query head, on this run's states: attended mass and output error "
                  f"|o - o_full| / |o_full|")
            print(f"  {'layer':>5} {'head':>4} {'mass bound':>10} {'rerank':>7} {'exact':>7} "
                  + " ".join(f"{f'err {a}:{b}':>17}" for a, b in PROBES))
            for r in result["per_head"]:
                print(f"  {r['layer']:>5} {r['head']:>4} {r['mass:bound']:>10.3f} {r['mass:rerank']:>7.3f} "
                      f"{r['mass:exact']:>7.3f} " + " ".join(f"{r[f'err:{a}:{b}']:>17.3f}" for a, b in PROBES))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
