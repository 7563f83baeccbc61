"""Supervised fine-tuning of the student on synthesized chat records.

Each record is one user prompt (or a list of chat messages) and one assistant completion. The
prompt is rendered with the tokenizer's chat template (generation prompt included), the completion
is followed by ``eos``, and the loss is taken on the completion tokens only (:func:`encode_chat`).

:func:`sft` trains with TRL's ``SFTTrainer`` when TRL is installed (``trainer="trl"``; the records
are handed over already tokenized, with a completion mask, so both trainers see the same tokens),
else with the short loop here (``trainer="loop"``): AdamW with warmup + cosine decay, a fixed
number of steps. Both run on the device asked for."""
from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from typing import List, Optional, Sequence

__all__ = ["sft", "encode_chat", "baseline_records", "trl_available", "SFT_TRAINERS"]

SFT_TRAINERS = ("auto", "trl", "loop")


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def encode_chat(tokenizer, prompt, completion: str):
    """``(input_ids, completion_mask)`` of one record: ``prompt`` (a user message string or a list of
    ``{"role", "content"}`` messages) through the chat template with the generation prompt, then the
    completion and ``eos``; the mask is 1 on the completion tokens."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


def _encode_records(tokenizer, records):
    data = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("completion"), str) or not (
                isinstance(r.get("prompt"), str) or isinstance(r.get("messages"), list)):
            raise ValueError(f"SFT record {i}: expected {{\"prompt\": str (or \"messages\": [...]), "
                             f"\"completion\": str}}")
        data.append(encode_chat(tokenizer, r.get("messages") or r["prompt"], r["completion"]))
    return data


def sft(model, tokenizer, records: Sequence[dict], steps: int = 100, batch_size: int = 16, lr: float = 5e-4,
        seed: int = 0, warmup: int = 10, copy_model: bool = True, log=None, device=None,
        trainer: str = "auto", progress: bool = False) -> tuple:
    """Fine-tune ``model`` on ``records`` (``{"prompt" | "messages", "completion"}``) for ``steps``
    optimizer steps of ``batch_size`` records on ``device`` (default: where the model is).
    ``trainer``: ``auto`` (TRL's ``SFTTrainer`` when TRL is installed, else the loop), ``trl`` or
    ``loop``. Returns ``(model, metrics)``; with ``copy_model`` the input model is left untouched."""
    import torch
    if not records:
        raise ValueError("no SFT records")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if trainer not in SFT_TRAINERS:
        raise ValueError(f"trainer must be one of {SFT_TRAINERS}, got {trainer!r}")
    if trainer == "auto":
        trainer = "trl" if trl_available() else "loop"
    elif trainer == "trl" and not trl_available():
        raise ValueError("trainer='trl' needs TRL (pip install trl); use trainer='loop'")
    data = _encode_records(tokenizer, records)
    if copy_model:
        model = copy.deepcopy(model)
    if device is not None:
        from scrimp.models import resolve_device
        model = model.to(resolve_device(device))
    torch.manual_seed(seed)
    run = _sft_trl if trainer == "trl" else _sft_loop
    t0 = time.time()
    model, m = run(model, tokenizer, data, steps, batch_size, lr, seed, warmup, log, progress)
    model.eval()
    m.update({"steps": steps, "seconds": time.time() - t0, "records": len(records), "trainer": trainer,
              "device": str(next(model.parameters()).device)})
    return model, m


def _sft_loop(model, tokenizer, data, steps, batch_size, lr, seed, warmup, log, progress):
    import torch
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    order: List[int] = []
    ema = None
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="sft", mininterval=2.0)
    for step in it:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            batch.append(data[order.pop()])
        n = max(len(x) for x, _ in batch)
        inp = torch.full((len(batch), n), pad, dtype=torch.long)   # [B, n], right padded
        att = torch.zeros_like(inp)
        lab = torch.full_like(inp, -100)
        for b, (ids, m) in enumerate(batch):
            t = torch.tensor(ids)
            inp[b, :len(ids)] = t
            att[b, :len(ids)] = 1
            t = t.clone()
            t[torch.tensor(m) == 0] = -100
            lab[b, :len(ids)] = t
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss = model(input_ids=inp.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"sft step {step + 1}/{steps} loss {ema:.4f}")
    return model, {"final_loss": ema}


def _sft_trl(model, tokenizer, data, steps, batch_size, lr, seed, warmup, log, progress):
    """TRL's ``SFTTrainer`` on the pre-tokenized records (``input_ids`` + ``completion_mask``: TRL
    skips its own tokenization and masks the prompt), the same optimizer settings as the loop."""
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    dev = next(model.parameters()).device
    ds = datasets.Dataset.from_dict({"input_ids": [x for x, _ in data], "completion_mask": [m for _, m in data]})
    losses = []

    class _Log(TrainerCallback):
        """Loss log and an optional progress bar on stderr (the Trainer's own print to stdout)."""
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if progress:
                import sys
                from tqdm.auto import tqdm
                self.bar = tqdm(total=steps, desc="sft (trl)", mininterval=2.0, file=sys.stderr)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
                if log is not None:
                    log(f"sft step {state.global_step}/{steps} loss {float(logs['loss']):.4f}")

    with tempfile.TemporaryDirectory(prefix="scrimp-sft-") as out:
        args = SFTConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98,
            max_grad_norm=1.0, seed=seed, data_seed=seed, logging_steps=max(1, steps // 5), save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=dev.type == "cpu", max_length=None,
            completion_only_loss=True, dataloader_num_workers=0, bf16=False, fp16=False)
        tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                        callbacks=[_Log()])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        tr.remove_callback(PrinterCallback)  # both print every log dict to stdout
        tr.remove_callback(ProgressCallback)
        out_metrics = tr.train()
    model = tr.model
    return model, {"final_loss": losses[-1] if losses else float(out_metrics.training_loss),
                   "train_loss": float(out_metrics.training_loss)}


def baseline_records(backend, problems: Sequence[dict], max_tokens: int = 128, params=None,
                     think_close: str = "</think>", think_open: Optional[str] = None) -> List[dict]:
    """Single-model traces (the Teacher-Only / Student-Only baselines): ``backend``
    writes the whole completion after the generation prompt, batched."""
    from .backends import GenParams
    tok = backend.tokenizer
    params = params or GenParams()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                       add_generation_prompt=True) for p in problems]
    res = backend.generate_batch(prompts, max_tokens, params)
    out = []
    for p, r in zip(problems, res):
        comp = r.text
        ans = comp.rsplit(think_close, 1)[1].strip() if think_close in comp else ""
        out.append({"id": p.get("id"), "prompt": p["prompt"], "completion": comp, "answer": ans,
                    "reference": p.get("reference"), "finish_reason": r.finish_reason,
                    "status": "ok" if r.finish_reason == "stop" and think_close in comp else "failed"})
    return out
