"""The memory-lean TIP loss for one batch of rollouts.

1. the student body runs with gradient (hidden states [B, L, H]); the teacher body without;
2. every response position is scored *without* gradient, ``chunk_tokens`` positions at a time
   (hidden states -> lm_head chunk -> fused :func:`scrimp.token_scores`), so at most a
   ``[chunk_tokens, V]`` logits block exists;
3. :func:`scrimp.tip.select` picks the kept positions;
4. the student's lm_head runs *with* gradient only on the kept hidden states (gathered before the
   lm_head), the teacher's only there too, and :func:`scrimp.kl_loss` (fused, gradient in the logits'
   dtype) gives the mean reverse KL over the kept tokens.

Both heads run over the shared tokenizer's vocabulary only (rows a head is padded with are never
computed) and apply the logit scaling / final soft-capping of their model's forward
(:class:`scrimp.tip.head.LogitHead`). :class:`LeanStudent` packages the student side of steps 1-4 as
one module for DDP / FSDP2.

A plain step (:func:`plain_loss`) materialises student logits with gradient for every position and a
float32 log-softmax over all response tokens: the anchor the lean step is measured against.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import hf
from ..distill_loss import kl_loss
from ..scoring import token_scores
from .head import LogitHead
from .select import SelectStats, TipScores, normalize_entropy, select


class TipLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean loss over the kept tokens
    kept: torch.Tensor  # bool [B, L]: kept *response tokens* (positions in input_ids)
    stats: SelectStats
    scores: TipScores  # per response token, [B, L] (0 outside the response)


class LeanForward(NamedTuple):
    """What :class:`LeanStudent` returns for one batch ``[B, L]``; k = kept positions."""

    student_logits: torch.Tensor  # [k, V] with gradient: the student head on the kept hidden states only
    teacher_logits: torch.Tensor  # [k, V] no gradient, the student's dtype
    kept_positions: torch.Tensor  # bool [B, L]: positions whose logits predict a kept token
    stats: SelectStats
    scores: TipScores  # per prediction position, [B, L] float32 (0 elsewhere)


def lm_head_of(model) -> torch.nn.Module:
    return hf.lm_head(model)


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final (post-norm) hidden states ``[B, L, H]`` of a Hugging Face causal LM, without its lm_head."""
    out = hf.base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def prediction_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """Token j is predicted by the logits at position j - 1: shift the response mask left by one."""
    pred = torch.zeros_like(response_mask)
    pred[:, :-1] = response_mask[:, 1:]
    return pred


def shared_vocab_size(student, teacher, vocab_size: Optional[int] = None) -> int:
    """The |V| both heads are used over: ``vocab_size`` when given (the tokenizer's length), else the heads'
    common row count (ValueError when the heads differ and no ``vocab_size`` says which rows are real)."""
    vs, vt = lm_head_of(student).weight.shape[0], lm_head_of(teacher).weight.shape[0]
    if vocab_size is not None:
        return vocab_size
    if vs != vt:
        raise ValueError(f"teacher/student vocabulary mismatch: student lm_head has {vs} rows, teacher {vt}; "
                         "TIP needs a shared vocabulary (pass vocab_size=len(tokenizer) when the heads are only "
                         "padded past it)")
    return int(vs)


@torch.no_grad()
def score_positions(hs: torch.Tensor, ht: torch.Tensor, student_head, teacher_head, positions: torch.Tensor,
                    temperature: float = 1.0, chunk_tokens: int = 1024):
    """Fused scores of the flat ``positions`` (indices into ``[B*L]``), ``chunk_tokens`` at a time.
    ``student_head`` / ``teacher_head`` map hidden states ``[n, H]`` to logits ``[n, V]`` (a
    :class:`LogitHead`). Returns (normalised entropy, kl_reverse, kl_forward), float32 ``[len(positions)]``."""
    H_s, H_t = hs.shape[-1], ht.shape[-1]
    hs2, ht2 = hs.detach().reshape(-1, H_s), ht.reshape(-1, H_t)
    n = positions.numel()
    ent = torch.empty(n, dtype=torch.float32, device=hs.device)
    kr, kf = torch.empty_like(ent), torch.empty_like(ent)
    for c0 in range(0, n, chunk_tokens):
        idx = positions[c0:c0 + chunk_tokens]
        ls = student_head(hs2[idx])
        lt = teacher_head(ht2[idx]).to(ls.dtype)
        sc = token_scores(ls, lt, temperature=temperature)
        ent[c0:c0 + idx.numel()] = normalize_entropy(sc.student_entropy, sc.vocab_size)
        kr[c0:c0 + idx.numel()] = sc.kl_reverse
        kf[c0:c0 + idx.numel()] = sc.kl_forward
        del ls, lt
    return ent, kr, kf


class LeanStudent(torch.nn.Module):
    """The student's side of the lean step as one module: what DDP or FSDP2 wrap, so that every student
    parameter (embeddings, decoder, norm, lm_head) is used inside its ``forward``.

    ``forward(input_ids, attention_mask, pred_mask, teacher_hidden, teacher_head, ...)`` runs the student
    body with gradient, scores every ``pred_mask`` position without gradient, selects, and applies the
    student head with gradient only to the kept hidden states. ``forward(generate=kwargs)`` runs
    ``student.generate(**kwargs)`` (under FSDP2 the root parameters are gathered for it).
    """

    def __init__(self, student, vocab_size: Optional[int] = None):
        super().__init__()
        self.student = student
        self.head = LogitHead(student, vocab_size, "student")

    def forward(self, input_ids=None, attention_mask=None, pred_mask=None, teacher_hidden=None, teacher_head=None, *,
                rule: str = "soft_or", ratio: float = 0.5, generator: Optional[torch.Generator] = None,
                temperature: float = 1.0, chunk_tokens: int = 1024, generate: Optional[dict] = None):
        if generate is not None:
            return self.student.generate(**generate)
        hs = hidden_states(self.student, input_ids, attention_mask)
        return select_and_project(hs, teacher_hidden, pred_mask, self.head, teacher_head, rule=rule, ratio=ratio,
                                  generator=generator, temperature=temperature, chunk_tokens=chunk_tokens)


