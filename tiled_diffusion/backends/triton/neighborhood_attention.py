"""Triton forward kernel of `neighborhood_attention`: flash attention over each query's token-centred window.

Layouts: q, out [B·H, Hq, Wt, D] and k, v [B·H, Hk, Wt, D] contiguous (the op's [B, H, rows, Wt, D]); lse fp32
[B·H, Hq, Wt] (natural log). q holds the canvas rows [q_top, q_top + Hq) and k, v the rows [k_top, k_top + Hk) of an
Ht-row canvas (the op's `band`; the whole canvas: Hq = Hk = Ht, tops 0); windows are the canvas's.

One program = one 2-D block of TM_Y x TM_X queries (BLOCK_M = TM_Y·TM_X) of one (batch, head); grid
(cdiv(Hq, TM_Y)·cdiv(Wt, TM_X), B·H). Query blocks start at q_top, so a band whose q_top is a multiple of TM_Y
walks exactly the whole canvas's blocks and key tiles for its rows (the same result, bitwise). No mask tensor exists: every query's canvas coordinates come from its block
origin, its window [lo, hi) per axis from reference.neighborhood_bounds' formula (stride groups from `offset`,
centre, inward shift or clip), computed in registers. The program walks only the key band of its block (the union
of its queries' windows: [min lo, max hi) per axis, since lo and hi are monotone in the query coordinate), in 2-D
key tiles of TN_Y x TN_X tokens, so (query block, key tile) pairs outside every query's window are never visited;
inside, each (query, key) pair is masked by the query's own window. Online softmax in base 2, fp32 state; head dim
split as the window_attention kernel does (72 = 64 + 16, 8 masked).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import flash
from .launch import check_grid, device_guard
from .window_attention import LOG2E, _interpreting, split_head_dim, supports_head_dim  # noqa: F401

INTERPRET_CONFIG = {"TM_Y": 4, "TM_X": 4, "TN_Y": 4, "TN_X": 4, "num_warps": 4, "num_stages": 1}
# 64 queries (8x8) x 64 keys (8x8) per step: a 64-token window is walked as 9x9 key tiles at most (72x72 band).
# 8 warps: with 4 the sm_80 build spills (stack frame 104 B at 255 registers; `tiled-diffusion inspect --check`).
CONFIG = {"TM_Y": 8, "TM_X": 8, "TN_Y": 8, "TN_X": 8, "num_warps": 8, "num_stages": 2}


@triton.jit
def _bounds(i, n, W: tl.constexpr, S: tl.constexpr, OFF: tl.constexpr, CLIP: tl.constexpr):
    """reference.neighborhood_bounds for query indices i (i - OFF >= 0, so // is a floor)."""
    start = OFF + ((i - OFF) // S) * S + S // 2 - W // 2
    if CLIP:
        lo = tl.minimum(tl.maximum(start, 0), n)
        hi = tl.minimum(tl.maximum(start + W, 0), n)
    else:
        w = tl.minimum(n, W)
        lo = tl.minimum(tl.maximum(start, 0), n - w)
        hi = lo + w
    return lo, hi


@triton.jit
def _neighborhood_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, Ht, Wt, Hq, q_top, Hk, k_top, qk_scale,
    WY: tl.constexpr, WX: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, OY: tl.constexpr, OX: tl.constexpr,
    CLIP: tl.constexpr,
    HEAD_D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr,
    TM_Y: tl.constexpr, TM_X: tl.constexpr, TN_Y: tl.constexpr, TN_X: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TM_Y * TM_X
    BLOCK_N: tl.constexpr = TN_Y * TN_X
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    nbx = tl.cdiv(Wt, TM_X)
    offs_m = tl.arange(0, BLOCK_M)
    qy_local = (pid // nbx) * TM_Y + offs_m // TM_X
    qy = q_top + qy_local  # canvas row
    qx = (pid % nbx) * TM_X + offs_m % TM_X
    m_ok = (qy_local < Hq) & (qx < Wt)
    lo_y, hi_y = _bounds(qy, Ht, WY, SY, OY, CLIP)
    lo_x, hi_x = _bounds(qx, Wt, WX, SX, OX, CLIP)
    big = Ht + Wt
    band_y0 = tl.min(tl.where(m_ok, lo_y, big), 0)
    band_y1 = tl.max(tl.where(m_ok, hi_y, 0), 0)
    band_x0 = tl.min(tl.where(m_ok, lo_x, big), 0)
    band_x1 = tl.max(tl.where(m_ok, hi_x, 0), 0)

    # 64-bit offset of this (batch, head) once; token offsets inside it stay 32-bit (fewer registers: the sm_80
    # build spilled with 64-bit per-token offsets)
    q_base = bh * Hq * Wt * HEAD_D
    k_base = bh * Hk * Wt * HEAD_D
    q_ptr += q_base
    k_ptr += k_base
    v_ptr += k_base
    o_ptr += q_base
    q_rows = qy_local * Wt + qx
    offs_a, offs_b, b_ok = flash.head_columns(HEAD_D, DA, DB)
    q_a, q_b = flash.load_q(q_ptr, q_rows, m_ok, offs_a, offs_b, b_ok, HEAD_D, DB, UPCAST)

    m_i, l_i, acc_a, acc_b = flash.init_state(BLOCK_M, DA, DB)
    offs_n = tl.arange(0, BLOCK_N)
    for ky0 in range(band_y0, band_y1, TN_Y):
        for kx0 in range(band_x0, band_x1, TN_X):
            ky = ky0 + offs_n // TN_X
            kx = kx0 + offs_n % TN_X
            n_ok = (ky < band_y1) & (kx < band_x1)
            k_rows = (ky - k_top) * Wt + kx  # ky is a canvas row; k holds rows from k_top
            s = flash.scores(q_a, q_b, k_ptr, k_rows, n_ok, offs_a, offs_b, b_ok, HEAD_D, DB, FP32_DOT, UPCAST)
            # per-token mask: the key inside this query's own window
            inside = (n_ok[None, :] & (ky[None, :] >= lo_y[:, None]) & (ky[None, :] < hi_y[:, None])
                      & (kx[None, :] >= lo_x[:, None]) & (kx[None, :] < hi_x[:, None]))
            s = tl.where(inside, s * qk_scale, float("-inf"))
            # guarded: a query may have no key in this tile (or none at all with clip)
            p, alpha, m_i, l_i = flash.softmax_update(s, m_i, l_i, True)
            acc_a, acc_b = flash.accumulate(p, alpha, acc_a, acc_b, v_ptr, k_rows, n_ok, offs_a, offs_b, b_ok,
                                            HEAD_D, DB, FP32_DOT, UPCAST)

    # clip can leave a query without keys: out 0, lse -inf
    flash.store(o_ptr, lse_ptr + bh * Hq * Wt, q_rows, m_ok, acc_a, acc_b, m_i, l_i, offs_a, offs_b, b_ok, HEAD_D, DB)


def neighborhood_attention_triton(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None,
                                  band=(0, 0, 0), config: dict | None = None, out=None, lse=None):
    """Launch the kernel. Inputs are assumed checked (ops.check_neighborhood_attention; band as there): [B, H, rows,
    Wt, D] CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. `out` / `lse` let a caller provide contiguous
    buffers (tests poison them with NaN)."""
    B, H, Hq, Wt, D = q.shape
    Hk = k.shape[2]
    Ht, q_top, k_top = (int(x) for x in band) if band[0] else (Hq, 0, 0)
    da, db = split_head_dim(D)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty((B, H, Hq, Wt), dtype=torch.float32, device=q.device)
    if B * H * Hq * Wt == 0:
        return out, lse
    if config is None:
        config = INTERPRET_CONFIG if _interpreting() else CONFIG
    upcast = _interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot (window_attention.py)
    grid = check_grid((triton.cdiv(Hq, config["TM_Y"]) * triton.cdiv(Wt, config["TM_X"]), B * H),
                      "neighborhood_attention")
    with device_guard(q):
        wrap_triton(_neighborhood_attention_fwd)[grid](
            q, k, v, out, lse, Ht, Wt, Hq, q_top, Hk, k_top, scale * LOG2E,
            WY=int(window[0]), WX=int(window[1]), SY=int(stride[0]), SX=int(stride[1]), OY=int(offset[0]),
            OX=int(offset[1]), CLIP=bool(clip), HEAD_D=D, DA=da, DB=db, FP32_DOT=q.dtype == torch.float32,
            UPCAST=upcast, TM_Y=config["TM_Y"], TM_X=config["TM_X"], TN_Y=config["TN_Y"], TN_X=config["TN_X"],
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    return out, lse


# ------------------------------------------------------------------------------ ahead-of-time configs


def _aot_configs() -> list[dict]:
    """PixArt-1024's default geometry (64-token windows, stride 1, no clip) at D = 72, bf16 and fp16."""
    configs = []
    for dt in ("bf16", "fp16"):
        ptr = f"*{dt}"
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32", "Ht": "i32", "Wt": "i32",
               "Hq": "i32", "q_top": "i32", "Hk": "i32", "k_top": "i32", "qk_scale": "fp32"}
        c = CONFIG
        configs.append({
            "name": f"neighborhood_attention_d72_{dt}_w64s1_m{c['TM_Y']}x{c['TM_X']}n{c['TN_Y']}x{c['TN_X']}",
            "kernel": _neighborhood_attention_fwd, "signature": sig,
            "constexprs": {"WY": 64, "WX": 64, "SY": 1, "SX": 1, "OY": 0, "OX": 0, "CLIP": False, "HEAD_D": 72,
                           "DA": 64, "DB": 16, "FP32_DOT": False, "UPCAST": False, "TM_Y": c["TM_Y"], "TM_X": c["TM_X"],
                           "TN_Y": c["TN_Y"], "TN_X": c["TN_X"]},
            "num_warps": c["num_warps"], "num_stages": c["num_stages"], "expects_mma": True,
            "attrs": {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")},
        })
    return configs


AOT_CONFIGS = _aot_configs()
