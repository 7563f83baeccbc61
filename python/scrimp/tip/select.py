"""TIP token selection (arXiv 2604.14084): which response tokens of a batch of student rollouts
carry the distillation loss.

Every rule works on the *batch* of response tokens (the ``True`` entries of ``response_mask``, m of
them) and keeps ``k = max(1, floor(ratio * m))`` tokens (``ratio = 1`` keeps all of them):

* ``all``        - every response token (the baseline; ``ratio`` is ignored).
* ``random``     - k tokens uniformly at random, without replacement.
* ``entropy``    - k tokens sampled without replacement with probability proportional to the
                   normalised student entropy h = H(P_S) / log|V| (tokens with h = 0 are drawn, uniformly,
                   only once every token with h > 0 is taken).
* ``soft_or``    - the paper's rule: h' = min-max(clip(h, max=q98(h))), d' = min-max(KL(P_S||P_T)),
                   s = h' + d' - h' d' (a soft OR of "uncertain" and "wrong"); the top-k of s.
* ``q3``         - "overconfident and wrong": the top-k of KL(P_T||P_S) * (1 - h').
* ``divergence`` - the top-k of KL(P_S||P_T).

q98 is the 98th percentile (linear interpolation) over the batch's response tokens, min-max is over
the same tokens (a constant score maps to 0). The paper writes floor(rho m); the floor is raised to 1
so that a tiny batch never gives an empty loss, and the product gets a 1e-9 tolerance so that
ratios written in decimal keep their intended count (0.29 * 100 is 28.999999999999996 in floating point).

Quadrants (for the statistics): a token is "high entropy" when h > h_threshold and "high divergence"
when KL(P_S||P_T) > d_threshold; the thresholds default to the batch medians. Q1 = high h / high d,
Q2 = high h / low d, Q3 = low h / high d, Q4 = low h / low d.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Tuple, Union

import torch

RULES = ("soft_or", "entropy", "q3", "divergence", "random", "all")
#: the scores each rule needs to select (the quadrant statistics use entropy and kl_reverse when given)
_NEEDS = {"soft_or": ("entropy", "kl_reverse"), "entropy": ("entropy",), "q3": ("entropy", "kl_forward"),
          "divergence": ("kl_reverse",), "random": (), "all": ()}


class TipScores(NamedTuple):
    """Per-token scores used by :func:`select`; float32 tensors of the rollouts' shape ``[B, L]``.

    entropy : normalised student entropy H(P_S) / log|V|, in [0, 1].
    kl_reverse : KL(P_S || P_T), the per-token reverse KL (also the TIP loss).
    kl_forward : KL(P_T || P_S), used only by the ``q3`` rule; may be None.
    """

    entropy: torch.Tensor
    kl_reverse: Optional[torch.Tensor]
    kl_forward: Optional[torch.Tensor] = None


class SelectStats(NamedTuple):
    """What :func:`select` kept. Shares are fractions in [0, 1]; quadrant tuples are (Q1, Q2, Q3, Q4)."""

    rule: str
    ratio: float
    response_tokens: int
    kept_tokens: int
    kept_fraction: float
    quadrant_all: Tuple[float, float, float, float]
    quadrant_kept: Tuple[float, float, float, float]
    h_threshold: float
    d_threshold: float

    def as_dict(self) -> dict:
        d = self._asdict()
        for name in ("quadrant_all", "quadrant_kept"):
            for i, v in enumerate(d.pop(name)):
                d[f"{name}_q{i + 1}"] = v
        return d


def normalize_entropy(entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """H / log|V| (0 for |V| = 1, where the entropy is always 0)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")
    if vocab_size == 1:
        return torch.zeros_like(entropy)
    return entropy / math.log(vocab_size)


