"""Training KV Packet adapters (the base model stays frozen).

Teacher = the model with full attention on the plain prompt: its greedy answer and the logits of
every answer token. Student = one forward over ``[prefix, (header, doc, trailer)*, question,
answer[:-1]]`` with a block-diagonal 4-D mask (each wrapped document attends only to itself, the
question and answer attend to everything), every document token at its plain-prompt position (shifted
by the header length; `method.packet_positions`); loss = KL(teacher || student) on
the answer tokens; AdamW with linear decay. Because RoPE attention only sees relative positions,
the student's document KV equals a packet prefilled alone and re-rotated: what inference uses.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .method import (Adapters, _embed, _forward, _greedy_from, _new_cache, _device, model_fingerprint, packet_positions,
                     split_prompt)

__all__ = ["teacher_targets", "student_answer_logits", "train_adapters", "TRAIN_SEED_BASE"]

#: training examples use seeds from here on, far from the evaluation seeds (0, 1, 2, ...)
TRAIN_SEED_BASE = 50_000_000


@torch.no_grad()
def teacher_targets(model, tokenizer, prompt_ids: List[int], max_answer_tokens: int) -> Tuple[List[int], torch.Tensor]:
    """(greedy answer ids incl. a final eos if produced, teacher logits [len(answer), V])."""
    answer, _ = _greedy_from(model, _new_cache(model), list(prompt_ids), 0, max_answer_tokens, tokenizer.eos_token_id)
    dev = _device(model)
    ids = torch.tensor([list(prompt_ids) + answer[:-1]], device=dev)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:]
    return answer, logits.float()


def _student_inputs(model, adapters: Optional[Adapters], prefix, docs, tail):
    """(input embeddings [1, n, hidden], allowed-attention mask [1, 1, n, n], position ids [1, n]) of
    the student sequence; positions as at inference (`packet_positions`). The question and answer
    attend to the header tokens the assembled cache holds (``adapters.header_kv``): every document's
    ("every"), the first document's only ("once": the one shared copy), none ("none")."""
    dev = _device(model)
    parts, seg, pos, header = [], [], list(range(len(prefix))), []
    if prefix:
        parts.append(_embed(model, torch.tensor([prefix], device=dev)))
        seg += [0] * len(prefix)
        header += [False] * len(prefix)
    n_header = adapters.n_header if adapters is not None else 0
    starts, q_pos = packet_positions(len(prefix), [len(d) for d in docs], n_header)
    for i, (d, start) in enumerate(zip(docs, starts)):
        x = _embed(model, torch.tensor([d], device=dev))
        if adapters is not None:
            x = adapters.wrap(x)
        parts.append(x)
        seg += [i + 1] * x.shape[1]
        header += [True] * n_header + [False] * (x.shape[1] - n_header)
        pos += range(start, start + x.shape[1])
    parts.append(_embed(model, torch.tensor([tail], device=dev)))
    seg += [-1] * len(tail)
    header += [False] * len(tail)
    pos += range(q_pos, q_pos + len(tail))
    x = torch.cat(parts, dim=1)
    s = torch.tensor(seg, device=dev)
    n = len(seg)
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    tail_reads = torch.ones(n, dtype=torch.bool, device=dev)  # keys the question and answer may attend to
    if adapters is not None and adapters.header_kv != "every":
        tail_reads = ~torch.tensor(header, device=dev)
        if adapters.header_kv == "once":
            tail_reads |= s == 1
    allowed = causal & ((s[:, None] == s[None, :]) | ((s[:, None] == -1) & tail_reads[None, :]))
    return x, allowed[None, None], torch.tensor([pos], device=dev)


def student_answer_logits(model, adapters: Optional[Adapters], tokenizer, prompt_ids: List[int],
                          answer: List[int]) -> torch.Tensor:
    """Student logits [len(answer), V] of the answer tokens under the block-diagonal mask."""
    prefix, docs, question = split_prompt(prompt_ids, tokenizer)
    tail = list(question) + list(answer[:-1])
    x, mask, pos = _student_inputs(model, adapters, prefix, docs, tail)
    n = x.shape[1]
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[0, n - len(answer):].float()


def train_adapters(model, tokenizer, *, n_train: int = 64, epochs: int = 2, context_tokens: int = 512,
                   lr: float = 1e-3, n_header: int = 8, n_trailer: int = 8, seed: int = 0,
                   max_seconds: Optional[float] = None, progress: bool = True,
                   log: Callable[[str], None] = print, adapters: Optional[Adapters] = None,
                   header_kv: str = "every"):
    """Train header/trailer adapters for ``model`` on the testbed ``recall`` task.

    Returns ``(adapters, history)``; history has per-step losses and the wall time. ``max_seconds``
    stops early (the learning-rate schedule is laid out for the full run). ``header_kv`` says where
    the header's K/V go at inference (see :class:`Adapters`); training masks accordingly.
    """
    from ..testbed import tasks

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    dev = _device(model)
    if adapters is None:
        adapters = Adapters(model.config.hidden_size, n_header, n_trailer, seed=seed, header_kv=header_kv).to(dev)
    adapters.fingerprint = model_fingerprint(model)
    t0 = time.time()
    data = []
    for i in range(n_train):
        ex = tasks.recall(seed=TRAIN_SEED_BASE + seed * 100_003 + i, context_tokens=context_tokens, tokenizer=tokenizer)
        ans, tl = teacher_targets(model, tokenizer, ex.prompt_ids, len(ex.answer_ids) + 1)
        data.append((ex.prompt_ids, ans, tl))
    log(f"teacher targets for {n_train} examples in {time.time() - t0:.1f}s")
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
    total = epochs * n_train
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, total)))
    rng = random.Random(seed)
    hist = {"loss": [], "seconds": 0.0, "steps": 0, "stopped_early": False}
    it = range(total)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="kv-packet adapters", leave=False)
    order: List[int] = []
    for step in it:
        if not order:
            order = list(range(n_train))
            rng.shuffle(order)
        ids, ans, tl = data[order.pop()]
        sl = student_answer_logits(model, adapters, tokenizer, ids, ans)
        loss = F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["steps"] = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(hist['loss'][-16:]) / len(hist['loss'][-16:]):.4f}")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            hist["stopped_early"] = True
            break
    if bar is not None:
        bar.close()
    hist["seconds"] = time.time() - t0
    return adapters, hist
