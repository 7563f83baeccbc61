"""TESSY on pairs of real Hugging Face models other than the testbed's: random-weight Llama teacher and
Qwen2 students (one with another tokenizer and special-token set), per-model think markers, incremental
decoding against re-prefill, resume, device/dtype, SFT through TRL and the loop, bad input."""
import json
import os

import pytest
import torch

from scrimp.cli import main
from scrimp.tessy import (GenParams, LexiconPredictor, LocalBackend, TessyConfig, latest_records, read_problems,
                          run_synthesis)
from scrimp.tessy.output import JsonlWriter
from scrimp.tessy.sft import encode_chat, sft

from hf_models import WORDS, make_checkpoint
from tessy_helpers import AlwaysCut, recording, scripted_lm

GREEDY = dict(temperature=0.0)
#: per-model markers: the teacher's are several BPE tokens each, the student's are other text altogether
MARKERS = dict(teacher_think_open="<think>", teacher_think_close="</think>",
               student_think_open="[[reason]]", student_think_close="[[/reason]]")
#: frequent corpus words as "style": with these the predictors switch roles every few tokens
STYLE_WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tessy-models")
    return {
        "teacher": make_checkpoint("llama3", root, num_hidden_layers=3, intermediate_size=192, name="llama-teacher"),
        "student": make_checkpoint("qwen2", root, name="qwen2-student"),
        "student_alt": make_checkpoint("qwen2", root, vocab_size=384, specials="alt", name="qwen2-student-alt"),
        "sliding": make_checkpoint("mistral-sliding", root, name="mistral-sliding"),
    }


