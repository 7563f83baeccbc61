"""Training KV Packet adapters on any prompts (the base model stays frozen): self-distillation.

Teacher = the model itself with full attention over the plain prompt (:attr:`Prompt.ids`): the
logits of every answer token, the answer being the prompt's reference answer when it has one, else
the teacher's own greedy answer. Student = one forward over ``[prefix, (header, doc, trailer)*, question,
answer[:-1]]`` with a block-diagonal 4-D mask (each wrapped document attends only to itself, the
question and answer attend to everything), every document token at its plain-prompt position (shifted
by the header length; `method.packet_positions`); loss = KL(teacher || student) on
the answer tokens; AdamW with linear decay. Because RoPE attention only sees relative positions,
the student's document KV equals a packet prefilled alone and re-rotated: what inference uses.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .method import (Adapters, _embed, _greedy_from, _new_cache, _device, check_model, model_fingerprint,
                     packet_positions, stop_ids)
from .prompt import Prompt

__all__ = ["teacher_targets", "student_answer_logits", "train_adapters", "split_heldout", "heldout_metrics"]


@torch.no_grad()
def teacher_targets(model, prompt: Prompt, max_answer_tokens: int = 32, tokenizer=None) -> Tuple[List[int], torch.Tensor]:
    """(answer ids, teacher logits ``[len(answer), V]``): the prompt's reference answer when it has
    one, else the greedy answer of the model with full attention (a final stop token included when
    produced); logits of full attention over ``prompt.ids + answer[:-1]``."""
    ids = prompt.ids
    if prompt.answer:
        answer = list(prompt.answer)
    else:
        answer, _ = _greedy_from(model, _new_cache(model), ids, 0, max_answer_tokens, stop_ids(model, tokenizer))
    dev = _device(model)
    x = torch.tensor([ids + answer[:-1]], device=dev)
    logits = model(input_ids=x).logits[0, len(ids) - 1:]
    return answer, logits.float()


def _student_inputs(model, adapters: Optional[Adapters], prefix, docs, tail, positions: str = "overlap"):
    """(input embeddings [1, n, hidden], allowed-attention mask [1, 1, n, n], position ids [1, n]) of
    the student sequence; positions as at inference (`packet_positions`, or every row in its own slot
    with ``positions="slots"``, as :class:`PacketEngine` and vLLM lay packets out). The question and answer
    attend to the header tokens the assembled cache holds (``adapters.header_kv``): every document's
    ("every"), the first document's only ("once": the one shared copy), none ("none")."""
    dev = _device(model)
    parts, seg, pos, header = [], [], list(range(len(prefix))), []
    if prefix:
        parts.append(_embed(model, torch.tensor([prefix], device=dev)))
        seg += [0] * len(prefix)
        header += [False] * len(prefix)
    n_header = adapters.n_header if adapters is not None else 0
    if positions == "slots":
        n_rows = n_header + (adapters.n_trailer if adapters is not None else 0)
        starts, q_pos = [], len(prefix)
        for d in docs:
            starts.append(q_pos)
            q_pos += len(d) + n_rows
    else:
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


def student_answer_logits(model, adapters: Optional[Adapters], prompt: Prompt, answer: List[int],
                          positions: str = "overlap") -> torch.Tensor:
    """Student logits ``[len(answer), V]`` of the answer tokens under the block-diagonal mask (packets
    placed as ``PacketEngine(positions=...)`` places them)."""
    tail = list(prompt.question) + list(answer[:-1])
    x, mask, pos = _student_inputs(model, adapters, prompt.prefix, prompt.documents, tail, positions)
    n = x.shape[1]
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[0, n - len(answer):].float()


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student), both ``[rows, V]`` logits."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


