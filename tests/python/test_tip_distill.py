"""The TIP training loop: steps, checkpoint + resume after a SIGKILL (bit-exact), DDP on 2 gloo CPU processes."""
import math
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("transformers")

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _tiny(tok, seed, hidden=32):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    return Qwen3ForCausalLM(cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from scrimp.testbed import get_tokenizer
    tok = get_tokenizer()
    root = tmp_path_factory.mktemp("tip_models")
    paths = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        d = str(root / name)
        _tiny(tok, seed).save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = d
    return paths


def _cli(models, out, steps, extra=()):
    return [sys.executable, "-c", "import sys; from scrimp.cli import main; sys.exit(main(sys.argv[1:]))",
            "tip", "distill", "--student", models["student"], "--teacher", models["teacher"], "--steps", str(steps),
            "--batch-size", "2", "--max-new-tokens", "6", "--out", str(out), "--checkpoint-every", "1",
            "--quiet", "--threads", "1", "--ratio", "0.5", "--device", "cpu", *extra]


def _state(out):
    """(step, student state dict, history) of the newest checkpoint under ``out``."""
    from safetensors.torch import load_file
    names = sorted((int(n.split("-")[1]), n) for n in os.listdir(out) if n.startswith("checkpoint-") and
                   not n.endswith(".tmp"))
    path = os.path.join(out, names[-1][1])
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    return st["step"], load_file(os.path.join(path, "model.safetensors")), st["history"]


def test_distiller_steps_and_logging():
    from scrimp.testbed import get_tokenizer
    from scrimp.tip import OnPolicyDistiller, arith_prompts
    tok = get_tokenizer()
    s, t = _tiny(tok, 0), _tiny(tok, 1)
    before = [p.detach().clone() for p in s.parameters()]
    d = OnPolicyDistiller(s, t, tok, rule="soft_or", ratio=0.5, batch_size=3, max_new_tokens=8, progress=False)
    hist = d.train(2, arith_prompts(tok))
    assert [r["step"] for r in hist] == [1, 2]
    for r in hist:
        assert r["kept_tokens"] == max(1, int(0.5 * r["response_tokens"]))
        assert abs(sum(r[f"q{i}_all"] for i in range(1, 5)) - 1) < 1e-6
        assert r["loss"] > 0 and math.isfinite(r["tokens_per_s"]) and r["peak_memory_mb"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, s.parameters()))
    from transformers import Qwen3Config, Qwen3ForCausalLM
    small = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok) - 3, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=f"teacher: its LM head has {len(tok) - 3} rows but the vocabulary has {len(tok)}"):
        OnPolicyDistiller(s, small, tok)