def _problems(n, offset=0):
    return [{"id": f"p{i}", "prompt": " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(6))}
            for i in range(offset, offset + n)]


def _scripted_pair(ckpts):
    """Teacher writes '!' forever (its closing marker is '!!!', three tokens); the student (another
    tokenizer) writes '7' and stops."""
    t = LocalBackend(*scripted_lm(ckpts["teacher"], "!"), name="llama-teacher")
    s = LocalBackend(*scripted_lm(ckpts["student_alt"], "7", stop=True), name="qwen2-student-alt")
    return t, s


def _scripted_cfg(**kw):
    return TessyConfig(**{**dict(teacher_step=6, student_step=4, max_total_tokens=200, answer_max_tokens=4,
                                 max_retries=0), **MARKERS, "teacher_think_close": "!!!", **GREEDY, **kw})


def test_pair_with_different_tokenizers_and_markers_writes_the_students_format(ckpts):
    t, s = _scripted_pair(ckpts)
    recording(t), recording(s)
    assert len(t.tokenizer) != len(s.tokenizer) and t.tokenizer.eos_token != s.tokenizer.eos_token
    recs = []
    summ = run_synthesis(_problems(2), t, s, AlwaysCut("teacher", t.tokenizer), AlwaysCut("student", s.tokenizer),
                         _scripted_cfg(), on_record=recs.append)
    assert summ["ok"] == 2, recs
    rec = next(r for r in recs if r["id"] == "p0")
    # the student opens, the teacher's own marker '!!!' ends the thinking, the record uses the student's markers
    assert [(x["source"], x["text"], x["phase"]) for x in rec["spans"]] == [
        ("student", "7", "think"), ("teacher", "[[/reason]]", "think"), ("student", "7", "answer")]
    assert rec["completion"] == "[[reason]]7[[/reason]]7" and rec["answer"] == "7"
    # each model saw its own chat template and opening marker; the student answered after its closing one
    prompt = _problems(1)[0]["prompt"]
    assert f"<|user|>{prompt}<|eos|><|assistant|><think>7" in {x[0] for x in t.log}
    assert f"<s>[INST] {prompt} [/INST][[reason]]" in {x[0] for x in s.log}
    assert f"<s>[INST] {prompt} [/INST][[reason]]7[[/reason]]" in {x[0] for x in s.log}
    # provenance token counts in each model's tokenizer
    for span in rec["spans"]:
        for role, b in (("teacher", t), ("student", s)):
            assert span["tokens_per_model"][role] == len(b.tokenizer(span["text"], add_special_tokens=False)["input_ids"])
    per = rec["n_tokens_per_model"]
    assert per["student"]["total"] == rec["n_tokens"]["total"]
    assert per["teacher"]["teacher"] == rec["spans"][1]["tokens_per_model"]["teacher"]
    assert len(t.tokenizer("[[/reason]]", add_special_tokens=False)["input_ids"]) > 1  # a multi-token marker
    assert rec["config"]["markers"] == {"teacher": ["<think>", "!!!"], "student": ["[[reason]]", "[[/reason]]"]}
    assert t.sessions == 0 and s.sessions == 0  # the KV caches of finished problems are freed


def _random_pair(ckpts, decoding, student="student_alt"):
    t = LocalBackend.from_pretrained(ckpts["teacher"], name="teacher", device="cpu", decoding=decoding)
    s = LocalBackend.from_pretrained(ckpts[student], name="student", device="cpu", decoding=decoding)
    return recording(t), recording(s)


@pytest.mark.parametrize("student", ["student_alt", "student"])
def test_incremental_decoding_equals_reprefill_under_greedy(ckpts, student):
    cfg = TessyConfig(teacher_step=8, student_step=6, max_total_tokens=400, answer_max_tokens=4, max_retries=0,
                      **MARKERS, **GREEDY)
    runs = {}
    for decoding in ("reprefill", "incremental"):
        t, s = _random_pair(ckpts, decoding, student)
        recs = []
        summ = run_synthesis(_problems(3), t, s, LexiconPredictor("teacher", STYLE_WORDS),
                             LexiconPredictor("student", STYLE_WORDS), cfg, on_record=recs.append)
        runs[decoding] = (t, s, sorted(recs, key=lambda r: r["id"]), summ)
    (tr, sr, rr, _), (ti, si, ri, summ) = runs["reprefill"], runs["incremental"]
    # the same spans, in the same order, for every problem and model
    assert len(tr.log) + len(sr.log) > 40 and len(sr.log) >= 2 * 3  # several spans per model and problem
    for a, b in ((tr, ti), (sr, si)):
        assert sorted(a.log) == sorted(b.log)
    assert [(r["id"], r["finish_reason"]) for r in rr] == [(r["id"], r["finish_reason"]) for r in ri]
    # the incremental models prefilled a fraction of the tokens
    for a, b in ((tr, ti), (sr, si)):
        assert b.reused_tokens > 0 and b.prefill_tokens < a.prefill_tokens / 2
        assert b.sessions == 0
    assert summ["teacher_reused_tokens"] == ti.reused_tokens


def test_resume_after_a_killed_run(ckpts, tmp_path):
    probs = _problems(4)
    straight = str(tmp_path / "straight.jsonl")
    t, s = _scripted_pair(ckpts)
    preds = (AlwaysCut("teacher", t.tokenizer), AlwaysCut("student", s.tokenizer))
    run_synthesis(probs, t, s, *preds, _scripted_cfg(), out_path=straight)
    out = str(tmp_path / "resumed.jsonl")
    run_synthesis(probs[:2], t, s, *preds, _scripted_cfg(), out_path=out)
    with open(out, "ab") as f:
        f.write(b'{"id": "p2", "status": "o')  # killed while writing p2
    summ = run_synthesis(probs, t, s, *preds, _scripted_cfg(temperature=0.7), out_path=out)
    assert (summ["records"], summ["skipped"], summ["ok"]) == (2, 2, 2)
    a, b = latest_records(straight), latest_records(out)
    assert sorted(a) == sorted(b) == ["p0", "p1", "p2", "p3"]
    assert all(a[i]["completion"] == b[i]["completion"] for i in a)
    assert len(open(out).read().splitlines()) == 4


def test_device_dtype_and_sliding_window_refusal(ckpts):
    b = LocalBackend.from_pretrained(ckpts["student"], device="cpu", dtype="bfloat16")
    d = b.describe()
    assert (d["device"], d["dtype"], d["decoding"], d["architecture"]) == ("cpu", "bfloat16", "incremental",
                                                                          "Qwen2ForCausalLM")
    (r,) = b.generate_batch(["the river"], 3, GenParams(temperature=0))
    assert r.n_tokens == 3
    with pytest.raises(ValueError, match="incremental decoding cannot run this mistral model exactly: sliding_window"
                                         ".*decoding='reprefill'"):
        LocalBackend.from_pretrained(ckpts["sliding"], device="cpu")
    LocalBackend.from_pretrained(ckpts["sliding"], device="cpu", decoding="reprefill")
    with pytest.raises(ValueError, match="decoding must be one of"):
        LocalBackend.from_pretrained(ckpts["student"], decoding="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_cuda_device(ckpts):
    cfg = TessyConfig(teacher_step=8, student_step=6, max_total_tokens=160, answer_max_tokens=4, max_retries=0,
                      **MARKERS, **GREEDY)
    logs = {}
    for decoding in ("reprefill", "incremental"):
        t = recording(LocalBackend.from_pretrained(ckpts["teacher"], device="cuda", decoding=decoding))
        s = recording(LocalBackend.from_pretrained(ckpts["student_alt"], device="cuda", decoding=decoding))
        assert t.describe()["device"].startswith("cuda")
        run_synthesis(_problems(3), t, s, LexiconPredictor("teacher", STYLE_WORDS),
                      LexiconPredictor("student", STYLE_WORDS), cfg)
        logs[decoding] = sorted(t.log) + sorted(s.log)
    assert logs["reprefill"] == logs["incremental"]
    model, tok = scripted_lm(ckpts["student"], "7")
    tuned, m = sft(model, tok, [{"prompt": "the river", "completion": "[[reason]]7[[/reason]]7"}] * 4, steps=2,
                   batch_size=2, device="cuda", trainer="loop")
    assert m["device"].startswith("cuda")
    from scrimp.tessy import BoundaryPredictor, train_predictor
    p = BoundaryPredictor.new("teacher", tokenizer=tok, hidden=32, layers=1, device="cuda")
    train_predictor(p, [{"text": "the river of 7", "spans": [(0, 3)]}] * 4, max_steps=2, batch_size=2)
    assert p.device.type == "cuda" and len(p.predict(["the river"])[0][1]) > 0


# ----------------------------------------------------------------------------- SFT

def _chat_records():
    return [{"prompt": "the river of", "completion": "[[reason]] alpha 7 [[/reason]] 7"},
            {"messages": [{"role": "user", "content": "compute seven"}], "prompt": "compute seven",
             "completion": "[[reason]] beta [[/reason]] 11"}]


@pytest.mark.parametrize("trainer", ["trl", "loop"])
def test_sft_trains_a_few_steps(ckpts, trainer):
    if trainer == "trl":
        pytest.importorskip("trl")
    import scrimp
    model, tok = scrimp.load_model(ckpts["student_alt"], device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, m = sft(model, tok, _chat_records(), steps=3, batch_size=2, lr=1e-3, warmup=1, device="cpu",
                   trainer=trainer)
    assert m["trainer"] == trainer and m["steps"] == 3 and m["device"] == "cpu"
    assert m["final_loss"] == m["final_loss"] and m["final_loss"] > 0  # finite
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is kept
    # the loss is taken on the completion (and eos) only: prompt positions are masked
    ids, mask = encode_chat(tok, "the river of", "[[reason]] alpha")
    n_prompt = len(tok(tok.apply_chat_template([{"role": "user", "content": "the river of"}], tokenize=False,
                                               add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt) and ids[-1] == tok.eos_token_id


def test_sft_bad_input(ckpts):
    import scrimp
    model, tok = scrimp.load_model(ckpts["student"], device="cpu")
    with pytest.raises(ValueError, match="trainer must be one of"):
        sft(model, tok, _chat_records(), steps=1, trainer="keras")
    with pytest.raises(ValueError, match=r"SFT record 0: expected"):
        sft(model, tok, [{"prompt": "x"}], steps=1, trainer="loop")
    with pytest.raises(ValueError, match="no SFT records"):
        sft(model, tok, [], steps=1)


# ----------------------------------------------------------------------------- bad input and the CLI

@pytest.mark.parametrize("line,words", [
    ("{not json", "not valid JSON"),
    ('{"id": "a"}', 'no non-empty "prompt" string'),
    ('{"prompt": ""}', 'no non-empty "prompt" string'),
    ('["a list"]', "got a JSON list"),
    ('{"messages": [{"role": "user"}]}', '"messages" is not a non-empty list'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "the last message must be a non-empty user turn"),
    ('{"prompt": "q", "id": true}', '"id" must be a string or an integer'),
])
def test_malformed_problem_lines_name_the_line_and_the_expectation(tmp_path, line, words):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        read_problems(str(p))
    assert f"{p}:3: " in str(e.value) and words in str(e.value)
    assert 'expected a JSON object with "prompt"' in str(e.value) or "must be" in str(e.value)


def test_problem_formats(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": 3, "prompt": "a", "answer": 5}) + "\n" +
                 json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "b"}]}) + "\n")
    a, b = read_problems(str(p))
    assert a == {"id": "3", "prompt": "a", "reference": "5"}
    assert b["prompt"] == "b" and b["messages"][0]["role"] == "system"


@pytest.mark.parametrize("kw,words", [
    (dict(think_close=""), "closing think marker is empty"),
    (dict(student_think_close="  "), "only whitespace"),
    (dict(teacher_think_open=" <think>"), "leading/trailing whitespace"),
    (dict(think_open="<think>", think_close="<think>"), "contain one another"),
    (dict(teacher_think_open="<t>", teacher_think_close="<t>x"), "teacher's think markers"),
    (dict(student_think_close=7), "must be a string"),
    (dict(teacher_step=0), "teacher_step must be an int >= 1"),
])
def test_bad_marker_config_is_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        TessyConfig(**kw).validate()


def test_cli_synth_with_model_specs_markers_and_bad_input(ckpts, tmp_path, capsys):
    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps(p) + "\n" for p in _problems(2)) +
                     json.dumps({"id": "m", "messages": [{"role": "user", "content": "the river"}]}) + "\n")
    out = str(tmp_path / "o.jsonl")
    base = ["tessy", "synth", "--input", str(probs), "--out", out, "--teacher", ckpts["teacher"],
            "--student", ckpts["student_alt"], "--device", "cpu", "--dtype", "float32",
            "--student-think-open", "[[reason]]", "--student-think-close", "[[/reason]]",
            "--max-tokens", "60", "--max-retries", "0", "--temperature", "0", "--quiet", "--threads", "1"]
    assert main(base + ["--json", str(tmp_path / "s.json")]) == 0
    recs = latest_records(out)
    assert set(recs) == {"p0", "p1", "m"} and all(r["finish_reason"] == "length" for r in recs.values())
    rep = json.load(open(tmp_path / "s.json"))
    assert rep["backends"]["teacher"]["decoding"] == "incremental" and rep["summary"]["records"] == 3
    assert rep["backends"]["student"]["architecture"] == "Qwen2ForCausalLM"
    capsys.readouterr()
    assert main(["tessy", "stats", out, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"promt": "typo"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: no non-empty \"prompt\" string"):
        main(base[:3] + [str(bad)] + base[4:])
    with pytest.raises(SystemExit, match="closing think marker is empty"):
        main(base + ["--teacher-think-close", ""])
