"""The TIP part of ``scrimp demo``: a few on-policy distillation steps, Soft-OR 50% vs all tokens."""
from __future__ import annotations

import io
import os
import statistics
import time


def _models():
    from .. import testbed

    have = all(os.path.isfile(os.path.join(testbed.path(n), "config.json")) for n in ("arith-student-teacher-style", "arith-teacher"))
    if have:
        s, tok = testbed.load("arith-student-teacher-style")
        t, _ = testbed.load("arith-teacher")
        return s, t, tok, "testbed arith-student-teacher-style <- arith-teacher"
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = testbed.get_tokenizer()

    def tiny(seed):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id))

    return tiny(0), tiny(1), tok, "random-weight tiny Qwen3 pair (arith checkpoints not found)"


def demo_section(quick: bool = True) -> str:
    """Run a short TIP comparison and return a printable report (about 30-60 s on 2 CPU cores)."""
    import copy

    from .distiller import OnPolicyDistiller, arith_prompts
    from .memory import measure_step_memory

    out = io.StringIO()
    steps = 2 if quick else 10
    student0, teacher, tok, what = _models()
    print(f"TIP on-policy distillation ({what}), {steps} steps x 4 rollouts each, reverse KL:", file=out)
    hdr = f"  {'selection':<14} {'kept':>6} {'loss(last)':>11} {'Q3 share kept/all':>18} {'resp tok/s':>11}"
    print(hdr, file=out)
    for rule, ratio in (("all", 1.0), ("soft_or", 0.5)):
        d = OnPolicyDistiller(copy.deepcopy(student0), teacher, tok, rule=rule, ratio=ratio, batch_size=4,
                              max_new_tokens=32 if quick else 96, lr=1e-4, seed=0, progress=False)
        hist = d.train(steps, arith_prompts(tok))
        kept = statistics.mean(r["kept_fraction"] for r in hist)
        q3k = statistics.mean(r["q3_kept"] for r in hist)
        q3a = statistics.mean(r["q3_all"] for r in hist)
        tps = statistics.mean(r["tokens_per_s"] for r in hist)
        print(f"  {rule + f' {ratio:.0%}':<14} {kept:6.2f} {hist[-1]['loss']:11.4f} {q3k:8.2f} / {q3a:<7.2f} {tps:11.0f}",
              file=out)
    shape = dict(vocab=32000, hidden=64, batch=2, response=128 if quick else 448, prompt=32)
    print(f"One training step's peak memory (random Qwen3, V=32000, {shape['batch']}x{shape['response']} response "
          "tokens, bf16, CPU peak RSS in a fresh process):", file=out)
    t0 = time.time()
    rows = [("plain fp32 log-softmax, all tokens", measure_step_memory("plain", "all", 1.0, **shape)),
            ("scrimp lean step, all tokens", measure_step_memory("lean", "all", 1.0, **shape)),
            ("scrimp lean step, Soft-OR 50%", measure_step_memory("lean", "soft_or", 0.5, **shape))]
    base = rows[0][1]["peak_step_bytes"]
    for name, r in rows:
        print(f"  {name:<36} {r['peak_step_bytes'] / 2 ** 20:8.1f} MiB  ({r['peak_step_bytes'] / base:4.2f}x)",
              file=out)
    print(f"  (memory runs took {time.time() - t0:.0f} s)", file=out)
    return out.getvalue()
