"""TIP scale-out: 2 gloo CPU processes, student replicated (DDP) or sharded (FSDP2 fully_shard), give the
same losses and weights as 1 process on the same batch; the FSDP2 checkpoint is a plain HF checkpoint."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_models import make_checkpoint  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.tip import OnPolicyDistiller
    torch.set_num_threads(1)
    student, teacher, out, mode = sys.argv[1:5]
    if mode != "single":
        torch.distributed.init_process_group("gloo")
    tok = AutoTokenizer.from_pretrained(student)
    s, t = AutoModelForCausalLM.from_pretrained(student), AutoModelForCausalLM.from_pretrained(teacher)
    d = OnPolicyDistiller(s, t, tok, teacher_tokenizer=tok, rule="soft_or", ratio=0.5, lr=1e-2, progress=False,
                          output_dir=out, fsdp=(mode == "fsdp"))
    g = torch.Generator().manual_seed(0)  # the same batch of 3 rollouts on every rank
    ids = torch.randint(0, len(tok), (3, 14), generator=g)
    attn = torch.ones_like(ids)
    attn[2, -4:] = 0
    resp = torch.zeros(3, 14, dtype=torch.bool)
    resp[:, 5:] = True
    resp[2, -4:] = False
    losses = [d.train_on_batches([(ids, attn, resp)])["loss"] for _ in range(3)]
    d.save_checkpoint()
    if d.rank == 0:
        json.dump({"losses": losses, "world": d.world}, open(os.path.join(out, "losses.json"), "w"))
    if mode != "single":
        torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("tip_parallel")
    student = make_checkpoint("qwen2", root, name="student")
    teacher = make_checkpoint("llama3", root, name="teacher", seed=1, hidden_size=96, intermediate_size=192,
                              pad_vocab_to=96)
    AutoTokenizer.from_pretrained(student).save_pretrained(teacher)
    script = root / "step.py"
    script.write_text(SCRIPT)

    done = {}

    def go(mode):
        if mode in done:
            return done[mode]
        out = root / mode
        if mode == "single":
            cmd = [sys.executable, str(script)]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   str(script)]
        r = subprocess.run(cmd + [student, teacher, str(out), mode], env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        from safetensors.torch import load_file
        done[mode] = (json.load(open(out / "losses.json")),
                      load_file(str(out / "checkpoint-3" / "model.safetensors")), out / "checkpoint-3")
        return done[mode]

    return go


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_batch(run, mode):
    from transformers import AutoModelForCausalLM
    single, w1, _ = run("single")
    multi, w2, path = run(mode)
    assert multi["world"] == 2 and single["world"] == 1
    # step 1: the same forward; steps 2-3: the averaged gradients and the (sharded) AdamW updates agree
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-7)
    assert single["losses"][2] != single["losses"][0]  # the weights did move
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    AutoModelForCausalLM.from_pretrained(path)  # the gathered FSDP2 / DDP student is a plain HF checkpoint
