"""Tests of scrimp.testbed: tokenizer, task generators, shipped checkpoints, evaluation,
training and the CLI."""
import json
import math
import os
import random

import pytest
import torch

import scrimp.testbed as tb
from scrimp.testbed import tasks
from scrimp.testbed.tokenizer import get_tokenizer

# Exact-match accuracy of the shipped checkpoints on the fixed evaluation sets used
# below (seed 0), measured when they were committed. The tests allow MARGIN below
# these (float differences across machines / library versions can flip an example).
RECORDED = {
    ("recall", 512): 30 / 30,   # (full set: 99% of 100; 100% at 1024 tokens)
    ("recall", 2048): 19 / 20,  # (full set: 92% of 100; 93.4% of 500; see docs/testbed.md)
    ("arith-teacher", None): 1.0,     # 30/30 (full set: 99.0% of 200)
    ("arith-student", None): 2 / 30,  # (full set: 8.0% of 200)
    ("arith-student-h32", None): 1 / 30,  # (full set: 7.5% of 200)
    ("arith-student-teacher-style", None): 12 / 30,  # (full set: 36.0% of 200)
    ("arith-teacher-robust", None): 1.0,          # 30/30 (full set: 99.5% of 200)
    ("arith-teacher-robust", "student"): 1.0,     # 30/30 continuing student-style traces (98.5% of 200)
    ("arith-teacher-robust", "mixed"): 1.0,       # 30/30 continuing mixed-style traces (99.0% of 200)
    ("recall-8k", "8192f"): 19 / 20,  # 8,192 tokens, half filler (86.8% of 500 of example seed 1)
    ("recall-8k", 2048): 19 / 20,
}
MARGIN = 0.10
N_RECALL_SHORT, N_RECALL_LONG, N_ARITH = 30, 20, 30


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {name: tb.load(name) for name in tb.MODELS}


# ----------------------------------------------------------------------------- tokenizer

def _sample_texts():
    texts = [tasks.recall(n_docs=3, records_per_doc=4, seed=s).prompt for s in range(5)]
    for s in range(20):
        for style in tasks.STYLES:
            ex = tasks.arith(seed=s, style=style)
            texts.append(ex.prompt + ex.completion + "<eos>")
    texts += ["Hello,  world!\n\n  spaces  and ~ symbols {}[]|\\^`", "0123456789", "x" * 50,
              "<think></think><doc></doc>", "Okayso Thenhmm FirstFirst"]
    return texts


