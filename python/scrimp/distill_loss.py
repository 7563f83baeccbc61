"""Fused distillation losses with autograd: :func:`kl_loss`.

The compiled kernel (``scrimp._C.kl_loss``) reads each row of student and teacher logits three times
(log-partitions, loss sums, gradient) and writes the per-row loss and, in the same call, the gradient
with respect to the student logits *in the logits' dtype*. Backward is then a no-op (or one multiply
by the incoming gradient), so no float32 ``[N, V]`` log-softmax, probability or gradient buffer ever
exists - the buffers a plain torch KL (or TRL's ``generalized_jsd_loss``) keeps for backward.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _C

KINDS = {"reverse": 0, "forward": 1, "jsd": 2}
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _stream_of(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.device.type == "cuda" else 0


@torch.library.custom_op("scrimp::kl_loss_fwd", mutates_args=())
def _kl_loss_fwd(student: torch.Tensor, teacher: torch.Tensor, kind: int, beta: float, temperature: float,
                 grad_scale: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    student, teacher = student.detach(), teacher.detach()  # DLPack export refuses tensors that require grad
    rows = student.shape[:-1]
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty((0,))
    _C.kl_loss(student, teacher, int(kind), float(beta), float(temperature), loss,
               grad if need_grad else None, float(grad_scale), stream=_stream_of(student))
    return loss, grad


@_kl_loss_fwd.register_fake
def _(student, teacher, kind, beta, temperature, grad_scale, need_grad):
    loss = student.new_empty(student.shape[:-1], dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty((0,))
    return loss, grad


class _KLLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, kind, beta, temperature, reduction):
        need_grad = ctx.needs_input_grad[0]
        n = student.numel() // student.shape[-1]
        scale = 1.0 / n if (reduction == "mean" and n > 0) else 1.0
        rows, grad = _kl_loss_fwd(student.detach(), teacher.detach(), kind, beta, temperature, scale, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.need_grad = need_grad
        if reduction == "none":
            return rows
        return rows.mean() if reduction == "mean" else rows.sum()  # over float32 [N] (NaN mean when N = 0)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.need_grad:  # only the teacher required grad: it never receives one
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            g = grad * grad_out.unsqueeze(-1).to(grad.dtype)
        elif not torch.compiler.is_compiling() and bool(grad_out == 1):  # one scalar read (a sync on CUDA)
            g = grad  # the common loss.backward(): the saved gradient is the answer, no [N, V] copy
        else:
            g = grad * grad_out.to(grad.dtype)
        return g, None, None, None, None, None


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse", beta: float = 0.5,
            temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Fused per-token KL / generalized-JSD distillation loss over ``[..., V]`` logits.

    Parameters
    ----------
    student_logits : Tensor [..., V] (float32 / float16 / bfloat16, CPU or CUDA; the vocabulary dim
        contiguous). Gradients flow to it; the gradient has its dtype.
    teacher_logits : Tensor [..., V], same shape, dtype and device; never receives a gradient.
    kind : ``"reverse"`` KL(P_S || P_T) (the TIP / on-policy loss), ``"forward"`` KL(P_T || P_S), or
        ``"jsd"``: beta KL(P_T || M) + (1 - beta) KL(P_S || M), M = beta P_T + (1 - beta) P_S, equal to
        TRL's ``GKDTrainer.generalized_jsd_loss`` (beta = 0 is forward KL, beta = 1 reverse KL, as there).
    beta : JSD interpolation weight in [0, 1] (ignored by the KL kinds).
    temperature : both logits are divided by it before the softmax (no T^2 factor, as in TRL).
    reduction : ``"mean"`` over the N = prod(leading dims) rows, ``"sum"``, or ``"none"`` (float32
        ``[...]``).

    ``-inf`` logits are masked vocabulary entries (probability 0, contribute 0). With ``"mean"`` and
    N = 0 the result is NaN, as for ``torch.mean`` of an empty tensor.
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape [..., V], got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"{name}: expected logits with a vocabulary dimension [..., V], got a 0-d tensor")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16 logits, got {x.dtype}")
        if x.shape[-1] < 1:
            raise ValueError(f"{name}: the vocabulary (last) dimension must be >= 1, got shape {tuple(x.shape)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher/student vocabulary mismatch: student V={student_logits.shape[-1]}, teacher "
                         f"V={teacher_logits.shape[-1]}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"teacher_logits: expected the student's dtype {student_logits.dtype}, got {teacher_logits.dtype}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"teacher_logits: expected device {student_logits.device}, got {teacher_logits.device}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta: expected a float in [0, 1], got {beta!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")

    def fix(x):  # the kernel needs a contiguous vocabulary dim
        return x if (x.numel() == 0 or x.shape[-1] == 1 or x.stride(-1) == 1) else x.contiguous()

    return _KLLossFunction.apply(fix(student_logits), fix(teacher_logits), KINDS[kind], float(beta),
                                 float(temperature), reduction)


def kl_loss_reference(student_logits, teacher_logits, kind="reverse", beta=0.5, temperature=1.0, reduction="mean"):
    """The plain torch formula of :func:`kl_loss` (materialises float [N, V] log-softmaxes): the anchor
    the fused kernel is tested and benchmarked against. Computes in the inputs' dtype."""
    s = torch.log_softmax(student_logits / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits / temperature, dim=-1)

    def kl(lp, lq):  # KL(p || q) from log-probs; entries with p == 0 contribute 0 (and no NaN gradient)
        p = lp.exp()
        diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
        return (p * diff).sum(-1)

    if kind == "forward" or (kind == "jsd" and beta == 0):
        rows = kl(t, s)
    elif kind == "reverse" or (kind == "jsd" and beta == 1):
        rows = kl(s, t)
    else:
        both = (s == float("-inf")) & (t == float("-inf"))  # p = q = 0: keep logaddexp's gradient finite
        a = torch.where(both, torch.zeros_like(t), t) + torch.log(torch.tensor(beta, dtype=s.dtype))
        b = torch.where(both, torch.zeros_like(s), s) + torch.log1p(torch.tensor(-beta, dtype=s.dtype))
        m = torch.logaddexp(a, b)
        rows = beta * kl(t, m) + (1 - beta) * kl(s, m)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
