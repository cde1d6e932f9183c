"""CPU path of `seam_blend` and `blend_lcm_step`: a scatter of weighted tiles with slicing adds, in fp32.

Layouts as in reference.seam_blend. Instead of accumulating Σ w·tile and Σ w and dividing afterwards (one extra
pass over the canvas), the normalisation is folded into per-tile weight maps first (cached across calls): wn_i = w / Σw over the tile's
footprint, an [th, tw] map per tile (C·B times smaller than the data). Then canvas = Σ_i wn_i · tile_i is one
fused multiply-add per tile element (`addcmul_` on a canvas slice), and pixels no tile covers stay 0. For the
fused LCM step the ε-coefficient of the update is folded into the weight maps as well, so the step is two more
in-place passes over the canvas.

The per-tile Python loop costs ~10 µs per tile; canvases have tens to a few hundred tiles, and each addcmul_ moves
C·B·th·tw elements, so the loop overhead stays small against the memory traffic.
"""
from __future__ import annotations

import collections
import weakref
from typing import Optional

import torch

# The sampler blends with the same grid and window every step: keep the last few weight-map sets. An entry is
# valid only for the very same weights tensor object (weak reference; a freed tensor whose memory is reused
# misses) at the same version counter (an in-place change misses).
_CACHE: "collections.OrderedDict[tuple, list]" = collections.OrderedDict()
_CACHE_SIZE = 4


def _normalised_weights(origins_y: list[int], origins_x: list[int], weights: torch.Tensor, height: int,
                        width: int) -> list[list[torch.Tensor]]:
    """w / Σw over each tile's footprint: fp32 [th, tw] per (iy, ix); 0 where Σw = 0. Cached."""
    key = (tuple(origins_y), tuple(origins_x), height, width, id(weights))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is weights and hit[1] == weights._version:
        _CACHE.move_to_end(key)
        return hit[2]
    th, tw = weights.shape
    w = weights.to(torch.float32)
    wsum = torch.zeros(height, width, dtype=torch.float32)
    for oy in origins_y:
        for ox in origins_x:
            wsum[oy:oy + th, ox:ox + tw] += w
    inv = torch.where(wsum > 0, 1.0 / torch.where(wsum > 0, wsum, torch.ones_like(wsum)), torch.zeros_like(wsum))
    maps = [[w * inv[oy:oy + th, ox:ox + tw] for ox in origins_x] for oy in origins_y]
    _CACHE[key] = (weakref.ref(weights), weights._version, maps)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return maps


def _accumulate(tiles: torch.Tensor, origins_y: list[int], origins_x: list[int], wn, out: torch.Tensor,
                scale: float = 1.0) -> None:
    """out[B, C, H, W] (fp32, zero) += scale · wn[iy][ix] · tile for every tile (mixed-dtype addcmul_: the
    bf16/fp16 tile is widened inside the kernel, no fp32 copy of it)."""
    B = out.shape[0]
    ny, nx = len(origins_y), len(origins_x)
    _, C, th, tw = tiles.shape
    t = tiles.view(B, ny, nx, C, th, tw)
    for iy, oy in enumerate(origins_y):
        for ix, ox in enumerate(origins_x):
            dst = out[:, :, oy:oy + th, ox:ox + tw]
            dst.addcmul_(t[:, iy, ix], wn[iy][ix], value=scale)


def seam_blend_cpu(tiles: torch.Tensor, origins_y: torch.Tensor, origins_x: torch.Tensor, weights: torch.Tensor,
                   batch: int, height: int, width: int) -> torch.Tensor:
    """canvas [batch, C, height, width] in tiles' dtype. Inputs are assumed checked (ops.check_seam_blend)."""
    oy, ox = origins_y.tolist(), origins_x.tolist()
    wn = _normalised_weights(oy, ox, weights, height, width)
    acc = torch.zeros(batch, tiles.shape[1], height, width, dtype=torch.float32)
    _accumulate(tiles.contiguous(), oy, ox, wn, acc)
    return acc if tiles.dtype == torch.float32 else acc.to(tiles.dtype)


def blend_lcm_step_cpu(tiles: torch.Tensor, origins_y: torch.Tensor, origins_x: torch.Tensor, weights: torch.Tensor,
                       sample: torch.Tensor, noise: Optional[torch.Tensor], sqrt_alpha_t: float, sqrt_beta_t: float,
                       c_skip: float, c_out: float, sqrt_alpha_prev: float,
                       sqrt_beta_prev: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev_sample, denoised) in sample's dtype.

    denoised = c_out·(s − √β_t·ε)/√α_t + c_skip·s = (c_out/√α_t + c_skip)·s + (−c_out·√β_t/√α_t)·ε: the ε
    coefficient goes into the weight maps, so the blend directly produces the ε term.
    """
    B, C, H, W = sample.shape
    oy, ox = origins_y.tolist(), origins_x.tolist()
    k_eps = -c_out * sqrt_beta_t / sqrt_alpha_t
    k_s = c_out / sqrt_alpha_t + c_skip
    wn = _normalised_weights(oy, ox, weights, H, W)
    den = torch.zeros(B, C, H, W, dtype=torch.float32)
    _accumulate(tiles.contiguous(), oy, ox, wn, den, scale=k_eps)
    den.add_(sample, alpha=k_s)  # fp32 += k_s · sample (promotes bf16/fp16 sample)
    if noise is None:
        out = den.to(sample.dtype)
        return out, out.clone()
    prev = torch.mul(den, sqrt_alpha_prev).add_(noise, alpha=sqrt_beta_prev)
    return prev.to(sample.dtype), den.to(sample.dtype)
