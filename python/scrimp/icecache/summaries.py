"""Stand-ins for the pages a decode step does not attend: a fixed number of summary rows per KV head.

Each row stands for a *group* of ``g`` consecutive page ids (neighbouring leaves of the page tree, or
pages evicted from the window one after another) by its mean value, weighted by the group's attention
mass (below): the group's ``sum_t exp(q.k_t) v_t`` is approximated by ``mass * mean_v``. While a layer
holds at most ``rows`` pages, ``g = 1`` (one row per page); when it holds more, ``g = ceil(pages /
rows)`` (the rows are regrouped whenever ``g`` grows), so the device memory of the rows does not grow
with the context.

A step's selected pages are attended exactly and must leave their group's row: the rows of groups
holding a selected page are masked, and per selected page one extra row carries its group's summary
without the group's selected pages (computed on the host from the per-page sums kept there). With
``g = 1`` the extra rows are empty and the masked rows are the selected pages' own.

How much attention a row takes (``mass``):

* ``"mean"``: its mean key scored with a bias of log(tokens): ``n exp(q.mean_k)``, a lower bound of the
  group's true ``sum_t exp(q.k_t)`` (Jensen), exact only when the group's keys coincide.
* ``"exact"``: the group's true mass per query head, ``log sum_t exp(scale q.k_t)`` over its unselected
  tokens, from the page masses the host computes each step (``ClusteredCache.page_log_mass``, every
  indexed key against the query on the host), passed as a ``[B, Hq, R]`` bias that is the row's whole
  score; the device then holds no summary keys. The mean value still stands in for the group's values.
"""
from __future__ import annotations

import torch


