"""float64 torch references shared by the kernel tests."""
import torch


def _plogratio(p, a, b):
    # p * (a - b) with 0 where p == 0 (masked entries contribute nothing); NaN stays NaN.
    term = p * (a - b)
    return torch.where(p == 0, torch.zeros_like(term), term).sum(-1)


def token_scores_reference(s, t=None, temperature=1.0, targets=None):
    ls = torch.log_softmax(s.double() / temperature, -1)
    ps = ls.exp()
    out = {"student_entropy": -_plogratio(ps, ls, torch.zeros_like(ls))}
    if t is not None:
        lt = torch.log_softmax(t.double() / temperature, -1)
        pt = lt.exp()
        out["teacher_entropy"] = -_plogratio(pt, lt, torch.zeros_like(lt))
        out["kl_forward"] = _plogratio(pt, lt, ls)
        out["kl_reverse"] = _plogratio(ps, ls, lt)
    if targets is not None:
        out["student_logprob"] = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if t is not None:
            out["teacher_logprob"] = lt.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return out
