"""The shared testbed tokenizer: a tiny, deterministic Hugging Face fast tokenizer.

Design (built with the ``tokenizers`` library, no training needed):

* pre-tokenizer: every run of ASCII letters is one piece, every digit, space,
  newline and punctuation character is its own piece, so digits are always single
  tokens and whitespace is never lost;
* model: BPE with ``ignore_merges=True`` and no merges: a letter run that is a
  vocabulary word becomes one token, anything else falls back to single characters;
* decoder: ``Fuse`` (plain concatenation), so ``decode(encode(x)) == x`` for any
  printable-ASCII text;
* markers ``<think>``, ``</think>``, ``<doc>``, ``</doc>`` are whole (non-special)
  tokens; ``<bos>``, ``<eos>``, ``<pad>``, ``<unk>`` are special tokens.

The vocabulary is a fixed list (see :data:`WORDS`), so the tokenizer is rebuilt
bit-identically on any machine; the copy saved next to every checkpoint is the
one the models were trained with.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MARKERS = ["<think>", "</think>", "<doc>", "</doc>"]

# Printable ASCII plus newline: every character the generators can emit.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# Whole-word tokens (letter runs only). Style words of both arith styles, task
# words, and a few chat words.
WORDS = sorted(set("""
First Then Next Finally So Now After that then next finally so now after
Okay okay hmm Hmm Wait wait um Um let me see Let see think Alright alright Done done
plus minus times equals gives is makes result answer Answer The the So we get We get
Compute compute Query Question Document document value of what What key is
user assistant system Step step right Right yeah Yeah oh Oh and And this that
Good good check Check again
""".split()))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def vocabulary() -> list:
    """The ordered vocabulary (token id = index)."""
    vocab = list(SPECIAL_TOKENS) + list(MARKERS) + list(CHARS)
    for w in WORDS:
        if w not in vocab:
            vocab.append(w)
    return vocab


def build_tokenizer():
    """Build the testbed tokenizer as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    bpe = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_CACHE = {}


def get_tokenizer():
    """The (cached) testbed tokenizer built in memory."""
    if "tok" not in _CACHE:
        _CACHE["tok"] = build_tokenizer()
    return _CACHE["tok"]


def save_tokenizer(directory) -> None:
    get_tokenizer().save_pretrained(str(directory))