def test_tokenizer_round_trips_generator_text(tok):
    for text in _sample_texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_tokenizer_vocab_digits_markers(tok):
    assert len(tok) <= 512
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("12345", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    for m in ["<think>", "</think>", "<doc>", "</doc>", "<bos>", "<eos>", "<pad>"]:
        assert len(tok(m, add_special_tokens=False)["input_ids"]) == 1, m
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


def test_tokenizer_save_load_and_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    for text in _sample_texts()[:10]:
        assert tok2(text, add_special_tokens=False)["input_ids"] == \
            tok(text, add_special_tokens=False)["input_ids"]
    ex = tasks.arith(seed=3)
    msgs = [{"role": "user", "content": ex.problem}]
    assert tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == ex.prompt
    full = tok2.apply_chat_template(msgs + [{"role": "assistant", "content": ex.completion}],
                                    tokenize=False)
    assert full.startswith(ex.prompt.rstrip()) and ex.completion + "<eos>" in full


def test_shipped_tokenizers_match_builder(tok):
    from transformers import AutoTokenizer

    text = "".join(_sample_texts())
    ref = tok(text, add_special_tokens=False)["input_ids"]
    for name in tb.MODELS:
        t = AutoTokenizer.from_pretrained(tb.path(name))
        assert t(text, add_special_tokens=False)["input_ids"] == ref, name


# ----------------------------------------------------------------------------- generators

def test_recall_deterministic_and_seed_dependent():
    a = tasks.recall(n_docs=4, records_per_doc=5, seed=7)
    b = tasks.recall(n_docs=4, records_per_doc=5, seed=7)
    c = tasks.recall(n_docs=4, records_per_doc=5, seed=8)
    assert a == b
    assert a.prompt != c.prompt


def test_recall_structure(tok):
    ex = tasks.recall(n_docs=5, records_per_doc=6, seed=3)
    ids = ex.prompt_ids
    assert tok.decode(ids) == ex.prompt
    assert len(ex.doc_spans) == 5
    # prefix, documents and question tile the prompt, in that order
    assert ex.prefix_span == (0, 1) and ids[0] == tok.bos_token_id
    assert ex.doc_spans[0][0] == ex.prefix_span[1]
    for (s0, e0), (s1, _) in zip(ex.doc_spans, ex.doc_spans[1:]):
        assert e0 == s1
    assert ex.question_span == (ex.doc_spans[-1][1], len(ids))
    for (s, e), recs in zip(ex.doc_spans, ex.records):
        text = tok.decode(ids[s:e])
        assert text.startswith("<doc>\n") and text.endswith("</doc>\n")
        assert text.count("<doc>") == 1 and text.count("</doc>") == 1
        assert len(recs) == 6
    keys = [k for recs in ex.records for k, _ in recs]
    assert len(set(keys)) == len(keys)
    assert tok.decode(ids[ex.question_span[0]:]) == f"Query: {ex.key}="
    assert (ex.key, ex.answer) in ex.records[ex.target_doc]
    assert f"{ex.key}={ex.answer}\n" in ex.documents[ex.target_doc]
    assert len(ex.answer_ids) == 3 and tok.decode(ex.answer_ids) == ex.answer


@pytest.mark.parametrize("L", [128, 512, 2048, 3000, 4096])
def test_recall_context_tokens(L):
    ex = tasks.recall(context_tokens=L, seed=1)
    assert L - 7 <= ex.n_tokens <= L


def test_recall_validation():
    with pytest.raises(ValueError, match="n_docs"):
        tasks.recall(n_docs=0)
    with pytest.raises(ValueError, match="records_per_doc"):
        tasks.recall(records_per_doc=0)
    with pytest.raises(TypeError, match="seed"):
        tasks.recall(seed="1")
    with pytest.raises(TypeError, match="n_docs"):
        tasks.recall(n_docs=2.5)
    with pytest.raises(ValueError, match="unique keys"):
        tasks.recall(n_docs=100, records_per_doc=10)
    with pytest.raises(ValueError, match="unique keys"):
        tasks.recall(context_tokens=20000)
    with pytest.raises(ValueError, match="context_tokens"):
        tasks.recall(context_tokens=5)


@pytest.mark.parametrize("L,share", [(2048, 0.3), (8192, 0.5), (8192, 0.1)])
def test_recall_filler_reaches_long_contexts(L, share):
    """``filler_share``: filler lines (upper-case letters only: no ``=``, no digit) spread through the
    documents take the context past what the 676 unique keys can fill."""
    ex = tasks.recall(context_tokens=L, seed=4, filler_share=share)
    assert L - tasks.FILLER_TOKENS - 7 <= ex.n_tokens <= L
    flat = [kv for recs in ex.records for kv in recs]
    assert len(flat) <= tasks.MAX_RECALL_RECORDS and len({k for k, _ in flat}) == len(flat)
    assert f"{ex.key}={ex.answer}\n" in ex.documents[ex.target_doc]
    lines = [ln for d in ex.documents for ln in d.split("\n")]
    filler = [ln for ln in lines if ln and "=" not in ln and not ln.startswith("<")]
    assert filler and all(len(ln) == tasks.FILLER_LINE_LETTERS and ln.isalpha() and ln.isupper() for ln in filler)
    assert len([ln for ln in lines if "=" in ln]) == len(flat)
    assert ex == tasks.recall(context_tokens=L, seed=4, filler_share=share)
    assert ex.doc_spans[0][0] == ex.prefix_span[1] and ex.doc_spans[-1][1] == ex.question_span[0]


def test_recall_filler_share_zero_is_the_plain_task():
    assert tasks.recall(context_tokens=2048, seed=5, filler_share=0.0) == tasks.recall(context_tokens=2048, seed=5)
    with pytest.raises(ValueError, match="filler_share"):
        tasks.recall(context_tokens=2048, filler_share=0.95)
    with pytest.raises(TypeError, match="filler_share"):
        tasks.recall(context_tokens=2048, filler_share="0.5")
    with pytest.raises(ValueError, match="filler_share"):
        tasks.recall(n_docs=2, filler_share=0.5)
    text, spans = tasks.recall_training_text(random.Random(2), 8564, 32, filler_share=0.5)
    assert (text, spans) == tasks.recall_training_text(random.Random(2), 8564, 32, filler_share=0.5)
    assert len(spans) == 32 and all(text[a:b].endswith("<eos>") for a, b in spans)
    assert tasks.recall_training_text(random.Random(2), 2048, 32, filler_share=0.0) == \
        tasks.recall_training_text(random.Random(2), 2048, 32)


def test_arith_deterministic_styles_share_reasoning():
    for s in range(30):
        t1, t2 = tasks.arith(seed=s), tasks.arith(seed=s)
        assert t1 == t2
        st = tasks.arith(seed=s, style="student")
        assert st.steps == t1.steps and st.answer == t1.answer and st.problem == t1.problem
        assert st.completion != t1.completion
    assert tasks.arith(seed=1).problem != tasks.arith(seed=2).problem


def test_arith_answers_are_right():
    for s in range(200):
        ex = tasks.arith(seed=s)
        expr = ex.problem[len("Compute "):]
        assert str(eval(expr)) == ex.answer  # fully parenthesised left-to-right chain
        assert 2 <= len(ex.steps) <= 4
        for a, op, b, r in ex.steps:
            assert 0 <= r <= 99 and {"+": a + b, "-": a - b, "*": a * b}[op] == r
        assert ex.completion.startswith("<think>")
        assert ex.completion.endswith("</think> " + ex.answer)


@pytest.mark.parametrize("style", tasks.STYLES)
def test_arith_labels_cover_every_token(style, tok):
    n_style = n_cap = 0
    for s in range(100):
        ex = tasks.arith(seed=s, style=style)
        assert ex.completion_ids == tok(ex.completion, add_special_tokens=False)["input_ids"]
        assert len(ex.labels) == len(ex.completion_ids)
        assert set(ex.labels) <= {tasks.STYLE, tasks.CAPABILITY}
        assert ex.label_ids == [int(lab == tasks.STYLE) for lab in ex.labels]
        assert "".join(t for t, _ in ex.segments) == ex.completion
        for i, lab in zip(ex.completion_ids, ex.labels):
            piece = tok.decode([i])
            if piece.isdigit() or piece in {"+", "-", "*", "=", "<think>", "</think>"}:
                assert lab == tasks.CAPABILITY, (piece, ex.completion)
            if piece in {"First", "Then", "Next", "Finally", "Okay", "hmm", "Wait", "Hmm",
                         "Um", "um", "Alright", "Done", "Yeah", "Right"}:
                assert lab == tasks.STYLE, (piece, ex.completion)
        n_style += ex.labels.count(tasks.STYLE)
        n_cap += ex.labels.count(tasks.CAPABILITY)
    assert n_style > 0 and n_cap > 0


def test_arith_mixed_keeps_the_problem_and_mixes_the_styles(tok):
    from scrimp.testbed.evaluate import writes_teacher_style

    n_pure = n_student_open = 0
    for s in range(300):
        ex = tasks.arith_mixed(seed=s)
        assert ex == tasks.arith_mixed(seed=s) and ex.style == "mixed"
        ref = tasks.arith(seed=s)
        assert ex.problem == ref.problem and ex.steps == ref.steps and ex.answer == ref.answer
        assert ex.completion.endswith("</think> " + ex.answer)
        assert ex.completion_ids == tok(ex.completion, add_special_tokens=False)["input_ids"]
        assert len(ex.labels) == len(ex.completion_ids)
        # every step's result, in order, whatever style wrote its connective
        pos = 0
        for a, op, b, r in ex.steps:
            pos = ex.completion.index(f"{a} {op} {b} = {r}.", pos) + 1
        n_pure += writes_teacher_style(ex.completion)
        n_student_open += not ex.completion.startswith("<think> First")
    # 40% pure teacher style, the others a uniform student share: about 30% open in the student style
    assert 0.4 <= n_pure / 300 <= 0.65 and 0.2 <= n_student_open / 300 <= 0.4
    assert all(writes_teacher_style(tasks.arith_mixed(s, student_share=0.0).completion) for s in range(20))
    for s in range(20):
        only = tasks.arith_mixed(s, student_share=1.0).completion
        assert not only.startswith("<think> First") and "Finally" not in only
    with pytest.raises(ValueError, match=r"student_share must be in \[0, 1\]"):
        tasks.arith_mixed(0, student_share=1.5)
    with pytest.raises(TypeError, match="student_share"):
        tasks.arith_mixed(0, student_share="half")


def test_robust_teacher_recipe_starts_from_the_shipped_teacher(tmp_path):
    from safetensors.torch import load_file
    from scrimp.testbed import train

    out = tmp_path / "robust"
    # threads=1: train() sets torch's thread count for the process; 2 threads on a busy 2-core host
    # spin-wait and slow every later test several-fold
    m = train.train("arith", "teacher", seed=0, out=str(out), steps=1, lr=1e-12, eval_n=1, style="mixed",
                    progress=False, threads=1)
    assert m["style"] == "mixed" and m["recipe"]["init"] == "arith-teacher"
    assert {"accuracy", "teacher_style_share", "continuation_accuracy_student",
            "continuation_accuracy_mixed"} <= set(m)
    w = load_file(str(out / "model.safetensors"))
    w0 = load_file(os.path.join(tb.path("arith-teacher"), "model.safetensors"))
    assert w.keys() == w0.keys()
    assert all(torch.allclose(w[k], w0[k], atol=1e-6) for k in w)
    with pytest.raises(ValueError, match="init checkpoint 'arith-teacher' has shape"):
        train.train("arith", "teacher", seed=0, out=str(tmp_path / "x"), steps=1, style="mixed",
                    overrides={"hidden": 64}, progress=False, threads=1)


def test_arith_validation():
    with pytest.raises(ValueError, match="valid styles"):
        tasks.arith(style="pirate")
    with pytest.raises(TypeError):
        tasks.arith(style=None)
    with pytest.raises(ValueError, match="n_steps"):
        tasks.arith(n_steps=0)
    with pytest.raises(TypeError, match="seed"):
        tasks.arith(seed=1.0)


# ----------------------------------------------------------------------------- checkpoints

def test_names_and_paths():
    assert set(tb.MODELS) == {"recall", "arith-teacher", "arith-student", "arith-student-h32",
                              "arith-student-teacher-style", "arith-teacher-robust", "recall-8k"}
    for name in tb.MODELS:
        assert os.path.isfile(os.path.join(tb.path(name), "config.json"))
    with pytest.raises(ValueError, match="recall, arith-teacher, arith-student, arith-student-h32, arith-student-teacher-style, "
                                         "arith-teacher-robust, recall-8k"):
        tb.load("nope")
    with pytest.raises(ValueError, match="valid names"):
        tb.path("gpt2")
    with pytest.raises(TypeError):
        tb.path(3)


def test_checkpoints_are_standard_small_gqa_models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = {"recall": "LlamaForCausalLM", "arith-teacher": "Qwen3ForCausalLM",
                "arith-student": "Qwen3ForCausalLM", "arith-student-h32": "Qwen3ForCausalLM",
                "arith-student-teacher-style": "Qwen3ForCausalLM",
                "arith-teacher-robust": "Qwen3ForCausalLM", "recall-8k": "LlamaForCausalLM"}
    total = 0
    for name, cls in expected.items():
        d = tb.path(name)
        files = os.listdir(d)
        assert "model.safetensors" in files and "tokenizer.json" in files, files
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
        m = AutoModelForCausalLM.from_pretrained(d)
        assert type(m).__name__ == cls
        c = m.config
        assert c.num_attention_heads >= 2 * c.num_key_value_heads
        assert AutoTokenizer.from_pretrained(d).eos_token_id == c.eos_token_id
    assert tb.load("recall")[0].config.max_position_embeddings >= 4096
    assert total <= 40 * 2**20


def _recorded(key):
    v = RECORDED[key]
    assert v is not None, f"no recorded accuracy for {key}"
    return v


def test_recall_accuracy_512_holds_its_recorded_value(models):
    m, t = models["recall"]
    acc = tb.evaluate(m, t, "recall", n=N_RECALL_SHORT, context_tokens=512)["accuracy"]
    assert acc >= _recorded(("recall", 512)) - MARGIN
    assert acc >= 0.75  # the look-up works at 512 tokens (random digits: 0.1%)


def test_recall_accuracy_2048_holds_its_recorded_value(models):
    m, t = models["recall"]
    acc = tb.evaluate(m, t, "recall", n=N_RECALL_LONG, context_tokens=2048)["accuracy"]
    assert acc >= _recorded(("recall", 2048)) - MARGIN


def test_recall_8k_accuracy_at_8192_tokens_holds_its_recorded_value(models):
    """The long-context recall model at 8,192 tokens with half of the context filler, and at 2,048 tokens
    without filler (the length `recall` is measured at), against the recorded values minus MARGIN."""
    m, t = models["recall-8k"]
    assert m.config.rope_parameters["rope_type"] == "yarn"
    acc = tb.evaluate(m, t, "recall", n=N_RECALL_LONG, context_tokens=8192, filler_share=0.5)["accuracy"]
    assert acc >= _recorded(("recall-8k", "8192f")) - MARGIN
    acc = tb.evaluate(m, t, "recall", n=N_RECALL_LONG, context_tokens=2048)["accuracy"]
    assert acc >= _recorded(("recall-8k", 2048)) - MARGIN


# The task's target: >= 90% greedy exact match at 2048 tokens with the full cache, on the 100-example
# evaluation set of the checkpoint's metrics.json (a 20-example subset cannot tell 88% from 90%).
RECALL_2048_FULL_SET = 0.92  # the shipped checkpoint (docs/testbed.md; 93.4% on 500 examples)


def test_recall_accuracy_2048_full_set_meets_the_target(models):
    """Regression on the whole 100-example set: at most 2 examples below the recorded value, which
    keeps the 90% target."""
    m, t = models["recall"]
    acc = tb.evaluate(m, t, "recall", n=100, context_tokens=2048)["accuracy"]
    assert acc >= RECALL_2048_FULL_SET - 0.021
    assert acc >= 0.9


def _assert_student_style_traces(res):
    """Well-formed ``<think> ... </think>`` traces, mostly in the student style, none in the teacher's."""
    outs = [r["output"] for r in res["results"]]
    assert sum(o.startswith("<think>") and "</think>" in o for o in outs) >= 0.9 * N_ARITH
    assert sum("Okay" in o or "Alright" in o for o in outs) >= N_ARITH // 2
    assert not any(o.startswith("<think> First") for o in outs)


def test_arith_teacher_accurate_student_weaker(models):
    m, t = models["arith-teacher"]
    teacher = tb.evaluate(m, t, "arith", n=N_ARITH, style="teacher")["accuracy"]
    assert teacher >= _recorded(("arith-teacher", None)) - MARGIN
    m, t = models["arith-student"]
    res = tb.evaluate(m, t, "arith", n=N_ARITH, style="student")
    student = res["accuracy"]
    assert student >= _recorded(("arith-student", None)) - MARGIN
    assert student <= _recorded(("arith-student", None)) + MARGIN
    assert student < teacher - 0.15
    # the student writes well-formed traces in its own style, with a numeric final answer
    _assert_student_style_traces(res)
    assert sum(r["got"].isdigit() for r in res["results"]) >= 0.9 * N_ARITH


def test_h32_student_is_the_student_with_32_dim_heads(models):
    """arith-student-h32: the arith student's width and size with heads of 32 (vLLM's CPU attention
    serves those, not 16), as weak as arith-student and writing the student style."""
    m, t = models["arith-student-h32"]
    base = models["arith-student"][0]
    c = m.config
    assert (c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (32, 2, 1)
    assert c.num_attention_heads * c.head_dim == base.config.num_attention_heads * base.config.head_dim
    assert abs(sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in base.parameters())) <= 64
    res = tb.evaluate(m, t, "arith", n=N_ARITH, style="student")
    acc = res["accuracy"]
    assert _recorded(("arith-student-h32", None)) - MARGIN <= acc <= _recorded(("arith-student-h32", None)) + MARGIN
    _assert_student_style_traces(res)


def test_tip_student_writes_the_teacher_style_and_is_weaker(models):
    m, t = models["arith-student-teacher-style"]
    res = tb.evaluate(m, t, "arith", n=N_ARITH, style="teacher")
    acc = res["accuracy"]
    assert _recorded(("arith-student-teacher-style", None)) - MARGIN <= acc <= _recorded(("arith-student-teacher-style", None)) + MARGIN
    assert acc <= _recorded(("arith-teacher", None)) - 0.3
    outs = [r["output"] for r in res["results"]]
    assert sum(o.startswith("<think> First") for o in outs) >= 0.9 * N_ARITH
    assert not any("Okay" in o for o in outs)


def test_robust_teacher_continues_either_style_and_writes_the_teacher_style(models):
    from scrimp.testbed.evaluate import arith_continuation, writes_teacher_style

    from scrimp.tip import arith_accuracy  # batched testbed.evaluate (same examples and rule)

    m, t = models["arith-teacher-robust"]
    res = arith_accuracy(m, t, n=N_ARITH, seed=0)
    assert res["accuracy"] >= _recorded(("arith-teacher-robust", None)) - MARGIN
    # unprompted it writes the teacher style
    assert all(writes_teacher_style(r["output"]) for r in res["results"])
    assert sum(r["output"].startswith("<think> First") for r in res["results"]) >= 0.9 * N_ARITH
    for style in ("student", "mixed"):
        acc = arith_continuation(m, t, n=N_ARITH, seed=0, style=style)["accuracy"]
        assert acc >= _recorded(("arith-teacher-robust", style)) - MARGIN, style
    # the single-style teacher derails on the same student-style prefixes (why TESSY needs this one)
    m0, _ = models["arith-teacher"]
    assert arith_continuation(m0, t, n=N_ARITH, seed=0, style="student")["accuracy"] <= 0.3


def test_arith_continuation_cuts_after_a_style_segment(models):
    from scrimp.testbed.evaluate import arith_continuation

    m, t = models["arith-teacher"]
    res = arith_continuation(m, t, n=6, seed=3, style="teacher", batch_size=4)
    assert res["n"] == 6 and len(res["results"]) == 6
    for i, r in enumerate(res["results"]):
        ex = tasks.arith(seed=3 * 1_000_003 + i)
        assert ex.completion.startswith(r["prefix"]) and r["prefix"].startswith("<think>")
        assert r["prefix"].endswith(" ") and r["expected"] == ex.answer
        assert r["correct"] == (r["got"] == ex.answer)
    again = arith_continuation(m, t, n=6, seed=3, style="teacher", batch_size=6)
    assert [r["prefix"] for r in again["results"]] == [r["prefix"] for r in res["results"]]
    with pytest.raises(ValueError, match="unknown style"):
        arith_continuation(m, t, n=2, style="pirate")
    with pytest.raises(ValueError, match="n must be"):
        arith_continuation(m, t, n=0)


def test_evaluate_results_and_validation(models):
    m, t = models["recall"]
    res = tb.evaluate(m, t, "recall", n=4, seed=1, context_tokens=256)
    assert res["n"] == 4 and len(res["results"]) == 4
    for r in res["results"]:
        assert set(r) >= {"prompt", "expected", "got", "correct"}
        assert r["correct"] == (r["got"] == r["expected"])
    assert res["accuracy"] == sum(r["correct"] for r in res["results"]) / 4
    with pytest.raises(ValueError, match="valid tasks"):
        tb.evaluate(m, t, "chess")
    with pytest.raises(ValueError, match="n must be"):
        tb.evaluate(m, t, "recall", n=0)
    with pytest.raises(TypeError):
        tb.evaluate(m, t, "recall", n="5")
    with pytest.raises(ValueError, match="context_tokens"):
        tb.evaluate(m, t, "arith", context_tokens=512)
    with pytest.raises(TypeError, match="generate_fn"):
        tb.evaluate(m, t, "recall", generate_fn=42)


def test_generate_fn_hook_with_cache_api(models):
    """A hand-written greedy loop over the transformers Cache API matches generate()."""
    from transformers import DynamicCache

    calls = []

    def manual(model, tokenizer, prompt_ids, max_new_tokens):
        calls.append(prompt_ids.shape)
        cache = DynamicCache()
        out = []
        with torch.no_grad():
            logits = model(prompt_ids, past_key_values=cache, use_cache=True).logits
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
                logits = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True).logits
        return torch.tensor(out)

    m, t = models["recall"]
    ref = tb.evaluate(m, t, "recall", n=4, context_tokens=1024)
    got = tb.evaluate(m, t, "recall", n=4, context_tokens=1024, generate_fn=manual)
    assert len(calls) == 4 and all(s[0] == 1 and len(s) == 2 for s in calls)
    assert [r["output"] for r in got["results"]] == [r["output"] for r in ref["results"]]

    m, t = models["arith-teacher"]
    ref = tb.evaluate(m, t, "arith", n=4, seed=3)
    got = tb.evaluate(m, t, "arith", n=4, seed=3, generate_fn=manual)
    assert [r["output"] for r in got["results"]] == [r["output"] for r in ref["results"]]
    assert ref["accuracy"] >= 0.5

    def garbage(model, tokenizer, prompt_ids, max_new_tokens):
        return torch.tensor(tokenizer("<think> 1 </think> 1000", add_special_tokens=False)["input_ids"])

    assert tb.evaluate(m, t, "arith", n=4, seed=3, generate_fn=garbage)["accuracy"] == 0.0


