"""TESSY synthesis loop, local backend and output files."""
import asyncio
import json
import os

import pytest

from scrimp import tessy
from scrimp.tessy import (BackendError, GenParams, GenResult, LexiconPredictor, LocalBackend, TessyConfig,
                          find_repetition, latest_records, run_synthesis, stats)
from scrimp.tessy.output import JsonlWriter, finished_ids, repair_jsonl, to_chat_records, write_chat
from scrimp.tessy.synth import parse_shard

from tessy_helpers import ScriptBackend, needs_testbed, tiny_causal_lm

LEX_T, LEX_S = LexiconPredictor("teacher"), LexiconPredictor("student")


def _student_reply(trace, k):
    if trace == "":
        return " Okay so 1 plus 2"
    if trace.endswith("= 3."):
        return " Done. </think> 3"
    if trace.endswith("</think>"):
        return GenResult(" 3", "stop")
    if trace.endswith("Done. "):  # asked to close the thinking the teacher ended: it does not write its marker
        return " Hmm"
    raise AssertionError(f"unexpected student call on {trace!r}")


def _teacher_reply(trace, k):
    if trace == " Okay so ":
        return "1 + 2 = 3. Finally, 3"
    if trace.endswith("Done. "):
        return "</think> 3 and more"
    raise AssertionError(f"unexpected teacher call on {trace!r}")


def test_loop_spans_roles_and_record(tmp_path):
    out = str(tmp_path / "o.jsonl")
    t, s = ScriptBackend("T", _teacher_reply), ScriptBackend("S", _student_reply)
    cfg = TessyConfig(teacher_step=10, student_step=5)
    summ = run_synthesis([{"id": "a", "prompt": "Compute 1 + 2", "reference": "3"}], t, s, LEX_T, LEX_S, cfg,
                         out_path=out)
    assert summ["ok"] == 1 and summ["failed"] == 0
    (rec,) = latest_records(out).values()
    assert [(x["source"], x["text"], x["phase"]) for x in rec["spans"]] == [
        ("student", " Okay so ", "think"), ("teacher", "1 + 2 = 3.", "think"), ("student", " Done. ", "think"),
        ("teacher", "</think>", "think"), ("student", " 3", "answer")]
    assert rec["completion"] == "<think> Okay so 1 + 2 = 3. Done. </think> 3"
    assert rec["thinking"] == "<think> Okay so 1 + 2 = 3. Done. </think>" and rec["answer"] == "3"
    assert rec["completion"] == "<think>" + "".join(x["text"] for x in rec["spans"])
    n = rec["n_tokens"]
    assert n["total"] == sum(x["tokens"] for x in rec["spans"]) and n["student"] + n["teacher"] == n["total"]
    assert rec["student_token_share"] == pytest.approx(n["student"] / n["total"])
    assert rec["models"]["teacher"] == "T" and "lexicon" in rec["models"]["student_predictor"]
    assert rec["reference"] == "3" and rec["status"] == "ok" and rec["attempts"] == 1
    # step sizes: the student gets 5 tokens, the teacher 10 (the answer call its own budget)
    assert [k for _, k in s.calls[:2]] == [5, 5] and all(k == 10 for _, k in t.calls)
    assert stats(out)["answer_accuracy"] == 1.0


def test_teacher_first_and_no_boundary_continues():
    calls = []

    def teacher(trace, k):
        calls.append(trace)
        return "1 + 2" if trace == "" else (" = 3." if trace == "1 + 2" else " </think> x")

    def student(trace, k):
        return GenResult(" 3", "stop")

    cfg = TessyConfig(first="teacher")
    recs = []
    run_synthesis(["Compute 1 + 2"], ScriptBackend("T", teacher), ScriptBackend("S", student), LEX_T, LEX_S, cfg,
                  on_record=recs.append)
    # no style token: the teacher keeps the turn until it ends the thinking
    assert calls == ["", "1 + 2", "1 + 2 = 3."]
    assert recs[0]["completion"] == "<think>1 + 2 = 3. </think> 3"
    assert {x["source"] for x in recs[0]["spans"] if x["phase"] == "think"} == {"teacher"}


