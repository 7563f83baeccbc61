"""scrimp.tip: token-selective on-policy distillation (TIP, arXiv 2604.14084).

* :func:`select` - the paper's token selectors (Soft-OR, entropy, Q3, divergence, random, all);
* :func:`compute_scores` - fused per-token scores (normalised entropy, reverse/forward KL);
* :func:`tip_loss` - the memory-lean loss step for Hugging Face causal LMs;
* :class:`OnPolicyDistiller` - the training loop (checkpoints, resume, DDP / FSDP2);
* :func:`load_prompts`, :func:`prompt_source` - prompts from a JSONL file;
* ``scrimp.tip.trl_hook`` - TIP inside TRL's ``GKDTrainer``.
"""
from __future__ import annotations

from .select import RULES, SelectStats, TipScores, clipped_entropy, compute_scores, normalize_entropy, select, soft_or_score

__all__ = ["RULES", "SelectStats", "TipScores", "clipped_entropy", "compute_scores", "normalize_entropy", "select",
           "soft_or_score"]
from .head import LogitHead, check_same_vocabulary
from .step import LeanStudent, TipLossOutput, plain_loss, tip_loss
from .distiller import OnPolicyDistiller, StepOutOfMemory, peak_memory_bytes
from .prompts import load_prompts, prompt_source
from .bench import arith_accuracy, arith_prompts

__all__ += ["LogitHead", "check_same_vocabulary", "LeanStudent", "TipLossOutput", "plain_loss", "tip_loss",
            "OnPolicyDistiller", "StepOutOfMemory", "peak_memory_bytes", "load_prompts", "prompt_source",
            "arith_accuracy", "arith_prompts"]
from .demo import demo_section

__all__ += ["demo_section"]