def _read_metrics(out):
    p = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_killed_run_resumes_bit_exact(models, tmp_path):
    total = 5
    # reference: uninterrupted
    ref = tmp_path / "ref"
    subprocess.run(_cli(models, ref, total), env=ENV, check=True, capture_output=True, timeout=300)
    # killed mid-way with SIGKILL, then resumed by rerunning the same command
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(models, out, 200), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(_read_metrics(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _state(out)[0]
    assert 1 <= done < 200
    if done >= total:
        pytest.skip("the run went past the comparison point before it was killed (machine too fast)")
    subprocess.run(_cli(models, out, total), env=ENV, check=True, capture_output=True, timeout=300)
    a, b = _state(ref), _state(out)
    assert a[0] == b[0] == total
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert [r["loss"] for r in a[2]] == [r["loss"] for r in b[2]]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{total}")  # the export is a normal HF checkpoint


def test_crash_at_the_checkpoint_commit_resumes_exactly(models, tmp_path, monkeypatch):
    """The commit point is the rename of ``checkpoint-N.tmp``: a crash just before it must resume from the
    previous checkpoint (left intact) with that step's RNG state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.tip import OnPolicyDistiller, arith_prompts

    tok = AutoTokenizer.from_pretrained(models["student"])

    def distiller(out):
        s = AutoModelForCausalLM.from_pretrained(models["student"])
        t = AutoModelForCausalLM.from_pretrained(models["teacher"])
        return OnPolicyDistiller(s, t, tok, rule="soft_or", ratio=0.5, batch_size=2, max_new_tokens=6,
                                 progress=False, output_dir=str(out), checkpoint_every=1)

    ref = distiller(tmp_path / "ref")
    ref.train(3, arith_prompts(tok))
    run = distiller(tmp_path / "run")
    real_rename = os.rename

    def crash_on_step2_commit(src, dst, *a, **k):
        if str(src).endswith("checkpoint-2.tmp"):
            raise KeyboardInterrupt("simulated kill")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", crash_on_step2_commit)
    with pytest.raises(KeyboardInterrupt):
        run.train(3, arith_prompts(tok))
    monkeypatch.setattr(os, "rename", real_rename)
    names = sorted(os.listdir(tmp_path / "run"))
    assert "checkpoint-1" in names and "checkpoint-2.tmp" in names and "checkpoint-2" not in names
    assert _state(tmp_path / "run")[0] == 1
    resumed = distiller(tmp_path / "run")
    resumed.train(3, arith_prompts(tok))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    for a, b in zip(ref.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    assert len(_read_metrics(tmp_path / "run")) == 3  # the step logged before the crash is not duplicated
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint")) == ["checkpoint-3"]
    os.remove(tmp_path / "run" / "checkpoint-3" / "rng-rank0.pt")
    with pytest.raises(RuntimeError, match="RNG state"):
        distiller(tmp_path / "run").train(4, arith_prompts(tok))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_gloo(models, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from scrimp.tip import OnPolicyDistiller, arith_prompts
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        tok = AutoTokenizer.from_pretrained({models['student']!r})
        s = AutoModelForCausalLM.from_pretrained({models['student']!r})
        t = AutoModelForCausalLM.from_pretrained({models['teacher']!r})
        d = OnPolicyDistiller(s, t, tok, rule="soft_or", ratio=0.5, batch_size=2, max_new_tokens=6, progress=False,
                              lr=1e-2)
        assert d.distributed and d.world == 2
        hist = d.train(2, arith_prompts(tok, rank), resume=False)
        flat = torch.cat([p.detach().flatten() for p in s.parameters()])
        torch.save({{"flat": flat, "hist": hist}}, os.path.join({str(tmp_path)!r}, f"rank{{rank}}.pt"))
        dist.destroy_process_group()
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # different prompts and rollouts per rank, identical weights after the all-reduced steps
    assert r0["hist"][0]["loss"] != r1["hist"][0]["loss"]
    torch.testing.assert_close(r0["flat"], r1["flat"], rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM
    init = torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(models["student"]).parameters()])
    assert not torch.allclose(init, r0["flat"])


def test_batched_arith_accuracy_matches_testbed_evaluate():
    from scrimp import testbed
    from scrimp.tip import arith_accuracy
    tok = testbed.get_tokenizer()
    m = _tiny(tok, 3).eval()
    ref = testbed.evaluate(m, tok, "arith", n=5, max_new_tokens=24)
    got = arith_accuracy(m, tok, n=5, batch_size=3, max_new_tokens=24)
    assert [r["output"] for r in got["results"]] == [r["output"] for r in ref["results"]]
    assert got["accuracy"] == ref["accuracy"]


def test_rollouts_stop_at_every_generation_config_eos():
    from scrimp.testbed import get_tokenizer
    from scrimp.tip import OnPolicyDistiller
    tok = get_tokenizer()
    s, t = _tiny(tok, 0), _tiny(tok, 1)
    prompt = tok("12+7=", add_special_tokens=False)["input_ids"]
    first = int(s.generate(torch.tensor([prompt]), max_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, -1])
    assert first != tok.eos_token_id
    s.generation_config.eos_token_id = [tok.eos_token_id, first]  # e.g. Llama-3-Instruct's <|eot_id|>
    d = OnPolicyDistiller(s, t, tok, temperature=0.0, batch_size=1, max_new_tokens=6, progress=False)
    assert d.stop_ids == [tok.eos_token_id, first]
    _, _, response = d.rollout([prompt])
    assert int(response.sum()) == 1  # the first sampled token is a stop id: the response ends there
