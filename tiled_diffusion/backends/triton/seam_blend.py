"""Triton kernels for `seam_blend` and the fused `blend_lcm_step` (gather formulation, no atomics).

Layouts (see reference.seam_blend): tiles [N, C, th, tw] with N = B·ny·nx ordered (b, iy, ix); origins_y int32
[ny], origins_x int32 [nx] sorted, every tile inside the canvas; weights fp32 [th, tw]; canvas [B, C, H, W].

One program owns a BLOCK_Y × BLOCK_X block of canvas pixels of one (b, c) plane. Each pixel finds its covering
tiles from per-row / per-column coverage tables (first covering tile index, number of covering tiles; H + W
int32, computed on the device with searchsorted), so every output is written exactly once by one program:
deterministic, no atomics, no zero-init pass. The loops over covering tile rows/columns have a runtime bound
(the block's maximum coverage), so a block inside one tile's interior does one iteration. Accumulation in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .launch import check_grid, device_guard, seam_blend_grid

BLOCK_Y = 16
BLOCK_X = 64
NUM_WARPS = 4


@triton.jit
def _blend_program(tiles_ptr, w_ptr, oy_ptr, ox_ptr, fy_ptr, cy_ptr, fx_ptr, cx_ptr, C, H, W, ny, nx, th, tw, n_bx,
                   BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's block of the canvas, blended: (eps, off, mask). eps = Σ w·tile / Σ w (0 where Σ w = 0), fp32
    [BLOCK_Y, BLOCK_X]; off: the block's offsets in a [B·C, H, W] tensor (int64); mask: the pixels inside H × W.
    Grid: axis 0 pixel blocks (can exceed 65535 on an 8192² canvas), axis 1 b·C + c; both kernels share it."""
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    b = bc // C
    c = bc % C
    ys = (pid // n_bx) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = (pid % n_bx) * BLOCK_X + tl.arange(0, BLOCK_X)
    my = ys < H
    mx = xs < W
    fy = tl.load(fy_ptr + ys, mask=my, other=0)
    cy = tl.load(cy_ptr + ys, mask=my, other=0)
    fx = tl.load(fx_ptr + xs, mask=mx, other=0)
    cx = tl.load(cx_ptr + xs, mask=mx, other=0)
    kmax_y = tl.max(cy, axis=0)
    kmax_x = tl.max(cx, axis=0)
    acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
    plane = th * tw
    for ky in range(0, kmax_y):
        iy = fy + ky
        vy = my & (ky < cy)
        ty = ys - tl.load(oy_ptr + iy, mask=vy, other=0)
        row = (b * ny + iy).to(tl.int64) * nx  # first tile index of tile row iy for image b
        for kx in range(0, kmax_x):
            ix = fx + kx
            vx = mx & (kx < cx)
            tx = xs - tl.load(ox_ptr + ix, mask=vx, other=0)
            m = vy[:, None] & vx[None, :]
            pix = ty[:, None] * tw + tx[None, :]
            w = tl.load(w_ptr + pix, mask=m, other=0.0)
            tile = row[:, None] + ix[None, :]
            t = tl.load(tiles_ptr + (tile * C + c) * plane + pix, mask=m, other=0.0).to(tl.float32)
            acc += w * t
            wsum += w
    eps = tl.where(wsum > 0, acc / tl.where(wsum > 0, wsum, 1.0), 0.0)
    off = bc.to(tl.int64) * H * W + ys[:, None] * W + xs[None, :]
    return eps, off, my[:, None] & mx[None, :]


@triton.jit
def seam_blend_kernel(tiles_ptr, out_ptr, w_ptr, oy_ptr, ox_ptr, fy_ptr, cy_ptr, fx_ptr, cx_ptr,
                      C, H, W, ny, nx, th, tw, n_bx,
                      BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    eps, off, m = _blend_program(tiles_ptr, w_ptr, oy_ptr, ox_ptr, fy_ptr, cy_ptr, fx_ptr, cx_ptr, C, H, W, ny, nx,
                                 th, tw, n_bx, BLOCK_Y, BLOCK_X)
    tl.store(out_ptr + off, eps.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def blend_lcm_step_kernel(tiles_ptr, w_ptr, oy_ptr, ox_ptr, fy_ptr, cy_ptr, fx_ptr, cx_ptr,
                          sample_ptr, noise_ptr, prev_ptr, den_ptr,
                          sqrt_alpha_t, sqrt_beta_t, c_skip, c_out, sqrt_alpha_prev, sqrt_beta_prev,
                          C, H, W, ny, nx, th, tw, n_bx,
                          HAS_NOISE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    eps, off, m = _blend_program(tiles_ptr, w_ptr, oy_ptr, ox_ptr, fy_ptr, cy_ptr, fx_ptr, cx_ptr, C, H, W, ny, nx,
                                 th, tw, n_bx, BLOCK_Y, BLOCK_X)
    s = tl.load(sample_ptr + off, mask=m, other=0.0).to(tl.float32)
    # diffusers LCMScheduler.step, epsilon prediction (reference.lcm_step), all in fp32.
    x0 = (s - sqrt_beta_t * eps) / sqrt_alpha_t
    den = c_out * x0 + c_skip * s
    if HAS_NOISE:
        z = tl.load(noise_ptr + off, mask=m, other=0.0).to(tl.float32)
        prev = sqrt_alpha_prev * den + sqrt_beta_prev * z
    else:
        prev = den
    tl.store(den_ptr + off, den.to(den_ptr.dtype.element_ty), mask=m)
    tl.store(prev_ptr + off, prev.to(prev_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------- launchers


def coverage_tables(origins: torch.Tensor, tile: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each canvas position p in [0, size): (index of the first tile covering p, number covering p), int32.

    origins is sorted, all tiles have length `tile`, so the tiles covering p are the contiguous range
    {i : origins[i] <= p < origins[i] + tile}. Computed on origins' device without a host sync.
    """
    o = origins.to(torch.int64)
    p = torch.arange(size, device=origins.device, dtype=torch.int64)
    first = torch.searchsorted(o + tile, p, right=True)  # tiles ending at or before p come first
    end = torch.searchsorted(o, p, right=True)
    return first.to(torch.int32), (end - first).to(torch.int32)


def _prepare(tiles, origins_y, origins_x, weights, height, width):
    _, _, th, tw = tiles.shape
    fy, cy = coverage_tables(origins_y, th, height)
    fx, cx = coverage_tables(origins_x, tw, width)
    return (tiles.contiguous(), weights.to(torch.float32).contiguous(), origins_y.contiguous(),
            origins_x.contiguous(), fy, cy, fx, cx)


def seam_blend_triton(tiles: torch.Tensor, origins_y: torch.Tensor, origins_x: torch.Tensor, weights: torch.Tensor,
                      batch: int, height: int, width: int) -> torch.Tensor:
    """seam_blend on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1). Inputs are assumed checked."""
    N, C, th, tw = tiles.shape
    args = _prepare(tiles, origins_y, origins_x, weights, height, width)
    out = torch.empty((batch, C, height, width), dtype=tiles.dtype, device=tiles.device)
    n_bx = triton.cdiv(width, BLOCK_X)
    grid = check_grid(seam_blend_grid(batch, C, height, width, BLOCK_Y, BLOCK_X), "seam_blend")
    with device_guard(tiles):
        wrap_triton(seam_blend_kernel)[grid](args[0], out, *args[1:], C, height, width, origins_y.numel(),
                                             origins_x.numel(), th, tw, n_bx, BLOCK_Y=BLOCK_Y, BLOCK_X=BLOCK_X,
                                             num_warps=NUM_WARPS)
    return out


def blend_lcm_step_triton(tiles: torch.Tensor, origins_y: torch.Tensor, origins_x: torch.Tensor,
                          weights: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                          sqrt_alpha_t: float, sqrt_beta_t: float, c_skip: float, c_out: float,
                          sqrt_alpha_prev: float, sqrt_beta_prev: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused blend + LCM step; returns (prev_sample, denoised) in sample's dtype. Inputs are assumed checked."""
    B, C, H, W = sample.shape
    _, _, th, tw = tiles.shape
    args = _prepare(tiles, origins_y, origins_x, weights, H, W)
    sample = sample.contiguous()
    noise_arg = sample if noise is None else noise.contiguous()  # never read when HAS_NOISE is False
    prev = torch.empty_like(sample)
    den = torch.empty_like(sample)
    n_bx = triton.cdiv(W, BLOCK_X)
    grid = check_grid(seam_blend_grid(B, C, H, W, BLOCK_Y, BLOCK_X), "blend_lcm_step")
    with device_guard(sample):
        wrap_triton(blend_lcm_step_kernel)[grid](*args, sample, noise_arg, prev, den,
                                                 float(sqrt_alpha_t), float(sqrt_beta_t), float(c_skip),
                                                 float(c_out), float(sqrt_alpha_prev), float(sqrt_beta_prev),
                                                 C, H, W, origins_y.numel(), origins_x.numel(), th, tw, n_bx,
                                                 HAS_NOISE=noise is not None, BLOCK_Y=BLOCK_Y, BLOCK_X=BLOCK_X,
                                                 num_warps=NUM_WARPS)
    return prev, den


# ------------------------------------------------------------------------------ ahead-of-time configs

_TRITON_DTYPE = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_TABLES = {"w_ptr": "*fp32", "oy_ptr": "*i32", "ox_ptr": "*i32", "fy_ptr": "*i32", "cy_ptr": "*i32",
           "fx_ptr": "*i32", "cx_ptr": "*i32"}
_DIMS = {n: "i32" for n in ("C", "H", "W", "ny", "nx", "th", "tw", "n_bx")}


def _aot_configs() -> list[dict]:
    configs = []
    for dt, ptr in _TRITON_DTYPE.items():
        configs.append({
            "name": f"seam_blend_{dt}", "kernel": seam_blend_kernel,
            "signature": {"tiles_ptr": ptr, "out_ptr": ptr, **_TABLES, **_DIMS},
            "constexprs": {"BLOCK_Y": BLOCK_Y, "BLOCK_X": BLOCK_X},
            "num_warps": NUM_WARPS, "num_stages": 1, "expects_mma": False,
        })
        for has_noise in (True, False):
            configs.append({
                "name": f"blend_lcm_step_{dt}{'' if has_noise else '_last'}", "kernel": blend_lcm_step_kernel,
                "signature": {"tiles_ptr": ptr, **_TABLES, "sample_ptr": ptr, "noise_ptr": ptr, "prev_ptr": ptr,
                              "den_ptr": ptr, **{n: "fp32" for n in ("sqrt_alpha_t", "sqrt_beta_t", "c_skip",
                                                                      "c_out", "sqrt_alpha_prev",
                                                                      "sqrt_beta_prev")}, **_DIMS},
                "constexprs": {"HAS_NOISE": has_noise, "BLOCK_Y": BLOCK_Y, "BLOCK_X": BLOCK_X},
                "num_warps": NUM_WARPS, "num_stages": 1, "expects_mma": False,
            })
    return configs


AOT_CONFIGS = _aot_configs()