def compute_scores(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                   vocab_size: Optional[int] = None) -> TipScores:
    """Fused scoring of ``[..., V]`` logits into :class:`TipScores` (no gradient, no [N, V] buffer).

    ``vocab_size`` (default ``V``) is the |V| of the normalisation; pass the real vocabulary size when the
    logits are padded with ``-inf`` columns.
    """
    from ..scoring import token_scores

    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1:
        raise ValueError("student_logits: expected a tensor of shape [..., V]")
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() < 1:
        raise ValueError("teacher_logits: expected a tensor of shape [..., V]")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher/student vocabulary mismatch: student V={student_logits.shape[-1]}, "
                         f"teacher V={teacher_logits.shape[-1]} (TIP needs a shared vocabulary)")
    ts = token_scores(student_logits, teacher_logits, temperature=temperature)
    V = int(student_logits.shape[-1]) if vocab_size is None else vocab_size
    return TipScores(normalize_entropy(ts.student_entropy, V), ts.kl_reverse, ts.kl_forward)


def _as_tip_scores(scores, vocab_size) -> TipScores:
    if isinstance(scores, TipScores):
        return scores
    if hasattr(scores, "student_entropy") and hasattr(scores, "kl_reverse"):  # scrimp.TokenScores
        if vocab_size is None:
            vocab_size = getattr(scores, "vocab_size", None)
        if vocab_size is None:
            raise ValueError("select: this TokenScores carries no vocab_size (it was not made by "
                             "scrimp.token_scores); pass vocab_size= to normalise the entropy")
        ent = scores.student_entropy
        return TipScores(normalize_entropy(ent, vocab_size), scores.kl_reverse, scores.kl_forward)
    if isinstance(scores, Mapping):
        unknown = set(scores) - set(TipScores._fields)
        if unknown:
            raise ValueError(f"select: unknown score names {sorted(unknown)}; expected {TipScores._fields}")
        if "entropy" not in scores:
            raise ValueError("select: scores must contain 'entropy' (normalised, in [0, 1])")
        return TipScores(scores["entropy"], scores.get("kl_reverse"), scores.get("kl_forward"))
    raise TypeError(f"select: scores must be TipScores, scrimp.TokenScores or a mapping, got {type(scores).__name__}")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(x)
    return (x - lo) / span


def clipped_entropy(h: torch.Tensor, percentile: float = 0.98) -> torch.Tensor:
    """h' of the paper over a flat vector of response tokens: clip at the percentile, then min-max."""
    q = torch.quantile(h.double(), percentile).to(h.dtype)
    return _minmax(torch.minimum(h, q))


def soft_or_score(h: torch.Tensor, d: torch.Tensor, percentile: float = 0.98) -> torch.Tensor:
    """s = h' + d' - h' d' over flat vectors of response tokens."""
    hp = clipped_entropy(h, percentile)
    dp = _minmax(d)
    return hp + dp - hp * dp


