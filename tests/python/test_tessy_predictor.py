"""TESSY boundary predictors: cut rule, lexicon fallback, trained classifier, annotation."""
import json

import pytest

from scrimp.testbed import get_tokenizer
from scrimp.tessy import (BoundaryPredictor, LexiconPredictor, annotate_texts, annotation_prompt,
                          evaluate_predictor, load_predictor, parse_annotation, train_predictor)
from scrimp.tessy.cli import testbed_examples
from scrimp.tessy.annotate import AnnotationError, EndpointAnnotator, chunk_words
from scrimp.tessy.predictor import CAPABILITY, STYLE, cut_generated, spans_to_token_labels

from tessy_helpers import ThreadServer


def test_spans_to_token_labels():
    offs = [(0, 1), (1, 5), (5, 6), (6, 8), (8, 9)]
    assert spans_to_token_labels(offs, [(1, 6)]) == [0, 1, 1, 0, 0]
    assert spans_to_token_labels(offs, [(2, 3)]) == [0, 1, 0, 0, 0]  # a span starting inside a token
    assert spans_to_token_labels(offs, []) == [0] * 5


def _toks(text):
    """Character-level offsets of every char (a simple tokenizer for cut tests)."""
    return [(i, i + 1) for i in range(len(text))]


def test_cut_teacher_before_style_token_kept_and_word_extension():
    ctx, gen = " so ", "12 + 7 = 19. Then 19"
    combined = ctx + gen
    offs = _toks(combined)
    # position i predicts the class of char i+1: the space before "Then" is style
    nxt = [CAPABILITY] * len(combined)
    sp = combined.index(". Then") + 1  # index of the space
    nxt[sp - 1] = STYLE  # predicted at '.', about the space
    c = cut_generated(ctx, gen, offs, nxt, "teacher")
    assert c.boundary and c.text == "12 + 7 = 19."
    # a cut inside a word is extended to the next whitespace
    nxt2 = [CAPABILITY] * len(combined)
    nxt2[combined.index("Then") + 1] = STYLE  # after "Th"
    c2 = cut_generated(ctx, gen, offs, nxt2, "teacher")
    assert c2.text == "12 + 7 = 19. Then"
    assert cut_generated(ctx, gen, offs, nxt2, "teacher", extend="none").text == "12 + 7 = 19. Th"
    # no boundary: everything is kept, no switch
    c3 = cut_generated(ctx, gen, offs, [CAPABILITY] * len(combined), "teacher")
    assert not c3.boundary and c3.text == gen
    # predictions on context tokens never cut
    nxt4 = [STYLE if i < len(ctx) else CAPABILITY for i in range(len(combined))]
    assert not cut_generated(ctx, gen, offs, nxt4, "teacher").boundary


def test_cut_student_and_extension_modes():
    ctx, gen = "", " Hmm, then 19 * 3"
    offs = _toks(gen)
    nxt = [STYLE] * len(gen)
    nxt[gen.index("19") - 1] = CAPABILITY  # at the space before "19": next is capability
    c = cut_generated(ctx, gen, offs, nxt, "student")
    assert c.boundary and c.text == " Hmm, then "
    # the official code's rule extends even after a space (into the next word)
    assert cut_generated(ctx, gen, offs, nxt, "student", extend="code").text == " Hmm, then 19"
    # min_span_tokens: the first generated token may not end the span
    nxt2 = [CAPABILITY] + [STYLE] * (len(gen) - 1)
    assert cut_generated(ctx, gen, offs, nxt2, "student").text == " "  # after the space: no word split
    assert cut_generated(ctx, gen, offs, nxt2, "student", extend="code").text == " Hmm,"
    assert cut_generated(ctx, gen, offs, nxt2, "student", min_span_tokens=2).boundary is False
    with pytest.raises(ValueError):
        cut_generated(ctx, gen, offs, nxt, "student", extend="bogus")
    with pytest.raises(ValueError):
        cut_generated(ctx, gen, offs, nxt, "judge")


def test_lexicon_predictor_on_testbed_traces():
    for role in ("teacher", "student"):
        ev = evaluate_predictor(LexiconPredictor(role, tokenizer=get_tokenizer()), testbed_examples(60, role, seed=5))
        assert ev["precision"] >= 0.95 and ev["recall"] >= 0.85, ev
        assert ev["first_boundary_agreement"] >= 0.9
    cuts = LexiconPredictor("teacher").cut_batch([" Okay so "], ["12 + 7 = 19. Then 19 * 3"])
    assert cuts[0].boundary and cuts[0].text == "12 + 7 = 19."
    cuts = LexiconPredictor("student").cut_batch(["12 + 7 = 19."], [" Hmm, then 19 * 3 = 57"])
    assert cuts[0].boundary and cuts[0].text == " Hmm, then "


def test_trained_classifier_precision_recall_and_save_load(tmp_path):
    train = testbed_examples(320, "teacher", seed=1)
    held = testbed_examples(60, "teacher", seed=2)
    pred = BoundaryPredictor.new("teacher", tokenizer=get_tokenizer(), hidden=64, layers=2)
    before = evaluate_predictor(pred, held)
    m = train_predictor(pred, train, epochs=4, lr=2e-3, batch_size=32)
    after = evaluate_predictor(pred, held)
    assert m["steps"] == 40
    assert after["precision"] >= 0.95 and after["recall"] >= 0.95, after
    assert after["f1"] > before["f1"] + 0.2
    pred.save_pretrained(str(tmp_path / "bt"))
    again = load_predictor(str(tmp_path / "bt"), "teacher")
    texts = [ex["text"] for ex in held[:5]]
    assert [x[1] for x in again.predict(texts)] == [x[1] for x in pred.predict(texts)]
    with pytest.raises(ValueError, match="teacher"):
        load_predictor(str(tmp_path / "bt"), "student")
    with pytest.raises(FileNotFoundError):
        load_predictor(str(tmp_path / "nothing"), "teacher")


