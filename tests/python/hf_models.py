"""Random-weight Hugging Face checkpoints of real architectures, built offline for tests.

No weights can be downloaded in CI, so each test model is built from its transformers config with
random weights and a byte-level BPE tokenizer trained here on a few KB of text (special tokens unlike
the testbed's, a chat template), then saved as an ordinary checkpoint directory that
``scrimp.load_model(directory)`` and ``AutoModelForCausalLM.from_pretrained`` load.

    path = make_checkpoint("qwen2", tmp_path)            # -> directory
    model, tok = scrimp.load_model(path)

Architectures (:data:`ARCHS`): ``llama3`` (Llama with llama3 rope scaling), ``qwen2``, ``qwen3``,
``mistral`` (sliding window off), ``phi3`` (partial rotary, fused qkv), ``mistral-sliding``,
``gemma2`` (soft-capping + sliding window: models that methods must refuse).
"""
from __future__ import annotations

import functools
import os
import random
from typing import Dict

WORDS = ("the of and to in is was for on as with by at from that this which be are it an or have not but had "
         "river mountain city paper model token cache memory packet teacher student answer question document "
         "alpha beta gamma delta seven eleven thirteen blue green orange quickly slowly carefully north south "
         "compute store fetch rotate select prune train evaluate kernel vector matrix value key query").split()

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eos|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

#: a second special-token set and chat template (``make_tokenizer(..., specials="alt")``): a tokenizer
#: that differs from the default one in its special tokens as well as its vocabulary
SPECIALS_ALT = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]"]

CHAT_TEMPLATE_ALT = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                     "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}")


def corpus(n_sentences: int = 400, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        digits = " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3)))
        out.append(" ".join(words) + (" " + digits if digits else "") + ".")
    return out


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int, specials: str = "default") -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS if specials == "default" else SPECIALS_ALT,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(), trainer=trainer)
    return tk.to_str()


def make_tokenizer(vocab_size: int = 512, chat_template: bool = True, specials: str = "default"):
    """A PreTrainedTokenizerFast with a BPE vocabulary trained on :func:`corpus`; ``specials="alt"``
    uses :data:`SPECIALS_ALT` and :data:`CHAT_TEMPLATE_ALT` instead of the default set."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if specials not in ("default", "alt"):
        raise ValueError(f"specials must be 'default' or 'alt', got {specials!r}")
    names = SPECIALS if specials == "default" else SPECIALS_ALT
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, specials)),
                                  pad_token=names[0], bos_token=names[1], eos_token=names[2])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE if specials == "default" else CHAT_TEMPLATE_ALT
    return tok


def _base(vocab: int, **kw) -> Dict:
    d = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    d.update(kw)
    return d


def config_for(arch: str, vocab: int, **overrides):
    """The transformers config of a small random model of ``arch`` (see :data:`ARCHS`)."""
    import transformers as T

    if arch == "llama3":
        cfg = T.LlamaConfig(**_base(vocab, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512, "rope_theta": 500000.0}))
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**_base(vocab, use_sliding_window=False))
    elif arch == "qwen3":
        cfg = T.Qwen3Config(**_base(vocab, head_dim=32))
    elif arch == "mistral":
        cfg = T.MistralConfig(**_base(vocab, sliding_window=None))
    elif arch == "mistral-sliding":
        cfg = T.MistralConfig(**_base(vocab, sliding_window=64))
    elif arch == "phi3":
        cfg = T.Phi3Config(**_base(vocab, partial_rotary_factor=0.5, pad_token_id=0))
    elif arch == "gemma2":  # no SDPA path in transformers: eager attention
        cfg = T.Gemma2Config(**_base(vocab, head_dim=16, sliding_window=64, query_pre_attn_scalar=16))
    else:
        raise ValueError(f"unknown test architecture {arch!r}; known: {', '.join(ARCHS)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    return cfg


ARCHS = ("llama3", "qwen2", "qwen3", "mistral", "phi3", "mistral-sliding", "gemma2")
#: architectures every "any model" method must run exactly
SUPPORTED_ARCHS = ("llama3", "qwen2", "qwen3", "mistral", "phi3")


def make_checkpoint(arch: str, root, *, vocab_size: int = 512, seed: int = 0, name: str = None,
                    chat_template: bool = True, pad_vocab_to: int = 0, specials: str = "default",
                    **overrides) -> str:
    """Save a random-weight ``arch`` model + trained tokenizer under ``root``; returns the directory.

    The model's vocabulary is the tokenizer's as ``AutoTokenizer`` reloads it from the directory (some
    architectures add tokens, e.g. Qwen2's ``<|endoftext|>``), rounded up to a multiple of
    ``pad_vocab_to`` when given (LM heads padded past the tokenizer, as Qwen's 151936 rows).
    ``specials``: the tokenizer's special-token set (see :func:`make_tokenizer`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(str(root), name or f"{arch}-v{vocab_size}-p{pad_vocab_to}-s{seed}"
                        + ("" if specials == "default" else f"-{specials}"))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(vocab_size, chat_template=chat_template, specials=specials)
    config_for(arch, len(tok)).save_pretrained(path)  # so AutoTokenizer picks the architecture's class
    tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    vocab = len(tok)
    if pad_vocab_to:
        vocab = -(-vocab // pad_vocab_to) * pad_vocab_to
    torch.manual_seed(seed)
    cfg = config_for(arch, vocab, **overrides)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