def test_a_teacher_span_through_the_marker_is_cut_there_and_the_student_closes_and_answers():
    """The teacher's span runs through its marker into the answer: the text after the marker is dropped, the
    student closes the thinking with its own phrase and marker, and its answer call sees the trace ending
    exactly with that marker and keeps its whole answer."""
    student_calls = []

    def teacher(trace, k):
        assert trace == ""
        return "12 + 30 = 42. </think> 4"  # no style token: one span, through the marker

    def student(trace, k):
        student_calls.append((trace, k))
        if trace == "12 + 30 = 42. ":
            return " Done. </think> 42 and more"
        if trace == "12 + 30 = 42.  Done. </think>":
            return GenResult(" 42", "stop")
        raise AssertionError(f"unexpected student call on {trace!r}")

    recs = []
    cfg = TessyConfig(first="teacher", teacher_step=10, student_step=7, answer_max_tokens=9)
    run_synthesis([{"prompt": "Compute 12 + 30", "reference": "42"}], ScriptBackend("T", teacher),
                  ScriptBackend("S", student), LEX_T, LEX_S, cfg, on_record=recs.append)
    (rec,) = recs
    assert rec["status"] == "ok", rec
    assert [(x["source"], x["text"], x["phase"]) for x in rec["spans"]] == [
        ("teacher", "12 + 30 = 42. ", "think"), ("student", " Done. </think>", "think"),
        ("student", " 42", "answer")]
    assert rec["answer"] == rec["reference"] == "42"
    assert rec["completion"] == "<think>12 + 30 = 42.  Done. </think> 42"
    # one closing span (student_step tokens), then the answer call with its own budget
    assert [k for _, k in student_calls] == [7, 9]


def test_the_teacher_marker_stands_when_the_student_does_not_close():
    """Per-model markers: the student, asked to close, writes no marker of its own within its span; the
    thinking ends where the teacher ended it, written with the student's marker."""
    def teacher(trace, k):
        return "1 + 2 = 3. </think> 3"

    def student(trace, k):
        if trace == "1 + 2 = 3. ":
            return " so so so </think>"  # the teacher's marker is not the student's
        if trace == "1 + 2 = 3. [[/reason]]":
            return GenResult(" 3", "stop")
        raise AssertionError(f"unexpected student call on {trace!r}")

    recs = []
    cfg = TessyConfig(first="teacher", student_think_close="[[/reason]]")
    run_synthesis(["Compute 1 + 2"], ScriptBackend("T", teacher), ScriptBackend("S", student), LEX_T, LEX_S, cfg,
                  on_record=recs.append)
    assert recs[0]["status"] == "ok", recs[0]
    assert [(x["source"], x["text"]) for x in recs[0]["spans"]] == [
        ("teacher", "1 + 2 = 3. [[/reason]]"), ("student", " 3")]


def test_failures_are_retried_then_recorded_and_the_run_continues(tmp_path):
    out = str(tmp_path / "f.jsonl")

    attempts = {"n": 0}

    def teacher(trace, k):
        attempts["n"] += 1
        return _teacher_reply(trace, k)

    class Flaky(ScriptBackend):
        async def generate(self, prompt, max_tokens, params):
            if "Compute 9" in prompt:
                return GenResult("", "stop")  # an empty reply
            if "Compute 8" in prompt:
                raise BackendError("HTTP 500 from http://x: boom")
            if "Compute 7" in prompt:
                return GenResult(" hmm hmm", "length")  # the student never leaves style -> length
            return await super().generate(prompt, max_tokens, params)

    probs = [{"id": "ok", "prompt": "Compute 1 + 2"}, {"id": "empty", "prompt": "Compute 9"},
             {"id": "err", "prompt": "Compute 8"}, {"id": "long", "prompt": "Compute 7"}]
    cfg = TessyConfig(max_retries=2, max_total_tokens=60)
    summ = run_synthesis(probs, ScriptBackend("T", teacher), Flaky("S", _student_reply), LEX_T, LEX_S, cfg,
                         out_path=out)
    recs = latest_records(out)
    assert summ["ok"] == 1 and summ["failed"] == 3 and len(recs) == 4
    assert recs["empty"]["finish_reason"] == "empty" and recs["empty"]["attempts"] == 3
    assert recs["err"]["finish_reason"] == "error" and "HTTP 500" in recs["err"]["error"]
    assert recs["long"]["finish_reason"] == "length"
    assert recs["ok"]["status"] == "ok"
    assert summ["failures"] == {"empty": 3, "error": 3, "length": 3}


def test_predictor_crash_is_a_failure_record():
    class Broken(LexiconPredictor):
        def predict(self, texts):
            raise RuntimeError("classifier exploded")
    recs = []
    summ = run_synthesis(["Compute 1 + 2"], ScriptBackend("T", _teacher_reply), ScriptBackend("S", _student_reply),
                         LEX_T, Broken("student"), TessyConfig(max_retries=0), on_record=recs.append)
    assert summ["failed"] == 1 and "classifier exploded" in recs[0]["error"]


