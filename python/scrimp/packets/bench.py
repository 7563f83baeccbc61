"""KV Packet on the shipped testbed ``recall`` task: its model, its prompts split into documents at the
testbed's ``<doc>``/``</doc>`` markers, and :func:`scrimp.packets.compare.compare_methods` scored by
:func:`scrimp.testbed.evaluate` (the benchmark, demo and CLI default)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from . import method as M
from .compare import compare_methods
from .prompt import Prompt

__all__ = ["RECALL_CONTEXT", "TRAIN_SEED_BASE", "load_recall_model", "split_recall_prompt", "recall_prompts",
           "compare_on_testbed"]

#: context length (tokens) of the testbed comparison: the length the recall model is trained for. At
#: 1,024 tokens no recompute already matches full recompute on this task (20 of 20 prompts, KL 0.0045
#: on the first answer token), so there is little for adapters or recompute to restore; at 2,048 there is.
RECALL_CONTEXT = 2048


def load_recall_model():
    """The testbed ``recall`` model and tokenizer (FileNotFoundError while it is not shipped)."""
    from .. import testbed

    return testbed.load("recall")


def split_recall_prompt(ids: Sequence[int], tokenizer) -> Prompt:
    """A testbed ``recall`` prompt as a :class:`Prompt`, split at its ``<doc>``/``</doc>`` markers: a
    document runs from ``<doc>`` through ``</doc>`` and the token after it (the newline)."""
    vocab = tokenizer.get_vocab()
    if "<doc>" not in vocab or "</doc>" not in vocab:
        raise ValueError("split_recall_prompt needs a tokenizer with <doc> and </doc> tokens (the testbed's)")
    open_id, close_id = vocab["<doc>"], vocab["</doc>"]
    ids = [int(i) for i in ids]
    prefix: List[int] = []
    docs: List[List[int]] = []
    i = 0
    while i < len(ids) and ids[i] != open_id:
        prefix.append(ids[i])
        i += 1
    while i < len(ids) and ids[i] == open_id:
        j = ids.index(close_id, i) if close_id in ids[i:] else len(ids) - 1
        end = min(j + 2, len(ids))
        docs.append(ids[i:end])
        i = end
    return Prompt(prefix, docs, ids[i:])


#: testbed recall training prompts use seeds from here on, far from the evaluation seeds (0, 1, 2, ...)
TRAIN_SEED_BASE = 50_000_000


def recall_prompts(tokenizer, n: int, context_tokens: int = RECALL_CONTEXT, seed: int = 0,
                   training: bool = False) -> List[Prompt]:
    """The ``n`` testbed ``recall`` prompts :func:`scrimp.testbed.evaluate` scores (same seeds), with
    their reference answers; ``training``: prompts from seeds far from every evaluation seed."""
    from .. import testbed

    out = []
    for i in range(n):
        s = TRAIN_SEED_BASE + seed * 100_003 + i if training else seed * 1_000_003 + i
        ex = testbed.tasks.recall(seed=s, context_tokens=context_tokens, tokenizer=tokenizer)
        p = split_recall_prompt(ex.prompt_ids, tokenizer)
        p.answer = list(ex.answer_ids)
        out.append(p)
    return out


def compare_on_testbed(model, tokenizer, adapters: Optional[M.Adapters], n: int = 20,
                       context_tokens: int = RECALL_CONTEXT, seed: int = 0, methods: Optional[Sequence[str]] = None,
                       out=None, fidelity: bool = True, progress: bool = False) -> List[Dict]:
    """:func:`compare_methods` on the testbed ``recall`` task, accuracy scored by
    :func:`scrimp.testbed.evaluate` on the same ``n`` prompts."""
    from .. import testbed

    def accuracy_fn(answer_fn):
        def gen(model_, tok_, prompt_ids, max_new_tokens):
            ids = answer_fn(split_recall_prompt(prompt_ids[0].tolist(), tok_), max_new_tokens)
            return torch.tensor(ids, dtype=torch.long)
        return testbed.evaluate(model, tokenizer, "recall", n=n, seed=seed, context_tokens=context_tokens,
                                generate_fn=gen, progress=progress)["accuracy"]

    return compare_methods(model, tokenizer, adapters, recall_prompts(tokenizer, n, context_tokens, seed), methods,
                           accuracy_fn=accuracy_fn, fidelity=fidelity, progress=progress, out=out)
