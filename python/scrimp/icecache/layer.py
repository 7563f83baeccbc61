"""One IceCache attention layer: resident sink + window on the device, the other tokens in a host page
index; its prefill (one pass or chunks), window eviction, page selection and decode attention."""
from __future__ import annotations

import math
from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import _C
from .attention import ATTN_NAME, _mark
from .coarse import coarse_groups
from .summaries import SummaryRows

_METHOD_INDEX = {  # method -> (cluster pages at prefill, page score)
    "icecache": (True, "bounds"),
    "quest": (False, "bounds"),
    "random": (False, "random"),
    "oracle": (False, "oracle"),
    "streaming": (False, "bounds"),
}
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}



class _Softmax:
    """Running softmax attention of queries q [B, H, R, D] (float32) over key blocks, merged by
    log-sum-exp: ``add`` one block at a time, ``result`` = softmax(q K^T * scale) V over all of them."""

    def __init__(self, q, scale):
        self.q, self.scale = q, scale
        B, H, R, D = q.shape
        self.m = torch.full((B, H, R), float("-inf"), device=q.device)
        self.l = torch.zeros((B, H, R), device=q.device)
        self.acc = torch.zeros((B, H, R, D), device=q.device)

    def add(self, keys, values, mask, kv_valid):
        """keys, values [B, H, L, D]; mask broadcastable to [B, H, R, L] (True = attend); kv_valid
        broadcastable to [B, H, L] (False rows of values are zeroed: padding may hold anything)."""
        s = torch.matmul(self.q, keys.float().transpose(-1, -2)) * self.scale
        s = s.masked_fill(~mask, float("-inf"))
        m_new = torch.maximum(self.m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(self.m - m_safe)
        v = values.float().masked_fill(~kv_valid[..., None], 0.0)
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha[..., None] + torch.matmul(p, v)
        self.m = m_new

    def result(self):
        return self.acc / torch.where(self.l > 0, self.l, torch.ones_like(self.l))[..., None]


class IceCacheLayer(CacheLayerMixin):
    """One attention layer: resident sink + window on the device, the rest in a host page index."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "IceCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.length = 0  # tokens seen (cache positions 0..length-1)
        self.index = None
        self.max_pages = 0  # host pool capacity of `index` per stream, in pages
        self.slots = 0  # device page-cache slots per stream (rows of k_store / v_store per stream)
        self.k_store = self.v_store = None
        self.dev_bounds = None
        self._stats_base = {"hits": 0, "misses": 0, "bytes_copied": 0}  # of indexes replaced by _grow
        self.stats = {"steps": 0, "mass": []}
        self.dev_summaries = None  # summaries=True: device mirrors of the page summaries (_sync_summaries)
        # reuse_selection: a follower uses its leader's page selection (same tokens in the same pages:
        # its layout is copied from the leader's, not clustered on its own keys); see IceCache
        self.leader: Optional["IceCacheLayer"] = None
        self.followers: list = []
        self.shared_pages = None  # this step's selected pages [B, H, k] int32 (leaders, for followers)
        self._prefill_k = self._prefill_v = self._chunk = None

    # ---- CacheLayerMixin -----------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        o = self.owner
        B, H, _, D = key_states.shape
        o._check_states(key_states, value_states, self.layer_idx)
        self.device = torch.device(o.device) if o.device is not None else key_states.device
        self.dtype = key_states.dtype
        self.B, self.H, self.D = B, H, D
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        model_kwargs = kwargs.get("kwargs")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._prefill_k, self._prefill_v = key_states, value_states
            _mark(self, "icecache_prefill", model_kwargs)
            return key_states, value_states
        o._check_states(key_states, value_states, self.layer_idx, (self.B, self.H, self.D), self.dtype)
        if self._prefill_k is not None or self._chunk is not None:
            raise RuntimeError(f"IceCache layer {self.layer_idx}: the previous call was not finished by the "
                               f"'{ATTN_NAME}' attention function (was this cache used with another model, or the model's "
                               "attention implementation changed?); create a new IceCache for each model and sequence")
        if key_states.shape[-2] > 1:  # a prefill chunk: attended exactly in chunk_attention
            self._chunk = (key_states.to(self.device), value_states.to(self.device))
            _mark(self, "icecache_chunk", model_kwargs)
            return key_states, value_states
        self._append(key_states.to(self.device), value_states.to(self.device))
        _mark(self, "icecache_decode", model_kwargs)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        raise RuntimeError("IceCache cannot be reset in place; create a new IceCache for a new sequence")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("IceCache does not support beam search")

    # ---- prefill: the first call (dense SDPA by transformers), then chunks (chunk_attention) ---------
    @staticmethod
    def _valid_columns(attention_mask, n):
        """[B, n] bool: which of the last n key positions the mask's last query row may attend (None
        when there is no mask)."""
        if attention_mask is None or attention_mask.dim() != 4:
            return None
        row = attention_mask[:, 0, -1, -n:]
        return (row if row.dtype == torch.bool else row == 0).to("cpu")

    def finish_prefill(self, module, attention_mask):
        self.owner._check_module(module)
        self._build(self._valid_columns(attention_mask, self._prefill_k.shape[-2]))

    def _build(self, valid):
        """State for the first call's N tokens: empty resident buffers and index, then ingest them."""
        o = self.owner
        k_all, v_all = self._prefill_k, self._prefill_v
        self._prefill_k = self._prefill_v = None
        B, H, N, D = k_all.shape
        S, Wcap = o.sink_pages * o.page_size, o.window_pages * o.page_size
        self.S, self.Wcap = S, Wcap
        self.pads = [0] * B
        self.length = self.ws = self.evicted = 0
        # Resident tokens live in one preallocated buffer per K and V: S sink slots, then up to Wcap
        # window tokens (no per-step concatenation); `dense_mask` marks the slots attention may use.
        self.dense_k = k_all.new_zeros((B, H, S + Wcap, D), device=self.device)
        self.dense_v = k_all.new_zeros((B, H, S + Wcap, D), device=self.device)
        self.dense_mask = torch.zeros((B, S + Wcap), dtype=torch.uint8, device=self.device)
        self.sink_pos = torch.full((B, S), -1, dtype=torch.long)
        if o.measure:
            self.full_k = k_all[:, :, :0].to(self.device)
            self.all_valid = torch.zeros((B, 0), dtype=torch.bool)
        self._ingest(k_all, v_all, valid)

    def _ingest(self, k_new, v_new, valid):
        """Add T tokens at positions length..length+T-1 (k_new, v_new [B, H, T, D]; valid [B, T] bool or
        None = all real): left padding is recorded, the window advances to its page-aligned start for
        the new length, and the tokens that leave it fill the sink (the first S real tokens of each
        row) and then go to the page index."""
        o = self.owner
        B, H, T, D = k_new.shape
        ps, S = o.page_size, self.S
        n0, n1 = self.length, self.length + T
        if valid is not None:
            valid = valid[:, -T:]
            for b in range(B):
                n_pad = int((~valid[b]).sum())
                if n_pad and (bool(valid[b, :n_pad].any()) or not bool(valid[b, n_pad:].all())
                              or self.pads[b] < n0):
                    raise ValueError("IceCache supports left padding only (padding must precede every real token)")
                self.pads[b] += n_pad
        pads = self.pads
        ws0 = self.ws
        ws1 = max(ws0, max((n1 - 1) // ps - (o.window_pages - 1), 0) * ps)  # new window start (page aligned)
        # the tokens from the old window start on: [B, H, n1 - ws0, D], positions ws0..n1-1
        w0 = n0 - ws0
        seg_k = torch.cat([self.dense_k[:, :, S:S + w0], k_new.to(self.device)], dim=2)
        seg_v = torch.cat([self.dense_v[:, :, S:S + w0], v_new.to(self.device)], dim=2)
        starts = []  # per row: first position that goes to the index
        for b in range(B):
            lo = max(pads[b], ws0)
            have = int((self.sink_pos[b] >= 0).sum())
            take = max(min(S - have, ws1 - lo), 0)
            if take:
                self.dense_k[b, :, have:have + take] = seg_k[b, :, lo - ws0:lo - ws0 + take]
                self.dense_v[b, :, have:have + take] = seg_v[b, :, lo - ws0:lo - ws0 + take]
                self.dense_mask[b, have:have + take] = 1
                self.sink_pos[b, have:have + take] = torch.arange(lo, lo + take)
            starts.append(lo + take)
        if o._uses_index():
            self._index_tokens(seg_k, seg_v, ws0, starts, ws1)
        w1 = n1 - ws1
        self.dense_k[:, :, S:S + w1] = seg_k[:, :, ws1 - ws0:]
        self.dense_v[:, :, S:S + w1] = seg_v[:, :, ws1 - ws0:]
        self.dense_mask[:, S:] = 0
        for b in range(B):
            self.dense_mask[b, S + max(pads[b] - ws1, 0):S + w1] = 1  # padding inside the window stays masked
        if o.measure:
            self.full_k = torch.cat([self.full_k, k_new.to(self.device)], dim=2)
            real = torch.ones((B, T), dtype=torch.bool)
            for b in range(B):
                real[b, :max(pads[b] - n0, 0)] = False
            self.all_valid = torch.cat([self.all_valid, real], dim=1)
        self.length, self.ws = n1, ws1

    def _index_tokens(self, seg_k, seg_v, p0, starts, end):
        """Put positions [starts[b], end) of each row into the page index (seg_k / seg_v hold positions
        p0.. on the device), creating or growing it first."""
        o = self.owner
        B = self.B
        n = max([end - s for s in starts] + [0])
        groups = -(-n // o.coarse_tokens) if (o.coarse_tokens and o.method == "icecache") else 1
        self._reserve(-(-n // o.page_size) + groups + 1)
        first = self._min_pages()
        if n > 0:
            if self.leader is not None:
                self._build_from_leader(seg_k, seg_v, p0)
            elif len(set(starts)) == 1:
                self._build_rows(seg_k, seg_v, slice(None), starts[0], end, -1, p0)
            else:
                for b in range(B):
                    if starts[b] < end:
                        self._build_rows(seg_k, seg_v, slice(b, b + 1), starts[b], end, b, p0)
        if o._select_on_device(self.device) and self.leader is None:  # a follower never selects
            self._sync_bounds(first)
        if o.summaries:
            self._sync_summaries(first)

    # ---- the page index: created and grown with what it holds --------------------------------------
    def _reserve(self, extra: int):
        """Make room for `extra` more pages in every stream: create the index, or replace it by a
        larger one (capacity at least doubled, capped by max_context) holding the same pages."""
        have = self.index.num_pages() if self.index is not None else 0
        need = have + extra
        if self.index is not None and need <= self.max_pages:
            return
        o = self.owner
        cap = o._max_pages_cap()
        if cap is not None and need > cap:
            raise ValueError(f"IceCache layer {self.layer_idx}: page pool full: {need} pages per KV head needed, "
                             f"max_context = {o.max_context} tokens allows {cap} (raise max_context, or leave it "
                             f"None to grow with the sequence)")
        grow = max(need, 2 * self.max_pages, 16)
        self._grow(grow if cap is None else min(grow, cap))

    def _fit(self, k: int):
        """A follower handed its leader's k pages: hold at least the leader's capacity (the leader may
        have grown this step before the follower's own update)."""
        if k > self.slots and self.leader is not None:
            self._grow(max(self.leader.max_pages, self.max_pages))

    def _grow(self, max_pages: int):
        o = self.owner
        old = self.index
        self.max_pages = max_pages
        self.slots = min(o.cache_pages, max_pages)
        self.index = o._new_index(self.B, self.H, self.D, self.dtype, max_pages, self.slots)
        self.k_store = torch.zeros((self.B * self.H * self.slots, o.page_size, self.D), dtype=self.dtype,
                                   device=self.device)
        self.v_store = torch.zeros_like(self.k_store)
        if old is not None:
            s = old.stats()
            for key in self._stats_base:
                self._stats_base[key] += s[key]
            self._copy_pages(old, self.index)

    def _copy_pages(self, src, dst):
        """Every page of `src`, in order, into the empty index `dst` (same page numbers, so selections,
        leader layouts and device mirrors stay valid)."""
        ps, D, S = self.owner.page_size, self.D, self.B * self.H
        counts = [src.num_pages(s) for s in range(S)]
        P = max(counts)
        if P == 0:
            return
        pages = torch.full((S, P), -1, dtype=torch.int32)
        for s, c in enumerate(counts):
            pages[s, :c] = torch.arange(c, dtype=torch.int32)
        pos = torch.empty((S, P, ps), dtype=torch.long)
        src.page_positions(pages.view(self.B, self.H, P).contiguous(), P, pos)
        keys = torch.zeros((S, P * ps, D))
        values = torch.zeros_like(keys)
        rows = torch.zeros((S, P * ps), dtype=torch.long)
        bounds = torch.zeros((S, P + 1), dtype=torch.long)
        kbuf, vbuf = torch.empty((ps, D)), torch.empty((ps, D))
        for s, c in enumerate(counts):
            n = 0
            for p in range(c):
                m = src.read_page(s, p, kbuf, vbuf)
                keys[s, n:n + m], values[s, n:n + m] = kbuf[:m], vbuf[:m]
                rows[s, n:n + m] = pos[s, p, :m]
                n += m
                bounds[s, p + 1] = n
            bounds[s, c + 1:] = n
        dt = self.dtype
        dst.build_paged(keys.view(self.B, self.H, P * ps, D).to(dt).contiguous(),
                        values.view(self.B, self.H, P * ps, D).to(dt).contiguous(), rows, bounds)

    def _build_rows(self, k_seg, v_seg, rows, start, end, batch_row, p0):
        """Index positions [start, end) of the given batch rows (k_seg holds positions p0..): two-level
        (coarse k-means on the device, then the hierarchical tree per coarse cluster on the host) when
        long enough, else the tree."""
        o = self.owner
        km, vm = k_seg[rows, :, start - p0:end - p0], v_seg[rows, :, start - p0:end - p0]
        Bn, H, N, D = km.shape
        groups = -(-N // o.coarse_tokens) if (o.coarse_tokens and o.method == "icecache") else 1
        if groups <= 1:
            self.index.build(km.to("cpu").contiguous(), vm.to("cpu").contiguous(),
                             torch.arange(start, end, dtype=torch.long), batch_row)
            return
        order, bounds = coarse_groups(km.reshape(Bn * H, N, D), groups)
        idx = order.view(Bn, H, N, 1).expand(Bn, H, N, D)
        kp = torch.gather(km, 2, idx).to("cpu").contiguous()
        vp = torch.gather(vm, 2, idx).to("cpu").contiguous()
        pos = (order + start).to("cpu").contiguous()
        self.index.build_grouped(kp, vp, pos, bounds.to("cpu").contiguous(), batch_row)

    def _leader_positions(self, tail: Optional[int] = None, first: Optional[list] = None):
        """Positions of the leader's pages, per stream: all of them, with ``tail`` the last that many
        (a stream with fewer gets -1 rows), or with ``first`` (per stream) those from that page on.
        [B, H, pages, page_size] int64, -1 padding."""
        L, ps = self.leader.index, self.owner.page_size
        B, H = self.B, self.H
        counts = [L.num_pages(s) for s in range(B * H)]
        if tail is not None:
            k = tail
        elif first is not None:
            k = max(c - f for c, f in zip(counts, first))
        else:
            k = max(counts)
        pages = torch.full((B * H, k), -1, dtype=torch.int32)
        for s, c in enumerate(counts):
            if tail is not None:
                if c >= tail:
                    pages[s] = torch.arange(c - tail, c, dtype=torch.int32)
            else:
                f = first[s] if first is not None else 0
                pages[s, :c - f] = torch.arange(f, c, dtype=torch.int32)
        pos = torch.empty((B * H, k, ps), dtype=torch.long)
        if k:
            L.page_positions(pages.contiguous(), k, pos)
        return pos.view(B, H, k, ps)

    def _build_from_leader(self, k_seg, v_seg, p0):
        """A follower's new pages: this layer's K/V in exactly the leader's pages that it does not hold
        yet (page p of a stream holds the tokens of the leader's page p), so the leader's selection
        applies here. k_seg / v_seg [B, H, n, D] hold positions p0.. (every new page's tokens)."""
        B, H, N, D = k_seg.shape
        mine = [self.index.num_pages(s) for s in range(B * H)]
        pos = self._leader_positions(first=mine)  # [B, H, P, ps]
        P = pos.shape[2]
        if P == 0:
            return
        valid = pos >= 0
        lens = valid.sum(-1).view(B * H, P)
        bounds = torch.cat([torch.zeros((B * H, 1), dtype=torch.long), lens.cumsum(1)], dim=1)
        flat, fvalid = pos.view(B * H, -1), valid.view(B * H, -1)
        n_max = int(lens.sum(1).max())
        # the valid positions of each stream in page order, then padding (ignored by the bounds)
        order = torch.argsort((~fvalid).to(torch.int8), dim=1, stable=True)[:, :n_max]
        positions = torch.gather(flat, 1, order)
        rows = (positions - p0).clamp(min=0)  # [S, n_max] rows of the segment
        idx = rows.to(k_seg.device)[..., None].expand(B * H, n_max, D)
        kp = torch.gather(k_seg.reshape(B * H, N, D), 1, idx).view(B, H, n_max, D)
        vp = torch.gather(v_seg.reshape(B * H, N, D), 1, idx).view(B, H, n_max, D)
        self.index.build_paged(kp.to("cpu").contiguous(), vp.to("cpu").contiguous(),
                               positions.clamp(min=0).contiguous(), bounds.contiguous())

    # ---- chunked prefill: T > 1 tokens after the first call ------------------------------------------
    def chunk_attention(self, module, query, scaling, attention_mask):
        """Exact attention of a chunk's T queries (query [B, Hq, T, D]) over every token before it (sink
        + window resident, the index's pages recalled through the device page cache a block of `slots`
        pages at a time) and causally over the chunk itself; then the chunk's tokens join the cache.
        Returns [B, T, Hq, D] like sdpa_attention_forward."""
        o = self.owner
        o._check_module(module)
        k_new, v_new = self._chunk
        B, Hq, T, D = query.shape
        H, G, dev = self.H, Hq // self.H, self.device
        q = query.to(dev).float().reshape(B, H, G * T, D)  # rows (g, t) of each KV head's group
        sm = _Softmax(q, float(scaling if scaling is not None else 1.0 / math.sqrt(D)))
        dense_ok = self.dense_mask.bool()  # [B, S + Wcap]
        sm.add(self.dense_k, self.dense_v, dense_ok[:, None, None, :], dense_ok[:, None, :])
        if self.index is not None and self.index.num_pages() > 0:
            ps, P, C = o.page_size, self.index.num_pages(), self.slots
            counts = torch.tensor([self.index.num_pages(s) for s in range(B * H)]).view(B, H, 1)
            stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
            for j in range(0, P, C):
                k = min(C, P - j)
                pages = torch.arange(j, j + k, dtype=torch.int32).expand(B, H, k)
                pages = torch.where(pages < counts, pages, torch.full_like(pages, -1)).contiguous()
                slots, lens = torch.empty_like(pages), torch.empty_like(pages)
                self.index.recall(pages, k, self.k_store, self.v_store, slots, lens, stream)
                rows = slots.clamp(min=0).long().to(dev).view(-1)
                kk = self.k_store[rows].view(B, H, k * ps, D)
                vv = self.v_store[rows].view(B, H, k * ps, D)
                ok = (torch.arange(ps).view(1, 1, 1, ps) < lens[..., None]).view(B, H, k * ps).to(dev)
                sm.add(kk, vv, ok[:, :, None, :], ok)
        if attention_mask is not None and attention_mask.dim() == 4:
            m = attention_mask[:, 0, -T:, -T:]
            causal = (m if m.dtype == torch.bool else m == 0).to(dev)  # [B, T, T]
        else:
            causal = torch.ones((T, T), dtype=torch.bool, device=dev).tril().expand(B, T, T)
        real = causal.any(dim=1)  # [B, T]: tokens some query attends (not padding)
        mask = causal[:, None, None].expand(B, 1, G, T, T).reshape(B, 1, G * T, T)
        sm.add(k_new, v_new, mask, real[:, None, :])
        out = sm.result().view(B, Hq, T, D).to(query.dtype).to(query.device)
        self._chunk = None
        self._ingest(k_new, v_new, self._valid_columns(attention_mask, T))
        return out.transpose(1, 2).contiguous()

    # ---- decode ------------------------------------------------------------------------------------
    def _append(self, k, v):
        o = self.owner
        ps, S = o.page_size, self.S
        if self.length + 1 - self.ws > self.Wcap:
            # The window is full: its oldest page goes to the host index, the rest shifts left.
            if self.index is not None:
                self._reserve(1)
                # Left padding still inside the evicted page stays out of the index.
                skip = torch.tensor([max(p - self.ws, 0) for p in self.pads], dtype=torch.long)
                first = self._min_pages()
                self.index.append_page(self.dense_k[:, :, S:S + ps].to("cpu").contiguous(),
                                       self.dense_v[:, :, S:S + ps].to("cpu").contiguous(), self.ws,
                                       skip if bool(skip.any()) else None)
                if o._select_on_device(self.device) and self.leader is None:
                    self._sync_bounds(first)
                if o.summaries:
                    self._sync_summaries(first)
            w = self.length - self.ws
            self.dense_k[:, :, S:S + w - ps] = self.dense_k[:, :, S + ps:S + w].clone()
            self.dense_v[:, :, S:S + w - ps] = self.dense_v[:, :, S + ps:S + w].clone()
            self.dense_mask[:, S + w - ps:] = 0
            self.ws += ps
            self.evicted += 1
            if self.index is not None and o.recluster_pages > 1 and o.method == "icecache" \
                    and self.evicted % o.recluster_pages == 0:
                if self.leader is not None:  # the leader re-clustered its tail this step: copy its layout
                    n = o.recluster_pages
                    self.index.relayout_tail(n, self._leader_positions(tail=n).contiguous())
                else:
                    self.index.recluster_tail(o.recluster_pages)  # cluster the evicted pages together
                if self.dev_bounds is not None:
                    self._sync_bounds(max(self._min_pages() - o.recluster_pages, 0))
                if self.dev_summaries is not None:
                    self._sync_summaries(max(self._min_pages() - o.recluster_pages, 0))
        w = self.length - self.ws
        self.dense_k[:, :, S + w] = k[:, :, 0]
        self.dense_v[:, :, S + w] = v[:, :, 0]
        self.dense_mask[:, S + w] = 1
        self.length += 1
        if o.measure:
            self.full_k = torch.cat([self.full_k, k], dim=-2)
            self.all_valid = torch.cat([self.all_valid, torch.ones((self.B, 1), dtype=torch.bool)], dim=1)

    def _min_pages(self):
        if self.index is None:
            return 0
        return min(self.index.num_pages(s) for s in range(self.B * self.H))

    def _sync_bounds(self, first):
        """Mirror the page bounds from `first` on to the device (grown by doubling). With
        ``select_on_device`` left to its default, only while the layer holds at most ``summary_rows``
        pages (then the mirror is dropped and the host selects): the device memory stays fixed."""
        o = self.owner
        P = self.index.num_pages()
        if o.select_on_device is None and P > o.summary_rows:
            self.dev_bounds = None
            return
        S, D = self.B * self.H, self.D
        n = P - first
        if n <= 0:
            return
        if self.dev_bounds is None or self.dev_bounds[0].shape[1] < P:
            cap = max(P, 2 * (self.dev_bounds[0].shape[1] if self.dev_bounds is not None else 0), 16)
            lo = torch.zeros((S, cap, D), dtype=torch.float32, device=self.device)
            hi = torch.zeros_like(lo)
            lens = torch.zeros((S, cap), dtype=torch.int32, device=self.device)
            if self.dev_bounds is not None:
                old = self.dev_bounds[0].shape[1]
                lo[:, :old], hi[:, :old], lens[:, :old] = self.dev_bounds
            self.dev_bounds = (lo, hi, lens)
        lo_h = torch.empty((S, n, D), dtype=torch.float32)
        hi_h = torch.empty_like(lo_h)
        lens_h = torch.empty((S, n), dtype=torch.int32)
        self.index.export_bounds(first, n, lo_h, hi_h, lens_h)
        lo, hi, lens = self.dev_bounds
        lo[:, first:P] = lo_h.to(self.device)
        hi[:, first:P] = hi_h.to(self.device)
        lens[:, first:P] = lens_h.to(self.device)
        del o

    def _sync_summaries(self, first):
        """Bring the summary rows (``SummaryRows``, created at the first page) in step with pages `first..`."""
        if self.dev_summaries is None:
            o = self.owner
            self.dev_summaries = SummaryRows(self.B, self.H, self.D, o.summary_rows, min(o.selected_pages, self.slots),
                                             self.dtype, self.device, mass=o.summary_mass)
        self.dev_summaries.sync(self.index, first)

    def select_on_device(self, q, k):
        """Bound scores on the device as two matmuls: sum_d max(q lo, q hi) = q+ . hi + q- . lo; the GQA
        heads of a group merged by max of (score - that head's best); top-k pages per stream
        (int32 [B, H, k] on the host, -1 padding)."""
        B, H, D = self.B, self.H, self.D
        G = q.shape[1] // H
        P = self.index.num_pages()
        lo, hi, lens = (t[:, :P] for t in self.dev_bounds)
        qg = q.float().view(B, H, G, D)
        s = torch.matmul(qg.clamp(min=0), hi.view(B, H, P, D).transpose(-1, -2)) + \
            torch.matmul(qg.clamp(max=0), lo.view(B, H, P, D).transpose(-1, -2))  # [B, H, G, P]
        valid = (lens.view(B, H, 1, P) > 0)
        s = s.masked_fill(~valid, float("-inf"))
        s = s - s.amax(dim=-1, keepdim=True)
        merged = s.amax(dim=2).masked_fill(~valid[:, :, 0], float("-inf"))  # [B, H, P]
        take = min(k, P)
        val, idx = merged.topk(take, dim=-1)
        idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1)).to(torch.int32).cpu()
        if take < k:
            idx = torch.cat([idx, torch.full((B, H, k - take), -1, dtype=torch.int32)], dim=-1)
        return idx.contiguous()

    def decode_attention(self, module, query, scaling):
        o = self.owner
        o._check_module(module)
        B, Hq, q_len, D = query.shape
        H = self.H
        k_sel = min(o.selected_pages, self.slots)  # all pages when the budget exceeds what the index holds
        dev = self.device
        q = query[:, :, -1, :].to(dev).contiguous()
        k_dense, v_dense, mask = self.dense_k, self.dense_v, self.dense_mask
        pages = q_host = None  # q_host: the query on the host, float32 [B, Hq, D] (copied once per step)
        if self.index is not None and k_sel > 0 and self.index.num_pages() > 0:
            if self.leader is not None:
                pages = self.leader.shared_pages  # reuse_selection: the leader's pages, this step
            else:
                k_cand = k_sel * max(o.rerank, 1)
                q_host = q.float().cpu().contiguous() if (o.rerank or self.dev_bounds is None) else None
                if self.dev_bounds is not None:
                    pages = self.select_on_device(q, k_cand)
                else:
                    pages = torch.empty((B, H, k_cand), dtype=torch.int32)
                    self.index.select(q_host, k_cand, pages)
                if o.rerank:
                    cand, pages = pages, torch.empty((B, H, k_sel), dtype=torch.int32)
                    self.index.rerank(q_host, cand, k_sel, pages)
            self.shared_pages = pages if self.followers else None
            self._fit(pages.shape[-1])
            slots = torch.empty_like(pages)
            lens = torch.empty_like(pages)
            stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
            # (waits for this layer's pages, prefetched ones included)
            self.index.recall(pages, pages.shape[-1], self.k_store, self.v_store, slots, lens, stream)
            if self.followers and o.prefetch:
                for f in self.followers:
                    f.prefetch(pages, stream)
            table, tlens = slots.to(dev), lens.to(dev)
            k_store, v_store = self.k_store, self.v_store
        else:
            table = tlens = None
            k_store = v_store = k_dense.new_zeros((1, o.page_size, D))
        out = torch.empty_like(q)
        stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
        summaries = {}
        scale = float(scaling if scaling is not None else 1.0 / math.sqrt(D))
        if self.dev_summaries is not None and self.index.num_pages() > 0:
            log_mass = None
            if o.summary_mass == "exact":  # every page's exact mass this step, on the host
                if q_host is None:
                    q_host = q.float().cpu().contiguous()
                log_mass = torch.empty((B, Hq, self.index.num_pages()), dtype=torch.float32)
                self.index.page_log_mass(q_host, scale, log_mass)
            summaries = self.dev_summaries.step(pages, log_mass)
        _C.paged_decode_attention(q, k_store, v_store, table, tlens, k_dense, v_dense, mask, H, scale, out, stream,
                                  **summaries)
        self.stats["steps"] += 1
        if o.measure:
            self._measure(q, pages, mask, scaling)
        return out.to(query.device).unsqueeze(1)  # [B, 1, Hq, D] like sdpa_attention_forward

    def prefetch(self, pages, stream):
        """Start copying a follower's pages for this step (the leader's selection) while the layers
        before it run: recall without wait on the copy stream; the recall in this layer's own
        attention then waits for it (and copies pages appended or re-laid out since)."""
        if self.index is None or self.index.num_pages() == 0:
            return
        self._fit(pages.shape[-1])
        counts = torch.tensor([self.index.num_pages(s) for s in range(self.B * self.H)], dtype=torch.int32)
        # pages the leader has and this layer does not yet (its window page is appended in its update)
        p = torch.where(pages < counts.view(self.B, self.H, 1), pages, torch.full_like(pages, -1)).contiguous()
        slots, lens = torch.empty_like(p), torch.empty_like(p)
        self.index.recall(p, p.shape[2], self.k_store, self.v_store, slots, lens, stream, wait=False)

    def _measure(self, q, pages, mask, scaling):
        """Fraction of the true attention mass (over every cached token) that the attended set holds."""
        o = self.owner
        B, Hq, D = q.shape
        H, G = self.H, Hq // self.H
        k = self.full_k.float()  # [B, H, L, D]
        L = k.shape[2]
        s = torch.einsum("bhgd,bhld->bhgl", q.float().view(B, H, G, D), k) * float(scaling or 1 / math.sqrt(D))
        s = s.masked_fill(~self.all_valid.to(s.device)[:, None, None, :L], float("-inf"))
        p = torch.softmax(s, dim=-1).cpu()
        attended = torch.zeros((B, H, L), dtype=torch.bool)
        for b in range(B):
            sp = self.sink_pos[b][self.sink_pos[b] >= 0]
            attended[b, :, sp] = True
        attended[:, :, self.ws:self.length] = True
        if pages is not None:
            pos = torch.empty((B, H, pages.shape[2], o.page_size), dtype=torch.long)
            self.index.page_positions(pages, pages.shape[2], pos)
            pos = pos.view(B, H, -1)
            for b in range(B):
                for h in range(H):
                    pp = pos[b, h][pos[b, h] >= 0]
                    attended[b, h, pp] = True
        mass = (p * attended[:, :, None, :].float()).sum(-1)  # [B, H, G]
        self.stats["mass"].append(float(mass.mean()))

    def index_stats(self) -> dict:
        """Page-cache hits / misses / bytes copied of this layer (over every index it has had), host pool bytes."""
        out = dict(self._stats_base, pool_bytes=0)
        if self.index is not None:
            s = self.index.stats()
            for key in self._stats_base:
                out[key] += s[key]
            out["pool_bytes"] = s["pool_bytes"]
        return out

    def device_bytes(self) -> int:
        """Bytes this layer holds on the device (resident tokens + page store + mirrors)."""
        n = 0
        for t in ("dense_k", "dense_v", "k_store", "v_store", "dense_mask"):
            x = getattr(self, t, None)
            if x is not None:
                n += x.numel() * x.element_size()
        for x in getattr(self, "dev_bounds", None) or ():
            n += x.numel() * x.element_size()
        if self.dev_summaries is not None:
            n += self.dev_summaries.nbytes()
        return n
