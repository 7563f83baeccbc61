"""On-policy distillation with TIP token selection: the training loop.

Each step: the student samples responses to a batch of prompts (``generate``, temperature 1.0, no
top-k/top-p), the teacher scores them in the same forward that the student trains on, every
response token is scored (fused, chunked, no gradient), :func:`scrimp.tip.select` keeps a fraction,
and the mean reverse KL over the kept tokens (fused :func:`scrimp.kl_loss`, student lm_head on kept
rows only) is minimised. Logging: kept fraction, quadrant shares, loss, response tokens/s, peak memory.
Checkpoints hold the student, optimizer, step and every RNG state, so a killed run resumes exactly.

Under ``torchrun`` (``torch.distributed`` initialised, world size > 1) the student is wrapped in
``DistributedDataParallel``; each rank draws its own prompts and selects within its own batch.
"""
from __future__ import annotations

import json
import os
import random
import resource
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .select import RULES
from .step import hidden_states, tip_loss


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _StudentBody(torch.nn.Module):
    """What DDP wraps: the student's forward up to the final hidden states (the lm_head runs outside,
    on the kept rows only; its parameters still get their gradients all-reduced by DDP's hooks)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask):
        return hidden_states(self.student, input_ids, attention_mask)


def arith_prompts(tokenizer, rank: int = 0) -> Callable[[int, int], List[List[int]]]:
    """Prompt source for the testbed ``arith`` task: ``f(step, batch_size)`` -> token id lists. Seeds start
    at 10^7 (disjoint from the evaluation seeds) and differ per step and rank."""
    from ..testbed import tasks

    def make(step: int, batch_size: int) -> List[List[int]]:
        base = 10_000_000 + (step * 1009 + rank) * batch_size
        return [tasks.arith(seed=base + j, tokenizer=tokenizer).prompt_ids for j in range(batch_size)]

    return make


@torch.no_grad()
def arith_accuracy(model, tokenizer, n: int = 50, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 128,
                   style: str = "teacher") -> dict:
    """Batched greedy version of ``scrimp.testbed.evaluate(model, tok, "arith", n, seed)``: the same
    examples (seeds ``seed * 1_000_003 + i``), budget, answer extraction and exact-match rule, with the
    prompts left-padded into batches (much faster on CPU). Returns ``{"accuracy", "n", "results"}``."""
    from ..testbed import tasks
    from ..testbed.evaluate import arith_final_answer

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    exs = [tasks.arith(seed=seed * 1_000_003 + i, style=style, tokenizer=tokenizer) for i in range(n)]
    results = []
    try:
        for b0 in range(0, n, batch_size):
            chunk = exs[b0:b0 + batch_size]
            P = max(len(e.prompt_ids) for e in chunk)
            ids = torch.full((len(chunk), P), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, e in enumerate(chunk):
                ids[i, P - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
                attn[i, P - len(e.prompt_ids):] = 1
            out = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for e, row in zip(chunk, out[:, P:].tolist()):
                new = row[:row.index(eos)] if eos in row else row
                text = tokenizer.decode(new, skip_special_tokens=True)
                got = arith_final_answer(text)
                results.append({"expected": e.answer, "got": got, "output": text, "correct": got == e.answer})
    finally:
        if was_training:
            model.train()
    return {"accuracy": sum(r["correct"] for r in results) / n, "n": n, "results": results}


class OnPolicyDistiller:
    """TIP on-policy distillation of ``student`` from ``teacher`` (Hugging Face causal LMs sharing a vocabulary).

    Parameters
    ----------
    rule, ratio : the token selector and kept fraction (see :func:`scrimp.tip.select`).
    kind, beta : the loss (``reverse`` KL as in the paper; ``forward`` or TRL's ``jsd``).
    lr, optimizer : AdamW learning rate, or a ready optimizer over the student's parameters.
    batch_size, max_new_tokens : rollouts per step (per rank) and their length limit.
    sample_temperature : the rollout temperature (1.0: the student's own distribution).
    output_dir, checkpoint_every : where ``checkpoint.pt`` and ``metrics.jsonl`` go; 0 = only at the end.
    seed : seeds the selection generator and the sampling (offset by the rank).
    """

    def __init__(self, student, teacher, tokenizer, *, rule: str = "soft_or", ratio: float = 0.5,
                 kind: str = "reverse", beta: float = 0.5, lr: float = 1e-4, optimizer=None,
                 batch_size: int = 8, max_new_tokens: int = 64, sample_temperature: float = 1.0,
                 loss_temperature: float = 1.0, chunk_tokens: int = 1024, grad_clip: float = 1.0,
                 output_dir: Optional[str] = None, checkpoint_every: int = 0, seed: int = 0,
                 progress: bool = True, device=None):
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
        if not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        hs = student.get_output_embeddings().weight.shape[0]
        ht = teacher.get_output_embeddings().weight.shape[0]
        if hs != ht:
            raise ValueError(f"teacher/student vocabulary mismatch: student {hs}, teacher {ht}")
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.rule, self.ratio, self.kind, self.beta = rule, float(ratio), kind, beta
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.sample_temperature, self.loss_temperature = sample_temperature, loss_temperature
        self.chunk_tokens, self.grad_clip = chunk_tokens, grad_clip
        self.output_dir, self.checkpoint_every, self.progress = output_dir, checkpoint_every, progress
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.body = _StudentBody(self.student)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.body = DDP(self.body, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = optimizer or torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad],
                                                        lr=lr, weight_decay=0.0)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed * 7919 + self.rank)
        torch.manual_seed(seed * 104729 + self.rank)
        self.step_count = 0
        self.history: List[Dict] = []

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]]):
        """Sample one response per prompt from the student; returns right-padded ``input_ids``,
        ``attention_mask`` and ``response_mask`` (the sampled tokens up to and including ``<eos>``)."""
        tok = self.tokenizer
        pad, eos = tok.pad_token_id, tok.eos_token_id
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, P - len(p):] = torch.tensor(list(p))
            attn[i, P - len(p):] = 1
        self.student.eval()
        out = self.student.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), do_sample=True,
            temperature=self.sample_temperature, top_k=0, top_p=1.0, max_new_tokens=self.max_new_tokens,
            eos_token_id=eos, pad_token_id=pad, use_cache=True)
        self.student.train()
        gen = out[:, P:].cpu()
        seqs, resp_lens = [], []
        for i, p in enumerate(prompts):
            g = gen[i].tolist()
            if eos in g:
                g = g[:g.index(eos) + 1]
            seqs.append(list(p) + g)
            resp_lens.append(len(g))
        L = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        response = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, (s, p, r) in enumerate(zip(seqs, prompts, resp_lens)):
            input_ids[i, :len(s)] = torch.tensor(s)
            attention[i, :len(s)] = 1
            response[i, len(p):len(p) + r] = True
        return input_ids.to(self.device), attention.to(self.device), response.to(self.device)

    # ------------------------------------------------------------------ one step
    def step(self, prompts: Sequence[Sequence[int]]) -> Dict:
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        input_ids, attention, response = self.rollout(prompts)
        t1 = time.perf_counter()
        self.student.train()
        hs = self.body(input_ids, attention)
        out = tip_loss(self.student, self.teacher, input_ids, attention, response, rule=self.rule, ratio=self.ratio,
                       generator=self.generator, kind=self.kind, beta=self.beta, temperature=self.loss_temperature,
                       chunk_tokens=self.chunk_tokens, student_hidden=hs)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        t2 = time.perf_counter()
        self.step_count += 1
        n_resp = int(response.sum())
        st = out.stats
        rec = {"step": self.step_count, "loss": float(out.loss.detach()), "kept_fraction": st.kept_fraction,
               "kept_tokens": st.kept_tokens, "response_tokens": n_resp,
               **{f"q{i + 1}_all": v for i, v in enumerate(st.quadrant_all)},
               **{f"q{i + 1}_kept": v for i, v in enumerate(st.quadrant_kept)},
               "mean_response_len": n_resp / max(1, len(prompts)),
               "tokens_per_s": n_resp / max(t2 - t0, 1e-9), "rollout_s": t1 - t0, "train_s": t2 - t1,
               "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20}
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Optional[str]:
        return os.path.join(self.output_dir, "checkpoint.pt") if self.output_dir else None

    def _rng_path(self, step: int) -> str:
        return os.path.join(self.output_dir, f"rng-rank{self.rank}-step{step}.pt")

    def save_checkpoint(self) -> Optional[str]:
        """Atomically write ``output_dir/checkpoint.pt``.

        Every rank first writes its RNG state for this step to its own file; only then does rank 0
        replace ``checkpoint.pt`` (the commit point). A kill at any moment therefore leaves a
        checkpoint whose RNG files all exist, so a resumed run continues bit-exactly. RNG files of
        older steps are removed after the commit."""
        path = self._ckpt_path()
        if path is None:
            return None
        os.makedirs(self.output_dir, exist_ok=True)
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rpath = self._rng_path(self.step_count)
        torch.save({"step": self.step_count, "rng": rng}, rpath + ".tmp")
        os.replace(rpath + ".tmp", rpath)
        if self.distributed:
            torch.distributed.barrier()
        if self.rank == 0:
            state = {"step": self.step_count, "student": self.student.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "history": self.history,
                     "config": {"rule": self.rule, "ratio": self.ratio, "kind": self.kind}}
            tmp = path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, path)
        if self.distributed:
            torch.distributed.barrier()
        prefix = f"rng-rank{self.rank}-step"
        for name in os.listdir(self.output_dir):
            if name.startswith(prefix) and name.endswith(".pt") and name != os.path.basename(rpath):
                os.remove(os.path.join(self.output_dir, name))
        return path

    def load_checkpoint(self) -> bool:
        """Resume from ``output_dir/checkpoint.pt`` if it exists; returns whether it did.

        Restores weights, optimizer, history and this rank's RNG state of the same step, and rewrites
        ``metrics.jsonl`` to the checkpoint's history (steps logged after the last checkpoint by a
        killed run are dropped, since they will be redone)."""
        path = self._ckpt_path()
        if path is None or not os.path.isfile(path):
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        step = int(state["step"])
        rpath = self._rng_path(step)
        if not os.path.isfile(rpath):
            raise RuntimeError(f"cannot resume from {path}: its RNG state {rpath} is missing "
                               f"(was the output directory written by another world size?)")
        r = torch.load(rpath, weights_only=False)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = step
        self.history = list(state.get("history", []))
        torch.set_rng_state(r["rng"]["torch"])
        self.generator.set_state(r["rng"]["generator"])
        random.setstate(r["rng"]["python"])
        if "cuda" in r["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(r["rng"]["cuda"], self.device)
        if self.rank == 0:
            metrics = os.path.join(self.output_dir, "metrics.jsonl")
            with open(metrics + ".tmp", "w") as f:
                for rec in self.history:
                    f.write(json.dumps(rec) + "\n")
            os.replace(metrics + ".tmp", metrics)
        return True

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int, prompt_fn: Callable[[int, int], List[List[int]]], resume: bool = True,
              log_fn: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Run until ``steps`` total steps (counting resumed ones); ``prompt_fn(step, batch_size)`` gives
        each step's prompts. Appends every record to ``output_dir/metrics.jsonl`` (rank 0)."""
        if resume:
            self.load_checkpoint()
        it = range(self.step_count, steps)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=self.step_count, desc=f"distill {self.rule}@{self.ratio:g}")
        for s in it:
            rec = self.step(prompt_fn(s, self.batch_size))
            if self.output_dir and self.rank == 0:
                os.makedirs(self.output_dir, exist_ok=True)
                with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if log_fn:
                log_fn(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", kept=f"{rec['kept_fraction']:.2f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.output_dir and (not self.checkpoint_every or self.step_count % self.checkpoint_every):
            self.save_checkpoint()
        return self.history