def _sample_proportional(w: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k distinct indices, drawn sequentially with probability proportional to w (>= 0); the zero-weight
    indices are drawn uniformly after every positive one."""
    pos = torch.nonzero(w > 0).flatten()
    take = min(k, pos.numel())
    picked = []
    if take > 0:
        sub = torch.multinomial(w[pos].double(), take, replacement=False, generator=generator)
        picked.append(pos[sub])
    if k > take:
        zero = torch.nonzero(w <= 0).flatten()
        perm = torch.randperm(zero.numel(), generator=generator)[: k - take]
        picked.append(zero[perm])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def select(scores: Union[TipScores, Mapping, "object"], response_mask: torch.Tensor, rule: str = "soft_or",
           ratio: float = 0.2, generator: Optional[torch.Generator] = None, *, vocab_size: Optional[int] = None,
           percentile: float = 0.98,
           quadrant_thresholds: Optional[Tuple[float, float]] = None) -> Tuple[torch.Tensor, SelectStats]:
    """Choose the response tokens that carry the TIP loss.

    Parameters
    ----------
    scores : TipScores (see :func:`compute_scores`), the ``scrimp.TokenScores`` of
        :func:`scrimp.token_scores` (its entropy is normalised by its ``vocab_size``; ``vocab_size=``
        overrides it, e.g. for logits padded with ``-inf`` columns) or a mapping with ``entropy``
        (normalised) and ``kl_reverse`` / ``kl_forward``; each tensor shaped like ``response_mask``.
    response_mask : bool tensor ``[B, L]`` (any shape): True at the response tokens that may be kept.
    rule : one of ``soft_or``, ``entropy``, ``q3``, ``divergence``, ``random``, ``all``.
    ratio : the kept fraction rho, in (0, 1].
    generator : a ``torch.Generator`` (CPU) for the ``entropy`` and ``random`` rules; same seed, same mask.
    percentile : the clipping percentile of the entropy (0.98 in the paper).
    quadrant_thresholds : (h_threshold, d_threshold) for the statistics; default: batch medians.

    Returns
    -------
    (mask, stats) : a bool tensor shaped like ``response_mask`` (a subset of it) and :class:`SelectStats`.
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"select: unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"select: ratio must be a float in (0, 1], got {type(ratio).__name__}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"select: ratio must be in (0, 1], got {ratio}")
    if not (0.0 < percentile <= 1.0):
        raise ValueError(f"select: percentile must be in (0, 1], got {percentile}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("select: generator must be a torch.Generator or None")
    if not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool:
        raise TypeError("select: response_mask must be a bool tensor")
    sc = _as_tip_scores(scores, vocab_size)
    shape = response_mask.shape
    for name in TipScores._fields:
        t = getattr(sc, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"select: scores.{name} must be a tensor")
        if t.shape != shape:
            raise ValueError(f"select: scores.{name} has shape {tuple(t.shape)}, response_mask {tuple(shape)}")
    for need in _NEEDS[rule]:
        if getattr(sc, need) is None:
            raise ValueError(f"select: rule {rule!r} needs scores.{need}")
    m = int(response_mask.sum())
    if m == 0:
        raise ValueError("select: the response mask is empty (no response tokens to select from)")

    dev = response_mask.device
    flat_mask = response_mask.reshape(-1)
    idx = torch.nonzero(flat_mask).flatten()  # positions of the m response tokens, in order

    def vec(t):
        v = t.reshape(-1)[idx].float()
        if not bool(torch.isfinite(v).all()):
            raise ValueError("select: scores contain NaN or inf at response positions")
        return v

    h = vec(sc.entropy) if sc.entropy is not None else None
    d = vec(sc.kl_reverse) if sc.kl_reverse is not None else None
    k = m if rule == "all" else min(m, max(1, int(math.floor(ratio * m + 1e-9))))

    if rule == "all":
        chosen = torch.arange(m, device=dev)
    elif rule == "random":
        chosen = torch.randperm(m, generator=generator)[:k].to(dev)
    elif rule == "entropy":
        chosen = _sample_proportional(h.clamp_min(0).cpu(), k, generator).to(dev)
    else:
        if rule == "soft_or":
            s = soft_or_score(h, d, percentile)
        elif rule == "q3":
            s = vec(sc.kl_forward) * (1.0 - clipped_entropy(h, percentile))
        else:  # divergence
            s = d
        chosen = torch.topk(s, k, sorted=False).indices

    keep = torch.zeros(m, dtype=torch.bool, device=dev)
    keep[chosen] = True
    out = torch.zeros_like(flat_mask)
    out[idx[keep]] = True
    out = out.reshape(shape)

    # quadrant statistics
    if h is not None and d is not None:
        if quadrant_thresholds is None:
            h_thr, d_thr = float(h.median()), float(d.median())
        else:
            h_thr, d_thr = (float(x) for x in quadrant_thresholds)
        hi_h, hi_d = h > h_thr, d > d_thr
        quads = torch.stack([hi_h & hi_d, hi_h & ~hi_d, ~hi_h & hi_d, ~hi_h & ~hi_d])  # [4, m]
        q_all = tuple(float(x) for x in quads.float().mean(1))
        q_kept = tuple(float(x) for x in quads[:, keep].float().mean(1))
    else:
        h_thr = d_thr = float("nan")
        q_all = q_kept = (float("nan"),) * 4
    stats = SelectStats(rule, ratio, m, k, k / m, q_all, q_kept, h_thr, d_thr)
    return out, stats
