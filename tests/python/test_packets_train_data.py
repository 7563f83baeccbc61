"""KV Packet on the user's data: JSONL reading and its bad lines, adapter training by self-distillation
(held-out KL falls, resumable), and `scrimp packets train` / `scrimp packets eval` end to end on JSONL
files with random-weight models of every supported architecture."""
import math
import json
import random

import pytest
import torch

import scrimp
from hf_models import SUPPORTED_ARCHS, WORDS, make_checkpoint
from scrimp import cli
from scrimp.packets import method as M
from scrimp.packets.data import read_examples
from scrimp.packets.prompt import build_prompt
from scrimp.packets.train import train_adapters


def _examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "." for _ in range(3)]
        ex = {"documents": docs, "question": "what is the " + rng.choice(WORDS) + "?"}
        if i % 2:
            ex["answer"] = rng.choice(WORDS)
        out.append(ex)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("packets-data")


@pytest.fixture(scope="module")
def data_file(root):
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _examples(16)))
    return str(path)


def test_bad_lines_are_named_with_what_was_expected(tmp_path):
    lines = [json.dumps(_examples(1)[0]), "[1, 2]", json.dumps({"question": "q?"}),
             json.dumps({"documents": [], "question": "q?"}), json.dumps({"documents": ["d"]}),
             "{not json", "", json.dumps({"documents": ["d", 3], "question": "q?"}),
             json.dumps({"documents": ["d"], "question": "q?", "answer": 5}), json.dumps(_examples(2)[1])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        read_examples(str(path))
    msg = str(e.value)
    assert "7 bad line(s)" in msg and "nothing was done" in msg
    for no, words in ((2, "got a JSON list"), (3, "no 'documents' key (a list of strings)"), (4, "'documents' is an empty list"),
                      (5, "no 'question' key (a string)"), (6, "not valid JSON (Expecting property name enclosed in double "
                                                     "quotes at column 2)"),
                      (8, "'documents'[1] is int, not a string"), (9, "'answer' (optional) is not non-empty text: 5")):
        assert f"bad.jsonl:{no}: {words}; expected a JSON object {{\"documents\"" in msg, (no, msg)
    with pytest.warns(UserWarning, match=r"bad.jsonl:2: got a JSON list; expected a JSON object.*line skipped"):
        good = read_examples(str(path), on_error="skip")
    assert [g.line for g in good] == [1, 10] and good[1].answer is not None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no usable lines"):
        read_examples(str(empty))
    with pytest.raises(FileNotFoundError):
        read_examples(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_training_on_user_prompts_lowers_the_heldout_kl(root, data_file, arch):
    model, tok = scrimp.load_model(make_checkpoint(arch, root), device="cpu", dtype="float32")
    prompts = [build_prompt(tok, e.documents, e.question, answer=e.answer) for e in read_examples(data_file)]
    ad, hist = train_adapters(model, prompts, tokenizer=tok, steps=24, lr=3e-3, heldout=4, max_answer_tokens=4,
                              progress=False, log=lambda s: None)
    assert hist["n_train"] == 12 and hist["n_heldout"] == 4 and hist["steps"] == 24
    before, after = hist["heldout_before"], hist["heldout_after"]
    assert after["kl"] < before["kl"], (before, after)
    assert 0 <= after["first_token_agreement"] <= 1
    assert ad.fingerprint == M.model_fingerprint(model)


def test_training_resumes_where_it_stopped(root, data_file, tmp_path):
    model, tok = scrimp.load_model(make_checkpoint("qwen2", root), device="cpu", dtype="float32")
    prompts = [build_prompt(tok, e.documents, e.question) for e in read_examples(data_file)[:4]]
    kw = dict(tokenizer=tok, steps=6, lr=1e-2, heldout=1, max_answer_tokens=3, progress=False, log=lambda s: None)
    straight, _ = train_adapters(model, prompts, **kw)
    ckpt = str(tmp_path / "state.pt")
    part, h1 = train_adapters(model, prompts, checkpoint=ckpt, max_seconds=0.0, **kw)  # stops after one step
    assert h1["stopped_early"] and h1["steps"] == 1
    resumed, h2 = train_adapters(model, prompts, checkpoint=ckpt, resume=True, **kw)
    assert h2["resumed_from"] == 1 and h2["steps"] == 6 and len(h2["loss"]) == 5
    torch.testing.assert_close(resumed.header, straight.header)
    torch.testing.assert_close(resumed.trailer, straight.trailer)
    with pytest.raises(ValueError, match="cannot resume .* other lr"):
        train_adapters(model, prompts, checkpoint=ckpt, resume=True, **{**kw, "lr": 2e-2})


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_cli_train_and_eval_on_jsonl(root, data_file, tmp_path, arch, capsys):
    ckpt = make_checkpoint(arch, root)
    out, mj, ej = str(tmp_path / "ad.safetensors"), str(tmp_path / "train.json"), str(tmp_path / "eval.json")
    assert cli.main(["packets", "train", "--model", ckpt, "--data", data_file, "--out", out, "--steps", "24",
                     "--lr", "3e-3", "--max-answer-tokens", "4", "--heldout", "0.25", "--quiet", "--json", mj,
                     "--device", "cpu", "--n-header", "4", "--n-trailer", "4"]) == 0
    m = json.load(open(mj))
    assert m["steps"] == 24 and m["n_heldout"] == 4 and m["heldout_after"]["kl"] < m["heldout_before"]["kl"]
    assert cli.main(["packets", "eval", "--model", ckpt, "--data", data_file, "--adapters", out, "--quiet",
                     "--max-new-tokens", "3", "--json", ej, "--device", "cpu",
                     "--methods", "full", "none", "kvpacket", "cacheblend-10", "epic", "kvpacket-attn-50"]) == 0
    table = capsys.readouterr().out
    assert "kvpacket" in table and "cacheblend-10" in table
    rows = {r["method"]: r for r in json.load(open(ej))["rows"]}
    assert set(rows) == {"full", "none", "kvpacket", "cacheblend-10", "epic", "kvpacket-attn-50"}
    assert rows["full"]["kl"] < 1e-6 and rows["full"]["agree"] == 1.0
    for r in rows.values():
        assert r["n"] == 16 and 0 <= r["accuracy"] <= 1 and math.isfinite(r["ttft_ms"]) and r["flops"] > 0
    assert rows["kvpacket"]["flops"] < rows["cacheblend-10"]["flops"] < rows["full"]["flops"]


def test_cli_bad_input_writes_nothing(root, tmp_path):
    ckpt = make_checkpoint("llama3", root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_examples(1)[0]) + "\n" + json.dumps({"documents": [], "question": "q?"}) + "\n")
    out = tmp_path / "ad.safetensors"
    with pytest.raises(ValueError, match="bad.jsonl:2: 'documents' is an empty list; expected a JSON object"):
        cli.main(["packets", "train", "--model", ckpt, "--data", str(bad), "--out", str(out), "--steps", "1", "--quiet"])
    assert not out.exists() and not (tmp_path / "ad.safetensors.train.pt").exists()
    # adapters trained for another model: both fingerprints named
    other = make_checkpoint("qwen2", root)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(e) + "\n" for e in _examples(3)))
    assert cli.main(["packets", "train", "--model", other, "--data", str(good), "--out", str(out), "--steps", "1",
                     "--heldout", "0", "--max-answer-tokens", "2", "--quiet"]) == 0
    mine = M.model_fingerprint(scrimp.load_model(other, tokenizer=False))
    theirs = M.model_fingerprint(scrimp.load_model(ckpt, tokenizer=False))
    with pytest.raises(ValueError, match=f"trained for model {mine} \\(dtype float32\\), not this model \\({theirs}, dtype float32\\)"):
        cli.main(["packets", "eval", "--model", ckpt, "--data", str(good), "--adapters", str(out), "--quiet"])
    # a model KV Packet cannot run exactly
    sliding = make_checkpoint("mistral-sliding", root)
    with pytest.raises(ValueError, match="sliding_window"):
        cli.main(["packets", "eval", "--model", sliding, "--data", str(good), "--methods", "full", "none", "--quiet"])
