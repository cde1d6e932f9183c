"""Image-quality metrics for tiled generation.

`seam_ratio` follows the idea of the seam score of Tiled Diffusion (CVPR'25): a visible seam is a line where the
image gradient is systematically larger than elsewhere. We compare the mean absolute finite difference *across*
the given seam lines with the mean absolute finite difference everywhere else.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _band(seams: Sequence[int], n_diffs: int, width: int) -> torch.Tensor:
    """Mask over the n_diffs finite differences d[i] = I[i+1] − I[i]: True within `width` of a seam.

    A seam at s is the boundary between rows s−1 and s, i.e. difference index s−1; width w marks indices
    s−w … s+w−2 (w=1: only s−1).
    """
    m = torch.zeros(n_diffs, dtype=torch.bool)
    for s in seams:
        lo, hi = max(s - width, 0), min(s + width - 1, n_diffs)
        if 0 < s <= n_diffs:
            m[lo:hi] = True
    return m


def seam_ratio(image: torch.Tensor, seams_y: Sequence[int] = (), seams_x: Sequence[int] = (), width: int = 1) -> float:
    """mean |∇| across the seam lines / mean |∇| elsewhere, for image [B, C, H, W] or [C, H, W].

    seams_y: canvas rows where a horizontal seam starts (boundaries between row s−1 and s); seams_x likewise for
    columns. Vertical differences are scored at horizontal seams and horizontal differences at vertical seams;
    all other differences (both directions) form the baseline. ≈ 1.0 = seamless; ≫ 1 = visible seams.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"seam_ratio: image must be [B, C, H, W] or [C, H, W], got shape {tuple(image.shape)}")
    if width < 1:
        raise ValueError(f"seam_ratio: width must be >= 1, got {width}")
    if not seams_y and not seams_x:
        raise ValueError("seam_ratio: give at least one seam in seams_y or seams_x")
    x = image.double()
    H, W = x.shape[-2:]
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1))  # [H-1, W]
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1))  # [H, W-1]
    my = _band(seams_y, H - 1, width)
    mx = _band(seams_x, W - 1, width)
    on = torch.cat([dy[my].flatten(), dx[:, mx].flatten()])
    off = torch.cat([dy[~my].flatten(), dx[:, ~mx].flatten()])
    if on.numel() == 0 or off.numel() == 0:
        raise ValueError(f"seam_ratio: seams {list(seams_y)}, {list(seams_x)} leave no seam or no baseline pixels "
                         f"in a {H}x{W} image")
    base = off.mean().item()
    return float("inf") if base == 0 else on.mean().item() / base


def tile_seams(origins: Sequence[int], tile: int, overlap_mid: bool = True) -> list[int]:
    """Seam lines of a tiling along one axis: the middle of each overlap (or each tile start if overlap_mid=False)."""
    o = list(origins)
    if overlap_mid:
        return [(o[i] + o[i - 1] + tile) // 2 for i in range(1, len(o))]
    return o[1:]
