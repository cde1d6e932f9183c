"""Pure-PyTorch version of every op: the test oracle and the fallback on devices without a kernel.

Short and obviously right beats fast here. Each function has the same name and argument order as its op
in ops.py (`torch.ops.tiled_diffusion.<name>`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# --------------------------------------------------------------------------------------------- int8 GEMM


# Rows with absmax below this (127 * 2^-126) would get a subnormal scale and an infinite 1 / scale: they quantize
# like an all-zero row. The CUDA kernel (csrc/cuda/int8_gemm.cu, kTinyBits) compares the same bits.
TINY_ABSMAX = 127 * 2.0**-126


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_i8 [M, K] int8, scale [M] fp32); symmetric: x ≈ x_i8 * scale, scale = absmax / 127,
    x_i8 = round-half-to-even(x * (1 / scale)) in fp32, clamped to [-127, 127].

    Edge rows, defined the same on every device: absmax < TINY_ABSMAX (all-zero, subnormal or tiny rows) -> scale
    0 and zeros; a row holding NaN -> scale NaN and zeros; ±inf (no NaN) -> scale inf and zeros. A non-finite row
    thus dequantizes to NaN (0 * NaN / inf) instead of a silently finite value. Subnormal elements of a normal
    row are quantized without flushing them to zero.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # NaN when the row holds a NaN
    ok = (amax >= TINY_ABSMAX) & (amax < math.inf)  # False for NaN
    scale = torch.where(amax < TINY_ABSMAX, torch.zeros_like(amax), amax / 127.0)
    inv = torch.where(ok, 1.0 / scale, torch.zeros_like(scale))
    x_i8 = torch.where(ok[:, None], torch.round(xf * inv[:, None]), torch.zeros_like(xf))
    return x_i8.clamp_(-127, 127).to(torch.int8), scale


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """a [M, K] int8, a_scale [M] fp32, w [N, K] int8, w_scale [N] fp32, bias [N] -> out [M, N] out_dtype.

    out = (a @ wᵀ computed exactly in integers) * a_scale[:, None] * w_scale[None, :] + bias
    """
    acc = (a.to(torch.int64) @ w.to(torch.int64).t()).to(torch.float64)
    out = acc * a_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        out = out + bias.double()[None, :]
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------- window attention


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    neighbours: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query tile attends to the keys of the tiles listed in its neighbour row.

    q, k, v: [T, H, L, D] (T tiles, batch folded in; L tokens per tile). neighbours: int32 [T, NB], key-tile
    indices, -1 = empty slot. bias: fp32 [T, NB] additive log-weight per neighbour (-inf = excluded).
    Returns out [T, H, L, D] (q's dtype) and lse [T, H, L] fp32 (natural log of the softmax denominator,
    scaled logits). A query with no valid key gets out = 0 and lse = -inf.
    """
    T, H, L, D = q.shape
    NB = neighbours.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nb = neighbours.long()
    valid = nb >= 0
    idx = nb.clamp(min=0)
    kg = k.double()[idx]  # [T, NB, H, L, D]
    vg = v.double()[idx]
    kg = kg.permute(0, 2, 1, 3, 4).reshape(T, H, NB * L, D)
    vg = vg.permute(0, 2, 1, 3, 4).reshape(T, H, NB * L, D)
    logits = torch.einsum("thld,thsd->thls", q.double(), kg) * scale
    slot_bias = torch.zeros(T, NB, dtype=torch.float64, device=q.device) if bias is None else bias.double()
    slot_bias = torch.where(valid, slot_bias, torch.full_like(slot_bias, -math.inf))
    logits = logits + slot_bias.repeat_interleave(L, dim=1)[:, None, None, :]
    lse = torch.logsumexp(logits, dim=-1)  # -inf for rows without a valid key
    p = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("thls,thsd->thld", p, vg)
    return out.to(q.dtype), lse.float()


