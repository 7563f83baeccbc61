"""KV Packet on real architectures with random weights (Llama-3 rope scaling, Qwen2, Qwen3, Mistral,
Phi-3 partial rotary) and tokenizers without any marker tokens: re-rotation is exact for every rope
type it accepts, the engine's assembled cache equals the block-masked training forward, the
baselines and attention pruning run on every architecture, and what cannot be exact is refused."""
import math
import pytest
import torch

import scrimp
from hf_models import SUPPORTED_ARCHS, make_checkpoint
from scrimp.packets import method as M
from scrimp.packets.prompt import Prompt, build_prompt
from scrimp.packets.rope import RopeSpec, rerotate_keys, rope_spec, verify_rerotation
from scrimp.packets.store import _layers_of
from scrimp.packets.train import _student_inputs, student_answer_logits

DOCS = ["the river city was north of the mountain and seven blue packets were stored there.",
        "alpha beta gamma delta: the teacher asked the student to rotate every key carefully.",
        "eleven green vectors and thirteen orange matrices were evaluated quickly on the kernel."]
QUESTION = "which city was north of the mountain?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("packets-models")


@pytest.fixture(scope="module")
def models(root):
    return {a: scrimp.load_model(make_checkpoint(a, root), device="cpu", dtype="float32") for a in SUPPORTED_ARCHS}


# rope variants on top of the llama3 / phi3 test models: (name, base arch, config overrides)
ROPE_VARIANTS = [
    ("linear", "llama3", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    ("yarn", "llama3", dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                             "original_max_position_embeddings": 512})),
    ("dynamic", "llama3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                               max_position_embeddings=256)),
    ("longrope", "phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                               "short_factor": [1.0, 1.2, 1.5, 2.0],
                                               "long_factor": [2.0, 3.0, 4.0, 6.0],
                                               "original_max_position_embeddings": 128,
                                               "partial_rotary_factor": 0.5},
                              original_max_position_embeddings=128, max_position_embeddings=1024)),
]


@pytest.fixture(scope="module")
def rope_models(root):
    out = {}
    for name, arch, kw in ROPE_VARIANTS:
        out[name] = scrimp.load_model(make_checkpoint(arch, root, name=f"rope-{name}", **kw), device="cpu",
                                      dtype="float32")
    return out


@torch.no_grad()
def _cache_keys(model, ids, start):
    """Per-layer keys ``[1, kv_heads, n, head_dim]`` the model caches for ``ids`` at positions ``start..``."""
    out = M._forward(model, input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None],
                     cache=M._new_cache(model), use_cache=True)
    return [k for k, _ in _layers_of(M._out_cache(out))]


def _check_rerotation_exact(model, n=12, delta=53):
    ids = [(7 * i + 3) % 200 + 5 for i in range(n)]
    spec = rope_spec(model)
    at0, atd = _cache_keys(model, ids, 0), _cache_keys(model, ids, delta)
    for layer, (k0, kd) in enumerate(zip(at0, atd)):
        moved = rerotate_keys(k0, delta, spec.inv_freq, layout=spec.layout)
        torch.testing.assert_close(moved, kd, rtol=1e-4, atol=1e-5, msg=f"layer {layer}")
    return spec


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_rerotation_equals_the_models_own_keys(models, arch):
    model, _ = models[arch]
    spec = _check_rerotation_exact(model)
    if arch == "phi3":  # partial rotary: only the first half of the head dim rotates
        assert spec.rotary_dim == spec.head_dim // 2
    if arch == "llama3":
        assert spec.rope_type == "llama3"


@pytest.mark.parametrize("name", [v[0] for v in ROPE_VARIANTS])
def test_rerotation_is_exact_for_every_accepted_rope_type(rope_models, name):
    model, _ = rope_models[name]
    spec = _check_rerotation_exact(model)
    assert spec.rope_type == name
    if name == "yarn":  # keys carry yarn's attention factor; moving them keeps it
        assert spec.attention_scaling > 1.0
    if name in ("dynamic", "longrope"):
        assert spec.max_positions == (256 if name == "dynamic" else 128)
    else:
        assert spec.max_positions is None


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused_past_its_length(rope_models, name):
    model, tok = rope_models[name]
    eng = M.PacketEngine(model, tok, M.Adapters(model.config.hidden_size, 2, 2))
    short = Prompt([1], [list(range(5, 25))], [30, 31])
    eng.prepare(short, max_new_tokens=8)
    long = Prompt([1], [list(range(5, 105)), list(range(5, 105))], [30, 31])
    with pytest.raises(ValueError, match=f"rope type '{name}' switches its frequencies past"):
        eng.prepare(long, max_new_tokens=64)


