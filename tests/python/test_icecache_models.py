"""IceCache on real architectures (random-weight Llama-3 / Qwen2 / Qwen3 / Mistral / Phi-3 checkpoints):
exact at budget >= context with and without chunked prefill, refused features, memory that follows the
tokens held (not the budget), no transformers deprecation warnings, and `scrimp icecache eval` on JSONL."""
import json
import warnings

import pytest
import torch

import scrimp
from scrimp.icecache import IceCache, cache_argument, generate, load_jsonl
from scrimp.models import load_model

from hf_models import SUPPORTED_ARCHS, make_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("icecache_models")


@pytest.fixture(scope="module")
def ckpt(root):
    return lambda arch: make_checkpoint(arch, root)


def _prompt(tok, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(tok), (1, n), generator=g)


def _greedy(model, ids, cache=None, n=24, mask=None, **kw):
    extra = {} if cache is None else {cache_argument(model): cache}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra, **kw)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("chunk", [None, 48])
def test_budget_above_context_reproduces_the_full_cache(ckpt, arch, chunk):
    model, tok = load_model(ckpt(arch))
    ids = _prompt(tok, 300)
    ref = _greedy(model, ids)
    cache = IceCache(model, budget=1024, page_size=16, dense_layers=0, prefill_chunk=chunk)
    out = generate(model, ids, cache, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                   do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    s = cache.stats()
    assert s["misses"] > 0  # pages went through the host pool and the device page cache
    assert torch.equal(_greedy(model, ids), ref)  # the model is unchanged for other caches


def test_chunked_prefill_with_left_padding_reuse_and_small_chunks_is_exact(ckpt):
    """Chunks smaller than the sink + window, a left-padded row whose padding spans two chunks, reused
    selections and two-level clustering: still the full cache's output at budget >= context."""
    model, tok = load_model(ckpt("qwen3"))
    a, b = _prompt(tok, 260, 1), _prompt(tok, 150, 2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 110, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :110] = 0
    ref = _greedy(model, ids, mask=mask, n=40)
    for chunk, extra in ((40, {}), (97, dict(reuse_selection=1, coarse_tokens=32, summaries=True))):
        cache = IceCache(model, budget=2048, page_size=8, dense_layers=0, prefill_chunk=chunk, **extra)
        out = _greedy(model, ids, cache, mask=mask, n=40, prefill_chunk_size=chunk)
        assert torch.equal(out, ref), (chunk, extra)


def test_chunked_prefill_at_a_small_budget_holds_only_its_buffers(ckpt):
    model, tok = load_model(ckpt("llama3"))
    ids = _prompt(tok, 600)
    cache = IceCache(model, budget=64, page_size=8, sink_pages=1, window_pages=1, dense_layers=0, prefill_chunk=64)
    out = _greedy(model, ids, cache, n=8, prefill_chunk_size=64)
    assert out.shape == (1, 608)
    for layer in cache.layers:
        assert layer.k_store.shape[0] == layer.B * layer.H * cache.cache_pages  # 2 x 6 selected pages
        assert layer.dense_k.shape[2] == 16  # sink + window


def test_memory_follows_the_tokens_held_not_the_budget(ckpt):
    """budget=2**20 on a 2,048-token prompt: the device page store and host pool are sized by the ~128
    pages per KV head the prompt fills, not by the 65,532 pages the budget would select."""
    model, tok = load_model(ckpt("llama3"))
    ids = _prompt(tok, 2048)
    cache = IceCache(model, budget=1 << 20, dense_layers=0)
    _greedy(model, ids, cache, n=4)
    full = IceCache(model, method="full")
    _greedy(model, ids, full, n=4)
    pages = -(-2052 // 16)
    for layer in cache.layers:
        assert layer.slots <= 2 * pages and layer.max_pages <= 2 * pages
        assert layer.k_store.shape[0] == layer.B * layer.H * layer.slots
    assert cache.device_bytes() <= 2.5 * full.device_bytes()
    assert cache.stats()["host_pool_bytes"] <= 2.5 * full.device_bytes()
    # a long decode grows the pool (its pages copied) and stays exact
    short = _prompt(tok, 100)
    ref = _greedy(model, short, n=200)
    grown = IceCache(model, budget=1 << 20, page_size=4, dense_layers=0, recluster_pages=2)
    first = []
    real = grown.layers[0]._grow
    grown.layers[0]._grow = lambda n: (first.append(n), real(n))
    assert torch.equal(_greedy(model, short, grown, n=200), ref)
    assert len(first) >= 3 and grown.layers[0].index.num_pages() >= 60


def test_max_context_caps_the_pool(ckpt):
    model, tok = load_model(ckpt("qwen2"))
    cache = IceCache(model, budget=1024, dense_layers=0, max_context=128)
    with pytest.raises(ValueError, match="page pool full"):
        _greedy(model, _prompt(tok, 400), cache, n=2)


def test_generate_raises_no_deprecation_warning(ckpt):
    model, tok = load_model(ckpt("mistral"))
    ids = _prompt(tok, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, ids, IceCache(model, budget=128, dense_layers=0, prefill_chunk=50),
                 attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model(ids, **{cache_argument(model): IceCache(model, budget=128, dense_layers=0)})


@pytest.mark.parametrize("arch,feature", [("mistral-sliding", "sliding_window"), ("gemma2", "sliding_window"),
                                          ("gemma2", "attn_logit_softcapping")])
def test_refused_features_are_named(ckpt, arch, feature):
    model, _ = load_model(ckpt(arch))
    where = "layers" if feature == "sliding_window" else f"{feature}="  # per layer, or the config field
    with pytest.raises(ValueError, match=rf"IceCache cannot run this .* model exactly: .*{feature}.*{where}"):
        IceCache(model.config)
    with pytest.raises(ValueError, match=feature):
        IceCache(model)
    IceCache(model.config, method="full")  # the full cache runs anything


def test_hybrid_layers_and_eager_attention_are_refused(ckpt):
    model, _ = load_model(ckpt("qwen2"))
    cfg = model.config
    with pytest.raises(ValueError, match="hybrid_layers"):
        c = type(cfg).from_dict(cfg.to_dict())
        c.layer_types = ["full_attention", "linear_attention"]
        IceCache(c)
    sinks, _ = load_model(ckpt("qwen2"))
    scrimp.hf.decoder_layers(sinks)[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # learned sinks
    with pytest.raises(ValueError, match="attention_sinks"):
        IceCache(sinks)
    cache = IceCache(sinks.config, budget=128, dense_layers=0)  # the config alone cannot show them ...
    with pytest.raises(ValueError, match="layer 1 exactly: attention_sinks"):  # ... the attention call does
        _greedy(sinks, torch.randint(5, 100, (1, 60)), cache, n=2)
    eager, _ = load_model(ckpt("qwen2"), attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        IceCache(eager)


def test_attention_call_carrying_a_refused_feature_is_refused_by_layer(ckpt):
    """A sliding window switched on after construction (the config passed the check) is refused when
    the attention function sees the call, naming the layer."""
    model, tok = load_model(ckpt("mistral"))
    cache = IceCache(model, budget=128, dense_layers=0)
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match=r"layer 0 exactly: sliding_window"):
        _greedy(model, _prompt(tok, 80), cache, n=2)


# ---- scrimp icecache eval ------------------------------------------------------------------------------

def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_cli_eval_runs_end_to_end_on_jsonl(ckpt, tmp_path, capsys):
    from scrimp import cli

    model, tok = load_model(ckpt("qwen2"))
    rows = []
    for i in range(3):  # answers the model itself gives: the full cache scores 3/3
        ids = _prompt(tok, 200, seed=10 + i)
        text = tok.decode(ids[0])
        new = _greedy(model, tok(text, return_tensors="pt").input_ids, n=3)[0, -3:]
        rows.append({"prompt": text, "answer": tok.decode(new, skip_special_tokens=True).strip() or "x"})
    data = _write_jsonl(tmp_path / "d.jsonl", rows + [""])
    out = tmp_path / "r.json"
    rc = cli.main(["icecache", "eval", "--model", ckpt("qwen2"), "--data", data, "--budgets", "64", "1024",
                   "--dense-layers", "0", "--prefill-chunk", "64", "--summary-rows", "16", "--max-new-tokens", "3",
                   "--json", str(out),
                   "--quiet", "--device", "cpu", "--dtype", "float32", "--seed", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["settings"]["summary_rows"] == 16
    full, small, big = res["rows"]
    assert (full["method"], small["budget"], big["budget"]) == ("full", 64, 1024)
    assert big["same_as_full"] == 3 and big["accuracy"] == full["accuracy"]
    assert small["device_kv_bytes_mean"] < big["device_kv_bytes_mean"]
    assert "icecache" in capsys.readouterr().out


@pytest.mark.parametrize("line,words", [
    ("[1, 2]", "bad.jsonl:2: got a JSON list"),
    ('{"prompt": "a"}', "bad.jsonl:2: 'answer' is missing"),
    ('{"prompt": "", "answer": "b"}', "bad.jsonl:2: 'prompt' is str"),
    ("{not json", "bad.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_lines_stop_before_anything_runs(tmp_path, line, words):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": "a"}, line])
    with pytest.raises(ValueError, match=words):
        load_jsonl(path)
    from scrimp import cli

    with pytest.raises(SystemExit):
        cli.main(["icecache", "eval", "--model", "/nonexistent/model", "--data", path])


def test_answer_rule():
    from scrimp.icecache import answer_matches

    assert answer_matches(" 042\n", "042") and answer_matches("042. yes", "042")
    assert not answer_matches("0421", "042") and not answer_matches("41", "042")