def neighborhood_bounds(n: int, window: int, stride: int = 1, clip: bool = False,
                        offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Key range [start, end) per query index along one canvas axis of n tokens: int64 [n], [n].

    The window of `window` tokens is centred on the query's stride group: groups start at `offset` (in
    (-stride, 0]; a negative offset makes the first group partial, e.g. the half-tile shift of the tile-blocked
    mode), group g = (i - offset) // stride holds the tokens [offset + g·stride, offset + g·stride + stride), its
    centre token is c = offset + g·stride + stride // 2 (stride 1: c = i), and the
    window starts window // 2 tokens before c — so an even window (or an even stride) puts the extra token on the
    left/top side: window // 2 keys before c, (window - 1) // 2 after (NATTEN's convention). At the canvas border:
    clip=False (NATTEN): the window is shifted inward so it keeps `window` keys (a window ≥ n is the whole axis);
    clip=True: the window is cut at the border (fewer keys; stride = tile, window = (2r+1)·tile is then exactly
    the tile-blocked window of `window_attention`). A partial last group keeps the same centre formula.
    """
    i = torch.arange(n)
    start = offset + ((i - offset) // stride) * stride + stride // 2 - window // 2
    if clip:
        return start.clamp(min=0, max=n), (start + window).clamp(min=0, max=n)
    w = min(window, n)
    start = start.clamp(min=0, max=n - w)
    return start, start + w


def neighborhood_axis_mask(n: int, window: int, stride: int = 1, clip: bool = False, offset: int = 0) -> torch.Tensor:
    """bool [n, n]: along one canvas axis of n tokens, whether query i may attend key j (neighborhood_bounds)."""
    lo, hi = neighborhood_bounds(n, window, stride, clip, offset)
    j = torch.arange(n)
    return (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: list[int],
    stride: list[int] = (1, 1),
    clip: bool = False,
    offset: list[int] = (0, 0),
    scale: Optional[float] = None,
    band: Optional[list[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D neighbourhood attention on the token canvas (NATTEN; GNA with a stride).

    q, k, v: [B, H, Ht, Wt, D] (B canvases, batch rows never mix). Query (y, x) attends the keys (y', x') with
    y' in neighborhood_bounds(Ht, window[0], stride[0], clip, offset[0])[y] and likewise along x. Returns out
    [B, H, Ht, Wt, D] (q's dtype) and lse [B, H, Ht, Wt] fp32 (natural log of the softmax denominator, scaled
    logits). A query whose window is empty (only possible with clip) gets out = 0 and lse = -inf.

    band (canvas_h, q_top, k_top), for a horizontal band of a taller canvas (one rank's rows): q holds the canvas
    rows [q_top, q_top + Hq) and k, v the rows [k_top, k_top + Hk) (Hk may differ from Hq); windows are those of
    the canvas_h-row canvas. None (or canvas_h 0): q, k and v are the whole canvas.
    """
    B, H, Ht, Wt, D = q.shape
    Hk = k.shape[2]
    canvas_h, q_top, k_top = band if band is not None and band[0] else (Ht, 0, 0)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    masks = []
    for n, w, s, o, rows in ((canvas_h, window[0], stride[0], offset[0], (q_top, Ht, k_top, Hk)),
                             (Wt, window[1], stride[1], offset[1], (0, Wt, 0, Wt))):
        q0, nq, k0, nk = rows
        masks.append(neighborhood_axis_mask(n, w, s, clip, o)[q0:q0 + nq, k0:k0 + nk])  # [query, key] on the axis
    my, mx = masks
    allowed = (my[:, None, :, None] & mx[None, :, None, :]).reshape(Ht * Wt, Hk * Wt).to(q.device)
    qf = q.double().reshape(B, H, Ht * Wt, D)
    kf, vf = (t.double().reshape(B, H, Hk * Wt, D) for t in (k, v))
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = p @ vf
    return out.reshape(B, H, Ht, Wt, D).to(q.dtype), lse.reshape(B, H, Ht, Wt).float()


def merge_attention(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets: out [..., L, D], lse [..., L]."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    out = w1 * out1.float() + w2 * out2.float()
    return out.to(out1.dtype), lse


# ------------------------------------------------------------------------------------------ seam blend


def seam_blend(
    tiles: torch.Tensor,
    origins_y: torch.Tensor,
    origins_x: torch.Tensor,
    weights: torch.Tensor,
    batch: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """Weighted average of overlapping tiles on the canvas.

    tiles [N, C, th, tw] with N = batch * ny * nx ordered (b, iy, ix); origins_y int32 [ny], origins_x int32
    [nx]: top-left corner of each tile row/column on the canvas; weights fp32 [th, tw]: the window profile.
    canvas[b, c, y, x] = Σ w·tile / Σ w over the tiles covering (y, x); 0 where Σ w = 0. Output dtype = tiles'.
    """
    N, C, th, tw = tiles.shape
    ny, nx = origins_y.numel(), origins_x.numel()
    acc = torch.zeros(batch, C, height, width, dtype=torch.float64, device=tiles.device)
    wsum = torch.zeros(height, width, dtype=torch.float64, device=tiles.device)
    t = tiles.double().reshape(batch, ny, nx, C, th, tw)
    w = weights.double()
    for iy, oy in enumerate(origins_y.tolist()):
        for ix, ox in enumerate(origins_x.tolist()):
            acc[:, :, oy : oy + th, ox : ox + tw] += t[:, iy, ix] * w
            wsum[oy : oy + th, ox : ox + tw] += w
    out = torch.where(wsum > 0, acc / torch.where(wsum > 0, wsum, torch.ones_like(wsum)), torch.zeros_like(acc))
    return out.to(tiles.dtype)


def lcm_step(
    eps: torch.Tensor,
    sample: torch.Tensor,
    noise: Optional[torch.Tensor],
    sqrt_alpha_t: float,
    sqrt_beta_t: float,
    c_skip: float,
    c_out: float,
    sqrt_alpha_prev: float,
    sqrt_beta_prev: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCMScheduler.step for an epsilon-predicting model (diffusers' formula, no thresholding).

    x0 = (sample - sqrt_beta_t * eps) / sqrt_alpha_t; denoised = c_out * x0 + c_skip * sample;
    prev = sqrt_alpha_prev * denoised + sqrt_beta_prev * noise (noise None on the last step: prev = denoised).
    Returns (prev_sample, denoised) in sample's dtype.
    """
    s = sample.double()
    x0 = (s - sqrt_beta_t * eps.double()) / sqrt_alpha_t
    denoised = c_out * x0 + c_skip * s
    prev = denoised if noise is None else sqrt_alpha_prev * denoised + sqrt_beta_prev * noise.double()
    return prev.to(sample.dtype), denoised.to(sample.dtype)


def blend_lcm_step(tiles: torch.Tensor, origins_y: torch.Tensor, origins_x: torch.Tensor, weights: torch.Tensor,
                   sample: torch.Tensor, noise: Optional[torch.Tensor], *coefficients: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """seam_blend of tile ε-predictions onto sample's canvas [B, C, H, W], then lcm_step on the canvas.
    coefficients: lcm_step's six (sqrt_alpha_t, sqrt_beta_t, c_skip, c_out, sqrt_alpha_prev, sqrt_beta_prev)."""
    B, _, H, W = sample.shape
    eps = seam_blend(tiles.double(), origins_y, origins_x, weights, B, H, W)
    return lcm_step(eps, sample, noise, *coefficients)
