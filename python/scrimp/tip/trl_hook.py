"""TIP inside TRL's ``GKDTrainer``: a lean trainer, and a loss hook.

:class:`TipGKDTrainer` (importable when ``trl`` is installed) is ``GKDTrainer`` whose ``compute_loss``
runs scrimp's lean step: the student forward returns hidden states (``logits_to_keep=1``, so no
``[B, L, V]`` logits), the teacher body runs without its head, every labelled position is scored in
chunks without gradient, ``tip_rule`` / ``tip_ratio`` select, and both LM heads run on the kept hidden
states only (over the tokenizer's vocabulary, with the models' logit transforms); the fused
:func:`scrimp.kl_loss` gives TRL's generalized JSD (``beta``; ``beta=1`` is the paper's reverse KL) over
the kept tokens. Everything else (on-policy generation with ``lmbda``, accumulation, logging, saving)
is TRL's own machinery::

    from scrimp.tip.trl_hook import TipGKDTrainer, gkd_config
    trainer = TipGKDTrainer(model=student, teacher_model=teacher, args=gkd_config(..., beta=1.0),
                            train_dataset=ds, processing_class=tok, tip_rule="soft_or", tip_ratio=0.5)

:func:`gkd_config` builds TRL's ``GKDConfig`` with gradient checkpointing under the name the installed
transformers uses (``activation_checkpointing`` where ``gradient_checkpointing`` is deprecated), so the
config raises no FutureWarning; a ``GKDConfig`` built directly works too. The trl versions admitted are
``scrimp._versions.SUPPORTED["trl"]``: importing this module with another one installed raises
:class:`scrimp.VersionError`.

:func:`tip_generalized_jsd_loss` is the functional form for code that already has full logits: TRL's
``generalized_jsd_loss`` signature plus the selector.
"""
from __future__ import annotations

import warnings
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


from .. import _versions

_versions.require("trl", "scrimp.tip.trl_hook")

try:  # the drop-in subclass, only with trl installed
    try:
        from trl.experimental.gkd import GKDConfig as _GKDConfig, GKDTrainer as _GKDTrainer
    except ImportError:
        from trl import GKDConfig as _GKDConfig, GKDTrainer as _GKDTrainer
except ImportError:  # pragma: no cover - trl is optional
    _GKDConfig = _GKDTrainer = None

#: transformers' deprecated gradient-checkpointing names -> their replacements (transformers >= 5.25)
_CHECKPOINTING_RENAMES = (("gradient_checkpointing", "activation_checkpointing"),
                          ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))

#: FutureWarnings transformers raises when TRL's rollout code calls the model's deprecated
#: ``gradient_checkpointing_*`` methods (TRL's code, not scrimp's): silenced around TRL's training step only
_TRL_CHECKPOINTING_WARNING = r"`(is_)?gradient_checkpointing\w*` is deprecated"


class _ConfigOnlyGenerate:
    """``model`` whose ``generate(..., generation_config=cfg, **kw)`` moves the generation parameters in
    ``kw`` (attributes of ``cfg``) into a copy of ``cfg``, so that only model inputs travel beside it."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, generation_config=None, **kw):
        if generation_config is not None:
            import copy

            generation_config = copy.deepcopy(generation_config)
            for k in [k for k in kw if k not in ("input_ids", "attention_mask") and hasattr(generation_config, k)]:
                setattr(generation_config, k, kw.pop(k))
        return self._model.generate(*args, generation_config=generation_config, **kw)


def gkd_config(**kwargs):
    """TRL's ``GKDConfig(**kwargs)``, with gradient checkpointing passed under the installed transformers'
    name: where ``TrainingArguments`` has ``activation_checkpointing`` (the deprecated
    ``gradient_checkpointing`` warns there), ``gradient_checkpointing`` / ``gradient_checkpointing_kwargs``
    in ``kwargs`` (or TRL's default for them) go to ``activation_checkpointing`` / ``..._kwargs``."""
    import dataclasses

    if _GKDConfig is None:
        raise ImportError("gkd_config needs trl: pip install 'trl" + _versions.specifier("trl") + "'")
    fields = {f.name: f for f in dataclasses.fields(_GKDConfig)}
    for old, new in _CHECKPOINTING_RENAMES:
        if new not in fields or old not in fields:
            continue
        if old in kwargs:
            value = kwargs.pop(old)
            kwargs.setdefault(new, value)
        elif new not in kwargs:
            f = fields[old]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if default is not None:
                kwargs[new] = default
    return _GKDConfig(**kwargs)

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

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            # TRL passes generation arguments beside generation_config, which transformers deprecates:
            # its rollout runs on a view of the model whose generate() moves them into the config
            return _GKDTrainer.generate_on_policy_outputs(_ConfigOnlyGenerate(model), inputs, generation_config)

        def training_step(self, *args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TRL_CHECKPOINTING_WARNING, category=FutureWarning)
                return super().training_step(*args, **kwargs)

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