def select_and_project(hs: torch.Tensor, ht: torch.Tensor, pred_mask: torch.Tensor, student_head, teacher_head, *,
                       rule: str = "soft_or", ratio: float = 0.5, generator: Optional[torch.Generator] = None,
                       temperature: float = 1.0, chunk_tokens: int = 1024) -> LeanForward:
    """Steps 2-4 of the lean step on ready hidden states: ``hs`` ``[B, L, H_s]`` (student, with gradient),
    ``ht`` ``[B, L, H_t]`` (teacher), ``pred_mask`` bool ``[B, L]`` (positions that may be kept)."""
    B, L = pred_mask.shape
    positions = torch.nonzero(pred_mask.reshape(-1)).flatten()
    ent, kr, kf = score_positions(hs, ht, student_head, teacher_head, positions, temperature, chunk_tokens)

    def full(v):
        out = torch.zeros(B * L, dtype=torch.float32, device=hs.device)
        out[positions] = v
        return out.reshape(B, L)

    scores = TipScores(full(ent), full(kr), full(kf))
    kept_pred, stats = select(scores, pred_mask, rule, ratio, generator)
    kept_pos = torch.nonzero(kept_pred.reshape(-1)).flatten()
    logits_s = student_head(hs.reshape(B * L, -1)[kept_pos])  # [k, V] with gradient: only the kept rows
    with torch.no_grad():
        logits_t = teacher_head(ht.reshape(B * L, -1)[kept_pos]).to(logits_s.dtype)
    return LeanForward(logits_s, logits_t, kept_pred, stats, scores)


def teacher_hidden_states(teacher, input_ids, attention_mask) -> torch.Tensor:
    """The teacher's final hidden states ``[B, L, H_t]``, without gradient."""
    with torch.no_grad():
        return hidden_states(teacher, input_ids, attention_mask)


def check_rollouts(input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Validate a batch of rollouts; returns the prediction-position mask ``[B, L]``."""
    for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-d tensor [B, L], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if response_mask.shape != input_ids.shape or response_mask.dtype != torch.bool:
        raise ValueError("response_mask: expected a bool tensor shaped like input_ids")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    pred = prediction_positions(response_mask)
    if not bool(pred.any()):
        raise ValueError("tip_loss: the response mask is empty (no response tokens to distil)")
    return pred


def tip_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
             *, rule: str = "soft_or", ratio: float = 0.5, generator: Optional[torch.Generator] = None,
             kind: str = "reverse", beta: float = 0.5, temperature: float = 1.0, chunk_tokens: int = 1024,
             vocab_size: Optional[int] = None) -> TipLossOutput:
    """Memory-lean TIP loss for rollouts ``input_ids`` ``[B, L]`` (prompt + response, padded).

    ``response_mask`` marks the response tokens (those the student sampled); the loss is the mean
    ``kind`` divergence (reverse KL in the paper) over the kept ones. ``vocab_size`` (the shared
    tokenizer's length) limits both LM heads to the real vocabulary when they are padded past it.
    Logit scaling and final soft-capping are applied as the models' forwards do (see
    :class:`scrimp.tip.head.LogitHead`); a transform it cannot reproduce raises ValueError.
    """
    pred = check_rollouts(input_ids, attention_mask, response_mask)
    V = shared_vocab_size(student, teacher, vocab_size)
    lean = LeanStudent(student, V)
    head_t = LogitHead(teacher, V, "teacher")
    ht = teacher_hidden_states(teacher, input_ids, attention_mask)
    fw = lean(input_ids, attention_mask, pred, ht, head_t, rule=rule, ratio=ratio, generator=generator,
              temperature=temperature, chunk_tokens=chunk_tokens)
    loss = kl_loss(fw.student_logits, fw.teacher_logits, kind, beta=beta, temperature=temperature, reduction="mean")
    return TipLossOutput(loss, response_kept(fw.kept_positions), fw.stats, response_scores(fw.scores))


def response_kept(kept_positions: torch.Tensor) -> torch.Tensor:
    """Prediction positions -> the response tokens they predict (shift right by one)."""
    kept = torch.zeros_like(kept_positions)
    kept[:, 1:] = kept_positions[:, :-1]
    return kept


def response_scores(scores: TipScores) -> TipScores:
    """Scores indexed by prediction position -> indexed by the response token they predict."""
    return TipScores(*[torch.nn.functional.pad(x[:, :-1], (1, 0)) for x in scores])


def plain_loss(student, teacher, input_ids, attention_mask, response_mask, temperature: float = 1.0,
               kept_mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """The plain torch step (the memory anchor of ``bench/anchors/gpu_e2e.py distill``): hidden states at
    the response positions (or at ``kept_mask``) -> lm_head -> float32 log-softmax for student and teacher ->
    mean of sum p (log p - log q). Every intermediate is a float32 ``[n, V]`` tensor kept for backward."""
    import torch.nn.functional as F

    pred = prediction_positions(response_mask if kept_mask is None else kept_mask)
    hs = hidden_states(student, input_ids, attention_mask)[pred]
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask)[pred]
        V = shared_vocab_size(student, teacher, vocab_size)
        lt = F.log_softmax(LogitHead(teacher, V, "teacher")(ht).float() / temperature, -1)
    ls = F.log_softmax(LogitHead(student, V, "student")(hs).float() / temperature, -1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()
