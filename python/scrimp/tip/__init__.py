"""scrimp.tip: token-selective on-policy distillation (TIP, arXiv 2604.14084).

* :func:`select` - the paper's token selectors (Soft-OR, entropy, Q3, divergence, random, all);
* :func:`compute_scores` - fused per-token scores (normalised entropy, reverse/forward KL);
"""
from __future__ import annotations

from .select import RULES, SelectStats, TipScores, clipped_entropy, compute_scores, normalize_entropy, select, soft_or_score

__all__ = ["RULES", "SelectStats", "TipScores", "clipped_entropy", "compute_scores", "normalize_entropy", "select",
           "soft_or_score"]
from .step import TipLossOutput, plain_loss, tip_loss
from .distiller import OnPolicyDistiller, arith_accuracy, arith_prompts, peak_memory_bytes

__all__ += ["TipLossOutput", "plain_loss", "tip_loss", "OnPolicyDistiller", "arith_accuracy", "arith_prompts", "peak_memory_bytes"]
from .demo import demo_section

__all__ += ["demo_section"]
