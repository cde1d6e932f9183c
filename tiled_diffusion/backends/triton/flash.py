"""The flash-attention steps both attention kernels share (window_attention.py walks neighbour tiles,
neighborhood_attention.py walks a key band): load a query block, score a key block, the online-softmax update, the
P·V accumulation and the final store. Triton inlines @triton.jit helpers, so the kernels compile as if written out
(`tiled-diffusion inspect --check` pins their registers and spills).

Head dim split: D = DA + DB, DA a power of two, DB the tail rounded up to a power of two (0 when D is one;
window_attention.split_head_dim); the tail's columns past D are masked (72 = 64 + 16, 8 masked). With DB = 0 the
`*_b` arguments are placeholders the compiler drops. Rows are token indices into [rows, HEAD_D] contiguous buffers
(the row stride is the constexpr HEAD_D so the compiler proves 16-byte alignment and vectorizes the loads).
Online softmax in base 2 with fp32 state (m_i, l_i, acc); P is rounded to the input dtype before P·V, as on the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def head_columns(HEAD_D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """(offs_a, offs_b, b_ok): the head dim's columns [0, DA) and tail [DA, DA + DB) with its mask (< HEAD_D)."""
    offs_a = tl.arange(0, DA)
    offs_b, b_ok = offs_a, offs_a < HEAD_D  # placeholders when DB == 0
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        b_ok = offs_b < HEAD_D
    return offs_a, offs_b, b_ok


@triton.jit
def init_state(BLOCK_M: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """(m_i, l_i, acc_a, acc_b) of an empty online softmax."""
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = acc_a  # placeholder when DB == 0
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    return tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32), acc_a, acc_b


@triton.jit
def load_q(base, rows, ok, offs_a, offs_b, b_ok, HEAD_D: tl.constexpr, DB: tl.constexpr, UPCAST: tl.constexpr):
    """The query block [M, DA] (and its tail [M, DB]) of `rows` (masked by `ok`)."""
    q_a = tl.load(base + rows[:, None] * HEAD_D + offs_a[None, :], mask=ok[:, None], other=0.0)
    if UPCAST:
        q_a = q_a.to(tl.float32)
    q_b = q_a
    if DB > 0:
        q_b = tl.load(base + rows[:, None] * HEAD_D + offs_b[None, :], mask=ok[:, None] & b_ok[None, :], other=0.0)
        if UPCAST:
            q_b = q_b.to(tl.float32)
    return q_a, q_b


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def scores(q_a, q_b, k_base, cols, n_ok, offs_a, offs_b, b_ok, HEAD_D: tl.constexpr, DB: tl.constexpr,
           FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Q·Kᵀ [M, N] of the query block against the key rows `cols` (masked by `n_ok`: those columns read 0)."""
    k_a = tl.load(k_base + cols[None, :] * HEAD_D + offs_a[:, None], mask=n_ok[None, :], other=0.0)
    if UPCAST:
        k_a = k_a.to(tl.float32)
    s = _dot(q_a, k_a, FP32_DOT)
    if DB > 0:
        k_b = tl.load(k_base + cols[None, :] * HEAD_D + offs_b[:, None], mask=n_ok[None, :] & b_ok[:, None],
                      other=0.0)
        if UPCAST:
            k_b = k_b.to(tl.float32)
        s += _dot(q_b, k_b, FP32_DOT)
    return s


@triton.jit
def softmax_update(s, m_i, l_i, GUARD: tl.constexpr):
    """One online-softmax step for scaled, masked scores s [M, N] (base 2): (p, alpha, m_new, l_new). GUARD: a row
    may have no valid key yet (m stays -inf): its state is kept at 0 instead of producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if GUARD:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _scaled_add(acc, alpha, p_in, v, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return acc * alpha[:, None] + tl.dot(p_in, v, input_precision="ieee")
    return tl.dot(p_in, v, acc * alpha[:, None])


@triton.jit
def accumulate(p, alpha, acc_a, acc_b, v_base, cols, n_ok, offs_a, offs_b, b_ok, HEAD_D: tl.constexpr,
               DB: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc · alpha + P·V over the value rows `cols`: (acc_a, acc_b)."""
    v_a = tl.load(v_base + cols[:, None] * HEAD_D + offs_a[None, :], mask=n_ok[:, None], other=0.0)
    if UPCAST:
        v_a = v_a.to(tl.float32)
    p_in = p.to(v_base.dtype.element_ty)  # P rounded to the input dtype, as on the GPU
    if UPCAST:
        p_in = p_in.to(tl.float32)
    acc_a = _scaled_add(acc_a, alpha, p_in, v_a, FP32_DOT)
    if DB > 0:
        v_b = tl.load(v_base + cols[:, None] * HEAD_D + offs_b[None, :], mask=n_ok[:, None] & b_ok[None, :],
                      other=0.0)
        if UPCAST:
            v_b = v_b.to(tl.float32)
        acc_b = _scaled_add(acc_b, alpha, p_in, v_b, FP32_DOT)
    return acc_a, acc_b


@triton.jit
def store(o_base, lse_base, rows, ok, acc_a, acc_b, m_i, l_i, offs_a, offs_b, b_ok, HEAD_D: tl.constexpr,
          DB: tl.constexpr):
    """out = acc / l and lse = (m + log2 l)·ln 2 for `rows`; a row that saw no key (l = 0): out 0, lse -inf."""
    nonempty = l_i > 0
    inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_base + rows, lse, mask=ok)
    tl.store(o_base + rows[:, None] * HEAD_D + offs_a[None, :], (acc_a * inv_l[:, None]).to(o_base.dtype.element_ty),
             mask=ok[:, None])
    if DB > 0:
        tl.store(o_base + rows[:, None] * HEAD_D + offs_b[None, :], (acc_b * inv_l[:, None]).to(o_base.dtype.element_ty),
                 mask=ok[:, None] & b_ok[None, :])
