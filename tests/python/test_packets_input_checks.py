"""KV Packet on bad input, on a tiny random Llama: adapter sizes (0 tokens round-trip), token ids
past the vocabulary, adapters loaded at another dtype, SelectiveRecompute options, interleaved rotary
layouts refused by name, stop ids given as integer-likes."""
import numpy as np
import pytest
import torch

from packets_helpers import tiny_recall_setup
from scrimp.packets import method as M
from scrimp.packets import rope as R
from scrimp.packets.cli import _non_negative_int
from scrimp.packets.bench import split_recall_prompt
from scrimp.packets.prompt import Prompt


@pytest.fixture(scope="module")
def setup():
    model, tok, ex = tiny_recall_setup(1, 120)
    return model, tok, split_recall_prompt(ex.prompt_ids, tok)


def test_adapter_sizes_are_checked_and_zero_tokens_round_trip(setup, tmp_path):
    model, tok, pr = setup
    hidden = model.config.hidden_size
    with pytest.raises(TypeError, match="n_header must be an int, got float"):
        M.Adapters(hidden, 2.0, 1)
    with pytest.raises(TypeError, match="n_trailer must be an int, got bool"):
        M.Adapters(hidden, 2, True)
    with pytest.raises(ValueError, match="n_trailer must be >= 0, got -1"):
        M.Adapters(hidden, 2, -1)
    for nh, nt in ((3, 0), (0, 2)):
        ad = M.Adapters(hidden, nh, nt, seed=1)
        path = str(tmp_path / f"a{nh}{nt}.safetensors")
        ad.save(path, model)
        back = M.Adapters.load(path, model)
        assert (back.n_header, back.n_trailer, back.adapter_id) == (nh, nt, ad.adapter_id)
        a = M.PacketEngine(model, tok, back).answer(prompt=pr, max_new_tokens=2)
        assert len(a.token_ids) >= 1
    import argparse
    assert _non_negative_int("0") == 0
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an int >= 0"):
            _non_negative_int(bad)


def test_token_ids_past_the_vocabulary_name_the_part(setup):
    model, tok, pr = setup
    n = model.get_input_embeddings().num_embeddings
    eng = M.PacketEngine(model, tok, None)
    cases = {"prefix": Prompt([n] + pr.prefix, pr.documents, pr.question),
             "documents\\[1\\]": Prompt(pr.prefix, [pr.documents[0], pr.documents[0] + [n + 5]], pr.question),
             "question": Prompt(pr.prefix, pr.documents, pr.question + [n])}
    for part, bad in cases.items():
        with pytest.raises(ValueError, match=f"^{part}: token id \\d+ is outside the model's vocabulary \\({n} "):
            eng.answer(prompt=bad, max_new_tokens=1)
        with pytest.raises(ValueError, match=f"^{part}: token id"):
            M.full_answer(model, bad, 1)
        with pytest.raises(ValueError, match=f"^{part}: token id"):
            M.full_first_token_logits(model, bad)
        with pytest.raises(ValueError, match=f"^{part}: token id"):
            M.SelectiveRecompute(model, tok, first_k=1).answer(bad, 1)
    with pytest.raises(ValueError, match="^document: token id"):
        eng.packet([1, n])
    with pytest.raises(ValueError, match="^prompt: token id"):
        M.full_first_token_logits(model, [1, 2, n])
    eng.answer(prompt=Prompt(pr.prefix, pr.documents, pr.question + [n - 1]), max_new_tokens=1)  # the last id is fine


def test_adapters_at_another_dtype_say_it_is_the_dtype(setup, tmp_path):
    model, tok, _ = setup
    ad = M.Adapters(model.config.hidden_size, 2, 0, seed=1)
    path = str(tmp_path / "f32.safetensors")
    ad.save(path, model)
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    msg = "trained for this model at dtype float32, and it is loaded as bfloat16: a packet's KV depends on the dtype"
    with pytest.raises(ValueError, match=msg):
        M.Adapters.load(path, half)
    with pytest.raises(ValueError, match=msg):
        M.PacketEngine(half, tok, M.Adapters.load(path, model))
    with torch.no_grad():
        half.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # another model, at another dtype
    with pytest.raises(ValueError, match=r"trained for model \w+ \(dtype float32\), not this model \(\w+, dtype bfloat16\)"):
        M.Adapters.load(path, half)


def test_selective_recompute_options_are_checked(setup):
    model, tok, _ = setup
    for kw, err, msg in ((dict(first_k=1.5), TypeError, "first_k must be an int, got float"),
                         (dict(first_k=True), TypeError, "first_k must be an int, got bool"),
                         (dict(first_k=-1), ValueError, "first_k must be >= 0, got -1"),
                         (dict(ratio="0.5"), TypeError, "ratio must be a real number, got str"),
                         (dict(ratio=float("nan")), ValueError, "ratio must be in \\[0, 1\\], got nan"),
                         (dict(ratio=1.5), ValueError, "ratio must be in \\[0, 1\\], got 1.5")):
        with pytest.raises(err, match=msg):
            M.SelectiveRecompute(model, tok, **kw)
    M.SelectiveRecompute(model, tok, first_k=0)
    M.SelectiveRecompute(model, tok, ratio=np.float32(0.25))


def test_interleaved_rotary_layout_is_refused_by_name(setup, monkeypatch):
    model, tok, _ = setup
    monkeypatch.setattr(model.config, "rope_interleave", True, raising=False)
    with pytest.raises(ValueError, match="rotary layout 'interleaved' \\(model type 'llama'\\) is not supported"):
        R.rope_spec(model)
    with pytest.raises(ValueError, match="rotary layout 'interleaved'"):
        M.PacketEngine(model, tok, None)
    monkeypatch.undo()
    assert R.interleaved_rope(type(model.config)(model_type="x")) is False
    # a layout that re-rotation does not reproduce is refused by every engine, naming the layout
    good = R.rope_spec(model)
    import scrimp.packets.engine as E  # where PacketEngine looks the rope spec up

    monkeypatch.setattr(E, "rope_spec", lambda m: R.RopeSpec(good.rope_type, good.inv_freq, good.head_dim,
                                                                 layout="interleaved"))
    with pytest.raises(ValueError, match="rope type 'default', rotary layout 'interleaved'.*differ from the model's own"):
        M.PacketEngine(model, tok, None)


def test_stop_ids_accept_integer_likes(setup):
    model, tok, _ = setup
    gc = model.generation_config
    saved = gc.eos_token_id
    try:
        for value, want in ((np.int64(7), {7}), (torch.tensor(7), {7}), ([np.int64(7), torch.tensor(9)], {7, 9}),
                            (torch.tensor([7, 9]), {7, 9}), (np.array([7, 9]), {7, 9})):
            gc.eos_token_id = value
            assert M.stop_ids(model, None) == want, value
        gc.eos_token_id = None
        assert M.stop_ids(model, tok) == {tok.eos_token_id}
    finally:
        gc.eos_token_id = saved
