"""Where IceCache loses accuracy at small budgets: page selection or the summary of unselected pages?

A float64-free torch re-implementation of one IceCache decode step on the testbed `recall` model, with
the same pages (the library's clustering and index) but interchangeable parts:

* ``--select``: how the pages are chosen - ``bound`` (the library's min/max bound), ``rerank`` (bound
  candidates, ``--rerank`` per selected page, re-scored by their exact max q.k: what
  ``IceCache(rerank=N)`` does), ``exact`` (the pages with the largest exact max q.k among all pages),
  ``centroid`` (q . mean key), ``mass`` (q . mean key * scale + log(page tokens));
* ``--summary``: what the unselected pages contribute - ``none`` (nothing, the paper), ``mean``
  (mean key + log count, mean value: ``IceCache(summaries=True)``), ``lse`` (the page's exact
  attention mass, mean value), ``var`` (mean key + a diagonal Gaussian correction 1/2 q^2 . var * scale^2).

The step reads every key and value (a full copy kept for the analysis), so it is slow and for
measurement only. Results are in docs/icecache.md.

    python bench/icecache_selection_analysis.py --select rerank --rerank 4 --summary mean --n 100 --budget 64
"""
from __future__ import annotations

import argparse
import math

import torch

from scrimp import testbed
from scrimp.icecache import make_generate_fn
from scrimp.icecache.cache import IceCacheLayer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--select", choices=("bound", "rerank", "exact", "centroid", "mass"), default="bound")
    ap.add_argument("--rerank", type=int, default=4, help="candidates per selected page for --select rerank")
    ap.add_argument("--summary", choices=("none", "mean", "lse", "var"), default="mean")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args(argv)

    orig_build, orig_append = IceCacheLayer._build, IceCacheLayer._append

    def build(self, valid):
        v = self._prefill_v
        orig_build(self, valid)
        self.full_v = v.clone()  # with measure=True the layer keeps full_k; the analysis also needs V

    def append(self, k, v):
        orig_append(self, k, v)
        self.full_v = torch.cat([self.full_v, v], dim=-2)

    def decode_attention(self, module, query, scaling):
        o = self.owner
        B, Hq, _, D = query.shape
        H, ps = self.H, o.page_size
        G = Hq // H
        scale = float(scaling if scaling is not None else 1 / math.sqrt(D))
        q = query[:, :, -1, :].float()
        k_sel = o.selected_pages
        P = self.index.num_pages()
        kc = k_sel * args.rerank if args.select == "rerank" else k_sel
        cand = torch.empty((B, H, kc), dtype=torch.int32)
        self.index.select(q.cpu().contiguous(), kc, cand)
        every = torch.arange(P, dtype=torch.int32).expand(B, H, P).clone()
        for s in range(B * H):
            every[s // H, s % H, self.index.num_pages(s):] = -1
        pos = torch.empty((B, H, P, ps), dtype=torch.long)
        self.index.page_positions(every, P, pos)
        out = torch.empty((B, Hq, D))
        K, V = self.full_k.float(), self.full_v.float()
        for b in range(B):
            for h in range(H):
                k, v = K[b, h], V[b, h]
                qh = q[b, h * G:(h + 1) * G]  # [G, D]
                s = qh @ k.T * scale  # [G, tokens]
                n_pages = self.index.num_pages(b * H + h)
                members = [pos[b, h, p][pos[b, h, p] >= 0] for p in range(n_pages)]

                def top(score_of, among):  # GQA merge as in ClusteredCache::select
                    sc = torch.stack([score_of(p) for p in among], -1)  # [G, len(among)]
                    merged = (sc - sc.amax(-1, keepdim=True)).amax(0)
                    return {among[int(i)] for i in merged.topk(min(k_sel, len(among))).indices}

                bound_cand = [int(p) for p in cand[b, h] if p >= 0]
                if args.select == "bound":
                    chosen = set(bound_cand[:k_sel])
                elif args.select == "rerank":
                    chosen = top(lambda p: s[:, members[p]].amax(-1), bound_cand)
                elif args.select == "exact":
                    chosen = top(lambda p: s[:, members[p]].amax(-1), list(range(n_pages)))
                else:
                    bias = (lambda p: math.log(len(members[p]))) if args.select == "mass" else (lambda p: 0.0)
                    chosen = top(lambda p: (qh @ k[members[p]].mean(0)) * scale + bias(p), list(range(n_pages)))
                exact = torch.zeros(k.shape[0], dtype=torch.bool)
                exact[self.sink_pos[b][self.sink_pos[b] >= 0]] = True
                exact[self.ws:self.length] = True
                for p in chosen:
                    exact[members[p]] = True
                logits, values = [s[:, exact]], [v[exact]]
                if args.summary != "none":
                    for p in range(n_pages):
                        if p in chosen:
                            continue
                        m = members[p]
                        mk = k[m].mean(0)
                        if args.summary == "lse":
                            lg = torch.logsumexp(s[:, m], -1, keepdim=True)
                        else:
                            lg = (qh @ mk)[:, None] * scale + math.log(len(m))
                            if args.summary == "var":
                                lg = lg + 0.5 * scale ** 2 * ((qh ** 2) @ k[m].var(0, unbiased=False))[:, None]
                        logits.append(lg)
                        values.append(v[m].mean(0, keepdim=True))
                w = torch.softmax(torch.cat(logits, 1), -1)
                out[b, h * G:(h + 1) * G] = w @ torch.cat(values, 0)
        return out.to(query.dtype).unsqueeze(1)

    IceCacheLayer._build, IceCacheLayer._append, IceCacheLayer.decode_attention = build, append, decode_attention
    model, tok = testbed.load("recall")
    sink, window = (1, 1) if args.budget <= 64 else (2, 2)
    fn = make_generate_fn("icecache", budget=args.budget, measure=True, dense_layers=0, max_context=args.context + 64,
                          page_size=args.page_size, sink_pages=sink, window_pages=window, select_on_device=False)
    res = testbed.evaluate(model, tok, "recall", n=args.n, context_tokens=args.context, generate_fn=fn)
    full = testbed.evaluate(model, tok, "recall", n=args.n, context_tokens=args.context)["accuracy"]
    print(f"select={args.select}{args.rerank if args.select == 'rerank' else ''} summary={args.summary} "
          f"budget={args.budget} page={args.page_size} n={args.n}: accuracy {res['accuracy']:.3f}, "
          f"full {full:.3f}, relative {res['accuracy'] / full:.3f}")


if __name__ == "__main__":
    main()