def test_real_examples_generate(models):
    m, t = models["arith-teacher"]
    ex = tasks.arith(seed=12345)
    out = m.generate(torch.tensor([ex.prompt_ids]), max_new_tokens=100, do_sample=False)
    text = t.decode(out[0, len(ex.prompt_ids):], skip_special_tokens=True)
    assert text.startswith("<think>") and "</think>" in text


# ----------------------------------------------------------------------------- training

def test_training_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.testbed import train

    out = tmp_path / "student"
    metrics = train.train("arith", "student", seed=0, out=str(out), steps=3, eval_n=2,
                          progress=False, threads=1)
    assert metrics["steps"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["final_loss"] > 0
    m = AutoModelForCausalLM.from_pretrained(out)
    assert type(m).__name__ == "Qwen3ForCausalLM"
    t2 = AutoTokenizer.from_pretrained(out)
    assert t2.decode([t2.convert_tokens_to_ids("<think>")]) == "<think>"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["seed"] == 0 and saved["steps"] == 3

    out2 = tmp_path / "recall"
    metrics = train.train("recall", "teacher", seed=1, out=str(out2), steps=2, eval_n=1,
                          final_eval_quick=True, progress=False, threads=1)
    assert "accuracy@2048" in metrics
    assert type(AutoModelForCausalLM.from_pretrained(out2)).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="role"):
        train.train("arith", "professor", seed=0, out=str(tmp_path / "x"), steps=1)


