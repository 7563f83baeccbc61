"""Prompts for KV Packet: a prefix, the documents (one packet each) and the question, as token ids.

A :class:`Prompt` is what the engine, the training forward and the baselines share; its plain
concatenation ``prefix + documents... + question`` is the prompt a model with full attention reads
(the reference every method is measured against). :func:`build_prompt` makes one from text with the
model's own tokenizer, no marker tokens needed:

* with a chat template, the documents and the question form one user message: ``prefix`` is the
  rendered template before the message, ``question`` the question text followed by the rest of
  the template (end of turn, assistant header);
* without one, ``prefix`` is the special tokens the tokenizer puts before any text (e.g. ``<bos>``)
  and ``question`` the question's tokens.

Each document is tokenized on its own (text followed by ``separator``), so the same document text
gives the same tokens, hence the same packet, in every prompt it appears in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

__all__ = ["Prompt", "build_prompt", "tokenize_document", "DEFAULT_SEPARATOR"]

#: text appended to every document before tokenizing it (keeps documents apart in the plain prompt)
DEFAULT_SEPARATOR = "\n\n"

_SENTINEL = "\u2063SCRIMP_KV_PACKET_CONTENT\u2063"


@dataclass
class Prompt:
    """Token ids of a KV Packet prompt. ``ids`` is the plain concatenation full attention reads."""
    prefix: List[int]
    documents: List[List[int]]
    question: List[int]
    answer: Optional[List[int]] = field(default=None)  # reference answer tokens, when known

    def __post_init__(self):
        self.prefix = _ids("prefix", self.prefix)
        if isinstance(self.documents, (str, bytes)) or not isinstance(self.documents, Sequence):
            raise TypeError(f"documents must be a list of token-id lists, got {type(self.documents).__name__}")
        self.documents = [_ids(f"documents[{i}]", d) for i, d in enumerate(self.documents)]
        for i, d in enumerate(self.documents):
            if not d:
                raise ValueError(f"documents[{i}] is empty; every document needs at least one token")
        self.question = _ids("question", self.question)
        if not self.question:
            raise ValueError("the question has no tokens; it needs at least one")
        if self.answer is not None:
            self.answer = _ids("answer", self.answer)

    @property
    def ids(self) -> List[int]:
        """The plain prompt: ``prefix + documents... + question``."""
        return list(self.prefix) + [t for d in self.documents for t in d] + list(self.question)

    @property
    def context_len(self) -> int:
        """Tokens before the question (prefix and documents)."""
        return len(self.prefix) + sum(len(d) for d in self.documents)


def _ids(name: str, ids) -> List[int]:
    try:
        import torch

        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point:
                raise TypeError(f"{name}: token ids must be integers, got {ids.dtype}")
            ids = ids.reshape(-1).tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name}: expected a list of token ids, got {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{name}: token ids must be ints, got {type(t).__name__}")
        if t < 0:
            raise ValueError(f"{name}: token ids must be >= 0, got {t}")
        out.append(int(t))
    return out


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_special_ids(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts before any text (``[<bos>]`` for Llama, ``[]`` for Qwen)."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def _template_parts(tokenizer):
    """(text before, text after) the user message in the rendered chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not render the user message verbatim; "
                         "pass use_chat_template=False or token ids")
    head, tail = text.split(_SENTINEL)
    return head, tail


def tokenize_document(tokenizer, document: Union[str, Sequence[int]], separator: str = DEFAULT_SEPARATOR) -> List[int]:
    """Token ids of one document: ``document + separator`` tokenized alone, or ids as given."""
    if isinstance(document, str):
        if not document.strip():
            raise ValueError("a document is empty (or only whitespace)")
        return _encode(tokenizer, document + separator)
    return _ids("document", document)


def build_prompt(tokenizer, documents: Sequence[Union[str, Sequence[int]]], question: Union[str, Sequence[int]],
                 *, answer: Union[None, str, Sequence[int]] = None, use_chat_template: bool = True,
                 separator: str = DEFAULT_SEPARATOR, prefix: Optional[Sequence[int]] = None) -> Prompt:
    """A :class:`Prompt` from documents and a question given as text or token ids.

    Parameters
    ----------
    documents : each a string (tokenized alone with ``separator`` appended) or a list of token ids.
    question : a string (with ``use_chat_template`` and a tokenizer that has a chat template, the
        question ends the user message and the template's assistant header follows) or token ids
        (used as given).
    answer : optional reference answer (string or ids), kept on the prompt for scoring and training.
    prefix : token ids placed before the first document; default: the chat template's text before
        the user message, else the tokenizer's leading special tokens.
    """
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a list of strings or token-id lists, got {type(documents).__name__}")
    if not documents:
        raise ValueError("documents is empty; KV Packet needs at least one document")
    docs = [tokenize_document(tokenizer, d, separator) for d in documents]
    parts = _template_parts(tokenizer) if use_chat_template and isinstance(question, str) else None
    if isinstance(question, str):
        if not question.strip():
            raise ValueError("the question is empty")
        if parts is not None:
            head, tail = parts
            pre = _encode(tokenizer, head)
            q = _encode(tokenizer, question + tail)
        else:
            pre = _leading_special_ids(tokenizer)
            q = _encode(tokenizer, question)
    else:
        pre = _leading_special_ids(tokenizer)
        q = _ids("question", question)
    if prefix is not None:
        pre = _ids("prefix", prefix)
    ans = None
    if answer is not None:
        ans = _encode(tokenizer, answer) if isinstance(answer, str) else _ids("answer", answer)
    return Prompt(pre, docs, q, ans)