def test_repetition_detection_and_abort():
    assert find_repetition("so " + "one two three " * 8 + "end") == "one two three"
    assert find_repetition("one two three " * 7) is None
    assert find_repetition(". . . " * 20) is None  # purely symbolic
    recs = []

    def student(trace, k):
        return " wait I think so" if "</think>" not in trace else GenResult(" 1", "stop")

    cfg = TessyConfig(max_retries=0, repetition_check_every=10, max_total_tokens=10_000)
    run_synthesis(["Compute 1"], ScriptBackend("T", _teacher_reply), ScriptBackend("S", student), LEX_T, LEX_S, cfg,
                  on_record=recs.append)
    assert recs[0]["finish_reason"] == "repetition"


def test_think_marker_and_config_checks():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "a": 1, "<": 2, ">": 3, "/": 4, "t": 5, "h": 6, "i": 7, "n": 8, "k": 9}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    plain = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    b = ScriptBackend("plain-model", _student_reply, tokenizer=plain)
    with pytest.raises(ValueError, match="'plain-model' cannot write the thinking marker '<think>'.*--teacher-think"):
        run_synthesis(["x"], b, ScriptBackend("S", _student_reply), LEX_T, LEX_S)
    with pytest.raises(ValueError, match="role"):
        run_synthesis(["x"], ScriptBackend("T", _teacher_reply), ScriptBackend("S", _student_reply), LEX_S, LEX_T)
    with pytest.raises(ValueError):
        TessyConfig(teacher_step=0).validate()
    with pytest.raises(ValueError, match="duplicate"):
        run_synthesis([{"id": "1", "prompt": "a"}, {"id": "1", "prompt": "b"}], ScriptBackend("T", _teacher_reply),
                      ScriptBackend("S", _student_reply), LEX_T, LEX_S)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_local_backend_batches_match_single_and_tokenizer_mismatch():
    model, tok = tiny_causal_lm(seed=1)
    b = LocalBackend(model, tok, name="tiny")
    prompts = ["<bos>user: Compute 1 + 2\nassistant: <think>", "<bos>user: hi\nassistant: <think> Okay so 12 + 7"]
    greedy = GenParams(temperature=0)
    single = [b.generate_batch([p], 6, greedy)[0].text for p in prompts]
    batched = [r.text for r in b.generate_batch(prompts, 6, greedy)]
    assert single == batched

    async def many():
        return await asyncio.gather(*[b.generate(p, 6, greedy) for p in prompts * 3])
    res = asyncio.run(many())
    assert [r.text for r in res] == single * 3
    assert b._batcher.batches == 1 and b._batcher.items == 6  # all six in one generate call
    big, _ = tiny_causal_lm(seed=2, vocab=50)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        LocalBackend(big, tok)


# ----------------------------------------------------------------------------- output

def test_writer_repairs_torn_line_and_resume(tmp_path):
    p = str(tmp_path / "r.jsonl")
    with JsonlWriter(p) as w:
        w.append({"id": "a", "status": "ok"})
        w.append({"id": "b", "status": "failed"})
    with open(p, "ab") as f:
        f.write(b'{"id": "c", "status": "o')  # killed mid-line
    assert finished_ids(p) == {"a", "b"}  # the torn line is unreadable, skipped
    w = JsonlWriter(p)
    assert w.repaired_bytes == len(b'{"id": "c", "status": "o')
    w.append({"id": "c", "status": "ok"})
    w.close()
    lines = open(p).read().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]
    assert finished_ids(p, retry_failed=True) == {"a", "c"}
    assert repair_jsonl(p) == 0
    # a file that is only a torn line
    q = str(tmp_path / "t.jsonl")
    open(q, "w").write('{"id": 1')
    assert repair_jsonl(q) == 8 and os.path.getsize(q) == 0


def test_rerun_skips_finished_ids_and_retry_failed(tmp_path):
    out = str(tmp_path / "o.jsonl")
    bad = {"on": True}

    def student(trace, k):
        return _student_reply(trace, k)

    class Sometimes(ScriptBackend):
        async def generate(self, prompt, max_tokens, params):
            if bad["on"] and "Compute 5" in prompt:
                return GenResult("", "stop")
            return await super().generate(prompt, max_tokens, params)

    probs = [{"id": "x", "prompt": "Compute 1 + 2"}, {"id": "y", "prompt": "Compute 5"}]
    mk = lambda: (ScriptBackend("T", _teacher_reply), Sometimes("S", student))  # noqa: E731
    s1 = run_synthesis(probs, *mk(), LEX_T, LEX_S, TessyConfig(max_retries=0), out_path=out)
    assert (s1["ok"], s1["failed"]) == (1, 1)
    s2 = run_synthesis(probs, *mk(), LEX_T, LEX_S, TessyConfig(max_retries=0), out_path=out)
    assert s2["records"] == 0 and s2["skipped"] == 2
    bad["on"] = False
    t, s = mk()
    s3 = run_synthesis(probs, t, s, LEX_T, LEX_S, TessyConfig(max_retries=0), out_path=out, retry_failed=True)
    assert s3["skipped"] == 1 and s3["records"] == 1
    recs = latest_records(out)
    assert recs["y"]["status"] == "ok" and recs["x"]["status"] == "ok"  # the later record supersedes
    assert len(open(out).read().splitlines()) == 3