def test_training_is_seeded(tmp_path):
    from scrimp.testbed import train
    from safetensors.torch import load_file

    a = train.train("arith", "student", seed=5, out=str(tmp_path / "a"), steps=2, eval_n=1, progress=False, threads=1)
    b = train.train("arith", "student", seed=5, out=str(tmp_path / "b"), steps=2, eval_n=1, progress=False, threads=1)
    assert a["final_loss"] == b["final_loss"]
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- CLI

def test_cli_testbed_eval(capsys):
    from scrimp.cli import main

    assert main(["testbed", "eval", "--n", "3", "--lengths", "256"]) == 0
    out = capsys.readouterr().out
    for name in tb.MODELS:
        assert name in out
    assert "context 256 tokens" in out and "%" in out
    assert main(["testbed", "eval", "--n", "2", "--lengths", "1024", "--filler-share", "0.5",
                 "--models", "recall", "--quiet"]) == 0
    assert "context 1024, filler 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["testbed", "eval", "--n", "2", "--filler-share", "1.5", "--models", "recall", "--quiet"])
    assert "filler_share must be in [0, 0.9], got 1.5" in capsys.readouterr().err


def test_cli_testbed_train(tmp_path, capsys):
    from scrimp.cli import main

    out = tmp_path / "ck"
    assert main(["testbed", "train", "--task", "arith", "--role", "student", "--steps", "2",
                 "--eval-n", "1", "--out", str(out), "--quiet"]) == 0
    assert "METRICS" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()


