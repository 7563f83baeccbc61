"""Building packets: a document prefilled alone inside its adapters from position 0 (optionally
pruned), and where the packets of a prompt are placed."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .adapter import Adapters
from .model_io import _device, _embed, _forward, _out_cache
from .store import _layers_of


# ----------------------------------------------------------------------------- packets

def packet_positions(prefix_len: int, doc_lens: Sequence[int], n_header: int = 0) -> Tuple[List[int], int]:
    """(start position of each packet, position of the first question token).

    Every document token keeps the position it has in the plain prompt, shifted by ``n_header``:
    packet i (``[header, doc_i, trailer]``) starts ``n_header`` positions before its document, so
    its header overlaps the previous packet's trailer positions (RoPE attention only sees relative
    positions; repeated positions are harmless). The context then spans ``n_header`` more positions
    than the plain prompt, not ``(n_header + n_trailer)`` per document: with 17 documents of a
    2,048-token prompt back-to-back packets would push the question 272 positions further, past
    where the model was trained."""
    for name, v in (("prefix_len", prefix_len), ("n_header", n_header), *(("doc_lens[]", d) for d in doc_lens)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"packet_positions: {name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"packet_positions: {name} must be >= 0, got {v}")
    starts, pos = [], prefix_len + n_header
    for n in doc_lens:
        starts.append(pos - n_header)
        pos += n
    return starts, pos


@torch.no_grad()
def _wrapped_prefill(model, doc_ids: Sequence[int], adapters: Optional[Adapters], hidden_states: bool = False):
    """Prefill ``[header, doc, trailer]`` alone from position 0. Returns (per-layer (K, V), each
    ``[1, kv_heads, tokens, head_dim]``; with ``hidden_states`` every layer's input ``[1, tokens, hidden]``,
    else None; positions ``[1, tokens]``)."""
    dev = _device(model)
    ids = torch.tensor([list(doc_ids)], dtype=torch.long, device=dev)
    x = _embed(model, ids)
    if adapters is not None:
        x = adapters.wrap(x)
    return _prefill_embeds(model, x, hidden_states)


@torch.no_grad()
def _prefill_embeds(model, x: torch.Tensor, hidden_states: bool = False):
    """Prefill input embeddings ``x`` [1, tokens, hidden] alone from position 0; returns as
    :func:`_wrapped_prefill`."""
    pos = torch.arange(x.shape[1], device=x.device)[None]
    out = _forward(model, inputs_embeds=x, position_ids=pos, use_cache=True, cache=_new_cache(model),
                   output_hidden_states=hidden_states)
    return _layers_of(_out_cache(out)), out.hidden_states, pos


def build_packet_kv(model, doc_ids: Sequence[int], adapters: Optional[Adapters] = None):
    """Prefill ``[header, doc, trailer]`` alone from position 0; returns (K, V) per layer, each
    ``[1, kv_heads, tokens, head_dim]``."""
    return _wrapped_prefill(model, doc_ids, adapters)[0]


def build_pruned_packet_kv(model, doc_ids: Sequence[int], adapters: Optional[Adapters], pruning):
    """Like :func:`build_packet_kv`, then keep only every adapter token and the best-scored document
    tokens under ``pruning`` (a :class:`~scrimp.packets.prune.Pruning`). Returns ``(layers, kept)``:
    the kept tokens' (K, V) per layer, ``[1, kv_heads, len(kept), head_dim]``, and their indices into
    the wrapped packet, in order."""
    from .prune import Pruning, attention_scores, key_norm_scores

    if not isinstance(pruning, Pruning):
        raise TypeError(f"pruning must be a scrimp.packets.prune.Pruning, got {type(pruning).__name__}")
    layers, hidden, pos = _wrapped_prefill(model, doc_ids, adapters, hidden_states=pruning.score == "attention")
    nh = adapters.n_header if adapters is not None else 0
    nt = adapters.n_trailer if adapters is not None else 0
    start, end = nh, nh + len(doc_ids)
    if pruning.score == "key_norm":
        scores = key_norm_scores(layers, start, end)
    else:
        scores = attention_scores(model, hidden, layers, pos, start, end, pruning.window, nt)
    kept = pruning.kept(scores, nh, nt)
    idx = torch.tensor(kept, dtype=torch.long, device=pos.device)
    return [(k.index_select(2, idx), v.index_select(2, idx)) for k, v in layers], kept


def drop_header(layers, kept: Optional[List[int]], n_header: int, n_tokens: int):
    """Remove the header rows from a built packet. ``layers``: (K, V) per layer, ``[1, kv_heads, T, head_dim]``
    holding the wrapped tokens ``kept`` (None = all ``n_tokens``). Returns ``(layers, kept)`` with only the
    document and trailer tokens, ``kept`` their indices into the wrapped packet."""
    for name, v in (("n_header", n_header), ("n_tokens", n_tokens)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"drop_header: {name} must be an int, got {type(v).__name__}")
    if not 0 <= n_header <= n_tokens:
        raise ValueError(f"drop_header: expected 0 <= n_header <= n_tokens, got {n_header} and {n_tokens}")
    kept = list(range(n_tokens)) if kept is None else [int(i) for i in kept]
    if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not 0 <= kept[0] <= kept[-1] < n_tokens):
        raise ValueError(f"drop_header: kept must be strictly increasing indices in [0, {n_tokens})")
    if not layers or any(k.shape[2] != len(kept) or v.shape[2] != len(kept) for k, v in layers):
        raise ValueError(f"drop_header: expected (K, V) per layer holding {len(kept)} tokens (dim 2), got "
                         f"{[tuple(k.shape) for k, _ in layers]}")
    rows = [j for j, i in enumerate(kept) if i >= n_header]
    if len(rows) == len(kept):
        return layers, kept
    idx = torch.tensor(rows, dtype=torch.long, device=layers[0][0].device)
    return [(k.index_select(2, idx), v.index_select(2, idx)) for k, v in layers], [kept[j] for j in rows]


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
