"""The LM head of a teacher or student as its own forward applies it, over the tokenizer's vocabulary.

TIP runs the LM head itself (on chosen hidden states only), so it must reproduce what the model's
``forward`` does after the decoder:

* rows past the tokenizer's vocabulary (heads padded to a multiple, e.g. 152064 rows for a 151665-token
  tokenizer) are dropped: the logits are ``hidden @ W[:V].T`` (+ bias), V = ``vocab_size``;
* logit scaling after the head, as the architecture's forward writes it (Cohere: ``* logit_scale``;
  Granite: ``/ logits_scaling``);
* final logit soft-capping (Gemma 2 and others): ``tanh(logits / cap) * cap``.

A logit transform the forward applies that is not one of these is refused with a ValueError naming it
(:func:`scrimp.hf.model_features` finds them), never run silently wrong.
:func:`check_same_vocabulary` checks that teacher and student tokenizers agree token by token.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import hf

#: model_type -> how its forward applies ``config.<field>`` to the logits: ("mul" | "div", field)
_LOGIT_SCALES = {
    "cohere": ("mul", "logit_scale"), "cohere2": ("mul", "logit_scale"), "cohere2_moe": ("mul", "logit_scale"),
    "granite": ("div", "logits_scaling"), "granitemoe": ("div", "logits_scaling"),
    "granitemoeshared": ("div", "logits_scaling"), "granitemoehybrid": ("div", "logits_scaling"),
    "granitemoe_swa": ("div", "logits_scaling"),
}


class LogitHead:
    """``hidden [N, H] -> logits [N, vocab_size]`` exactly as ``model.forward`` computes them.

    The head module is looked up at every call (FSDP swaps parameters between calls). ``name`` labels
    the model in error messages (``"student"``, ``"teacher"``).
    """

    def __init__(self, model, vocab_size: Optional[int] = None, name: str = "model"):
        head = hf.lm_head(model)
        rows = int(head.weight.shape[0])
        if vocab_size is None:
            vocab_size = rows
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")
        if vocab_size > rows:
            raise ValueError(f"{name}: its LM head has {rows} rows but the vocabulary has {vocab_size} tokens "
                             "(a tokenizer larger than the model's vocabulary)")
        self.model, self.name, self.vocab_size, self.rows = model, name, vocab_size, rows
        cfg = hf.text_config(model.config)
        feats = hf.model_features(model.config, model)
        self.scale = None  # ("mul" | "div", value)
        if "logit_scale" in feats:
            op = _LOGIT_SCALES.get(getattr(cfg, "model_type", ""))
            value = getattr(cfg, op[1], None) if op else None
            if value is None:
                raise ValueError(f"TIP cannot apply this {getattr(cfg, 'model_type', '?')} {name}'s logit transform "
                                 f"exactly: logit_scale ({hf.FEATURES['logit_scale']}): {feats['logit_scale']}; "
                                 f"known forms: {', '.join(sorted(_LOGIT_SCALES))}")
            self.scale = (op[0], float(value))
        self.softcap = float(cfg.final_logit_softcapping) if "final_logit_softcapping" in feats else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        head = hf.lm_head(self.model)
        if self.vocab_size == self.rows:
            logits = head(hidden)
        elif isinstance(head, torch.nn.Linear):  # only the real vocabulary's rows: no padded logits at all
            bias = None if head.bias is None else head.bias[:self.vocab_size]
            logits = torch.nn.functional.linear(hidden, head.weight[:self.vocab_size], bias)
        else:
            logits = head(hidden)[..., :self.vocab_size]
        if self.scale is not None:
            logits = logits * self.scale[1] if self.scale[0] == "mul" else logits / self.scale[1]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        parts = [f"{self.vocab_size} of {self.rows} head rows"]
        if self.scale:
            parts.append(f"logits {'x' if self.scale[0] == 'mul' else '/'} {self.scale[1]:g}")
        if self.softcap:
            parts.append(f"soft-cap {self.softcap:g}")
        return ", ".join(parts)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> int:
    """Raise ValueError unless both tokenizers map the same ids to the same tokens; returns |V|.

    The message names the first id where they differ (or the extra ids of the longer one).
    """
    ns, nt = len(student_tokenizer), len(teacher_tokenizer)
    vs, vt = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vs == vt and ns == nt:
        return ns
    by_id_s = {i: t for t, i in vs.items()}
    by_id_t = {i: t for t, i in vt.items()}
    for i in range(max(ns, nt, len(by_id_s), len(by_id_t))):
        a, b = by_id_s.get(i), by_id_t.get(i)
        if a != b:
            raise ValueError(f"teacher/student tokenizers disagree (TIP needs one shared vocabulary): token id {i} "
                             f"is {a!r} for the student and {b!r} for the teacher (student {ns} tokens, "
                             f"teacher {nt})")
    raise ValueError(f"teacher/student tokenizers disagree: student {ns} tokens, teacher {nt}")
