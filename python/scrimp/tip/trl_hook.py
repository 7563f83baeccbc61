"""TIP inside TRL's ``GKDTrainer``: a lean trainer, and a loss hook.

:class:`TipGKDTrainer` (importable when ``trl`` is installed) is ``GKDTrainer`` whose ``compute_loss``
runs scrimp's lean step: the student forward returns hidden states (``logits_to_keep=1``, so no
``[B, L, V]`` logits), the teacher body runs without its head, every labelled position is scored in
chunks without gradient, ``tip_rule`` / ``tip_ratio`` select, and both LM heads run on the kept hidden
states only (over the tokenizer's vocabulary, with the models' logit transforms); the fused
:func:`scrimp.kl_loss` gives TRL's generalized JSD (``beta``; ``beta=1`` is the paper's reverse KL) over
the kept tokens. Everything else (on-policy generation with ``lmbda``, accumulation, logging, saving)
is TRL's own machinery::

    from scrimp.tip.trl_hook import TipGKDTrainer
    trainer = TipGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(..., beta=1.0),
                            train_dataset=ds, processing_class=tok, tip_rule="soft_or", tip_ratio=0.5)

:func:`tip_generalized_jsd_loss` is the functional form for code that already has full logits: TRL's
``generalized_jsd_loss`` signature plus the selector.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..distill_loss import kl_loss
from ..scoring import token_scores
from .head import LogitHead
from .select import TipScores, normalize_entropy, select
from .step import select_and_project, shared_vocab_size, teacher_hidden_states


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
        """``GKDTrainer`` with scrimp's lean TIP step as ``compute_loss`` (see the module docstring).

        ``tip_rule``, ``tip_ratio`` : the selector (``all`` / 1.0 reproduces GKD's loss on every token);
        ``tip_seed`` : seeds the selection generator; ``tip_chunk_tokens`` : rows scored at a time.
        The heads are used over ``tip_vocab_size`` rows (default ``len(processing_class)``). ``tip_last_stats`` holds the last selection.
        """

        def __init__(self, *args, tip_rule: str = "soft_or", tip_ratio: float = 0.5, tip_seed: int = 0,
                     tip_chunk_tokens: int = 1024, tip_vocab_size: Optional[int] = None, **kwargs):
            self.tip_rule, self.tip_ratio, self.tip_chunk_tokens = tip_rule, tip_ratio, tip_chunk_tokens
            self.tip_generator = torch.Generator().manual_seed(tip_seed)
            self.tip_last_stats = None
            super().__init__(*args, **kwargs)
            student = self.accelerator.unwrap_model(self.model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            tok = self.processing_class
            if tip_vocab_size is None and tok is not None:
                tip_vocab_size = len(tok)
            V = shared_vocab_size(student, teacher, tip_vocab_size)
            self._tip_heads = (LogitHead(student, V, "student"), LogitHead(teacher, V, "teacher"))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, attn, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            pred = torch.zeros_like(labels, dtype=torch.bool)
            pred[:, :-1] = labels[:, 1:] != -100  # logits at i predict the token at i + 1
            # through the (possibly wrapped) model; logits_to_keep=1: a [B, 1, V] block instead of [B, L, V]
            out = model(input_ids=ids, attention_mask=attn, logits_to_keep=1, output_hidden_states=True,
                        use_cache=False)
            hs = out.hidden_states[-1]  # [B, L, H] after the final norm
            self.teacher_model.eval()
            ht = teacher_hidden_states(self.accelerator.unwrap_model(self.teacher_model), ids, attn)
            if not bool(pred.any()):  # nothing to distil in this batch: a zero loss that keeps the graph
                loss = hs.sum() * 0.0
            else:
                fw = select_and_project(hs, ht, pred, *self._tip_heads, rule=self.tip_rule, ratio=self.tip_ratio,
                                        generator=self.tip_generator, chunk_tokens=self.tip_chunk_tokens)
                self.tip_last_stats = fw.stats
                rows = kl_loss(fw.student_logits, fw.teacher_logits, "jsd", beta=self.beta, reduction="none")
                if num_items_in_batch is not None:  # TRL's accumulation-correct normalisation, kept tokens only
                    loss = rows.sum() / (num_items_in_batch * fw.stats.kept_fraction)
                else:
                    loss = rows.mean()
            return (loss, out) if return_outputs else loss

        def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", num_items_in_batch=None):
            loss, stats = tip_generalized_jsd_loss(
                student_logits, teacher_logits, labels, beta=beta, temperature=temperature, reduction=reduction,
                num_items_in_batch=num_items_in_batch, rule=self.tip_rule, ratio=self.tip_ratio,
                generator=self.tip_generator, return_stats=True)
            self.tip_last_stats = stats
            return loss
