"""Train a testbed model from a seed on CPU.

    python -m scrimp.testbed.train --task recall --seed 0 --out DIR
    python -m scrimp.testbed.train --task arith --role teacher --seed 0 --out DIR
    python -m scrimp.testbed.train --task arith --role student --seed 0 --out DIR
    python -m scrimp.testbed.train --task arith --role student --style teacher --seed 0 --out DIR
    python -m scrimp.testbed.train --task arith --role teacher --style mixed --seed 0 --out DIR

Writes ``model.safetensors``, ``config.json``, ``generation_config.json``, the
tokenizer files and ``metrics.json`` into ``--out`` and prints a final
``METRICS {...}`` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import sys
import time

# Recipes: model shape + optimisation defaults per (task, role), or (task, role, style) where a role
# trained on the other role's style has its own.
RECIPES = {
    ("recall", "teacher"): dict(
        # answer_softmax: until the curriculum starts, the answer loss is a softmax over the answer
        # vocabulary (digits, <eos>) only. Over the full vocabulary it pushes every never-predicted
        # token - the key letters included - the same way through the tied embeddings (mean pairwise
        # cosine of the letters 0.64 after 2,500 steps) and the induction circuit did not form by
        # step 3,000 (induction loss still ln 36), where with the answer softmax it formed by ~2,000.
        # Once the look-up has formed (the curriculum starts) the full softmax takes over: it is
        # what calibrates <eos> against the letters (with the answer softmax throughout, greedy
        # decoding wrote a letter instead of <eos>: 0% exact match with the digits right).
        # head_dim 32 (4 query / 2 KV heads; the same attention FLOPs as 8 x 16): a 16-dim head cannot
        # hold near-orthogonal directions for 2 x 26 key letters, so a record sharing one letter with
        # the queried key scores half a match.
        arch="llama", hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, head_dim=32, tie=True,
        # induction_share: that share of the training sequences is the dense induction task
        # (`induction_training_ids`); without it the look-up of the key never formed (digit 1 of the
        # value stayed at 33-38% through 6,000 steps), with it the look-up formed by step ~1,800-2,500 (lr 5e-4).
        context_loss=False, answer_softmax=True, induction_share=0.5,
        # lr 1e-3: at 5e-4 the induction circuit had not formed by step 2,500 / 3,500 in two runs; at 1e-3 it
        # formed by step ~1,200 (seed 1). max_len 2432: a training sequence of L tokens holds 32
        # answered queries (L - 372 tokens of context), so the longest contexts reach 2,060 tokens,
        # past the 2,048 the model is evaluated at (with max_len 2048 they stopped at 1,676).
        max_pos=8192, steps=6000, lr=1e-3, warmup=100, tokens_per_step=2560,
        min_len=160, start_len=160, max_len=2432, ramp_steps=1500, ramp_loss=0.3, p_max=0.25,
        # max_queries: answered queries per recall sequence at most (12 tokens each, after the context);
        # a long context costs the same forward pass whatever the number of queries after it
        queries_per_token=1 / 20, max_queries=32, confusable_share=0.0, lr_horizon=6000, small_alphabet_share=0.5,
        # value_collision_share: after the gate, that share of the recall contexts reuses ~1 two-digit
        # value prefix per 8 records (`tasks.recall_training_text(shared_value_prefixes=True)`)
        value_collision_share=0.0,
        # filler_share: after the gate, every recall context gives a share drawn uniformly from
        # [0, filler_share] of its tokens to filler lines (`tasks.recall_training_text(filler_share=)`);
        # contexts longer than the unique keys can fill (~4,900 tokens) take the rest as filler
        filler_share=0.0,
        # init: a shipped checkpoint name or a checkpoint directory to continue training from
        init="",
        # yarn_factor: > 0 gives the model YaRN RoPE scaling by that factor over `yarn_original_max`
        # positions (the low RoPE frequencies interpolated, the high ones kept, attention logits
        # sharpened by YaRN's 0.1 ln(factor) + 1 on cos and sin), for continuing a checkpoint trained at
        # `yarn_original_max` tokens to longer contexts; 0 keeps the checkpoint's (or plain) RoPE
        yarn_factor=0.0, yarn_original_max=2048),
    ("arith", "teacher"): dict(
        arch="qwen3", hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2,
        max_pos=512, steps=1000, lr=2e-3, warmup=100, batch=32),
    # head_dim: vLLM's CPU attention refuses heads of 16; `--set heads=2 --set kv_heads=1 --set
    # head_dim=32` is the same width and parameter count with heads it serves (arith-student-h32)
    ("arith", "student"): dict(
        arch="qwen3", hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, head_dim=16,
        max_pos=512, steps=800, lr=2e-3, warmup=30, batch=32),
    # the TIP pair's student: the teacher's style, a smaller model trained less (--style teacher)
    ("arith", "student", "teacher"): dict(
        arch="qwen3", hidden=96, intermediate=288, layers=3, heads=4, kv_heads=2,
        max_pos=512, steps=800, lr=2e-3, warmup=30, batch=32),
    # arith-teacher-robust (TESSY's teacher): arith-teacher fine-tuned on traces whose style segments
    # come from either style, mixed within a trace (`tasks.arith_mixed`), around correct capability
    # segments, so it continues a trace whatever style the other model wrote; 40% of the traces are
    # pure teacher style, so unprompted it opens (and writes) the teacher style.
    ("arith", "teacher", "mixed"): dict(
        arch="qwen3", hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2,
        max_pos=512, steps=400, lr=1e-3, warmup=40, batch=32, init="arith-teacher"),
}


def build_model(recipe, tokenizer, seed):
    """A freshly initialised model of the recipe's shape, or, when the recipe names a shipped
    checkpoint in ``init``, that checkpoint (whose shape must match the recipe)."""
    import torch
    torch.manual_seed(seed)
    yarn = _yarn_parameters(recipe)
    if recipe.get("init"):
        from transformers import AutoConfig, AutoModelForCausalLM
        from . import path as checkpoint_path
        path = recipe["init"] if os.path.isdir(recipe["init"]) else checkpoint_path(recipe["init"])
        cfg = AutoConfig.from_pretrained(path)
        if yarn:
            cfg.rope_parameters = yarn
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg)
        cfg = model.config
        got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
               cfg.num_key_value_heads)
        want = (recipe["hidden"], recipe["intermediate"], recipe["layers"], recipe["heads"], recipe["kv_heads"])
        if got != want:
            raise ValueError(f"init checkpoint {recipe['init']!r} has shape {got}, the recipe {want}")
        return model
    common = dict(
        vocab_size=len(tokenizer), hidden_size=recipe["hidden"],
        intermediate_size=recipe["intermediate"], num_hidden_layers=recipe["layers"],
        num_attention_heads=recipe["heads"], num_key_value_heads=recipe["kv_heads"],
        max_position_embeddings=recipe["max_pos"], rope_theta=10000.0,
        tie_word_embeddings=recipe.get("tie", True), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02, attention_dropout=0.0,
    )
    head_dim = recipe.get("head_dim", recipe["hidden"] // recipe["heads"])
    if recipe["arch"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(**common, head_dim=head_dim)
        model_class = LlamaForCausalLM
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        cfg = Qwen3Config(**common, head_dim=head_dim)
        model_class = Qwen3ForCausalLM
    if yarn:
        cfg.rope_parameters = yarn
    return model_class(cfg)


def _yarn_parameters(recipe):
    """The ``rope_parameters`` of YaRN scaling the recipe asks for (``yarn_factor`` > 0), else None."""
    factor = float(recipe.get("yarn_factor", 0.0))
    if factor == 0.0:
        return None
    if factor < 1.0:
        raise ValueError(f"yarn_factor must be 0 (no scaling) or >= 1, got {factor}")
    original = int(recipe.get("yarn_original_max", 2048))
    if original < 1:
        raise ValueError(f"yarn_original_max must be >= 1, got {original}")
    return dict(rope_type="yarn", rope_theta=10000.0, factor=factor,
                original_max_position_embeddings=original)


def _lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _schedule_step(step, steps, horizon, gate_step):
    """The step of the ``horizon``-step lr schedule that ``step`` of a ``steps``-step run uses.

    Before the gate (``gate_step`` None: the look-up has not formed yet) it is ``step`` itself, so the
    learning rates up to the gate - and with them the step at which the look-up forms - do not depend
    on ``steps``; after it the rest of the schedule is stretched over the remaining ``steps - gate``
    steps. With ``horizon == steps`` this is the plain schedule."""
    if gate_step is None or steps <= horizon:
        return step
    if gate_step >= horizon:
        return horizon - 1
    return gate_step + (step - gate_step) * (horizon - gate_step) / (steps - gate_step)


def _encode_with_mask(tok, text, spans):
    """Token ids of ``text`` and a 0/1 loss mask: 1 on tokens inside ``spans`` (chars)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    j = 0
    for (s, e) in enc["offset_mapping"]:
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask.append(1 if j < len(spans) and spans[j][0] <= s < spans[j][1] else 0)
    return list(enc["input_ids"]), mask