def test_classifier_sees_only_the_last_tokens():
    pred = BoundaryPredictor.new("student", tokenizer=get_tokenizer(), hidden=16, layers=1, max_length=8)
    (offs, labs), = pred.predict(["a b c d e f g h i j k l"])
    assert len(offs) == len(labs) == 8
    assert offs[-1][1] == len("a b c d e f g h i j k l")


def test_classifier_tokenizer_mismatch():
    pred = BoundaryPredictor.new("teacher", tokenizer=get_tokenizer(), hidden=16, layers=1)
    small = BoundaryPredictor.new("teacher", tokenizer=get_tokenizer(), hidden=16, layers=1)
    small.model.resize_token_embeddings(10)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        BoundaryPredictor(small.model, get_tokenizer(), role="teacher")
    assert pred.role == "teacher"


# ----------------------------------------------------------------------------- annotation

def test_parse_annotation():
    text = "Okay so 12 + 7 = 19. Then 19 * 3 = 57. Then done."
    assert parse_annotation('["Okay so", "Then", "Then"]', text) == [(0, 7), (21, 25), (39, 43)]
    assert parse_annotation('```json\n["Okay so"]\n```', text) == [(0, 7)]
    assert parse_annotation('Here you go: ["Then"] hope it helps', text) == [(21, 25)]
    assert parse_annotation("[]", text) == []
    with pytest.raises(AnnotationError, match="not in the text"):
        parse_annotation('["Okay so", "Wait"]', text)
    assert parse_annotation('["Okay so", "Wait"]', text, strict=False) == [(0, 7)]
    with pytest.raises(AnnotationError, match="not a JSON array"):
        parse_annotation("no json here", text)
    with pytest.raises(AnnotationError, match="not an array"):
        parse_annotation('{"a": 1}', text)
    with pytest.raises(AnnotationError, match="non-empty string"):
        parse_annotation('["Okay so", 3]', text)
    # order matters: a phrase is searched after the previous match
    with pytest.raises(AnnotationError):
        parse_annotation('["Then", "Okay so"]', text)
    assert "JSON array" in annotation_prompt("x") and "<input_text>\nx\n</input_text>" in annotation_prompt("x")


def test_chunk_words():
    t = " ".join(str(i) for i in range(150))
    ch = chunk_words(t, 60)
    assert len(ch) == 3 and ch[0].split()[0] == "0" and ch[1].split()[0] == "60"
    assert chunk_words("short text", 60) == ["short text"]
    assert all(len(c.split()) == 60 for c in chunk_words(t, 60, n=5))


def _annotator_app(bad_every=0):
    """An OpenAI-compatible chat endpoint whose 'model' copies lexicon phrases as a JSON array."""
    import re
    from fastapi import FastAPI, Request
    app = FastAPI()
    lex = LexiconPredictor("teacher", tokenizer=get_tokenizer())
    state = {"n": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state["n"] += 1
        prompt = body["messages"][-1]["content"]
        text = re.search(r"<input_text>\n(.*)\n</input_text>", prompt, re.S).group(1)
        if bad_every and state["n"] % bad_every == 0:
            content = "I think the spans are: Okay"
        else:
            content = json.dumps([text[s:e].strip() for s, e in lex.style_spans(text) if text[s:e].strip()])
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}
    return app


def test_annotate_through_endpoint_then_train(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    traces = [ex["text"] for ex in testbed_examples(48, "student", seed=9)]
    with ThreadServer(_annotator_app(bad_every=6)) as srv:
        ann = EndpointAnnotator(srv.url, "annotator", api="chat")
        examples, rep = annotate_texts(ann, traces)
    assert rep["chunks"] == 48 and rep["accepted"] == 40 and sum(rep["rejected"].values()) == 8
    # the located spans are the annotator's phrases
    ex = examples[0]
    assert all(ex["text"][s:e].strip() for s, e in ex["spans"])
    pred = BoundaryPredictor.new("student", tokenizer=get_tokenizer(), hidden=64, layers=2)
    train_predictor(pred, examples[:32], epochs=12, lr=2e-3, batch_size=16)
    # it learns the annotator's labels (held-out annotated chunks) ...
    ev = evaluate_predictor(pred, examples[32:])
    assert ev["precision"] >= 0.9 and ev["recall"] >= 0.9, ev
    # ... which differ from the generator's ground truth only in the whitespace around phrases
    gt = evaluate_predictor(pred, testbed_examples(40, "student", seed=3))
    assert gt["recall"] >= 0.9, gt


def test_annotator_unreachable():
    pytest.importorskip("httpx")
    ann = EndpointAnnotator("http://127.0.0.1:9", "m", retries=0, timeout=2)
    examples, rep = annotate_texts(ann, ["Okay so 1 + 2 = 3."])
    assert examples == [] and rep["rejected"]


def test_local_annotator_path():
    """A local HF model as the annotator: a random-weight one replies garbage, so every
    chunk is rejected with a reason, and nothing crashes."""
    from scrimp.tessy import LocalAnnotator
    from tessy_helpers import tiny_causal_lm
    model, tok = tiny_causal_lm(seed=7)
    ann = LocalAnnotator(model, tok, max_tokens=6)
    examples, rep = annotate_texts(ann, ["Okay so 1 + 2 = 3.", "Then 3 * 2 = 6."])
    assert rep["chunks"] == 2 and rep["accepted"] + sum(rep["rejected"].values()) == 2