def split_heldout(n: int, heldout: Union[int, float], seed: int = 0) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices) of ``n`` examples: ``heldout`` examples (an int) or that share
    of them (a float in [0, 1)), at least one of each when ``n >= 2`` and ``heldout > 0``."""
    if isinstance(heldout, bool) or not isinstance(heldout, (int, float)) or heldout < 0:
        raise ValueError(f"heldout must be a count >= 0 or a share in [0, 1), got {heldout!r}")
    if isinstance(heldout, float):
        if heldout >= 1:
            raise ValueError(f"a held-out share must be < 1, got {heldout}")
        k = int(round(heldout * n))
        if heldout > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
    else:
        k = heldout
        if k >= n:
            raise ValueError(f"heldout={k} leaves no training examples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])


@torch.no_grad()
def heldout_metrics(model, adapters: Optional[Adapters], targets: Sequence[Tuple[Prompt, List[int], torch.Tensor]],
                    positions: str = "overlap") -> Dict[str, float]:
    """``{"kl", "first_token_agreement", "n"}`` of the block-masked forward (what inference computes)
    against the teacher on ``targets`` (prompt, answer, teacher logits): mean KL(teacher || student)
    over all answer tokens, and how often the first answer token's argmax equals the teacher's."""
    if not targets:
        return {"kl": float("nan"), "first_token_agreement": float("nan"), "n": 0}
    kls, agree = [], []
    for prompt, ans, tl in targets:
        sl = student_answer_logits(model, adapters, prompt, ans, positions)
        kls.append(float(_kl(sl, tl)))
        agree.append(int(sl[0].argmax()) == int(tl[0].argmax()))
    return {"kl": sum(kls) / len(kls), "first_token_agreement": sum(agree) / len(agree), "n": len(targets)}


def _data_hash(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.prefix, p.documents, p.question, p.answer]).encode())
    return h.hexdigest()[:24]


def train_adapters(model, prompts: Sequence[Prompt], *, tokenizer=None, steps: Optional[int] = None, epochs: int = 2,
                   lr: float = 1e-3, n_header: int = 8, n_trailer: int = 8, seed: int = 0,
                   heldout: Union[int, float] = 0, max_answer_tokens: Union[int, Sequence[int]] = 32,
                   checkpoint: Optional[str] = None, checkpoint_every: int = 50, resume: bool = False,
                   max_seconds: Optional[float] = None, progress: bool = True,
                   log: Callable[[str], None] = print, adapters: Optional[Adapters] = None,
                   header_kv: str = "every", positions: str = "overlap"):
    """Train header/trailer adapters for ``model`` by self-distillation on ``prompts``.

    Parameters
    ----------
    prompts : :class:`~scrimp.packets.prompt.Prompt` objects (reference answers optional).
    steps : optimizer steps (one prompt each); default ``epochs`` passes over the training prompts.
    heldout : prompts kept out of training (a count or a share) to report KL and first-token
        agreement on, before and after training.
    max_answer_tokens : length of the teacher's greedy answer for prompts without a reference answer
        (an int, or one per prompt).
    checkpoint : file to save the training state to every ``checkpoint_every`` steps and at the end;
        with ``resume`` an existing one is continued (same prompts and settings required).
    max_seconds : stop early after this long (the learning-rate schedule is laid out for ``steps``).
    header_kv : where the header's K/V go at inference (see :class:`Adapters`); training masks accordingly.
    positions : where inference places the packets (``PacketEngine(positions=...)``): ``"overlap"``, or
        ``"slots"`` (every row in its own position, the layout vLLM gives packets; needs ``header_kv="every"``).

    Returns ``(adapters, history)``: history has per-step losses, ``steps``, ``seconds``,
    ``stopped_early``, ``heldout_before`` / ``heldout_after`` (see :func:`heldout_metrics`) and
    ``resumed_from`` (the step a resumed run started at, else 0).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("train_adapters: no prompts given")
    from .engine import PACKET_POSITIONS

    if positions not in PACKET_POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(PACKET_POSITIONS)}, got {positions!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise TypeError(f"prompts[{i}]: expected a scrimp.packets.Prompt, got {type(p).__name__}")
        if not p.documents:
            raise ValueError(f"prompts[{i}] has no documents")
    check_model(model)
    if isinstance(max_answer_tokens, int):
        max_answer = [max_answer_tokens] * len(prompts)
    else:
        max_answer = [int(m) for m in max_answer_tokens]
        if len(max_answer) != len(prompts):
            raise ValueError(f"max_answer_tokens: {len(max_answer)} values for {len(prompts)} prompts")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    dev = _device(model)
    train_idx, held_idx = split_heldout(len(prompts), heldout, seed)
    total = steps if steps is not None else epochs * len(train_idx)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"steps must be an int >= 1, got {total!r}")
    if adapters is None:
        adapters = Adapters(model.config.hidden_size, n_header, n_trailer, seed=seed, header_kv=header_kv).to(dev)
    adapters.fingerprint = model_fingerprint(model)
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, total)))
    rng = random.Random(seed)
    order: List[int] = []
    start = 0
    settings = {"data": _data_hash(prompts), "steps": total, "lr": lr, "seed": seed, "heldout": heldout,
                "n_header": adapters.n_header, "n_trailer": adapters.n_trailer, "header_kv": adapters.header_kv, "positions": positions,
                "model": adapters.fingerprint}
    if resume and checkpoint and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("settings") != settings:
            diff = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise ValueError(f"cannot resume from {checkpoint}: it was made with other {', '.join(diff)}")
        with torch.no_grad():
            adapters.header.copy_(state["header"])
            adapters.trailer.copy_(state["trailer"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        order, start = list(state["order"]), int(state["step"])
        log(f"resuming from step {start} of {total} ({checkpoint})")
    t0 = time.time()
    it = range(len(prompts))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="teacher targets", leave=False)
    targets = []
    for i in it:
        ans, tl = teacher_targets(model, prompts[i], max_answer[i], tokenizer)
        targets.append((prompts[i], ans, tl))
    log(f"teacher targets for {len(prompts)} prompts in {time.time() - t0:.1f}s")
    held = [targets[i] for i in held_idx]
    hist = {"loss": [], "seconds": 0.0, "steps": start, "stopped_early": False, "resumed_from": start,
            "n_train": len(train_idx), "n_heldout": len(held_idx),
            "heldout_before": heldout_metrics(model, adapters, held, positions)}

    def save_state(step):
        if checkpoint:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)) or ".", exist_ok=True)
            tmp = checkpoint + ".tmp"
            torch.save({"settings": settings, "step": step, "header": adapters.header.detach().cpu(),
                        "trailer": adapters.trailer.detach().cpu(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "rng": rng.getstate(), "order": order}, tmp)
            os.replace(tmp, checkpoint)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc="kv-packet adapters", leave=False)
    adapters.train()
    for step in range(start, total):
        if not order:
            order = list(train_idx)
            rng.shuffle(order)
        prompt, ans, tl = targets[order.pop()]
        loss = _kl(student_answer_logits(model, adapters, prompt, ans, positions), tl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["steps"] = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(hist['loss'][-16:]) / len(hist['loss'][-16:]):.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_state(step + 1)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            hist["stopped_early"] = True
            break
    if bar is not None:
        bar.close()
    adapters.eval()
    save_state(hist["steps"])
    hist["heldout_after"] = heldout_metrics(model, adapters, held, positions)
    hist["seconds"] = time.time() - t0
    return adapters, hist