INDUCTION_ALPHABET = string.ascii_uppercase + string.digits


def induction_training_ids(tok, rng, length, alphabet=INDUCTION_ALPHABET):
    """A dense induction sequence of about ``length`` tokens: ``<bos>`` and a random string S of
    letters and digits (55% of the length), then chunks of S (random start, 4-10 tokens), each after a
    ``<doc>`` separator. Returns (ids, mask) with mask 3 on every chunk token after the first.
    ``alphabet`` (default: the 36 upper-case letters and digits) is what S is drawn from; a small one
    makes short n-grams recur, so a chunk is found only by matching its longer prefix.

    Every masked token is predictable only by finding the chunk so far in S (n-gram induction at a
    random distance, no fixed offset to learn), so every one of them trains the circuit the recall
    look-up needs, where a recall sequence trains it on one token per ~20 (the first value digit).
    """
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 16:
        raise ValueError(f"length must be >= 16 tokens (a string and one chunk), got {length}")
    if not isinstance(alphabet, str) or len(set(alphabet)) < 2 or not set(alphabet) <= set(INDUCTION_ALPHABET):
        raise ValueError(f"alphabet must be a str of >= 2 distinct letters/digits, got {alphabet!r}")
    n = max(12, int(length * 0.55))
    s = "".join(rng.choice(alphabet) for _ in range(n))
    ids = tok("<bos>" + s, add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)
    sep = tok.convert_tokens_to_ids("<doc>")
    while len(ids) < length - 11:
        k = rng.randint(4, 10)
        i = rng.randrange(0, n - k)
        ids += [sep] + tok(s[i:i + k], add_special_tokens=False)["input_ids"]
        mask += [0, 0] + [3] * (k - 1)
    return ids, mask


