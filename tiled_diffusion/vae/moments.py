"""Exact canvas GroupNorm statistics: per-band moments, their one combination formula (`merge_moments`, also what
the ranks of a parallel decode combine with), and the normalisation with the canvas statistics."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def merge_moments(n_a: int, mean_a: Optional[torch.Tensor], m2_a: Optional[torch.Tensor], n_b: int,
                  mean_b: torch.Tensor, m2_b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise combination of two parts' (count, mean, M2 = Σ(x - mean)²): the M2s plus the spread
    of the two means (never a mean of variances). n_a = 0 (mean_a, m2_a None) is the empty part. The one place this
    formula lives: bands of one canvas (GroupStats) and ranks of a parallel one (parallel/comm.py)."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


def band_moments(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-(image, group) mean and M2 = Σ(x - mean)² of a band [B, C, rows, W] (any layout, float dtype), fp64
    [B, G], and the element count per group.

    On the CPU: aten's group-norm kernel (vectorised, channels-last aware, mixed dtype; 6x faster there than
    torch.var_mean): fp32 weights make it return fp32 moments for bf16/fp16 input, eps = 0 so var = rstd^-2 exactly.
    Elsewhere that op is no option — CUDA's native_group_norm wants contiguous NCHW input and one dtype for input
    and weights (bf16 moments would round the mean to 8 bits), and bands are channels-last slices — so they are a
    Welford var_mean in fp32 over (channels of the group, rows, W), a few groups at a time so the fp32 copy of a
    half-precision band stays at most half the band's own bytes."""
    B, C = t.shape[:2]
    cpg = C // groups
    nb = t[0, 0].numel() * cpg
    if t.device.type == "cpu":
        one = torch.ones(C, dtype=torch.float32, device=t.device)
        _, mean, rstd = torch.ops.aten.native_group_norm(t, one, torch.zeros_like(one), B, C, t[0, 0].numel(),
                                                         groups, 0.0)
        mean = mean.double().view(B, groups)
        return mean, rstd.double().view(B, groups).pow(-2) * nb, nb
    mean, m2 = var_mean_moments(t, groups)
    return mean, m2, nb


def var_mean_moments(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """band_moments' path for every device but the CPU (callable on the CPU too, so the CPU tests cover it)."""
    B, C = t.shape[:2]
    cpg = C // groups
    nb = t[0, 0].numel() * cpg
    step = groups if t.dtype == torch.float32 else max(1, groups // 4)
    means, vars_ = [], []
    for g0 in range(0, groups, step):
        x = t[:, g0 * cpg:min(groups, g0 + step) * cpg].float().unflatten(1, (-1, cpg))  # [B, g, cpg, rows, W]
        var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0)
        means.append(mean)
        vars_.append(var)
    return torch.cat(means, 1).double(), torch.cat(vars_, 1).double() * nb


class GroupStats:
    """Per-(image, group) mean and M2 of a canvas, accumulated band by band (Chan et al.'s pairwise combination)."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        self.gn = gn
        self.n = 0
        self.mean = self.m2 = None  # fp64 [B, G]

    def add(self, t: torch.Tensor) -> None:
        """t: a band of the canvas [B, C, rows, W]; each canvas position must be added exactly once."""
        mean, m2, nb = band_moments(t, self.gn.num_groups)
        self.n, self.mean, self.m2 = merge_moments(self.n, self.mean, self.m2, nb, mean, m2)

    def norm_args(self) -> tuple[torch.Tensor, ...]:
        """(mean, var, weight, bias) per image and channel, fp32 [B·C]: GroupNorm with these statistics is
        batch_norm in inference form over the B·C channels."""
        gn = self.gn
        B = self.mean.shape[0]
        cpg = gn.num_channels // gn.num_groups
        mean = self.mean.repeat_interleave(cpg, dim=1).flatten().float()
        var = (self.m2 / self.n).repeat_interleave(cpg, dim=1).flatten().float()
        if gn.affine:
            w, b = gn.weight.detach().float().repeat(B), gn.bias.detach().float().repeat(B)
        else:
            w, b = torch.ones_like(mean), torch.zeros_like(mean)
        return mean, var, w, b


def normed(x: torch.Tensor, stats: GroupStats) -> torch.Tensor:
    """GroupNorm of a band with the canvas statistics, computed in fp32 and returned in x's dtype (like the CPU and
    CUDA group_norm kernels): one batch_norm over [1, B·C, rows, W] (2.4x faster than an fp32 addcmul for bf16)."""
    B, C = x.shape[:2]
    args = [a.to(x.device) for a in stats.args]
    y = F.batch_norm(x.reshape(1, B * C, *x.shape[2:]), args[0], args[1], args[2], args[3], False, 0.0,
                     stats.gn.eps)
    return y.view(x.shape)


def group_stats(gn: Optional[nn.GroupNorm]) -> Optional[GroupStats]:
    return GroupStats(gn) if gn is not None else None
