"""The memory-lean TIP loss for one batch of rollouts.

1. the student body runs with gradient (hidden states [B, L, H]); the teacher body without;
2. every response position is scored *without* gradient, ``chunk_tokens`` positions at a time
   (hidden states -> lm_head chunk -> fused :func:`scrimp.token_scores`), so at most a
   ``[chunk_tokens, V]`` logits block exists;
3. :func:`scrimp.tip.select` picks the kept positions;
4. the student's lm_head runs *with* gradient only on the kept hidden states (gathered before the
   lm_head), the teacher's only there too, and :func:`scrimp.kl_loss` (fused, gradient in the logits'
   dtype) gives the mean reverse KL over the kept tokens.

A plain step (:func:`plain_loss`) materialises student logits with gradient for every position and a
float32 log-softmax over all response tokens: the anchor the lean step is measured against.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..distill_loss import kl_loss
from ..scoring import token_scores
from .select import SelectStats, TipScores, normalize_entropy, select


class TipLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean loss over the kept tokens
    kept: torch.Tensor  # bool [B, L]: kept *response tokens* (positions in input_ids)
    stats: SelectStats
    scores: TipScores  # per response token, [B, L] (0 outside the response)


def lm_head_of(model) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final (post-norm) hidden states ``[B, L, H]`` of a Hugging Face causal LM, without its lm_head."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        base = model.get_decoder()
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def prediction_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """Token j is predicted by the logits at position j - 1: shift the response mask left by one."""
    pred = torch.zeros_like(response_mask)
    pred[:, :-1] = response_mask[:, 1:]
    return pred


def _check_vocab(student_head, teacher_head):
    vs, vt = student_head.weight.shape[0], teacher_head.weight.shape[0]
    if vs != vt:
        raise ValueError(f"teacher/student vocabulary mismatch: student lm_head has {vs} rows, teacher {vt}; "
                         "TIP needs a shared vocabulary")


@torch.no_grad()
def score_positions(hs: torch.Tensor, ht: torch.Tensor, student_head, teacher_head, positions: torch.Tensor,
                    temperature: float = 1.0, chunk_tokens: int = 1024, vocab_size: Optional[int] = None):
    """Fused scores of the flat ``positions`` (indices into ``[B*L]``), ``chunk_tokens`` at a time.
    Returns (normalised entropy, kl_reverse, kl_forward), float32 ``[len(positions)]``."""
    H_s, H_t = hs.shape[-1], ht.shape[-1]
    hs2, ht2 = hs.detach().reshape(-1, H_s), ht.reshape(-1, H_t)
    n = positions.numel()
    ent = torch.empty(n, dtype=torch.float32, device=hs.device)
    kr, kf = torch.empty_like(ent), torch.empty_like(ent)
    V = vocab_size or student_head.weight.shape[0]
    for c0 in range(0, n, chunk_tokens):
        idx = positions[c0:c0 + chunk_tokens]
        ls = student_head(hs2[idx])
        lt = teacher_head(ht2[idx]).to(ls.dtype)
        sc = token_scores(ls, lt, temperature=temperature)
        ent[c0:c0 + idx.numel()] = normalize_entropy(sc.student_entropy, V)
        kr[c0:c0 + idx.numel()] = sc.kl_reverse
        kf[c0:c0 + idx.numel()] = sc.kl_forward
        del ls, lt
    return ent, kr, kf


def tip_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
             *, rule: str = "soft_or", ratio: float = 0.5, generator: Optional[torch.Generator] = None,
             kind: str = "reverse", beta: float = 0.5, temperature: float = 1.0, chunk_tokens: int = 1024,
             student_hidden: Optional[torch.Tensor] = None) -> TipLossOutput:
    """Memory-lean TIP loss for rollouts ``input_ids`` ``[B, L]`` (prompt + response, padded).

    ``response_mask`` marks the response tokens (those the student sampled); the loss is the mean
    ``kind`` divergence (reverse KL in the paper) over the kept ones. ``student_hidden`` may pass the
    student's hidden states when they were computed elsewhere (e.g. inside a DDP forward).
    """
    if response_mask.shape != input_ids.shape or response_mask.dtype != torch.bool:
        raise ValueError("response_mask: expected a bool tensor shaped like input_ids")
    head_s, head_t = lm_head_of(student), lm_head_of(teacher)
    _check_vocab(head_s, head_t)
    pred = prediction_positions(response_mask)
    if not bool(pred.any()):
        raise ValueError("tip_loss: the response mask is empty (no response tokens to distil)")
    hs = hidden_states(student, input_ids, attention_mask) if student_hidden is None else student_hidden
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask)
    B, L = input_ids.shape
    positions = torch.nonzero(pred.reshape(-1)).flatten()
    ent, kr, kf = score_positions(hs, ht, head_s, head_t, positions, temperature, chunk_tokens)

    def full(v):
        out = torch.zeros(B * L, dtype=torch.float32, device=input_ids.device)
        out[positions] = v
        return out.reshape(B, L)

    scores = TipScores(full(ent), full(kr), full(kf))
    kept_pred, stats = select(scores, pred, rule, ratio, generator)
    kept_pos = torch.nonzero(kept_pred.reshape(-1)).flatten()
    logits_s = head_s(hs.reshape(B * L, -1)[kept_pos])  # [k, V] with gradient: only the kept rows
    with torch.no_grad():
        logits_t = head_t(ht.reshape(B * L, -1)[kept_pos]).to(logits_s.dtype)
    loss = kl_loss(logits_s, logits_t, kind, beta=beta, temperature=temperature, reduction="mean")
    kept = torch.zeros_like(response_mask)
    kept[:, 1:] = kept_pred[:, :-1]
    # scores indexed by response token (shift back)
    shifted = TipScores(*[torch.nn.functional.pad(x[:, :-1], (1, 0)) for x in scores])
    return TipLossOutput(loss, kept, stats, shifted)


def plain_loss(student, teacher, input_ids, attention_mask, response_mask, temperature: float = 1.0,
               kept_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain torch step (the memory anchor of ``bench/anchors/gpu_e2e.py distill``): hidden states at
    the response positions (or at ``kept_mask``) -> lm_head -> float32 log-softmax for student and teacher ->
    mean of sum p (log p - log q). Every intermediate is a float32 ``[n, V]`` tensor kept for backward."""
    import torch.nn.functional as F

    pred = prediction_positions(response_mask if kept_mask is None else kept_mask)
    hs = hidden_states(student, input_ids, attention_mask)[pred]
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask)[pred]
        lt = F.log_softmax(lm_head_of(teacher)(ht).float() / temperature, -1)
    ls = F.log_softmax(lm_head_of(student)(hs).float() / temperature, -1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()
