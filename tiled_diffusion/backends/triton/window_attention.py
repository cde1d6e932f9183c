"""Triton forward kernel of `window_attention`: flash attention over each query tile's neighbour tiles.

Layouts: q, k, v, out [T, H, L, D] contiguous; neighbours int32 [T, NB]
(-1 = empty slot); bias fp32 [T, NB] (additive log-weight per neighbour slot, -inf = excluded);
lse fp32 [T, H, L] (natural log).

One program = BLOCK_M queries of one (tile, head); grid (cdiv(L, BLOCK_M), pairs) with the (tile, head) pairs on
axis y, split into launches of at most 65535 pairs starting at th0 (launch.window_attention_launches: T·H
exceeds axis y's limit on the largest canvases). The program walks the
neighbour slots; a -1 or -inf slot gets an empty key loop (its bound is set to 0), so excluded tiles cost
nothing. Online softmax in base 2 with fp32 state: the scale is pre-multiplied by log2(e) so every
exponential is one exp2, and the per-slot bias is folded in log2 units. L need not be a multiple of the
block sizes (masked loads, -inf logits past L).

Head dim without padding to 128: D is split into a power-of-two main part DA and a tail DB (a power of two
≥ 16, the smallest `tl.dot` operand; masked past D). PixArt's D = 72 runs as 64 + 16 (8 of the 16 tail
columns are masked): 80 computed columns for 72 useful = 11.1% extra FLOPs (padding to 128 would be 78%).
D = 64 / 128 have no tail (DB = 0).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import flash
from .launch import check_grid, device_guard, programs_bucket, window_attention_grid, window_attention_launches

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Small blocks for the interpreter (tests use tiny L; 16 is the smallest tl.dot size).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def split_head_dim(d: int) -> tuple[int, int]:
    """D -> (DA, DB): DA the largest power of two ≤ D (≥ 16), DB the tail rounded up to a power of two ≥ 16
    (0 when D is a power of two). Wasted columns: DA + DB - D."""
    if d < 16:
        raise ValueError(f"window_attention (Triton): head dim D={d} < 16 is not supported")
    da = 1 << (d.bit_length() - 1)
    rest = d - da
    db = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return da, db


def supports_head_dim(d: int) -> bool:
    """Head dims the kernel runs at ≤ 12.5% wasted FLOPs (16 ≤ D ≤ 256, tail waste ≤ D/8)."""
    if d < 16 or d > 256:
        return False
    da, db = split_head_dim(d)
    return (da + db - d) <= d / 8


@triton.jit(do_not_specialize=["programs_bucket", "th0"])
def _window_attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, nb_ptr, bias_ptr,
    H, L, NB, qk_scale, programs_bucket, th0,
    HEAD_D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # programs_bucket is only read by the autotuner's key (launch.programs_bucket of T·H).
    pid_m = tl.program_id(0)
    pid_th = th0 + tl.program_id(1)  # this launch's first (tile, head) pair + the pair on axis y
    t = pid_th // H
    h = pid_th % H
    t64 = t.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    m_ok = offs_m < L

    # Contiguous [T, H, L, D]: row stride is the constexpr HEAD_D, so the compiler can prove 16-byte
    # alignment of every row (D = 72 -> 144 bytes) and vectorize / pipeline (cp.async) the K, V loads.
    # Runtime strides would hide that alignment and leave the loads scalar and unpipelined.
    offs_a, offs_b, b_ok = flash.head_columns(HEAD_D, DA, DB)
    q_a, q_b = flash.load_q(q_ptr + (t64 * H + h) * L * HEAD_D, offs_m, m_ok, offs_a, offs_b, b_ok, HEAD_D, DB,
                            UPCAST)

    m_i, l_i, acc_a, acc_b = flash.init_state(BLOCK_M, DA, DB)

    for j in range(0, NB):
        kt = tl.load(nb_ptr + t64 * NB + j)
        if HAS_BIAS:
            slot_bias = tl.load(bias_ptr + t64 * NB + j) * 1.4426950408889634  # log2 units
            use = (kt >= 0) & (slot_bias > float("-inf"))
        else:
            slot_bias = 0.0
            use = kt >= 0
        n_end = tl.where(use, L, 0)  # an excluded slot runs no key block at all
        kt64 = tl.maximum(kt, 0).to(tl.int64)
        kv_off = (kt64 * H + h) * L * HEAD_D
        for n0 in range(0, n_end, BLOCK_N):
            cols = n0 + offs_n
            n_ok = cols < L
            s = flash.scores(q_a, q_b, k_ptr + kv_off, cols, n_ok, offs_a, offs_b, b_ok, HEAD_D, DB, FP32_DOT,
                             UPCAST)
            s = tl.where(n_ok[None, :], s * qk_scale + slot_bias, float("-inf"))
            # no guard: every block has >= 1 valid column, so m is finite
            p, alpha, m_i, l_i = flash.softmax_update(s, m_i, l_i, False)
            acc_a, acc_b = flash.accumulate(p, alpha, acc_a, acc_b, v_ptr + kv_off, cols, n_ok, offs_a, offs_b, b_ok,
                                            HEAD_D, DB, FP32_DOT, UPCAST)

    # Rows that saw no valid key keep l_i = 0: output 0 and lse = -inf, no NaN.
    flash.store(o_ptr + (t64 * H + h) * L * HEAD_D, lse_ptr + (t64 * H + h) * L, offs_m, m_ok, acc_a, acc_b, m_i,
                l_i, offs_a, offs_b, b_ok, HEAD_D, DB)


# Tensor-core configs, checked ahead of time for sm_80 and sm_90 at D = 72 (bf16/fp16, with and without bias) by
# `tiled-diffusion inspect --check`: cp.async-pipelined, no stack frame (ptxas reports spills as STACK, LOCAL stays 0).
# sm_80 sits at the 255-register limit. Left out because they spilled: m128n128w8s2 (sm_90), m128n64w4s3, m128n32w4s2,
# m128n64w8s2. 8 warps for BLOCK_M 128 = two warpgroups for wgmma on sm_90.
TUNE_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
]

_window_attention_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                           num_stages=c["num_stages"]) for c in TUNE_CONFIGS],
    key=["L", "HEAD_D", "FP32_DOT", "programs_bucket"],
)(_window_attention_fwd)


# Autotuning picks a config by timing, per process and GPU; BLOCK_N sets the online softmax's summation order, so two
# runs that pick differently differ in the last bits (and so may the pixels). TD_WINDOW_ATTENTION_CONFIG=<index
# into TUNE_CONFIGS> pins one config for bitwise-reproducible GPU runs (no tuning).
PIN_ENV = "TD_WINDOW_ATTENTION_CONFIG"


def pinned_config() -> dict | None:
    """The config TD_WINDOW_ATTENTION_CONFIG pins, or None (autotune)."""
    v = os.environ.get(PIN_ENV, "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) >= len(TUNE_CONFIGS):
        raise ValueError(f"{PIN_ENV} must be an index 0..{len(TUNE_CONFIGS) - 1} into TUNE_CONFIGS "
                         f"({', '.join(str(c) for c in TUNE_CONFIGS)}), got {v!r}")
    return TUNE_CONFIGS[int(v)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, neighbours: torch.Tensor,
                            bias: torch.Tensor | None = None, scale: float | None = None,
                            config: dict | None = None, out: torch.Tensor | None = None,
                            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Inputs are assumed checked (ops.check_window_attention). CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1. `config` forces one block config (skips autotuning); `out` / `lse`
    (contiguous, like the results) let a caller provide the buffers (tests poison them with NaN)."""
    T, H, L, D = q.shape
    NB = neighbours.shape[1]
    da, db = split_head_dim(D)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    nb = neighbours.to(torch.int32).contiguous()
    has_bias = bias is not None
    bias_arg = bias.to(torch.float32).contiguous() if has_bias else nb  # never read without HAS_BIAS
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty((T, H, L), dtype=torch.float32, device=q.device)
    if T == 0 or L == 0 or H == 0:
        return out, lse
    args = (q, k, v, out, lse, nb, bias_arg, H, L, NB, scale * LOG2E, programs_bucket(T * H))
    # The Triton 3.8 interpreter computes tl.dot on bf16 operands wrongly (garbage ~1e10); under the interpreter
    # bf16 tiles are widened to fp32 right after loading (exact) and P is rounded to bf16 before widening, so
    # the arithmetic matches a bf16 MMA with fp32 accumulation. Compiled kernels never take this branch.
    upcast = _interpreting() and q.dtype == torch.bfloat16
    meta = dict(HEAD_D=D, DA=da, DB=db, HAS_BIAS=has_bias, FP32_DOT=q.dtype == torch.float32, UPCAST=upcast)
    if config is None:
        config = INTERPRET_CONFIG if _interpreting() else pinned_config()
    with device_guard(q):
        for th0, pairs in window_attention_launches(T, H):
            if config is not None:
                grid = check_grid(window_attention_grid(pairs, L, config["BLOCK_M"]), "window_attention")
                wrap_triton(_window_attention_fwd)[grid](
                    *args, th0, **meta, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                    num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
            else:
                def grid(META, pairs=pairs):
                    return check_grid(window_attention_grid(pairs, L, META["BLOCK_M"]), "window_attention")

                wrap_triton(_window_attention_fwd_tuned)[grid](*args, th0, **meta)
    return out, lse


# ------------------------------------------------------------------------------ ahead-of-time configs


def _aot_configs() -> list[dict]:
    configs = []
    for dt in ("bf16", "fp16"):
        ptr = f"*{dt}"
        for has_bias in (True, False):
            for c in TUNE_CONFIGS:
                name = (f"window_attention_d72_{dt}{'_bias' if has_bias else ''}_m{c['BLOCK_M']}n{c['BLOCK_N']}"
                        f"w{c['num_warps']}s{c['num_stages']}")
                sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
                       "nb_ptr": "*i32", "bias_ptr": "*fp32", "H": "i32", "L": "i32", "NB": "i32", "qk_scale": "fp32",
                       "programs_bucket": "i32", "th0": "i32"}
                configs.append({
                    "name": name, "kernel": _window_attention_fwd,
                    "signature": sig,
                    "constexprs": {"HEAD_D": 72, "DA": 64, "DB": 16, "HAS_BIAS": has_bias, "FP32_DOT": False, "UPCAST": False,
                                   "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                    "num_warps": c["num_warps"], "num_stages": c["num_stages"], "expects_mma": True,
                    # What the JIT launcher specializes on (torch allocations are 16-byte aligned); without it the
                    # compiler cannot prove aligned rows and neither vectorizes nor pipelines the K/V loads.
                    "attrs": {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values())
                              if t.startswith("*")},
                })
    return configs


AOT_CONFIGS = _aot_configs()
