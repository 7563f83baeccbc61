"""On-policy distillation with TIP token selection: the training loop.

Each optimizer step: the student samples ``grad_accum`` micro-batches of ``batch_size`` responses
(``generate``; temperature / top-p / top-k as given), the teacher scores them, every response token is
scored (fused, chunked, no gradient), :func:`scrimp.tip.select` keeps a fraction per micro-batch, and
the mean reverse KL over the kept tokens (fused :func:`scrimp.kl_loss`, student LM head on kept rows
only, :class:`scrimp.tip.step.LeanStudent`) is minimised. Logged per step: loss, kept fraction,
quadrant shares, response tokens/s, peak memory.

Checkpoints: ``output_dir/checkpoint-N/`` (N = optimizer steps) is a Hugging Face checkpoint of the
student (``save_pretrained`` + the tokenizer: ``AutoModelForCausalLM.from_pretrained`` loads it) plus
``trainer_state.pt`` (optimizer, history) and one ``rng-rankR.pt`` per rank. It is written as
``checkpoint-N.tmp`` and renamed when complete (the commit point); older ones are then removed, so a
kill at any moment leaves the last checkpoint intact and rerunning resumes bit-exactly from it.

Scale-out (``torch.distributed`` initialised, world size > 1; every rank draws its own prompts and
selects within its own batch): the student is wrapped in ``DistributedDataParallel`` (``fsdp=False``)
or sharded with FSDP2 ``fully_shard`` (``fsdp=True``: each decoder layer one unit, embeddings + norm +
LM head the root unit; the teacher is replicated on every rank).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import hf
from ..distill_loss import kl_loss
from .head import LogitHead, check_same_vocabulary
from .select import RULES
from .step import LeanStudent, check_rollouts, teacher_hidden_states

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def is_out_of_memory(e: BaseException) -> bool:
    """A device (CUDA) or host allocation failure."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class StepOutOfMemory(RuntimeError):
    """A training step ran out of memory; the message gives the sizes that caused it."""


