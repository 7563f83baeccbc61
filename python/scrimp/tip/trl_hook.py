"""TIP inside TRL's ``GKDTrainer``: a loss hook and a drop-in subclass.

``GKDTrainer.compute_loss`` calls ``self.generalized_jsd_loss(student_logits, teacher_logits, labels=...,
beta=..., num_items_in_batch=...)`` on the shifted logits. :func:`tip_generalized_jsd_loss` takes the same
arguments plus the TIP selector: it scores every labelled position (fused, no gradient), keeps
``ratio`` of them with ``rule``, and returns the generalized JSD (TRL's definition; ``beta=1`` is the
paper's reverse KL) averaged over the kept positions, computed by the fused :func:`scrimp.kl_loss`.
:class:`TipGKDTrainer` (importable when ``trl`` is installed) is ``GKDTrainer`` with that hook::

    from scrimp.tip.trl_hook import TipGKDTrainer
    trainer = TipGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(..., beta=1.0),
                            train_dataset=ds, processing_class=tok, tip_rule="soft_or", tip_ratio=0.5)

What this saves inside TRL: the float32 ``[n, V]`` log-softmax / mixture / KL buffers now exist for no
row at all (fused loss) and the loss gradient only for the kept rows; the full student and teacher logits
that TRL's ``compute_loss`` materialises before calling the hook remain (use :class:`OnPolicyDistiller`
for the lm_head-on-kept-rows step).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..distill_loss import kl_loss
from ..scoring import token_scores
from .select import TipScores, normalize_entropy, select


def tip_generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                             reduction: str = "batchmean", num_items_in_batch=None, *, rule: str = "soft_or",
                             ratio: float = 0.5, generator: Optional[torch.Generator] = None,
                             return_stats: bool = False):
    """TRL's ``generalized_jsd_loss`` restricted to the TIP-selected tokens (see the module docstring).

    ``labels == -100`` marks positions that are never selected. ``reduction``: ``batchmean`` / ``mean``
    average over the kept tokens, ``sum`` sums them, ``none`` returns a float32 ``[B, L]`` tensor with 0 at
    dropped positions. ``num_items_in_batch`` (gradient accumulation) divides the kept sum by
    ``num_items_in_batch * kept_fraction`` instead.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher/student vocabulary mismatch: {student_logits.shape[-1]} vs {teacher_logits.shape[-1]}")
    lead = student_logits.shape[:-1]
    mask = torch.ones(lead, dtype=torch.bool, device=student_logits.device) if labels is None else labels != -100
    tl = teacher_logits.to(student_logits.dtype)
    pos = torch.nonzero(mask.reshape(-1)).flatten()
    V = student_logits.shape[-1]
    s2, t2 = student_logits.reshape(-1, V), tl.reshape(-1, V)
    with torch.no_grad():
        sc = token_scores(s2[pos].detach(), t2[pos].detach(), temperature=temperature)
    full = []
    for v in (normalize_entropy(sc.student_entropy, V), sc.kl_reverse, sc.kl_forward):
        f = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
        f[pos] = v
        full.append(f.reshape(lead))
    kept, stats = select(TipScores(*full), mask, rule, ratio, generator)
    kpos = torch.nonzero(kept.reshape(-1)).flatten()
    rows = kl_loss(s2[kpos], t2[kpos], "jsd", beta=beta, temperature=temperature, reduction="none")
    if reduction == "none":
        out = torch.zeros(mask.numel(), dtype=rows.dtype, device=rows.device).index_put((kpos,), rows)
        loss = out.reshape(lead)
    elif num_items_in_batch is not None:
        loss = rows.sum() / (num_items_in_batch * stats.kept_fraction)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.mean()
    return (loss, stats) if return_stats else loss


try:  # the drop-in subclass, only with trl installed
    try:
        from trl.experimental.gkd import GKDTrainer as _GKDTrainer
    except ImportError:
        from trl import GKDTrainer as _GKDTrainer
except ImportError:  # pragma: no cover - trl is optional
    _GKDTrainer = None

if _GKDTrainer is not None:
    class TipGKDTrainer(_GKDTrainer):
        """``GKDTrainer`` whose loss covers only the TIP-selected tokens (``tip_rule``, ``tip_ratio``)."""

        def __init__(self, *args, tip_rule: str = "soft_or", tip_ratio: float = 0.5, tip_seed: int = 0, **kwargs):
            self.tip_rule, self.tip_ratio = tip_rule, tip_ratio
            self.tip_generator = torch.Generator().manual_seed(tip_seed)
            self.tip_last_stats = None
            super().__init__(*args, **kwargs)

        def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", num_items_in_batch=None):
            loss, stats = tip_generalized_jsd_loss(
                student_logits, teacher_logits, labels, beta=beta, temperature=temperature, reduction=reduction,
                num_items_in_batch=num_items_in_batch, rule=self.tip_rule, ratio=self.tip_ratio,
                generator=self.tip_generator, return_stats=True)
            self.tip_last_stats = stats
            return loss