def recall_batch(tok, rng, progress, r):
    """One recall batch. ``progress`` in [0, 1] is the curriculum position: the longest
    context grows from ``start_len`` to ``max_len`` with it. A share ``induction_share`` of the
    sequences are dense induction sequences (`induction_training_ids`) of the same length."""
    from . import tasks
    cur_max = int(r["start_len"] + (r["max_len"] - r["start_len"]) * min(1.0, progress))
    # a share p_max of the batches at the current maximum length, the rest anywhere below
    L = cur_max if rng.random() < r["p_max"] else rng.randint(r["min_len"], cur_max)
    bs = max(1, r["tokens_per_step"] // L)
    ids, masks = [], []
    for _ in range(bs):
        if rng.random() < r["induction_share"]:
            # after the look-up has formed, a share of the induction strings uses a random small
            # alphabet (6-35 symbols): at 2,048 tokens a recall value's digits 2-3 are ambiguous given
            # one or two digits (~29 / ~3 records share them), so the copy must match the whole
            # "KEY=d1d2" prefix; over 36 symbols a 2-gram already identifies the chunk. No random
            # draw happens before the gate, so the stream up to the look-up is unchanged.
            share = r.get("small_alphabet_share", 0.0)
            alphabet = INDUCTION_ALPHABET
            if progress > 0 and share > 0 and rng.random() < share:
                alphabet = "".join(rng.sample(INDUCTION_ALPHABET, rng.randint(6, 35)))
            i, m = induction_training_ids(tok, rng, L, alphabet)
        else:
            # Many answered queries per sequence: far more look-up signal per forward pass.
            nq = max(1, min(r.get("max_queries", 32), int(L * r["queries_per_token"])))
            # after the look-up has formed, a share of the contexts draws its keys from a small
            # alphabet (hard negatives: keys sharing a letter, reversed pairs). No random draw happens
            # before that, so the data stream up to the look-up is the one the recipe always had.
            share = r.get("confusable_share", 0.0)
            confusable = progress > 0 and share > 0 and rng.random() < share
            vshare = r.get("value_collision_share", 0.0)
            collide = progress > 0 and vshare > 0 and rng.random() < vshare
            fshare = r.get("filler_share", 0.0)
            filler = rng.uniform(0.0, fshare) if progress > 0 and fshare > 0 else 0.0
            if filler == 0.0 and L - (nq - 1) * 12 > tasks.recall_max_context():
                filler = 1e-6  # records up to the unique keys, the rest filler
            text, spans = tasks.recall_training_text(rng, L, nq, confusable_keys=confusable,
                                                     shared_value_prefixes=collide, filler_share=filler)
            i, m = _encode_with_mask(tok, text, spans)
            # 2 = answer token (loss, and the curriculum's criterion); 1 = context token with loss
            m = [2 if a else (1 if r["context_loss"] else 0) for a in m]
        ids.append(i)
        masks.append(m)
    return ids, masks


def _recall_losses(model, inp, att, lab, ids, masks, answer_vocab=None):
    """(training loss, loss over the answer tokens only or None when the batch has none).

    The training loss is the mean over the answer (and context) tokens plus the mean over the
    induction tokens (full-vocabulary softmax: their targets are letters and digits)."""
    import torch
    import torch.nn.functional as F

    kind = torch.zeros_like(lab)
    for b, m in enumerate(masks):
        kind[b, :len(m)] = torch.tensor(m)
    logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
    tgt, kind = lab[:, 1:], kind[:, 1:]
    induction = kind == 3
    loss = logits.new_zeros(())
    if induction.any():
        loss = loss + F.cross_entropy(logits[induction], tgt[induction])
    recall = (kind == 1) | (kind == 2)
    answer_loss = None
    if recall.any():
        rl, rt = logits[recall], tgt[recall]
        if answer_vocab is not None:
            # softmax over the answer vocabulary only (digits, <eos>): tokens that are never targets get
            # no output gradient, so the tied embeddings of the key letters are not all pushed the same way
            remap = torch.full((logits.shape[-1],), -100, dtype=torch.long)
            remap[answer_vocab] = torch.arange(len(answer_vocab))
            rl, rt = rl[:, answer_vocab], remap[rt]
        ce = F.cross_entropy(rl, rt, ignore_index=-100, reduction="none")
        loss = loss + ce[rt != -100].mean()
        answer_loss = ce[kind[recall] == 2].detach().mean()
    return loss, answer_loss


def arith_batch(tok, rng, bs, style):
    """``bs`` arith training sequences in ``style`` ("teacher", "student" or "mixed":
    `tasks.arith_mixed`), loss mask on the completion and ``<eos>``."""
    from . import tasks
    ids, masks = [], []
    for _ in range(bs):
        s = rng.getrandbits(62) + 10**19
        ex = (tasks.arith_mixed(seed=s, tokenizer=tok) if style == "mixed"
              else tasks.arith(seed=s, style=style, tokenizer=tok))
        seq = ex.prompt_ids + ex.completion_ids + [tok.eos_token_id]
        ids.append(seq)
        masks.append([0] * len(ex.prompt_ids) + [1] * (len(ex.completion_ids) + 1))
    return ids, masks


def _collate(ids, masks, pad_id):
    import torch
    n = max(len(x) for x in ids)
    inp = torch.full((len(ids), n), pad_id, dtype=torch.long)
    lab = torch.full((len(ids), n), -100, dtype=torch.long)
    att = torch.zeros((len(ids), n), dtype=torch.long)
    for b, (x, m) in enumerate(zip(ids, masks)):
        inp[b, :len(x)] = torch.tensor(x)
        att[b, :len(x)] = 1
        t = torch.tensor(x)
        t[torch.tensor(m) <= 0] = -100
        lab[b, :len(x)] = t
    return inp, att, lab


def final_eval(model, tok, task, style, quick=False, n=None, filler_share=0.0):
    """Greedy exact match on the fixed evaluation sets (seed 0): recall at several
    context lengths (100 examples each), arith in the model's own ``style`` (200). A recall model
    trained with filler lines (``filler_share`` > 0) is also evaluated with half of the context
    filler up to 8,192 tokens (``accuracy@{L}f``)."""
    from .evaluate import evaluate
    out = {}
    if task == "recall":
        lengths = [512, 2048] if quick else [512, 1024, 2048, 3072, 4096]
        for L in lengths:
            k = n or (20 if quick else 100)
            out[f"accuracy@{L}"] = evaluate(model, tok, "recall", n=k, seed=0, context_tokens=L)["accuracy"]
        if filler_share > 0:
            for L in ([2048, 8192] if quick else [2048, 4096, 8192]):
                k = n or (20 if quick else 100)
                out[f"accuracy@{L}f"] = evaluate(model, tok, "recall", n=k, seed=0, context_tokens=L,
                                                 filler_share=0.5)["accuracy"]
    elif style == "mixed":
        # unprompted (greedy, the teacher style expected) and continuing traces another model began
        from .evaluate import arith_continuation, writes_teacher_style
        k = n or (30 if quick else 200)
        ev = evaluate(model, tok, "arith", n=k, seed=0, style="teacher")
        out["accuracy"] = ev["accuracy"]
        out["teacher_style_share"] = sum(writes_teacher_style(r["output"]) for r in ev["results"]) / k
        for st in ("student", "mixed"):
            out[f"continuation_accuracy_{st}"] = arith_continuation(model, tok, n=k, seed=0, style=st)["accuracy"]
    else:
        k = n or (30 if quick else 200)
        out["accuracy"] = evaluate(model, tok, "arith", n=k, seed=0, style=style)["accuracy"]
    return out


def train(task, role, seed, out, steps=None, lr=None, eval_every=0, threads=2,
          final_eval_quick=False, progress=True, eval_n=None, stop_after=None,
          save_intermediate=False, style=None, overrides=None):
    """Train one testbed model. ``style`` (arith only) is the writing style of the training traces;
    default: the role's own style (teacher -> "teacher", student -> "student"). A student trained on
    the teacher's style is the TIP pair's student (same style as its teacher, weaker)."""
    import torch
    from tqdm.auto import tqdm
    from .tokenizer import get_tokenizer

    if task not in ("recall", "arith"):
        raise ValueError(f"unknown task {task!r}; valid: recall, arith")
    if role not in ("teacher", "student"):
        raise ValueError(f"unknown role {role!r}; valid: teacher, student")
    if (task, role) not in RECIPES:
        raise ValueError(f"no recipe for task={task!r} role={role!r}; recall has only role 'teacher'")
    if task == "arith":
        style = role if style is None else style
        if style not in ("teacher", "student", "mixed"):
            raise ValueError(f"unknown style {style!r}; valid: teacher, student, mixed")
    elif style is not None:
        raise ValueError("style applies to the arith task only")
    r = dict(RECIPES.get((task, role, style), RECIPES[(task, role)]))
    for k, v in (overrides or {}).items():
        if k not in r:
            raise ValueError(f"unknown recipe entry {k!r}; valid: {', '.join(sorted(r))}")
        if isinstance(r[k], str):
            r[k] = str(v)
        elif isinstance(v, str):
            raise ValueError(f"recipe entry {k!r} is a number, got {v!r}")
        else:
            r[k] = type(r[k])(v)
    if steps is not None:
        r["steps"] = steps
        r["warmup"] = min(r["warmup"], max(1, steps // 10))
    if lr is not None:
        r["lr"] = lr
    torch.set_num_threads(threads)
    tok = get_tokenizer()
    model = build_model(r, tok, seed)
    n_params = sum(p.numel() for p in model.parameters())
    # the data stream of the role's own style keeps its historical seed string (reproducible checkpoints)
    stream = f"train:{task}:{role}:{seed}" if style in (None, role) else f"train:{task}:{role}:{style}:{seed}"
    rng = random.Random(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    answer_vocab = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")) + [tok.eos_token_id])
    t0 = time.time()
    cpu0 = time.process_time()  # CPU seconds of all threads: the cost without other jobs' contention
    n_tok = 0
    ema = None
    curriculum = 0.0
    # recall: the lr schedule up to the gate (the look-up forming) is the one of `lr_horizon` steps
    # whatever `steps` is; a longer run stretches only the schedule after the gate (`_schedule_step`)
    horizon = r["steps"] if task != "recall" else min(r["steps"], r.get("lr_horizon", r["steps"]))
    gate_step = None
    bar = tqdm(range(r["steps"]), desc=f"train {task}-{role}", disable=not progress,
               mininterval=5.0, file=sys.stderr)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        if task == "recall":
            # the curriculum starts once the answer loss is low (the look-up has formed at the
            # shortest lengths), then contexts grow linearly: the look-up is an induction circuit,
            # which does not depend on the length, and a loss gate at every step stalled the
            # curriculum (the loss over ever longer contexts hovers at the gate)
            if curriculum > 0 or (ema is not None and ema < r["ramp_loss"]):
                if gate_step is None:
                    gate_step = step
                curriculum += 1.0 / r["ramp_steps"]
            ids, masks = recall_batch(tok, rng, curriculum, r)
        else:
            ids, masks = arith_batch(tok, rng, r["batch"], style)
        inp, att, lab = _collate(ids, masks, tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = _lr_at(_schedule_step(step, r["steps"], horizon, gate_step), horizon,
                             r["lr"], r["warmup"])
        if task == "recall":
            answer_only = r["answer_softmax"] and curriculum == 0
            loss, answer_loss = _recall_losses(model, inp, att, lab, ids, masks,
                                               answer_vocab if answer_only else None)
        else:
            loss = answer_loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tok += int(att.sum())
        if answer_loss is not None:  # (a batch of induction sequences only has none)
            ema = answer_loss.item() if ema is None else 0.95 * ema + 0.05 * answer_loss.item()
        bar.set_postfix(loss="-" if ema is None else f"{ema:.3f}", L=inp.shape[1], cur=f"{curriculum:.2f}", tok_s=int(n_tok / (time.time() - t0)), refresh=False)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < r["steps"]:
            m = final_eval(model, tok, task, style, quick=True, n=eval_n,
                           filler_share=r.get("filler_share", 0.0))
            model.train()
            print(f"[step {step + 1}] loss={ema if ema is None else round(ema, 4)} curriculum={curriculum:.3f} " +
                  " ".join(f"{k}={v:.3f}" for k, v in m.items()), file=sys.stderr, flush=True)
            if save_intermediate:
                _save(model, tok, os.path.join(out, f"step{step + 1}"),
                      dict(m, steps=r["steps"], steps_run=step + 1, quick_eval=True))
    bar.close()
    train_s = time.time() - t0
    train_cpu_s = time.process_time() - cpu0
    model.eval()
    t1 = time.time()
    metrics = final_eval(model, tok, task, style, quick=final_eval_quick, n=eval_n,
                         filler_share=r.get("filler_share", 0.0))
    metrics.update(
        task=task, role=role, style=style, seed=seed, steps=r["steps"],
        steps_run=min(r["steps"], stop_after) if stop_after is not None else r["steps"], lr=r["lr"], params=n_params,
        final_loss=None if ema is None else round(ema, 5), curriculum=round(curriculum, 4), gate_step=gate_step, train_seconds=round(train_s, 1),
        train_cpu_seconds=round(train_cpu_s, 1),
        eval_seconds=round(time.time() - t1, 1), tokens_seen=n_tok,
        recipe={k: v for k, v in r.items()})
    _save(model, tok, out, metrics)
    print("METRICS " + json.dumps({k: v for k, v in metrics.items() if k != "recipe"},
                                  sort_keys=True), flush=True)
    return metrics


def _save(model, tok, out, metrics):
    os.makedirs(out, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)


def build_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m scrimp.testbed.train",
                                          description="Train a scrimp testbed model on CPU.")
    p.add_argument("--task", required=True, choices=["recall", "arith"],
                   help="the task the model learns: recall (KV Packet, IceCache) or arith (TIP, TESSY)")
    p.add_argument("--role", default="teacher", choices=["teacher", "student"],
                   help="arith: teacher (larger, teacher-style traces) or student; recall: teacher only")
    p.add_argument("--style", default=None, choices=["teacher", "student", "mixed"],
                   help="arith: writing style of the training traces (default: the role's own; mixed: "
                        "either style and mixtures within a trace, tasks.arith_mixed)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (time-boxed runs)")
    p.add_argument("--save-intermediate", action="store_true",
                   help="with --eval-every: also save a checkpoint to OUT/stepN at every evaluation")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one entry of the recipe (repeatable), e.g. --set layers=6")
    p.add_argument("--eval-every", type=int, default=0, help="quick eval every N steps (0: never)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--quick-eval", action="store_true", help="small final evaluation (smoke tests)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="examples per final evaluation (default 100 per recall length, 200 arith)")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help="no progress bars")
    return p


def run_from_args(args):
    if args.task == "recall" and args.role != "teacher":
        raise SystemExit("recall has a single model: use --role teacher (the default)")
    return train(args.task, args.role, args.seed, args.out, steps=args.steps, lr=args.lr,
                 eval_every=args.eval_every, threads=args.threads,
                 final_eval_quick=args.quick_eval, progress=not args.no_progress,
                 eval_n=args.eval_n, stop_after=args.stop_after,
                 save_intermediate=args.save_intermediate, style=args.style,
                 overrides=_parse_overrides(args.set))


def _parse_overrides(items):
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {it!r}")
        try:
            out[k.strip()] = float(v) if any(c in v for c in ".e") else int(v)
        except ValueError:
            out[k.strip()] = v.strip()  # a text entry (init); train() checks it against the recipe
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
