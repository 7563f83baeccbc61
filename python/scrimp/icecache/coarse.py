"""The coarse pass of two-level clustering: spherical k-means of each stream's keys on their device."""
from __future__ import annotations

import torch

from .. import _C


def coarse_groups(keys: torch.Tensor, groups: int, iters: int = 4):
    """Spherical k-means of each stream's keys into `groups` coarse clusters on the keys' device.

    keys [S, N, D]. The assignment step is scrimp's nearest_centroid kernel (keys x centroids +
    argmax; CUDA or CPU). Returns (order [S, N] int64: tokens sorted by cluster, bounds [S, groups + 1]).
    """
    S, N, D = keys.shape
    kn = torch.nn.functional.normalize(keys.float(), dim=-1).contiguous()
    init = torch.linspace(0, N - 1, groups, device=keys.device).long()
    cen = kn[:, init].clone()  # [S, C, D]
    assign = torch.empty((S, N), dtype=torch.int32, device=keys.device)
    stream = torch.cuda.current_stream(keys.device).cuda_stream if keys.is_cuda else 0
    for it in range(iters + 1):
        for s in range(S):
            _C.nearest_centroid(kn[s], cen[s].contiguous(), assign[s], stream)
        if it == iters:
            break
        a = assign.long()
        new = torch.zeros_like(cen).scatter_add_(1, a[..., None].expand(S, N, D), kn)
        count = torch.zeros((S, groups), device=keys.device).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float))
        keep = count[..., None] > 0
        cen = torch.where(keep, torch.nn.functional.normalize(new, dim=-1), cen)
    a = assign.long()
    order = torch.argsort(a, dim=1, stable=True)
    count = torch.zeros((S, groups), dtype=torch.long, device=keys.device).scatter_add_(1, a, torch.ones_like(a))
    bounds = torch.cat([torch.zeros((S, 1), dtype=torch.long, device=keys.device), count.cumsum(1)], dim=1)
    return order, bounds
