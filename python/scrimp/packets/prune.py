"""Score-based pruning of KV packets: keep the most useful document tokens, always the adapters.

A packet of ``[header, doc, trailer]`` can be stored smaller by dropping document tokens whose K/V
matter least (the paper: KV Packet composes with kvpress-style presses, adapter tokens pinned). The
same tokens are dropped in every layer and head, so a pruned packet keeps the store's one-buffer
layout ``[layers][K, V][kv_heads][kept tokens][head_dim]``; each kept key stays rotated for its
original position (``PacketMeta.kept``), so assembly moves it by the same delta as an unpruned one
and the context keeps the positions of the plain prompt.

Scores (higher = kept), per document token, averaged over layers and KV heads:

* ``key_norm``: minus the L2 norm of the key (KnormPress: low-norm keys draw the most attention).
  Needs nothing beyond the packet's own KV.
* ``attention``: the attention the observation window pays to the token (SnapKV-style), averaged
  over layers and query heads. The window is the trailer (the adapter tokens, which see the whole
  document) or, without adapters, the last ``window`` document tokens. Recomputed from the
  build's own prefill (its hidden states and cached keys): no second forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["Pruning", "SCORES"]

SCORES = ("key_norm", "attention")


@dataclass(frozen=True)
class Pruning:
    """Keep ``ceil(keep * n)`` of a packet's ``n`` document tokens (at least 1), chosen by ``score``."""
    score: str = "key_norm"
    keep: float = 0.5
    window: int = 8

    def __post_init__(self):
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a share in (0, 1], got {self.keep!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")

    @property
    def rule(self) -> str:
        """The pruning rule as stored in the packet (part of its key)."""
        w = f":w{self.window}" if self.score == "attention" else ""
        return f"{self.score}:{self.keep:g}{w}"

    def n_keep(self, n_doc: int) -> int:
        return max(1, min(n_doc, math.ceil(self.keep * n_doc - 1e-9)))

    def kept(self, scores: torch.Tensor, n_header: int, n_trailer: int) -> List[int]:
        """Indices into the wrapped packet ``[header, doc, trailer]`` to keep: every adapter token and
        the ``n_keep`` best-scored document tokens, in order. ``scores``: ``[n_doc]``."""
        n_doc = scores.shape[0]
        k = self.n_keep(n_doc)
        # ties broken towards earlier tokens (stable, deterministic)
        order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
        doc = sorted(int(i) + n_header for i in order)
        return list(range(n_header)) + doc + list(range(n_header + n_doc, n_header + n_doc + n_trailer))


def key_norm_scores(layers: Sequence, start: int, end: int) -> torch.Tensor:
    """``-mean ||k||`` over layers and KV heads for tokens ``start:end`` of ``[1, H, T, D]`` keys."""
    norms = torch.stack([k[0, :, start:end].float().norm(dim=-1).mean(0) for k, _ in layers])
    return -norms.mean(0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def layer_queries(model, layer, x: torch.Tensor) -> torch.Tensor:
    """Queries ``[1, heads, W, head_dim]`` (before RoPE) of a decoder ``layer`` for its normed input
    ``x`` ``[1, W, hidden]``: ``q_proj`` (Llama, Qwen2, Qwen3, Mistral) or the query rows of a fused
    ``qkv_proj`` (Phi-3), then ``q_norm`` when the layer has one (Qwen3)."""
    attn = layer.self_attn
    c = model.config
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x)
    elif hasattr(attn, "qkv_proj"):
        q = attn.qkv_proj(x)[..., : n_heads * head_dim]
    else:
        raise ValueError(f"attention pruning does not know the attention type {type(attn).__name__} "
                         "(no q_proj or qkv_proj)")
    q = q.view(1, x.shape[1], n_heads, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    return q.transpose(1, 2)


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` RoPE on the first ``cos.shape[-1]`` dims of ``q`` ``[1, heads, W, D]`` (the rest,
    partial rotary's pass-through dims, unchanged); ``cos`` / ``sin`` ``[1, W, rotary_dim]``."""
    r = cos.shape[-1]
    rot, rest = q[..., :r], q[..., r:]
    rot = rot * cos[:, None] + _rotate_half(rot) * sin[:, None]
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


@torch.no_grad()
def attention_scores(model, hidden_states: Sequence[torch.Tensor], layers: Sequence, position_ids: torch.Tensor,
                     start: int, end: int, window: Optional[int], n_trailer: int) -> torch.Tensor:
    """Attention from the observation window to tokens ``start:end``, mean over layers and heads.

    The window is the last ``n_trailer`` tokens when there are adapters, else the last ``window``
    document tokens (which then score each other too, as in SnapKV).

    Computed from the prefill that built the packet, without a second forward and without switching
    the model to eager attention (a model-wide change that other threads would see):
    ``hidden_states`` are each layer's inputs ``[1, T, hidden]`` (``output_hidden_states``), ``layers``
    the cached (K, V) ``[1, kv_heads, T, head_dim]`` (keys already rotated). The window's queries are
    recomputed with the layer's own input norm, query projection (:func:`layer_queries`) and rotary
    embedding (partial rotary included)."""
    from .. import hf

    decoder = hf.decoder_layers(model)
    rotary = hf.rotary_embedding(model)
    if len(hidden_states) < len(decoder) or len(layers) != len(decoder):
        raise ValueError("attention pruning needs the hidden states and KV of every layer")
    total = hidden_states[0].shape[1]
    w0 = total - n_trailer if n_trailer > 0 else max(start, end - window)
    pos_w = position_ids[:, w0:]
    per_layer = []
    for layer, h, (k, _) in zip(decoder, hidden_states, layers):
        attn = layer.self_attn
        if not hasattr(layer, "input_layernorm"):
            raise ValueError(f"attention pruning does not know the layer type {type(layer).__name__}")
        x = layer.input_layernorm(h[:, w0:])
        q = layer_queries(model, layer, x)  # [1, heads, W, D]
        n_heads, head_dim = q.shape[1], k.shape[-1]
        cos, sin = rotary(x, pos_w)  # [1, W, rotary_dim] (RoPE scaling and attention factor included)
        q = apply_rope(q, cos, sin)
        kk = k.repeat_interleave(n_heads // k.shape[1], dim=1)  # GQA: [1, heads, T, D]
        logits = (q.float() @ kk.float().transpose(-1, -2)) * getattr(attn, "scaling", head_dim ** -0.5)
        causal = torch.arange(total, device=q.device)[None, :] > torch.arange(w0, total, device=q.device)[:, None]
        probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
        per_layer.append(probs[0, :, :, start:end].mean(dim=(0, 1)))
    return torch.stack(per_layer).mean(0)