def test_shards_partition_the_problems(tmp_path):
    probs = [{"id": str(i), "prompt": "Compute 1 + 2"} for i in range(7)]
    seen = []
    for i in range(3):
        recs = []
        run_synthesis(probs, ScriptBackend("T", _teacher_reply), ScriptBackend("S", _student_reply), LEX_T, LEX_S,
                      shard=f"{i}/3", on_record=recs.append)
        seen.append({r["id"] for r in recs})
    assert set().union(*seen) == {str(i) for i in range(7)} and sum(len(s) for s in seen) == 7


def test_stats_and_convert(tmp_path):
    out = str(tmp_path / "o.jsonl")
    run_synthesis([{"id": "a", "prompt": "Compute 1 + 2", "reference": "3"}], ScriptBackend("T", _teacher_reply),
                  ScriptBackend("S", _student_reply), LEX_T, LEX_S, out_path=out)
    with JsonlWriter(out) as w:
        w.append({"id": "b", "prompt": "p", "status": "failed", "finish_reason": "empty", "attempts": 6,
                  "n_tokens": {"total": 0, "student": 0, "teacher": 0}, "student_token_share": 0.0})
    s = stats(out)
    assert s["records"] == 2 and s["ok"] == 1 and s["finish_reasons"] == {"stop": 1, "empty": 1}
    assert 0 < s["student_token_share"] < 1 and s["answer_accuracy"] == 1.0
    assert "student share" in tessy.format_stats(s)
    chat = str(tmp_path / "chat.jsonl")
    assert write_chat(out, chat) == 1
    (r,) = [json.loads(x) for x in open(chat)]
    assert r["messages"] == [{"role": "user", "content": "Compute 1 + 2"},
                             {"role": "assistant", "content": "<think> Okay so 1 + 2 = 3. Done. </think> 3"}]
    assert len(to_chat_records(latest_records(out).values(), only_ok=False)) == 1
    pytest.importorskip("datasets")
    import datasets
    d = str(tmp_path / "ds")
    assert write_chat(out, d, fmt="datasets") == 1
    assert datasets.load_from_disk(d)[0]["messages"][1]["role"] == "assistant"


# ----------------------------------------------------------------------------- testbed models

@needs_testbed
def test_local_synthesis_on_testbed_models(tmp_path):
    """The loop on real checkpoints. Mechanics with a pair that shares one style (the
    testbed student in both roles: every trace must complete); then the real teacher +
    student pair, whose records are all either complete or failures with a known reason
    (the single-style testbed teacher often derails on student-style text, see docs)."""
    from scrimp.testbed import tasks
    probs = []
    for i in range(6):
        ex = tasks.arith(seed=777 + i)
        probs.append({"id": str(i), "prompt": ex.problem, "reference": ex.answer})
    cfg = TessyConfig(temperature=0, max_total_tokens=400, answer_max_tokens=8, max_retries=1)
    s = LocalBackend.from_pretrained("testbed:arith-student", name="student")
    s_as_t = LocalBackend.from_pretrained("testbed:arith-student", name="student-as-teacher")
    out = str(tmp_path / "tb.jsonl")
    summ = run_synthesis(probs, s_as_t, s, LEX_T, LEX_S, cfg, out_path=out)
    assert summ["records"] == 6 and summ["ok"] == 6
    for r in latest_records(out).values():
        assert r["completion"] == "<think>" + "".join(x["text"] for x in r["spans"])
        assert r["spans"][0]["source"] == "student" and r["spans"][-1]["phase"] == "answer"
        assert {x["source"] for x in r["spans"]} == {"student", "teacher"}
        assert "</think>" in r["thinking"] and 0 < r["student_token_share"] < 1
    assert s._batcher.items > s._batcher.batches  # problems progressed together
    t = LocalBackend.from_pretrained("testbed:arith-teacher", name="teacher")
    out2 = str(tmp_path / "pair.jsonl")
    summ = run_synthesis(probs, t, s, LEX_T, LEX_S, cfg, out_path=out2)
    recs = latest_records(out2)
    assert summ["records"] == 6 == len(recs)
    known = {"empty", "length", "repetition", "answer_length"}  # no "error": nothing may crash
    for r in recs.values():
        assert r["status"] == "ok" or (r["finish_reason"] in known and r["attempts"] == 2), r