def _load_hf_weights(model, directory: str) -> None:
    """Load the safetensors of a ``save_pretrained`` directory into ``model`` (keys the file omits must be
    tied to keys it has, e.g. ``lm_head.weight`` tied to the embeddings)."""
    from safetensors.torch import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(directory, name)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if untied or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the student: missing {untied[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")


class OnPolicyDistiller:
    """TIP on-policy distillation of ``student`` from ``teacher`` (Hugging Face causal LMs sharing a vocabulary).

    Parameters
    ----------
    tokenizer : the student's tokenizer (pads the rollouts, is saved with every checkpoint).
    teacher_tokenizer : when given, checked to have the same vocabulary (ValueError naming the first
        differing token). Both LM heads are used over ``len(tokenizer)`` rows (heads padded past it are fine).
    rule, ratio : the token selector and kept fraction (see :func:`scrimp.tip.select`).
    kind, beta : the loss (``reverse`` KL as in the paper; ``forward`` or TRL's ``jsd``).
    lr, optimizer : AdamW learning rate, or a ready optimizer over the student's parameters.
    batch_size, grad_accum : rollouts per micro-batch (per rank) and micro-batches per optimizer step.
    max_new_tokens, temperature, top_p, top_k : rollout length limit and sampling (temperature 0: greedy;
        top_k 0: off).
    loss_temperature, chunk_tokens : the loss/score temperature; rows of logits scored at a time.
    output_dir, checkpoint_every : where checkpoints and ``metrics.jsonl`` go; 0 = only at the end.
    seed : seeds the selection generator and the sampling (offset by the rank).
    fsdp : shard the student with FSDP2 (needs ``torch.distributed`` initialised).
    rollout_engine : where the rollouts are sampled: None (default) is the student's Hugging Face ``generate``;
        an engine such as :class:`scrimp.integrations.vllm.rollouts.VLLMRollouts` has
        ``generate(prompts, max_new_tokens, temperature, top_p, top_k, stop_ids)`` (token ids of the responses)
        and ``sync(student)`` (load the student's current weights).
    sync_every : with a ``rollout_engine``, the student's weights are loaded into it before the first step
        and then every ``sync_every`` optimizer steps (1: the rollouts are always on-policy).
    """

    def __init__(self, student, teacher, tokenizer, *, teacher_tokenizer=None, rule: str = "soft_or",
                 ratio: float = 0.5, kind: str = "reverse", beta: float = 0.5, lr: float = 1e-4, optimizer=None,
                 batch_size: int = 8, grad_accum: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, loss_temperature: float = 1.0, chunk_tokens: int = 1024,
                 grad_clip: float = 1.0, output_dir: Optional[str] = None, checkpoint_every: int = 0, seed: int = 0,
                 progress: bool = True, device=None, fsdp: bool = False, rollout_engine=None, sync_every: int = 1):
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
        if not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        for name, v in (("batch_size", batch_size), ("grad_accum", grad_accum), ("max_new_tokens", max_new_tokens),
                        ("chunk_tokens", chunk_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not (temperature >= 0.0) or not (0.0 < top_p <= 1.0) or top_k < 0:
            raise ValueError(f"sampling: expected temperature >= 0, top_p in (0, 1], top_k >= 0; got "
                             f"{temperature}, {top_p}, {top_k}")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every: expected an int >= 1, got {sync_every!r}")
        if rollout_engine is not None and not (callable(getattr(rollout_engine, "generate", None)) and
                                               callable(getattr(rollout_engine, "sync", None))):
            raise ValueError("rollout_engine: expected an object with generate(...) and sync(student)")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected >= 0, got {checkpoint_every}")
        self.vocab_size = (check_same_vocabulary(tokenizer, teacher_tokenizer) if teacher_tokenizer is not None
                           else len(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: needs an eos token (rollouts end there and are padded with pad or eos)")
        # rollouts stop at the tokenizer's eos and at every id of the student's generation config
        # (Llama-3-Instruct lists <|eot_id|> and <|end_of_text|>)
        from ..packets.method import token_id_list

        gen_eos = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
        self.stop_ids: List[int] = list(dict.fromkeys(token_id_list(tokenizer.eos_token_id) + token_id_list(gen_eos)))
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1
        if fsdp and not self.distributed:
            raise ValueError("fsdp=True needs torch.distributed initialised with world size > 1 (run under torchrun)")
        if rollout_engine is not None and self.distributed:
            raise ValueError("rollout_engine: one colocated engine per training process is supported without "
                             "torch.distributed only; use the generate rollouts under torchrun")
        self.rollout_engine, self.sync_every = rollout_engine, sync_every
        self._synced_at: Optional[int] = None
        self.weight_syncs = 0
        self.fsdp = fsdp
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.student = student if fsdp else student.to(self.device)  # fully_shard moves each shard itself
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.lean = LeanStudent(self.student, self.vocab_size)  # refuses transforms it cannot reproduce
        self.teacher_head = LogitHead(self.teacher, self.vocab_size, "teacher")
        self.tokenizer = tokenizer
        self.rule, self.ratio, self.kind, self.beta = rule, float(ratio), kind, beta
        self.batch_size, self.grad_accum, self.max_new_tokens = batch_size, grad_accum, max_new_tokens
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.loss_temperature, self.chunk_tokens, self.grad_clip = loss_temperature, chunk_tokens, grad_clip
        self.output_dir, self.checkpoint_every, self.progress = output_dir, checkpoint_every, progress
        self.body = self.lean
        if self.distributed and fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in hf.decoder_layers(self.student):
                fully_shard(layer)
            self.body = fully_shard(self.lean)
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.body = DDP(self.lean, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = optimizer or torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad],
                                                        lr=lr, weight_decay=0.0)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed * 7919 + self.rank)
        torch.manual_seed(seed * 104729 + self.rank)
        self.step_count = 0
        self.history: List[Dict] = []
        self.last_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]]):
        """Sample one response per prompt from the student; returns right-padded ``input_ids``,
        ``attention_mask`` and ``response_mask`` (the sampled tokens up to and including ``<eos>``)."""
        pad, stops = self.pad_id, self.stop_ids
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("rollout: expected non-empty prompts (token id lists)")
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, P - len(p):] = torch.tensor(list(p))
            attn[i, P - len(p):] = 1
        if self.rollout_engine is not None:
            gen = self.rollout_engine.generate([list(p) for p in prompts], self.max_new_tokens, self.temperature,
                                               self.top_p, self.top_k, stops)
        else:
            self.student.eval()
            sampling = (dict(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
                        if self.temperature > 0 else dict(do_sample=False))
            kw = dict(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                      max_new_tokens=self.max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                      **sampling)
            if self.fsdp:  # inside the root FSDP unit's forward (its parameters gathered); ranks stop together
                out = self.body(generate=dict(kw, synced_gpus=True))
            else:
                out = self.student.generate(**kw)
            self.student.train()
            gen = out[:, P:].cpu().tolist()
        seqs, resp_lens = [], []
        for i, p in enumerate(prompts):
            g = list(gen[i])
            end = next((j for j, t in enumerate(g) if t in stops), None)
            if end is not None:
                g = g[:end + 1]
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
    def _sync_context(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of an optimizer step."""
        if self.distributed and self.fsdp:
            self.body.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.distributed and not last:
            return self.body.no_sync()
        return contextlib.nullcontext()

    def _oom(self, e, phase: str, batch) -> StepOutOfMemory:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch is not None:
            ids, _, resp = batch
            sizes = (f"{ids.shape[0]} rollouts x {ids.shape[1]} tokens ({int(resp.sum())} response tokens, "
                     f"longest response {int(resp.sum(1).max())})")
        else:
            sizes = f"{self.batch_size} rollouts x up to {self.max_new_tokens} new tokens"
        return StepOutOfMemory(
            f"out of memory on {self.device} in step {self.step_count + 1} ({phase}): micro-batch of {sizes}, "
            f"rule {self.rule} at ratio {self.ratio:g}, scoring chunk {self.chunk_tokens} rows x {self.vocab_size} "
            f"vocabulary; last checkpoint: {self.last_checkpoint or 'none written'} (intact). Lower the batch "
            f"size (and raise grad_accum), max_new_tokens or chunk_tokens, or shard the student (fsdp).")

    def train_on_batches(self, batches: Sequence[Sequence[torch.Tensor]], t_start: Optional[float] = None) -> Dict:
        """One optimizer step over ready micro-batches ``[(input_ids, attention_mask, response_mask), ...]``."""
        t0 = time.perf_counter() if t_start is None else t_start
        t1 = time.perf_counter()
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, kept, resp, quads = [], 0, 0, []
        for a, (ids, attn, rmask) in enumerate(batches):
            try:
                pred = check_rollouts(ids, attn, rmask)
                ht = teacher_hidden_states(self.teacher, ids, attn)
                with self._sync_context(a == len(batches) - 1):
                    fw = self.body(ids, attn, pred, ht, self.teacher_head, rule=self.rule, ratio=self.ratio,
                                   generator=self.generator, temperature=self.loss_temperature,
                                   chunk_tokens=self.chunk_tokens)
                    loss = kl_loss(fw.student_logits, fw.teacher_logits, self.kind, beta=self.beta,
                                   temperature=self.loss_temperature, reduction="mean")
                    (loss / len(batches)).backward()
            except Exception as e:
                if is_out_of_memory(e):
                    raise self._oom(e, "training", (ids, attn, rmask)) from e
                raise
            losses.append(float(loss.detach()))
            kept += fw.stats.kept_tokens
            resp += fw.stats.response_tokens
            quads.append((fw.stats.quadrant_all, fw.stats.quadrant_kept))
            del fw, loss, ht
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        t2 = time.perf_counter()
        self.step_count += 1
        n_rollouts = sum(b[0].shape[0] for b in batches)
        rec = {"step": self.step_count, "loss": sum(losses) / len(losses), "kept_fraction": kept / resp,
               "kept_tokens": kept, "response_tokens": resp,
               **{f"q{i + 1}_all": sum(q[0][i] for q in quads) / len(quads) for i in range(4)},
               **{f"q{i + 1}_kept": sum(q[1][i] for q in quads) / len(quads) for i in range(4)},
               "mean_response_len": resp / max(1, n_rollouts),
               "tokens_per_s": resp / max(t2 - t0, 1e-9), "rollout_s": t1 - t0, "train_s": t2 - t1,
               "peak_memory_mb": peak_memory_bytes(self.device) / 2 ** 20}
        if self.rollout_engine is not None:
            rec["weight_syncs"] = self.weight_syncs
        self.history.append(rec)
        return rec

    def sync_rollout_engine(self, force: bool = False) -> bool:
        """Load the student's weights into the rollout engine when ``sync_every`` steps have passed since the
        last load (or none was done, or ``force``); returns whether it did."""
        if self.rollout_engine is None:
            return False
        if not force and self._synced_at is not None and self.step_count - self._synced_at < self.sync_every:
            return False
        self.rollout_engine.sync(self.student)
        self._synced_at = self.step_count
        self.weight_syncs += 1
        return True

    def step(self, prompts: Sequence[Sequence[Sequence[int]]]) -> Dict:
        """One optimizer step: ``prompts`` holds one list of prompt token-id lists per micro-batch."""
        t0 = time.perf_counter()
        self.sync_rollout_engine()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = []
        for p in prompts:
            try:
                batches.append(self.rollout(p))
            except Exception as e:
                if is_out_of_memory(e):
                    raise self._oom(e, "rollout", None) from e
                raise
        return self.train_on_batches(batches, t_start=t0)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> List[int]:
        if not self.output_dir or not os.path.isdir(self.output_dir):
            return []
        return sorted(int(m.group(1)) for m in map(_CKPT.match, os.listdir(self.output_dir)) if m)

    def _barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def _full_state(self):
        """(student state dict on CPU or None, optimizer state dict or None) for rank 0; collective under FSDP."""
        if not self.fsdp:
            return None, (self.optimizer.state_dict() if self.rank == 0 else None)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.body, options=opts)
        osd = get_optimizer_state_dict(self.body, self.optimizer, options=opts)
        if self.rank != 0:
            return None, None
        return {k[len("student."):]: v for k, v in msd.items()}, osd

    def save_checkpoint(self) -> Optional[str]:
        """Write ``output_dir/checkpoint-N`` (N = steps done) atomically; returns its path (None without
        ``output_dir``). Every rank takes part (the state is gathered under FSDP)."""
        if not self.output_dir:
            return None
        final = os.path.join(self.output_dir, f"checkpoint-{self.step_count}")
        tmp = final + ".tmp"
        model_sd, optim_sd = self._full_state()
        if self.rank == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            self.student.save_pretrained(tmp, state_dict=model_sd)
            self.tokenizer.save_pretrained(tmp)
            torch.save({"step": self.step_count, "optimizer": optim_sd, "history": self.history,
                        "config": {"rule": self.rule, "ratio": self.ratio, "kind": self.kind, "world": self.world,
                                   "fsdp": self.fsdp}}, os.path.join(tmp, "trainer_state.pt"))
        self._barrier()
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        self._barrier()
        if self.rank == 0:
            if os.path.isdir(final):  # the same step written again (a resumed run that redid it)
                shutil.rmtree(final)
            os.rename(tmp, final)  # the commit point
            for n in self._checkpoints():
                if n != self.step_count:
                    shutil.rmtree(os.path.join(self.output_dir, f"checkpoint-{n}"), ignore_errors=True)
        self._barrier()
        self.last_checkpoint = final
        return final

    def load_checkpoint(self) -> bool:
        """Resume from the newest complete ``output_dir/checkpoint-N`` if there is one; returns whether it did.

        Restores weights, optimizer, history and this rank's RNG state, and rewrites ``metrics.jsonl`` to
        the checkpoint's history (steps logged after it by a killed run are dropped: they will be redone)."""
        found = self._checkpoints()
        if not found:
            return False
        path = os.path.join(self.output_dir, f"checkpoint-{found[-1]}")
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        rpath = os.path.join(path, f"rng-rank{self.rank}.pt")
        if not os.path.isfile(rpath) or state["config"].get("world", 1) != self.world:
            raise RuntimeError(f"cannot resume from {path}: it was written by {state['config'].get('world', 1)} "
                               f"process(es), this run has {self.world} (its RNG state {rpath} is missing)")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            msd = {}
            if self.rank == 0:
                from transformers import AutoModelForCausalLM
                full = AutoModelForCausalLM.from_pretrained(path, dtype=next(iter(state_dtypes(self.student))))
                msd = {f"student.{k}": v for k, v in full.state_dict().items()}
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(self.body, msd, options=opts)
            set_optimizer_state_dict(self.body, self.optimizer, state["optimizer"] if self.rank == 0 else {},
                                     options=opts)
        else:
            _load_hf_weights(self.student, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.history = list(state.get("history", []))
        r = torch.load(rpath, weights_only=False)
        torch.set_rng_state(r["torch"])
        self.generator.set_state(r["generator"])
        random.setstate(r["python"])
        if "cuda" in r and self.device.type == "cuda":
            torch.cuda.set_rng_state(r["cuda"], self.device)
        if self.rank == 0:
            metrics = os.path.join(self.output_dir, "metrics.jsonl")
            with open(metrics + ".tmp", "w") as f:
                for rec in self.history:
                    f.write(json.dumps(rec) + "\n")
            os.replace(metrics + ".tmp", metrics)
        self.last_checkpoint = path
        self._synced_at = None  # the rollout engine holds other weights now
        return True

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int, prompt_fn: Callable[[int, int], List[List[int]]], resume: bool = True,
              log_fn: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Run until ``steps`` optimizer steps in total (counting resumed ones). ``prompt_fn(i, batch_size)``
        gives the prompts of micro-batch ``i`` (= step index when ``grad_accum`` is 1). Appends every record
        to ``output_dir/metrics.jsonl`` (rank 0)."""
        if resume:
            self.load_checkpoint()
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=self.step_count, desc=f"tip distill {self.rule}@{self.ratio:g}")
        for s in range(self.step_count, steps):
            micro = [prompt_fn(s * self.grad_accum + a, self.batch_size) for a in range(self.grad_accum)]
            rec = self.step(micro)
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
        if self.output_dir and self.last_checkpoint != os.path.join(self.output_dir, f"checkpoint-{self.step_count}"):
            self.save_checkpoint()
        return self.history


def state_dtypes(model):
    """The floating dtypes of ``model``'s parameters, most common first."""
    from collections import Counter
    c = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return [d for d, _ in c.most_common()]