def test_cli_demo_and_errors(capsys):
    from scrimp.cli import main, register_command, COMMANDS

    assert main(["demo", "--quick", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "arith-teacher" in out and "scoring" in out
    with pytest.raises(SystemExit):
        main(["nonexistent-command"])
    with pytest.raises(SystemExit):
        main(["testbed"])

    def build(p):
        p.add_argument("--x", type=int, default=1)
        p.set_defaults(func=lambda args: args.x + 6)

    register_command("tmp-test-cmd", "temporary", build)
    try:
        assert main(["tmp-test-cmd", "--x", "1"]) == 7
    finally:
        COMMANDS.pop("tmp-test-cmd")


def test_train_recipe_overrides_are_checked(tmp_path):
    from scrimp.testbed import train as T

    with pytest.raises(ValueError, match="recipe entry 'lr' is a number, got 'abc'"):
        T.main(["--task", "recall", "--out", str(tmp_path / "a"), "--set", "lr=abc", "--steps", "1"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        T.main(["--task", "recall", "--out", str(tmp_path / "a"), "--set", "lr"])
    with pytest.raises(ValueError, match="unknown recipe entry 'nope'"):
        T.main(["--task", "recall", "--out", str(tmp_path / "a"), "--set", "nope=1", "--steps", "1"])
    with pytest.raises(ValueError, match="unknown style"):
        T.train("arith", "student", 0, str(tmp_path / "b"), steps=1, style="pirate")


def test_induction_training_ids_every_masked_token_is_a_chunk_continuation(tok):
    """The dense induction sequences: deterministic per seed, about the requested length, and every
    masked token continues (in the random string) the chunk written so far after a separator."""
    import random
    from scrimp.testbed import train

    sep = tok.convert_tokens_to_ids("<doc>")
    for seed, length in [(0, 40), (1, 160), (2, 2048)]:
        ids, mask = train.induction_training_ids(tok, random.Random(seed), length)
        assert (ids, mask) == train.induction_training_ids(tok, random.Random(seed), length)
        assert len(ids) == len(mask) and length - 11 <= len(ids) <= length
        assert ids[0] == tok.bos_token_id and set(mask) == {0, 3}
        s = ids[1:ids.index(sep)]
        assert tok.decode(s) and all(c in train.INDUCTION_ALPHABET for c in tok.decode(s))
        starts = [i for i, t in enumerate(ids) if t == sep]
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            chunk = ids[a + 1:b]
            assert 4 <= len(chunk) <= 10 and mask[a:b] == [0, 0] + [3] * (len(chunk) - 1)
            assert any(s[i:i + len(chunk)] == chunk for i in range(len(s)))
    with pytest.raises(TypeError, match="length must be an int"):
        train.induction_training_ids(tok, random.Random(0), 40.0)
    with pytest.raises(ValueError, match="length must be >= 16"):
        train.induction_training_ids(tok, random.Random(0), 8)
    with_seq = train.recall_batch(tok, random.Random(0), 0.0, dict(train.RECIPES[("recall", "teacher")]))
    kinds = [set(m) for m in with_seq[1]]
    assert any(3 in k for k in kinds) and any(2 in k for k in kinds)


def test_recall_training_text_confusable_keys_share_letters():
    """confusable_keys draws the keys from a small alphabet (a * a >= 1.2 * records), so keys share
    letters and reversed pairs occur; keys stay unique and every answer span is its record's value."""
    import random
    import re
    from scrimp.testbed import tasks

    for L, nq in [(160, 8), (2048, 32)]:
        text, spans = tasks.recall_training_text(random.Random(3), L, nq, confusable_keys=True)
        assert (text, spans) == tasks.recall_training_text(random.Random(3), L, nq, confusable_keys=True)
        context = text.partition("Query: ")[0]
        pairs = re.findall(r"([A-Z]{2})=(\d{3})\n", context)
        records = dict(pairs)
        assert len(records) == len(pairs)  # unique keys
        letters = set("".join(records))
        assert len(letters) ** 2 >= 1.2 * len(records) and (len(letters) - 1) ** 2 < 1.2 * len(records) \
            or len(letters) == 3
        assert any(k[::-1] in records for k in records if k[0] != k[1])
        for (a, b), (k, v) in zip(spans, re.findall(r"Query: ([A-Z]{2})=(\d{3})", text)):
            assert text[a:b] == v + "<eos>" and records[k] == v
    plain, _ = tasks.recall_training_text(random.Random(3), 2048, 32)
    assert len(set("".join(re.findall(r"([A-Z]{2})=\d{3}\n", plain)))) == 26


def test_recall_training_text_shared_value_prefixes_collide():
    """shared_value_prefixes: about one two-digit value prefix per 8 records, so a prefix recurs in
    many records and only the key tells the third digit; keys stay the plain layout's and every answer
    span is its record's value. A batch draws such contexts only after the look-up has formed."""
    import collections
    import random
    import re
    from scrimp.testbed import tasks, train

    for L, nq in [(160, 8), (2048, 32)]:
        text, spans = tasks.recall_training_text(random.Random(3), L, nq, shared_value_prefixes=True)
        assert (text, spans) == tasks.recall_training_text(random.Random(3), L, nq, shared_value_prefixes=True)
        pairs = re.findall(r"([A-Z]{2})=(\d{3})\n", text.partition("Query: ")[0])
        records = dict(pairs)
        assert len(records) == len(pairs)
        prefixes = collections.Counter(v[:2] for v in records.values())
        assert len(prefixes) <= max(2, -(-len(records) // 8))
        for (a, b), (k, v) in zip(spans, re.findall(r"Query: ([A-Z]{2})=(\d{3})", text)):
            assert text[a:b] == v + "<eos>" and records[k] == v
    plain, _ = tasks.recall_training_text(random.Random(3), 2048, 32)
    plain_prefixes = {v[:2] for v in re.findall(r"[A-Z]{2}=(\d{3})\n", plain)}
    assert len(plain_prefixes) > 3 * len(prefixes)
    for bad, err in [(dict(shared_value_prefixes=1), "shared_value_prefixes must be a bool"),
                     (dict(confusable_keys="yes"), "confusable_keys must be a bool")]:
        with pytest.raises(TypeError, match=err):
            tasks.recall_training_text(random.Random(0), 160, 4, **bad)
    with pytest.raises(TypeError, match="rng must be a random.Random"):
        tasks.recall_training_text(0, 160, 4)
    with pytest.raises(ValueError, match="n_queries"):
        tasks.recall_training_text(random.Random(0), 160, 0)
    tok = tasks._tokenizer(None)
    base = dict(train.RECIPES[("recall", "teacher")], induction_share=0.0)
    collide = dict(base, value_collision_share=1.0)
    assert train.recall_batch(tok, random.Random(5), 0.0, base) == train.recall_batch(tok, random.Random(5), 0.0, collide)
    assert train.recall_batch(tok, random.Random(5), 0.5, base) != train.recall_batch(tok, random.Random(5), 0.5, collide)


def test_recall_training_continues_from_a_checkpoint_directory(tmp_path):
    """``--set init=DIR`` continues from a saved checkpoint (its shape must be the recipe's); a shape
    mismatch names both shapes."""
    from scrimp.testbed import train as T

    small = ["--set", "hidden=32", "--set", "intermediate=64", "--set", "layers=1", "--set", "heads=2",
             "--set", "kv_heads=1", "--set", "head_dim=16", "--set", "tokens_per_step=256",
             "--set", "max_len=200"]
    T.main(["--task", "recall", "--out", str(tmp_path / "a"), "--steps", "1", "--quick-eval",
            "--eval-n", "1", "--quiet", "--threads", "1"] + small)
    m = T.main(["--task", "recall", "--out", str(tmp_path / "b"), "--steps", "1", "--quick-eval",
                "--eval-n", "1", "--quiet", "--threads", "1", "--set", f"init={tmp_path / 'a'}"] + small)
    assert m == 0
    import json
    assert json.load(open(tmp_path / "b" / "metrics.json"))["recipe"]["init"] == str(tmp_path / "a")
    with pytest.raises(ValueError, match="has shape"):
        T.main(["--task", "recall", "--out", str(tmp_path / "c"), "--steps", "1", "--quick-eval",
                "--quiet", "--set", f"init={tmp_path / 'a'}"])


def test_recall_batch_confusable_keys_leave_the_stream_before_the_look_up_alone(tok):
    """confusable_share draws nothing before the curriculum starts (progress 0): the batches up to the
    look-up are the recipe's historical ones; after it, the share of confusable contexts shows."""
    import random
    from scrimp.testbed import train

    base = dict(train.RECIPES[("recall", "teacher")], confusable_share=0.0)
    hard = dict(base, confusable_share=1.0)
    assert train.recall_batch(tok, random.Random(5), 0.0, base) == \
        train.recall_batch(tok, random.Random(5), 0.0, hard)
    assert train.recall_batch(tok, random.Random(5), 0.5, base) != \
        train.recall_batch(tok, random.Random(5), 0.5, hard)


def test_schedule_step_keeps_the_lr_before_the_gate_and_stretches_it_after():
    """A recall run longer than lr_horizon uses the horizon's learning rates up to the gate (so the
    look-up forms at the same step) and spreads the rest of the schedule over the remaining steps."""
    from scrimp.testbed import train

    lr = lambda s, steps, gate: train._lr_at(train._schedule_step(s, steps, 6000, gate), 6000, 1e-3, 100)
    for s in (0, 50, 99, 100, 700, 1215):
        assert lr(s, 8000, None) == train._lr_at(s, 6000, 1e-3, 100)
    assert lr(1216, 8000, 1216) == train._lr_at(1216, 6000, 1e-3, 100)  # continuous at the gate
    assert abs(lr(7999, 8000, 1216) - train._lr_at(5999, 6000, 1e-3, 100)) < 1e-8  # ends at the floor
    steps = [lr(s, 8000, 1216) for s in range(1216, 8000)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # still decays monotonically
    assert train._schedule_step(3000, 6000, 6000, 1216) == 3000  # steps == horizon: the plain schedule


def test_induction_strings_over_a_small_alphabet_only_after_the_look_up(tok):
    """small_alphabet_share: induction strings over a random 6-35 symbol sub-alphabet (short n-grams
    recur, so a chunk is found only by its longer prefix), drawn only after the curriculum starts; the
    stream before it is the recipe's historical one. A bad alphabet is a clear error."""
    import random
    from scrimp.testbed import train

    ids, mask = train.induction_training_ids(tok, random.Random(4), 400, alphabet="ABC123")
    sep = tok.convert_tokens_to_ids("<doc>")
    assert set(tok.decode(ids[1:ids.index(sep)])) <= set("ABC123")
    for bad in ("", "A", "AAAA", "ab", 7):
        with pytest.raises(ValueError, match="alphabet"):
            train.induction_training_ids(tok, random.Random(0), 40, alphabet=bad)
    base = dict(train.RECIPES[("recall", "teacher")], small_alphabet_share=0.0, induction_share=1.0)
    small = dict(base, small_alphabet_share=1.0)
    assert train.recall_batch(tok, random.Random(5), 0.0, base) == train.recall_batch(tok, random.Random(5), 0.0, small)
    ids_s, _ = train.recall_batch(tok, random.Random(5), 0.5, small)
    for seq in ids_s:  # every induction string of the batch uses fewer than the 36 symbols
        assert len(set(tok.decode(seq[1:seq.index(sep)]))) < len(train.INDUCTION_ALPHABET)


def test_train_yarn_factor_continues_a_checkpoint_with_yarn_rope(tmp_path):
    """`--set yarn_factor=F` continues a checkpoint with YaRN RoPE scaling: the weights are the
    checkpoint's, the saved config carries the scaling (so `from_pretrained` rebuilds it), and the
    scaled model differs from the plain one only through its rotary embedding."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from scrimp.testbed import train as T
    from scrimp.testbed.tokenizer import get_tokenizer

    r = dict(T.RECIPES[("recall", "teacher")], init="recall", yarn_factor=4.0, yarn_original_max=2048)
    model = T.build_model(r, get_tokenizer(), seed=0)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 2048
    assert abs(model.model.rotary_emb.attention_scaling - (0.1 * math.log(4.0) + 1.0)) < 1e-9
    w0 = load_file(os.path.join(tb.path("recall"), "model.safetensors"))
    assert all(torch.equal(p, w0[k]) for k, p in model.state_dict().items() if k in w0)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.rope_parameters["rope_type"] == "yarn"
    ids = torch.tensor([tasks.recall(seed=3, context_tokens=3000, filler_share=0.5).prompt_ids])
    plain, _ = tb.load("recall")
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (model.eval(), again, plain))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    for bad, match in [(0.5, "yarn_factor must be 0"), (-1.0, "yarn_factor must be 0")]:
        with pytest.raises(ValueError, match=match):
            T.build_model(dict(r, yarn_factor=bad), get_tokenizer(), seed=0)
    with pytest.raises(ValueError, match="yarn_original_max must be >= 1"):
        T.build_model(dict(r, yarn_original_max=0), get_tokenizer(), seed=0)
