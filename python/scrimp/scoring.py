"""Fused token scoring: entropies, KL divergences and target log-probs in one pass over logits.

The work is done by the compiled core (``scrimp._C``): one read of every logit, online softmax
statistics, no ``[N, V]`` intermediate. The op is registered with ``torch.library`` so it also works
inside ``torch.compile``-d code.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _C

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TokenScores(NamedTuple):
    """Per-token scores, float32 tensors shaped like the logits' leading dims (``logits.shape[:-1]``).

    Attributes
    ----------
    student_entropy : H(softmax(student / T)), nats.
    teacher_entropy : H(softmax(teacher / T)); None without a teacher.
    kl_forward : KL(P_T || P_S); None without a teacher.
    kl_reverse : KL(P_S || P_T); None without a teacher.
    student_logprob : log P_S[target]; None without targets.
    teacher_logprob : log P_T[target]; None without a teacher or targets.
    vocab_size : int, the |V| of the logits' last dimension (what normalising the entropy by log|V|
        needs, e.g. :func:`scrimp.tip.select`); None when built by hand without it.
    """

    student_entropy: torch.Tensor
    teacher_entropy: Optional[torch.Tensor]
    kl_forward: Optional[torch.Tensor]
    kl_reverse: Optional[torch.Tensor]
    student_logprob: Optional[torch.Tensor]
    teacher_logprob: Optional[torch.Tensor]
    vocab_size: Optional[int] = None


def _check_logits(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [..., V], got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16 logits, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected shape [..., V] with at least one dimension, got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: the vocabulary (last) dimension must be >= 1, got shape {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {x.device}")
    if x.numel() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name}: the last (vocabulary) dimension must be contiguous (stride 1), got strides "
            f"{tuple(x.stride())}; call .contiguous() first"
        )


def _stream_of(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.device.type == "cuda" else 0


def _wanted(has_teacher: bool, has_targets: bool) -> list[bool]:
    """Which of the six tensor fields of TokenScores are computed, in field order."""
    return [True, has_teacher, has_teacher, has_teacher, has_targets, has_teacher and has_targets]


@torch.library.custom_op("scrimp::token_scores", mutates_args=())
def _token_scores_op(
    student: torch.Tensor, teacher: Optional[torch.Tensor], targets: Optional[torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Fields that are not computed come back as empty tensors (a custom op has a fixed signature).
    wanted = _wanted(teacher is not None, targets is not None)
    lead = student.shape[:-1]
    outs = [torch.empty(lead if w else (0,), dtype=torch.float32, device=student.device) for w in wanted]
    _C.token_scores(
        student, teacher, targets, float(temperature),
        *[o if w else None for o, w in zip(outs, wanted)],
        stream=_stream_of(student),
    )
    return tuple(outs)


@_token_scores_op.register_fake
def _(student, teacher, targets, temperature):
    wanted = _wanted(teacher is not None, targets is not None)
    lead = student.shape[:-1]
    return tuple(student.new_empty(lead if w else (0,), dtype=torch.float32) for w in wanted)


def token_scores(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    targets: Optional[torch.Tensor] = None,
) -> TokenScores:
    """Entropy, forward/reverse KL and target log-probs of softmax(logits / temperature), fused.

    Parameters
    ----------
    student_logits : Tensor [..., V]
        float32, float16 or bfloat16 on CPU or CUDA; the last dim must be contiguous, the leading
        dims may have any strides. ``-inf`` marks masked vocabulary entries.
    teacher_logits : Tensor [..., V], optional
        Same shape, dtype and device as ``student_logits``.
    temperature : float
        Divides both logits before the softmax; finite and > 0.
    targets : LongTensor [...], optional
        Token ids (the logits' leading shape) whose log-probabilities are returned; values in
        ``[0, V)`` (out-of-range raises on CPU and gives NaN on CUDA, where checking would sync).

    Returns
    -------
    TokenScores
        float32 tensors of shape ``student_logits.shape[:-1]`` on the input's device, and
        ``vocab_size = student_logits.shape[-1]``. A row containing NaN gives NaN in that row's outputs
        only. Gradients do not flow through this function.
    """
    _check_logits(student_logits, "student_logits")
    if teacher_logits is not None:
        _check_logits(teacher_logits, "teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, "
                f"got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.dtype != student_logits.dtype:
            raise TypeError(f"teacher_logits: expected the student's dtype {student_logits.dtype}, got {teacher_logits.dtype}")
        if teacher_logits.device != student_logits.device:
            raise ValueError(f"teacher_logits: expected device {student_logits.device}, got {teacher_logits.device}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets: expected an int64 torch.Tensor, got {type(targets).__name__}")
        if targets.dtype != torch.int64:
            raise TypeError(f"targets: expected int64 token ids, got {targets.dtype}")
        if targets.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"targets: expected the logits' leading shape {tuple(student_logits.shape[:-1])}, got {tuple(targets.shape)}"
            )
        if targets.device != student_logits.device:
            raise ValueError(f"targets: expected device {student_logits.device}, got {targets.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature < float("inf")):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")

    outs = _token_scores_op(
        student_logits.detach(),
        None if teacher_logits is None else teacher_logits.detach(),
        None if targets is None else targets.detach(),
        temperature,
    )
    wanted = _wanted(teacher_logits is not None, targets is not None)
    return TokenScores(*[o if w else None for o, w in zip(outs, wanted)], vocab_size=int(student_logits.shape[-1]))
