"""Peak memory of one TIP training step, measured in a fresh subprocess.

``python -m scrimp.tip.memory MODE RULE RATIO [--vocab ...]`` builds a random-weight Qwen3 student
(and a 2x wider teacher), runs one forward + backward (no optimizer) and prints one JSON line.
MODE ``trl-gkd`` / ``trl-tip`` is one ``compute_loss`` + backward of TRL's ``GKDTrainer`` / scrimp's
``TipGKDTrainer`` on the same batch (:func:`run_trl_step`). MODE ``plain`` is the anchor step (full-vocabulary float32 log-softmax at every response position, or at a
random ``RATIO`` subset gathered before the lm_head); ``lean`` is :func:`scrimp.tip.tip_loss`.
A warm-up step on one short sequence runs first (lazy imports and one-time initialisation are not the
step's memory). On CPU the number is the peak RSS during the step (VmHWM, reset just before it via
``/proc/self/clear_refs``) minus the RSS before it, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that large
buffers are returned to the OS when freed; on CUDA it is ``max_memory_allocated`` minus the memory
allocated before the step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict

import torch

DEFAULT_SHAPE = dict(vocab=32000, hidden=128, batch=4, prompt=64, response=448, dtype="bfloat16", device="cpu",
                     threads=1, chunk=256, student="", teacher="")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the last reset (falls back to ru_maxrss, the peak since start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _random_qwen3(seed: int, hidden: int, vocab: int, positions: int, device: str, dt):
    """A 2-layer random-weight Qwen3 of width ``hidden`` (the step's student or 2x-wider teacher)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=positions, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).to(device, dt)


def _measured(step, device: str):
    """Run ``step()`` once and return ``(its result, peak bytes above the memory before it, seconds,
    whether the CPU peak could be reset)``: CUDA ``max_memory_allocated``, else the RSS high-water mark."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    reset = _reset_peak_rss()
    before_rss = _rss_bytes()
    t = time.perf_counter()
    out = step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss_bytes() - before_rss
    return out, int(peak), time.perf_counter() - t, reset


def run_step(mode: str, rule: str, ratio: float, vocab: int, hidden: int, batch: int, prompt: int, response: int,
             dtype: str, device: str, threads: int, chunk: int, student: str = "", teacher: str = "") -> Dict:
    """One measured step in *this* process (use :func:`measure_step_memory` for a clean one). With
    ``student`` / ``teacher`` (testbed names or directories) the step runs on those models and a batch of
    ``batch`` arith examples instead of the random-weight shapes."""
    from .select import select
    from .step import plain_loss, tip_loss

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)

    if student:
        from .bench import arith_step_batch

        student_m, teacher_m, ids, attn, resp = arith_step_batch(student, teacher, batch, device, dt)
        vocab = student_m.get_output_embeddings().weight.shape[0]
    else:
        positions = prompt + response + 8
        student_m = _random_qwen3(0, hidden, vocab, positions, device, dt)
        teacher_m = _random_qwen3(1, 2 * hidden, vocab, positions, device, dt).eval()
        g = torch.Generator().manual_seed(0)
        L = prompt + response
        ids = torch.randint(0, vocab, (batch, L), generator=g).to(device)
        attn = torch.ones_like(ids)
        resp = torch.zeros(batch, L, dtype=torch.bool, device=device)
        resp[:, prompt:] = True
    student, teacher = student_m.train(), teacher_m
    for p in teacher.parameters():
        p.requires_grad_(False)
    def one_step(ids, attn, resp):
        if mode == "plain":  # the anchor; "random" gathers a random subset of hidden states first
            kept = None
            if ratio < 1.0:
                kept, _ = select({"entropy": torch.zeros(resp.shape)}, resp.cpu(), "random", ratio,
                                 torch.Generator().manual_seed(0))
                kept = kept.to(device)
            loss = plain_loss(student, teacher, ids, attn, resp, kept_mask=kept)
        elif mode == "lean":
            loss = tip_loss(student, teacher, ids, attn, resp, rule=rule, ratio=ratio,
                            generator=torch.Generator().manual_seed(0), chunk_tokens=chunk).loss
        else:
            raise ValueError(f"mode must be plain or lean, got {mode!r}")
        loss.backward()
        return loss

    # warm-up on one short sequence: lazy imports and one-time initialisation are not the step's memory
    w = min(ids.shape[1], int(torch.nonzero(resp[0]).min()) + 4)
    one_step(ids[:1, :w], attn[:1, :w], resp[:1, :w])
    student.zero_grad(set_to_none=True)
    loss, peak, seconds, reset = _measured(lambda: one_step(ids, attn, resp), device)
    return {"mode": mode, "rule": rule, "ratio": ratio, "peak_step_bytes": peak,
            "seconds": seconds, "loss": float(loss),
            "fp32_logits_bytes": int(resp.sum()) * vocab * 4, "peak_reset": reset}


def run_trl_step(mode: str, rule: str, ratio: float, vocab: int, hidden: int, batch: int, prompt: int, response: int,
                 dtype: str, device: str, threads: int, chunk: int, student: str = "", teacher: str = "") -> Dict:
    """One ``compute_loss`` + backward of TRL's ``GKDTrainer`` (MODE ``trl-gkd``: full student and teacher
    logits, TRL's generalized JSD) or :class:`scrimp.tip.trl_hook.TipGKDTrainer` (``trl-tip``: the lean step)
    on the same random batch, both built by TRL (``GKDConfig``, beta 1 = reverse KL);
    memory measured as in :func:`run_step`."""
    import tempfile

    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from .bench import testbed_tokenizer
    from .trl_hook import TipGKDTrainer

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    tok = testbed_tokenizer()  # pads; the models have ``vocab`` rows and the batch is random ids below it
    positions = prompt + response + 8

    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, lmbda=0.0, beta=1.0,
                     report_to="none", use_cpu=device == "cpu", save_strategy="no", disable_tqdm=True,
                     bf16=dtype == "bfloat16" and device != "cpu")
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    kw = dict(tip_rule=rule, tip_ratio=ratio, tip_chunk_tokens=chunk, tip_vocab_size=vocab) if mode == "trl-tip" else {}
    cls = TipGKDTrainer if mode == "trl-tip" else GKDTrainer
    tr = cls(model=_random_qwen3(0, hidden, vocab, positions, device, dt),
             teacher_model=_random_qwen3(1, 2 * hidden, vocab, positions, device, dt), args=args, train_dataset=ds,
             processing_class=tok, **kw)
    g = torch.Generator().manual_seed(0)
    L = prompt + response
    ids = torch.randint(0, vocab, (batch, L), generator=g).to(tr.model.device)
    labels = ids.clone()
    labels[:, :prompt] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def one_step(inp):
        loss = tr.compute_loss(tr.model, inp)
        loss.backward()
        return loss

    w = prompt + 4  # warm-up on one short sequence
    one_step({k: v[:1, :w] for k, v in inputs.items()})
    tr.model.zero_grad(set_to_none=True)
    loss, peak, seconds, reset = _measured(lambda: one_step(inputs), device)
    return {"mode": mode, "rule": rule if mode == "trl-tip" else "all", "ratio": ratio if mode == "trl-tip" else 1.0,
            "peak_step_bytes": peak, "seconds": seconds, "loss": float(loss),
            "fp32_logits_bytes": batch * response * vocab * 4, "peak_reset": reset}


def measure_step_memory(mode: str, rule: str = "all", ratio: float = 1.0, timeout: float = 900, **shape) -> Dict:
    """Run :func:`run_step` in a fresh Python process and return its JSON record."""
    cfg = dict(DEFAULT_SHAPE, **shape)
    args = [sys.executable, "-m", "scrimp.tip.memory", mode, rule, str(ratio)]
    for k, v in cfg.items():
        args += [f"--{k}", str(v)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(cfg["threads"]), PYTHONWARNINGS="ignore")
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"step memory measurement failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["plain", "lean", "trl-gkd", "trl-tip"])
    p.add_argument("rule")
    p.add_argument("ratio", type=float)
    for k, v in DEFAULT_SHAPE.items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = vars(p.parse_args(argv))
    mode = a.pop("mode")
    fn = run_trl_step if mode.startswith("trl-") else run_step
    print(json.dumps(fn(mode, a.pop("rule"), a.pop("ratio"), **a)))


if __name__ == "__main__":
    main()