class SummaryRows:
    """Device summary rows of one layer: ``rows`` group rows + ``extra`` per-step rows per stream.

    Parameters
    ----------
    B, H, D : batch rows, KV heads, head dim.
    rows : most group rows per stream (>= 1).
    extra : pages a step selects per stream (the extra rows' count; grown when a step selects more).
    dtype, device : the cache's dtype and device (rows are stored in ``dtype``; biases in float32).
    mass : ``"mean"`` or ``"exact"`` (module docstring); ``"exact"`` keeps no keys on the device.
    """

    def __init__(self, B: int, H: int, D: int, rows: int, extra: int, dtype, device, mass: str = "mean"):
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            raise ValueError(f"extra must be an int >= 0, got {extra!r}")
        if mass not in ("mean", "exact"):
            raise ValueError(f"mass must be 'mean' or 'exact', got {mass!r}")
        self.B, self.H, self.D, self.rows, self.extra, self.mass = B, H, D, rows, extra, mass
        self.step_bias_bytes = 0  # "exact": the per-step [B, Hq, R] bias
        self.dtype, self.device = dtype, torch.device(device)
        self.group = 1  # pages per row
        S = B * H
        self.cap = 0  # group rows allocated (grown with the pages up to `rows`)
        R = self.cap + extra
        self.values = torch.zeros((B, H, R, D), dtype=dtype, device=self.device)  # [B, H, cap + extra, D]
        self.keys = torch.zeros_like(self.values) if mass == "mean" else None
        # log token counts per row (the "mean" bias; with "exact" only a host copy for the counts)
        self.bias = torch.full((B, H, R), float("-inf"), dtype=torch.float32,
                               device=self.device if mass == "mean" else "cpu")
        # host: per page the mean key / value (float32, [S, cap, D]) and token count ([S, cap])
        self._ksum = torch.zeros((S, 0, D))
        self._vsum = torch.zeros((S, 0, D))
        self._lens = torch.zeros((S, 0))
        # host: per group row the same sums ([S, cap, D], [S, cap])
        self._gk = torch.zeros((S, 0, D))
        self._gv = torch.zeros((S, 0, D))
        self._gn = torch.zeros((S, 0))
        self.pages = 0

    # ---- keeping the rows in step with the index ----------------------------------------------------
    def sync(self, index, first: int):
        """Pages ``first..`` of ``index`` changed or arrived: refresh the host sums and the rows they
        fall in (all rows when the group size grows)."""
        P = index.num_pages()
        n = P - first
        if n <= 0:
            return
        S, D = self.B * self.H, self.D
        if self._ksum.shape[1] < P:  # host arrays grow by doubling
            cap = max(P, 2 * self._ksum.shape[1], 16)
            for name in ("_ksum", "_vsum", "_lens"):
                old = getattr(self, name)
                new = old.new_zeros((S, cap) + tuple(old.shape[2:]))
                new[:, :old.shape[1]] = old
                setattr(self, name, new)
        km = torch.empty((S, n, D), dtype=torch.float32)
        vm = torch.empty_like(km)
        lens = torch.empty((S, n), dtype=torch.int32)
        index.export_summaries(first, n, km, vm, lens)
        lf = lens.float()
        self._ksum[:, first:P] = km  # page means (their sums: times the count)
        self._vsum[:, first:P] = vm
        self._lens[:, first:P] = lf
        self.pages = P
        if self.cap < min(P, self.rows):  # room for window evictions: grow by >= 1/8, at most to `rows`
            self._resize(min(self.rows, P + max(16, P // 8)), self.extra)
        g = max(self.group, -(-P // self.rows))
        if g != self.group:
            self.group, first = g, 0
        self._write_groups(first // g, -(-P // g))

    def _write_groups(self, a: int, b: int):
        """Rows a..b-1 from the host sums (group j = pages [j g, (j + 1) g))."""
        g, S, D = self.group, self.B * self.H, self.D
        P = b * g
        ks, vs, ls = self._ksum[:, a * g:P], self._vsum[:, a * g:P], self._lens[:, a * g:P]
        if ks.shape[1] < P - a * g:  # pad the last group
            pad = P - a * g - ks.shape[1]
            ks = torch.cat([ks, ks.new_zeros((S, pad, D))], 1)
            vs = torch.cat([vs, vs.new_zeros((S, pad, D))], 1)
            ls = torch.cat([ls, ls.new_zeros((S, pad))], 1)
        n = ls.view(S, b - a, g).sum(-1)  # [S, b - a]
        d = n.clamp(min=1)[..., None]
        w = ls[..., None]
        gk, gv = (ks * w).view(S, b - a, g, D).sum(2), (vs * w).view(S, b - a, g, D).sum(2)
        self._gk[:, a:b], self._gv[:, a:b], self._gn[:, a:b] = gk, gv, n
        self._gn[:, b:] = 0
        km, vm = (ks, vs) if g == 1 else (gk / d, gv / d)  # one page per row: its own mean, as exported
        B, H = self.B, self.H
        if self.keys is not None:
            self.keys[:, :, a:b] = km.view(B, H, b - a, D).to(device=self.device, dtype=self.dtype)
        self.values[:, :, a:b] = vm.view(B, H, b - a, D).to(device=self.device, dtype=self.dtype)
        self.bias[:, :, a:b] = n.log().view(B, H, b - a).to(self.bias.device)  # log 0 = -inf: no tokens
        self.bias[:, :, b:self.cap] = float("-inf")

    # ---- one decode step ----------------------------------------------------------------------------
    def step(self, pages, log_mass=None):
        """The kernel's summary arguments for a step that attends ``pages`` ([B, H, k] int32 page ids,
        -1 padding, or None) exactly: ``dict(summary_keys=, summary_values=, summary_bias=)``.
        ``log_mass`` ([B, Hq, >= pages] float32 on the host, ``ClusteredCache.page_log_mass``): every
        page's exact mass this step, required with ``mass="exact"``."""
        exact = self.mass == "exact"
        if exact:
            if not isinstance(log_mass, torch.Tensor) or log_mass.dim() != 3 or log_mass.shape[0] != self.B or \
                    log_mass.shape[1] % self.H or log_mass.shape[2] < self.pages or log_mass.dtype != torch.float32:
                raise ValueError(f"mass='exact' needs log_mass [B={self.B}, Hq (a multiple of {self.H}), >= "
                                 f"{self.pages}] float32, got {_describe(log_mass)}")
        B, H, R = self.B, self.H, self.cap
        if pages is None or not pages.numel():
            if not exact:
                return dict(summary_keys=self.keys, summary_values=self.values, summary_bias=self.bias)
            p = torch.full((B, H, 0), -1, dtype=torch.long)
        else:
            p = pages.to("cpu", torch.long)
        k = p.shape[-1]
        if k > self.extra:  # more pages selected than ever before (the page cache grew): more extra rows
            self._resize(self.cap, k)
        valid = p >= 0
        gid = torch.where(valid, p // self.group, torch.full_like(p, -1))
        hit = torch.zeros((B, H, R + 1), dtype=torch.bool)
        hit.scatter_(2, torch.where(valid, gid, torch.full_like(gid, R)), True)  # -1 -> the spare column
        hit = hit[:, :, :R]
        keep = None
        if self.group > 1 and k:
            keep = self._extra_rows(p.view(B * H, k), gid.view(B * H, k), valid.view(B * H, k))
        if not exact:
            bias = self.bias.masked_fill(torch.cat([hit, torch.zeros((B, H, self.extra), dtype=torch.bool)],
                                                   2).to(self.device), float("-inf"))
            if keep is not None:
                eb = torch.where(keep, self._extra_n.clamp(min=1).log(), torch.full_like(self._extra_n, float("-inf")))
                bias[:, :, R:R + k] = eb.view(B, H, k).to(self.device)
            return dict(summary_keys=self.keys, summary_values=self.values, summary_bias=bias)
        return dict(summary_keys=None, summary_values=self.values,
                    summary_bias=self._exact_bias(log_mass, p, valid, gid, hit, keep).to(self.device))

    def _exact_bias(self, log_mass, p, valid, gid, hit, keep):
        """[B, Hq, cap + extra] float32: each live row's exact log mass per query head (its group's
        unselected pages), -inf for the rest (groups holding a selected page, unused rows)."""
        B, H, R, g, P = self.B, self.H, self.cap, self.group, self.pages
        Hq = log_mass.shape[1]
        G = Hq // H
        lm = log_mass[:, :, :P].clone()  # [B, Hq, P]
        if p.shape[-1]:  # the selected pages are attended exactly: out of every row
            sel = torch.zeros((B, H, P + 1), dtype=torch.bool)
            sel.scatter_(2, torch.where(valid, p, torch.full_like(p, P)), True)
            lm.masked_fill_(sel[:, :, :P].repeat_interleave(G, 1), float("-inf"))
        n_groups = -(-P // g)
        pad = n_groups * g - P
        if pad:
            lm = torch.cat([lm, lm.new_full((B, Hq, pad), float("-inf"))], 2)
        group_mass = torch.logsumexp(lm.view(B, Hq, n_groups, g), -1)  # [B, Hq, n_groups]
        bias = torch.full((B, Hq, R + self.extra), float("-inf"))
        bias[:, :, :n_groups] = group_mass.masked_fill(hit[:, :, :n_groups].repeat_interleave(G, 1), float("-inf"))
        if keep is not None:  # extra rows: the touched groups without their selected pages
            k = p.shape[-1]
            gm = torch.gather(group_mass, 2, gid.clamp(min=0).repeat_interleave(G, 1))  # [B, Hq, k]
            live = keep.view(B, H, k).repeat_interleave(G, 1)
            bias[:, :, R:R + k] = torch.where(live, gm, torch.full_like(gm, float("-inf")))
        # -inf in every head of a row with no unselected tokens; logsumexp of an all -inf group is -inf
        self.step_bias_bytes = bias.numel() * bias.element_size()
        return bias

    def _resize(self, cap: int, extra: int):
        """Hold `cap` group rows (the first min(old, new) kept) and `extra` extra rows."""
        keep = min(cap, self.cap)
        for name in ("keys", "values", "bias"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_full(old.shape[:2] + (cap + extra,) + old.shape[3:], float("-inf") if name == "bias" else 0.0)
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)
        for name in ("_gk", "_gv", "_gn"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], cap) + tuple(old.shape[2:]))
            new[:, :keep] = old[:, :keep]
            setattr(self, name, new)
        self.cap, self.extra = cap, extra

    def _extra_rows(self, p, gid, valid):
        """Rows cap..cap+k-1: each touched group once, without its selected pages (keys, values and, in
        ``self._extra_n``, token counts); returns which of the k rows are live ([S, k] bool)."""
        S, k = p.shape
        D, R = self.D, self.cap
        pc = p.clamp(min=0)
        ps_n = torch.gather(self._lens, 1, pc) * valid
        ps_k = torch.gather(self._ksum, 1, pc[..., None].expand(S, k, D)) * ps_n[..., None]
        ps_v = torch.gather(self._vsum, 1, pc[..., None].expand(S, k, D)) * ps_n[..., None]
        same = (gid[:, :, None] == gid[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [S, k, k]
        first = valid & ~(same & torch.ones(k, k, dtype=torch.bool).tril(-1)).any(-1)
        sf = same.float()
        gi = gid.clamp(min=0)
        gk = torch.gather(self._gk, 1, gi[..., None].expand(S, k, D))
        gv = torch.gather(self._gv, 1, gi[..., None].expand(S, k, D))
        gn = torch.gather(self._gn, 1, gi)
        rk = gk - sf @ ps_k
        rv = gv - sf @ ps_v
        rn = gn - (sf @ ps_n[..., None])[..., 0]
        keep = first & (rn > 0.5)
        d = rn.clamp(min=1)[..., None]
        B, H = self.B, self.H
        if self.keys is not None:
            self.keys[:, :, R:R + k] = (rk / d).view(B, H, k, D).to(device=self.device, dtype=self.dtype)
        self.values[:, :, R:R + k] = (rv / d).view(B, H, k, D).to(device=self.device, dtype=self.dtype)
        self._extra_n = rn
        return keep

    def nbytes(self) -> int:
        """Device bytes of the rows (keys, values, biases; with ``mass="exact"`` values and the last
        step's per-query-head bias)."""
        if self.mass == "exact":
            return self.values.numel() * self.values.element_size() + self.step_bias_bytes
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.bias))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
