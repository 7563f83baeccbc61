"""FLOP accounting of KV Packet and its baselines (prefill, re-rotation, per method)."""
from __future__ import annotations

from typing import Optional, Sequence




# ----------------------------------------------------------------------------- FLOPs

def flops_prefill(config, n_new: int, n_past: int = 0, layers: Optional[int] = None) -> float:
    """Analytic FLOPs (2 per multiply-add) to run ``n_new`` tokens through ``layers`` decoder layers
    attending to ``n_past`` cached tokens plus themselves (causally): Q/K/V/O projections, attention
    scores and weighted sum, gated MLP. Embedding lookups, norms and the LM head are not counted."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qd, kvd = c.num_attention_heads * hd, getattr(c, "num_key_value_heads", c.num_attention_heads) * hd
    L = c.num_hidden_layers if layers is None else layers
    proj = 2 * n_new * (c.hidden_size * (qd + 2 * kvd) + qd * c.hidden_size)
    mlp = 2 * n_new * 3 * c.hidden_size * c.intermediate_size
    ctx = n_new * n_past + n_new * (n_new + 1) / 2  # attended (query, key) pairs
    attn = 2 * 2 * ctx * qd
    return float(L * (proj + mlp + attn))


def flops_rerotation(config, seq: int) -> float:
    """Re-rotation FLOPs as the KV Packet paper counts them: (4 + 3 * kv_heads) * seq * rope_dim per layer."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    from .. import hf

    rope_dim = int(hd * float(hf.rope_parameters(c).get("partial_rotary_factor", 1.0) or 1.0))
    kvh = getattr(c, "num_key_value_heads", c.num_attention_heads)
    return float(c.num_hidden_layers * (4 + 3 * kvh) * seq * rope_dim)


def method_flops(config, method: str, doc_lens: Sequence[int], prefix_len: int = 1, ratio: float = 0.0,
                 first_k: int = 0, n_header: int = 0, n_trailer: int = 0, n_shared: int = 0) -> float:
    """FLOPs spent preparing the context cache (the question prefill and decoding are the same for
    every method and not counted). Methods: full, none (no recompute), kvpacket, cacheblend, epic.
    For kvpacket: ``n_header`` / ``n_trailer`` adapter tokens re-rotated with every packet, ``n_shared``
    more once per context (a shared header)."""
    n_docs = sum(doc_lens)
    if method == "full":
        return flops_prefill(config, prefix_len + n_docs)
    if method == "kvpacket":
        return flops_rerotation(config, n_docs + len(doc_lens) * (n_header + n_trailer) + n_shared)
    rot = flops_rerotation(config, n_docs)
    if method == "none":
        return rot
    S = prefix_len + n_docs
    if method == "cacheblend":
        r = int(round(ratio * n_docs))
        select = flops_prefill(config, S, layers=1) + 2 * S * config.hidden_size * 2 * (
            getattr(config, "num_key_value_heads", config.num_attention_heads)
            * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))
        return rot + select + flops_prefill(config, r, n_past=S - r)
    if method == "epic":
        r = sum(min(first_k, n) for n in doc_lens)
        return rot + flops_prefill(config, r, n_past=S - r)
    raise ValueError(f"unknown method {method!r}")
