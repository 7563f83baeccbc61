"""The baselines KV Packet is measured against in the same harness: full recompute and CacheBlend-style
selective recompute of the tokens whose KV deviates most."""
from __future__ import annotations

import numbers
import time
from typing import List, Optional, Tuple

import torch

from .build import _new_cache
from .engine import PacketEngine, _greedy_from, _question_logits, stop_ids
from .model_io import _device, _embed, _forward, _out_cache, check_token_ids
from .prompt import Prompt
from .store import PacketStore, _layers_of


def _plain_ids(model, prompt) -> List[int]:
    """The plain prompt's ids, checked against the model's vocabulary."""
    if isinstance(prompt, Prompt):
        check_token_ids(model, prompt)
        return prompt.ids
    from .prompt import _ids

    ids = _ids("prompt", prompt)
    check_token_ids(model, ids)
    return ids


@torch.no_grad()
def full_first_token_logits(model, prompt) -> torch.Tensor:
    """Logits ``[vocab]`` after the plain prompt (a :class:`Prompt` or token ids) with full attention."""
    dev = _device(model)
    return model(input_ids=torch.tensor([_plain_ids(model, prompt)], device=dev), logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def full_answer(model, prompt, max_new_tokens: int = 64, tokenizer=None) -> Tuple[List[int], float]:
    """The full-recompute anchor: prefill the whole plain prompt, greedy decode. Returns (new ids,
    seconds to the first token)."""
    t0 = time.perf_counter()
    return _greedy_from(model, _new_cache(model), _plain_ids(model, prompt), 0, max_new_tokens,
                        stop_ids(model, tokenizer), t0)


# ----------------------------------------------------------------------------- selective recompute

@torch.no_grad()
def _recompute_positions(model, cache, seq_ids: List[int], sel: List[int], n: int):
    """Recompute the KV of the tokens at sequence positions ``sel`` through every layer, attending to
    the cached KV of all other tokens (CacheBlend's partial update), and write it into ``cache``."""
    if not sel:
        return cache
    dev = _device(model)
    sel_t = torch.tensor(sel, dtype=torch.long, device=dev)
    r = len(sel)
    x = _embed(model, torch.tensor([[seq_ids[i] for i in sel]], device=dev))
    allowed = torch.zeros(r, n + r, dtype=torch.bool, device=dev)
    past = torch.arange(n, device=dev)
    stale = torch.zeros(n, dtype=torch.bool, device=dev)
    stale[sel_t] = True
    allowed[:, :n] = (past[None, :] <= sel_t[:, None]) & ~stale[None, :]
    allowed[:, n:] = sel_t[None, :] <= sel_t[:, None]
    out = _forward(model, inputs_embeds=x, position_ids=sel_t[None], cache=cache, use_cache=True,
                   attention_mask=allowed[None, None], logits_to_keep=1)
    cache = _out_cache(out)
    pairs = []
    for layer in _layers_of(cache):
        k, v = layer
        k = k[:, :, :n].clone()
        v = v[:, :, :n].clone()
        k[:, :, sel_t] = layer[0][:, :, n:]
        v[:, :, sel_t] = layer[1][:, :, n:]
        pairs.append((k, v))
    from .rope import AssembledKV
    return AssembledKV([k for k, _ in pairs], [v for _, v in pairs], []).to_cache(model.config)


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_kv_full_attention(model, seq_ids: List[int], layer_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[1, kv_heads, n, head_dim]`` of decoder layer ``layer_index`` for ``seq_ids`` with full
    causal attention, running only layers ``0..layer_index`` (the model's own forward, stopped once
    that layer has written its cache): works for any architecture :mod:`scrimp.hf` knows."""
    from .. import hf

    layers = hf.decoder_layers(model)
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"layer_index must be in [0, {len(layers)}), got {layer_index}")
    dev = _device(model)
    cache = _new_cache(model)

    def stop(*_):
        raise _StopForward

    # stop once the layer's attention has run (at its MLP), else at the next layer or the final norm
    nxt = getattr(layers[layer_index], "mlp", None)
    if nxt is None:
        nxt = layers[layer_index + 1] if layer_index + 1 < len(layers) else getattr(hf.base_model(model), "norm", None)
    handle = nxt.register_forward_pre_hook(stop) if nxt is not None else None
    try:
        _forward(model, input_ids=torch.tensor([list(seq_ids)], device=dev),
                 position_ids=torch.arange(len(seq_ids), device=dev)[None], cache=cache, use_cache=True,
                 logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    k, v = _layers_of(cache)[layer_index]
    return k, v


@torch.no_grad()
def _kv_deviation(model, cache, seq_ids: List[int], layer_index: int = 1) -> torch.Tensor:
    """Per-token squared deviation ``[n]`` between the cached K/V of ``layer_index`` and the K/V
    computed with full attention (running layers ``<= layer_index`` over all tokens, as CacheBlend does)."""
    n = len(seq_ids)
    layer_index = min(layer_index, model.config.num_hidden_layers - 1)
    k, v = layer_kv_full_attention(model, seq_ids, layer_index)
    ck, cv = _layers_of(cache)[layer_index]
    return ((k.float() - ck[:, :, :n].float()) ** 2).sum(dim=(0, 1, 3)) + \
        ((v.float() - cv[:, :, :n].float()) ** 2).sum(dim=(0, 1, 3))


class SelectiveRecompute:
    """CacheBlend-style (``ratio``: recompute that fraction of document tokens with the largest KV
    deviation at layer 1) or EPIC-style (``first_k``: recompute the first k tokens of every document)
    on top of the no-recompute assembly (packets without adapters)."""

    def __init__(self, model, tokenizer=None, ratio: Optional[float] = None, first_k: Optional[int] = None,
                 store: Optional[PacketStore] = None):
        if (ratio is None) == (first_k is None):
            raise ValueError("give exactly one of ratio (CacheBlend) or first_k (EPIC)")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
                raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
            if not 0 <= ratio <= 1:  # NaN fails too
                raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if first_k is not None:
            if isinstance(first_k, bool) or not isinstance(first_k, int):
                raise TypeError(f"first_k must be an int, got {type(first_k).__name__}")
            if first_k < 0:
                raise ValueError(f"first_k must be >= 0, got {first_k}")
        self.engine = PacketEngine(model, tokenizer, None, store)
        self.ratio, self.first_k = ratio, first_k
        self.ttfts: List[float] = []
        self.recomputed: List[int] = []

    @torch.no_grad()
    def _prepared(self, prompt: Prompt, max_new_tokens: int = 0):
        eng = self.engine
        model = eng.model
        cache, n, question, kv, docs, prefix = eng.prepare(prompt, max_new_tokens)
        seq_ids = list(prefix) + [t for d in docs for t in d]
        if self.ratio is not None:
            dev = _kv_deviation(model, cache, seq_ids)
            dev[: len(prefix)] = -1  # the prefix was computed fresh
            r = int(round(self.ratio * (n - len(prefix))))
            sel = sorted(torch.topk(dev, r).indices.tolist()) if r > 0 else []
        else:
            sel, pos = [], len(prefix)
            for d in docs:
                sel.extend(range(pos, pos + min(self.first_k, len(d))))
                pos += len(d)
        cache = _recompute_positions(model, cache, seq_ids, sel, n)
        return cache, n, question, len(sel)

    @torch.no_grad()
    def first_token_logits(self, prompt: Prompt) -> torch.Tensor:
        cache, n, question, _ = self._prepared(prompt)
        return _question_logits(self.engine.model, cache, n, question)

    def answer(self, prompt: Prompt, max_new_tokens: int = 64) -> Tuple[List[int], float]:
        """(new ids, seconds to the first token) for a :class:`Prompt` (packets stored beforehand)."""
        self.engine.warm(prompt)
        t0 = time.perf_counter()
        cache, n, question, r = self._prepared(prompt, max_new_tokens)
        self.recomputed.append(r)
        new, ttft = _greedy_from(self.engine.model, cache, question, n, max_new_tokens,
                                 stop_ids(self.engine.model, self.engine.tokenizer), t0)
        self.ttfts.append(ttft)
        return new, ttft
