"""Helpers shared by the TESSY tests: tiny models, scripted backends, a loopback server."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from scrimp.tessy.backends import Backend, GenResult


def testbed_available(name="arith-student") -> bool:
    from scrimp import testbed
    try:
        return os.path.isfile(os.path.join(testbed.path(name), "config.json"))
    except Exception:
        return False


needs_testbed = pytest.mark.skipif(
    not (testbed_available("arith-student") and testbed_available("arith-teacher")),
    reason="the testbed arith checkpoints are not in this checkout")


def tiny_causal_lm(seed=0, hidden=32, layers=1, vocab=None):
    """A random-weight Qwen3 causal LM over the testbed tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from scrimp.testbed import get_tokenizer
    tok = get_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval(), tok


class ScriptBackend(Backend):
    """A scripted model: ``reply(trace, max_tokens) -> str | GenResult | Exception``,
    where ``trace`` is the text after the opening think marker of the prompt."""

    def __init__(self, name, reply, tokenizer=None):
        from scrimp.testbed import get_tokenizer
        self.name = name
        self.reply = reply
        self.tokenizer = tokenizer or get_tokenizer()
        self.calls = []

    async def generate(self, prompt, max_tokens, params):
        await asyncio.sleep(0)
        trace = prompt.split("<think>", 1)[1] if "<think>" in prompt else prompt
        self.calls.append((trace, max_tokens))
        r = self.reply(trace, max_tokens)
        if isinstance(r, BaseException):
            raise r
        if isinstance(r, GenResult):
            return r
        return GenResult(text=r, finish_reason="stop" if "</think>" in trace else "length")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ThreadServer:
    """Run a FastAPI app with uvicorn in a background thread on a loopback port."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ----------------------------------------------------------------------------- real models with set behaviour

def scripted_lm(path, emit: str, stop: bool = False):
    """A random-weight checkpoint (``path``) loaded and rewired so that greedy decoding always writes
    the token ``emit`` (a large LM-head bias on it) and, with ``stop``, ends with eos right after it:
    the embedding of ``emit`` is made large along one direction, which then dominates the final hidden
    state after that token, and the eos row of the LM head reads that direction. A real HF model and
    ``generate``, with a behaviour a test can predict. Returns ``(model, tokenizer)``."""
    import torch
    import scrimp
    model, tok = scrimp.load_model(path, device="cpu", dtype="float32")
    a = tok.convert_tokens_to_ids(emit)
    if a is None or a == tok.unk_token_id:
        raise ValueError(f"{emit!r} is not one token of {path}")
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[a] = 50.0
        if stop:
            g = torch.Generator().manual_seed(0)
            d = torch.nn.functional.normalize(torch.randn(head.in_features, generator=g), dim=0)
            model.get_input_embeddings().weight[a] = 50 * d
            ctx = torch.tensor([[tok.eos_token_id, a]])
            h = model.base_model(ctx).last_hidden_state[0, -1]  # the final hidden state after `emit`
            biased.weight[tok.eos_token_id] = 10 * torch.nn.functional.normalize(h, dim=0)
    model.set_output_embeddings(biased)
    return model.eval(), tok


class AlwaysCut:
    """A boundary predictor that ends every span after its first token (then the word extension):
    deterministic role switches for loop tests. ``tokenizer``: whose tokens it cuts."""

    def __init__(self, role, tokenizer):
        from scrimp.tessy.predictor import boundary_class
        self.role = role
        self.tokenizer = tokenizer
        self.name = "always-cut"
        self._cls = boundary_class(role)

    def predict(self, texts):
        out = []
        for t in texts:
            offs = [tuple(o) for o in self.tokenizer(t, add_special_tokens=False,
                                                     return_offsets_mapping=True)["offset_mapping"]]
            out.append((offs, [self._cls] * len(offs)))
        return out

    def cut_batch(self, contexts, generated, extend="word", min_span_tokens=1):
        from scrimp.tessy.predictor import Predictor
        return Predictor.cut_batch(self, contexts, generated, extend, min_span_tokens)

    def describe(self):
        return f"always-cut({self.role})"


def recording(backend):
    """Wrap ``backend.generate`` so that every ``(prompt, reply text)`` lands in ``backend.log``."""
    backend.log = []
    inner = backend.generate

    async def generate(prompt, max_tokens, params, **kw):
        r = await inner(prompt, max_tokens, params, **kw)
        backend.log.append((prompt, max_tokens, r.text, r.finish_reason))
        return r
    backend.generate = generate
    return backend