def test_unknown_rope_type_and_wrong_layout_are_refused(models):
    model, _ = models["qwen2"]
    spec = rope_spec(model)
    bad = RopeSpec(spec.rope_type, spec.inv_freq, spec.head_dim, layout="interleaved")
    with pytest.raises(ValueError, match="rope type 'default'.*differ from the model's own"):
        verify_rerotation(model, bad)
    params = model.config.rope_parameters
    saved = dict(params)
    try:
        params["rope_type"] = "made-up"
        with pytest.raises(ValueError, match="rope type 'made-up' is not supported"):
            rope_spec(model)
    finally:
        params.clear()
        params.update(saved)


@torch.no_grad()
def _student_cache(model, adapters, prompt):
    x, mask, pos = _student_inputs(model, adapters, prompt.prefix, prompt.documents, list(prompt.question))
    out = M._forward(model, inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=M._new_cache(model),
                     use_cache=True)
    return _layers_of(M._out_cache(out))


@pytest.mark.parametrize("header_kv", ["every", "none"])
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_assembled_cache_equals_the_block_masked_forward(models, arch, header_kv):
    model, tok = models[arch]
    ad = M.Adapters(model.config.hidden_size, 4, 3, seed=2, header_kv=header_kv)
    with torch.no_grad():  # adapters far from zero so that a wrong mask or position shows
        ad.header.mul_(50)
        ad.trailer.mul_(50)
    eng = M.PacketEngine(model, tok, ad)
    prompt = eng.prompt(DOCS, QUESTION)
    cache, n, question, kv, docs, prefix = eng.prepare(prompt)
    ref = _student_cache(model, ad, prompt)
    # the student's rows: prefix, then each wrapped document; the assembled cache drops unread header rows
    rows, off = list(range(len(prefix))), len(prefix)
    for d in docs:
        first = off if header_kv == "every" else off + ad.n_header
        rows += range(first, off + ad.n_header + len(d) + ad.n_trailer)
        off += ad.n_header + len(d) + ad.n_trailer
    idx = torch.tensor(rows)
    for layer, ((k, v), (rk, rv)) in enumerate(zip(_layers_of(cache), ref)):
        torch.testing.assert_close(k, rk.index_select(2, idx), rtol=1e-4, atol=1e-5, msg=f"K layer {layer}")
        torch.testing.assert_close(v, rv.index_select(2, idx), rtol=1e-4, atol=1e-5, msg=f"V layer {layer}")
    logits = M._question_logits(model, cache, n, question)
    torch.testing.assert_close(logits, student_answer_logits(model, ad, prompt, [5])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_answer_in_plain_terms_and_store_hits(models, arch):
    model, tok = models[arch]
    eng = M.PacketEngine(model, tok, M.Adapters(model.config.hidden_size, seed=1))
    a = eng.answer(DOCS[:2], QUESTION, max_new_tokens=4)
    assert 1 <= len(a.token_ids) <= 4 and isinstance(a.text, str)
    assert math.isfinite(a.ttft_s) and math.isfinite(a.total_s)
    assert a.packets_built == 2 and a.packets_reused == 0
    # the question ends the user message of the chat template, the assistant header follows
    rendered = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(a.prompt.question).endswith(rendered.split("X")[1])
    assert tok.decode(a.prompt.prefix) == rendered.split("X")[0]
    # one document reused in another prompt, next to a new one: a store hit
    b = eng.answer([DOCS[1], DOCS[2]], "what was evaluated?", max_new_tokens=2)
    assert b.packets_built == 1 and b.packets_reused == 1 and eng.built == 3
    # token ids work as well as text, and equal the text's tokens
    c = eng.answer([list(d) for d in a.prompt.documents], list(a.prompt.question), max_new_tokens=4,
                   prefix=a.prompt.prefix)
    assert c.token_ids == a.token_ids and c.packets_built == 0


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_baselines_and_attention_pruning_on_every_architecture(models, arch):
    from scrimp.packets.prune import Pruning, attention_scores

    model, tok = models[arch]
    prompt = build_prompt(tok, DOCS, QUESTION)
    full = M.full_first_token_logits(model, prompt)
    # recomputing every document token is full attention; CacheBlend's deviation is 0 on a full cache
    eng = M.PacketEngine(model, tok, None)
    cache, n, question, kv, docs, prefix = eng.prepare(prompt)
    seq = list(prefix) + [t for d in docs for t in d]
    redone = M._recompute_positions(model, cache, seq, list(range(len(prefix), n)), n)
    torch.testing.assert_close(M._question_logits(model, redone, n, question), full, rtol=1e-4, atol=1e-4)
    fc = M._out_cache(model(input_ids=torch.tensor([seq]), use_cache=True))
    assert M._kv_deviation(model, fc, seq).abs().max() < 1e-8
    assert M._kv_deviation(model, eng.prepare(prompt)[0], seq)[len(prefix) + len(docs[0]):].max() > 0
    for sr in (M.SelectiveRecompute(model, tok, ratio=0.2), M.SelectiveRecompute(model, tok, first_k=3)):
        ids, ttft = sr.answer(prompt, 3)
        assert len(ids) >= 1 and math.isfinite(ttft) and sr.recomputed[0] > 0
    # attention-score pruning equals the model's eager attention weights (fused qkv, q_norm, partial rotary)
    ad = M.Adapters(model.config.hidden_size, 3, 2, seed=4)
    doc = prompt.documents[0]
    layers, hidden, pos = M._wrapped_prefill(model, doc, ad, hidden_states=True)
    s = attention_scores(model, hidden, layers, pos, 3, 3 + len(doc), 4, 2)
    impl = model.config._attn_implementation
    x = ad.wrap(M._embed(model, torch.tensor([doc])))
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            att = model(inputs_embeds=x, position_ids=pos, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(impl)
    w0 = x.shape[1] - 2
    want = torch.stack([a[0, :, w0:, 3:3 + len(doc)].double().mean(dim=(0, 1)) for a in att]).mean(0)
    torch.testing.assert_close(s.double(), want, rtol=1e-4, atol=1e-6)
    pe = M.PacketEngine(model, tok, ad, pruning=Pruning("attention", 0.5))
    assert pe.answer(prompt=prompt, max_new_tokens=2).token_ids


@pytest.mark.parametrize("arch,feature", [("mistral-sliding", "sliding_window"), ("gemma2", "attn_logit_softcapping")])
def test_models_kv_packet_cannot_run_exactly_are_refused(root, arch, feature):
    from scrimp.packets.train import train_adapters

    model, tok = scrimp.load_model(make_checkpoint(arch, root), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=f"KV Packet cannot run this .* model exactly: .*{feature}"):
        M.PacketEngine(model, tok)
    with pytest.raises(ValueError, match=feature):
        M.SelectiveRecompute(model, tok, ratio=0.1)
    with pytest.raises(ValueError, match=feature):
        train_adapters(model, [build_prompt(tok, DOCS, QUESTION)], steps=1, progress=False)


def test_prompt_building_checks_its_input(models):
    _, tok = models["llama3"]
    with pytest.raises(ValueError, match="documents is empty"):
        build_prompt(tok, [], QUESTION)
    with pytest.raises(ValueError, match="document is empty"):
        build_prompt(tok, ["  "], QUESTION)
    with pytest.raises(TypeError, match="documents must be a list"):
        build_prompt(tok, "one document", QUESTION)
    with pytest.raises(ValueError, match="question is empty"):
        build_prompt(tok, DOCS, " ")
    with pytest.raises(TypeError, match="token ids must be ints"):
        build_prompt(tok, [[1, 2.5]], QUESTION)
    plain = build_prompt(tok, DOCS, QUESTION, use_chat_template=False)
    assert plain.prefix == [] and tok.decode(plain.question) == QUESTION  # this tokenizer adds no <bos>
    assert plain.ids == [t for d in plain.documents for t in d] + plain.question
