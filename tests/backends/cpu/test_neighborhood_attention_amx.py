"""The AMX-BF16 kernel of neighborhood_attention (csrc/cpu/amx_attention.h) against the fp64 reference.

Skipped where the kernel cannot run (no AMX-BF16, TD_CPU_ISA forcing another path, no native library). Outputs
are poisoned: the private `_out` op writes into NaN-filled tensors, which must be fully overwritten. Tolerances:
out as tests/ops/test_neighborhood_attention.py (<= 2x the error of plain masked attention in bf16 + 1e-3, against
fp64); lse to 2e-4, from the kernel's exp2 polynomial (relative error <= 7.5e-5, so the denominator's log is off by
<= 7.5e-5) plus fp32 accumulation — tighter than the op's LSE_ATOL, so a worse exp would show.
"""
import math

import pytest
import torch

from tiled_diffusion import _native, ops, reference
from tiled_diffusion.backends.cpu.neighborhood_attention import amx_unavailable
from tests.ops.test_neighborhood_attention import _check_against_reference, inputs

WHY = amx_unavailable(torch.empty(0, 72, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"AMX kernel unavailable: {WHY}")
LSE_ATOL = 2e-4


def _bounds(n, w, s, clip, o, rows=None, k_top=0):
    lo, hi = reference.neighborhood_bounds(n, w, s, clip, o)
    if rows is not None:
        lo, hi = lo[rows[0]:rows[1]], hi[rows[0]:rows[1]]
    return (lo - k_top).to(torch.int32), (hi - k_top).to(torch.int32)


def kernel_bounds(q, window, stride, clip, offset, band):
    """(ylo, yhi, xlo, xhi, q_top): the int32 key ranges the kernel takes for q [B, H, Hq, W, D], as the op passes
    them (band = (canvas rows, q_top, k_top) or None for the whole canvas)."""
    Hq, W = q.shape[2], q.shape[3]
    canvas_h, q_top, k_top = band if band else (Hq, 0, 0)
    ylo, yhi = _bounds(canvas_h, window[0], stride[0], clip, offset[0], (q_top, q_top + Hq), k_top)
    xlo, xhi = _bounds(W, window[1], stride[1], clip, offset[1])
    return ylo, yhi, xlo, xhi, q_top


def native_poisoned(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None, band=None):
    """The private op into NaN-filled outputs (every element must be written)."""
    D = q.shape[-1]
    ylo, yhi, xlo, xhi, q_top = kernel_bounds(q, window, stride, clip, offset, band)
    out = torch.full(q.shape, math.nan, dtype=torch.bfloat16)
    lse = torch.full(q.shape[:4], math.nan)
    _native.native_op("neighborhood_attention_amx_out")(q, k, v, ylo, yhi, xlo, xhi,
                                                        1 / math.sqrt(D) if scale is None else scale, q_top, out,
                                                        lse)
    return out, lse


CASES = [  # (B, H, Ht, Wt, D, window, stride, clip[, offset])
    (2, 2, 13, 11, 72, (5, 7), (1, 1), False),  # odd canvas, odd windows, B > 1 (CFG)
    (1, 3, 19, 37, 72, (6, 12), (1, 1), False),  # even windows, 3 column segments (the last partial)
    (1, 2, 20, 40, 72, (16, 16), (1, 1), False),  # a 16-token window: 31 key columns per segment
    (2, 2, 9, 7, 72, (30, 30), (1, 1), False),  # window > canvas: global; Wt < 16
    (1, 2, 19, 17, 40, (9, 7), (3, 2), False),  # GNA stride, partial last groups; D 40
    (1, 2, 21, 18, 64, (12, 12), (4, 4), False),  # D 64 (no padded d chunk)
    (2, 2, 12, 15, 72, (12, 15), (4, 5), True),  # tile-blocked r1 (clip)
    (1, 2, 14, 10, 72, (4, 4), (4, 4), True),  # radius 0, partial last tiles
    (1, 1, 23, 9, 72, (3, 3), (1, 1), True),  # clip at stride 1
    (2, 2, 13, 17, 72, (9, 12), (3, 4), True, (-1, -2)),  # blocked r1, half-tile shift
    (1, 2, 13, 17, 72, (6, 4), (3, 4), False, (-2, -3)),  # offsets
    (1, 2, 11, 21, 8, (5, 9), (1, 1), False),  # D 8: the padded d chunk spans several key rows
    (1, 2, 11, 19, 128, (7, 9), (1, 1), False),  # D 128: 4 d chunks, 2 groups of O tiles
    (1, 1, 7, 5, 256, (3, 5), (1, 1), False),  # the largest D
    (1, 2, 40, 24, 72, (33, 21), (1, 1), False),  # key rows x columns > one softmax block (many blocks)
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}x{c[3]}-D{c[4]}-w{c[5]}-s{c[6]}-{'clip' if c[7] else 'in'}"
                                             f"{'-o' + str(c[8]) if len(c) > 8 else ''}" for c in CASES])
def test_native_vs_reference(case):
    B, H, Ht, Wt, D, window, stride, clip = case[:8]
    offset = case[8] if len(case) > 8 else (0, 0)
    q, k, v = inputs(B, H, Ht, Wt, D, torch.bfloat16, seed=Ht * Wt + D)
    out, lse = native_poisoned(q, k, v, window, stride, clip, offset)
    _check_against_reference(out, lse, q, k, v, window, stride, clip, offset)
    ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, stride, clip, offset)[1]
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)


def test_empty_windows_are_zero_and_minus_inf():
    """clip with windows past the border: 0 / -inf, written over the poison."""
    q, k, v = inputs(1, 2, 9, 21, 72, torch.bfloat16, seed=1)
    # stride 3 with a 3-token window, offset -2: the first group is one token, centred at -1 -> keys [-2, 1)
    out, lse = native_poisoned(q, k, v, (3, 3), (3, 3), True, (-2, -2))
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), (3, 3), (3, 3), True,
                                                        (-2, -2))
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)
    # windows cut to nothing: a clip window entirely past the border via explicit bounds
    ylo = torch.tensor([0, 3, 5, 5, 2, 9, 0, 1, 4], dtype=torch.int32)
    yhi = torch.tensor([3, 3, 9, 4, 5, 9, 9, 2, 6], dtype=torch.int32)  # rows 1, 3, 5 empty
    xlo = torch.arange(21, dtype=torch.int32).clamp(max=18)
    xhi = (xlo + 3).to(torch.int32)
    xhi[[0, 7, 20]] = xlo[[0, 7, 20]]  # columns 0, 7, 20 empty
    out = torch.full(q.shape, math.nan, dtype=torch.bfloat16)
    lse = torch.full(q.shape[:4], math.nan)
    _native.native_op("neighborhood_attention_amx_out")(q, k, v, ylo, yhi, xlo, xhi, 0.3, 0, out, lse)
    allowed = torch.zeros(9, 21, 9, 21, dtype=torch.bool)
    for y in range(9):
        for x in range(21):
            allowed[y, x, ylo[y]:yhi[y], xlo[x]:xhi[x]] = True
    allowed = allowed.reshape(9 * 21, 9 * 21)
    qf, kf, vf = (t.double().reshape(1, 2, 9 * 21, 72) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2) * 0.3).masked_fill(~allowed, -math.inf)
    want_lse = torch.logsumexp(s, -1).reshape(1, 2, 9, 21)
    want = (torch.softmax(s, -1).nan_to_num(0.0) @ vf).reshape(q.shape)
    empty = ~allowed.any(1).reshape(9, 21)
    assert empty.sum() == 3 * 21 + 3 * 6
    assert torch.isneginf(lse[:, :, empty]).all() and (out[:, :, empty] == 0).all()
    torch.testing.assert_close(lse[:, :, ~empty], want_lse[:, :, ~empty].float(), atol=LSE_ATOL, rtol=0)
    assert (out.double() - want).abs().max() < 1e-2


@pytest.mark.parametrize("case", [(40, 9, (9, 4), (1, 1), False, (0, 0), (16, 32)),
                                  (40, 19, (8, 7), (1, 1), False, (0, 0), (11, 29)),
                                  (30, 20, (9, 6), (3, 2), True, (-1, 0), (8, 20)),
                                  (23, 17, (7, 5), (1, 1), False, (0, 0), (16, 23))],
                         ids=["aligned", "unaligned", "blocked-shifted", "bottom"])
def test_band_equals_whole_canvas_rows_bitwise(case):
    """A band (q rows [a, b), k/v rows exactly what their windows need) gives those rows of the whole canvas bit
    for bit when it is cut at even canvas rows (or ends at the canvas' end), as the multi-process bands are (on
    16-row grids): the kernel pairs rows from even canvas rows, so each query's keys are visited in the same
    order either way. Cut elsewhere, rows pair differently: equal to rounding."""
    Ht, Wt, window, stride, clip, offset, (a, b) = case
    q, k, v = inputs(2, 2, Ht, Wt, 72, torch.bfloat16, seed=Ht + a)
    lo, hi = reference.neighborhood_bounds(Ht, window[0], stride[0], clip, offset[0])
    ka, kb = int(lo[a:b].min()), int(hi[a:b].max())
    whole = native_poisoned(q, k, v, window, stride, clip, offset)
    part = native_poisoned(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], window, stride, clip, offset,
                           band=(Ht, a, ka))
    if a % 2 == 0 and (b % 2 == 0 or b == Ht):
        assert torch.equal(part[0], whole[0][:, :, a:b]) and torch.equal(part[1], whole[1][:, :, a:b])
    else:
        torch.testing.assert_close(part[0].float(), whole[0][:, :, a:b].float(), atol=8e-3, rtol=0)
        torch.testing.assert_close(part[1], whole[1][:, :, a:b], atol=LSE_ATOL, rtol=0)  # exp2 evaluated elsewhere
    # and the public op takes the kernel for the band form too
    out, lse = ops.neighborhood_attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], window, stride, clip,
                                          offset, band=(Ht, a, ka))
    assert torch.equal(out, part[0]) and torch.equal(lse, part[1])


def test_strided_inputs():
    """The processor's [B, Ht, Wt, H, D] views permuted to [B, H, Ht, Wt, D] are read through their strides."""
    q, k, v = inputs(2, 3, 9, 20, 72, torch.bfloat16, seed=5)
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4) for t in (q, k, v))
    assert not qs.is_contiguous()
    a = native_poisoned(q, k, v, (5, 7))
    b = native_poisoned(qs, ks, vs, (5, 7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_odd_column_stride():
    """A view whose column stride is odd (elements): k is copied before the K packing's dword gathers."""
    q, k, v = inputs(1, 2, 7, 9, 40, torch.bfloat16, seed=8)
    kb = torch.empty(1, 2, 7, 9 * 41 + 1, dtype=torch.bfloat16).normal_()
    kv = kb.as_strided(k.shape, (2 * 7 * (9 * 41 + 1), 7 * (9 * 41 + 1), 9 * 41 + 1, 41, 1), 1)
    kv.copy_(k)
    assert kv.stride(3) % 2 == 1 and torch.equal(kv, k)
    a = native_poisoned(q, k, v, (3, 5))
    b = native_poisoned(q, kv, v, (3, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scale():
    q, k, v = inputs(1, 2, 10, 18, 40, torch.bfloat16, seed=7)
    out, lse = native_poisoned(q, k, v, (5, 5), scale=0.37)
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), (5, 5), scale=0.37)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)
    assert (out.double() - ref_out).abs().max() < 1e-2


@pytest.mark.parametrize("case", [(2, 3, 21, 35, 72, (9, 11), (1, 1), False),
                                  (1, 2, 19, 17, 72, (9, 7), (3, 2), True, (-1, -1))])
def test_public_op_takes_the_kernel_and_agrees_with_the_torch_path(case, monkeypatch):
    """ops.neighborhood_attention on bf16 runs the kernel (bitwise the private op); TD_CPU_ISA=avx512 forces the
    torch path, which agrees within bf16 tolerance."""
    B, H, Ht, Wt, D, window, stride, clip = case[:8]
    offset = case[8] if len(case) > 8 else (0, 0)
    q, k, v = inputs(B, H, Ht, Wt, D, torch.bfloat16, seed=11)
    out, lse = ops.neighborhood_attention(q, k, v, window, stride, clip, offset)
    nat = native_poisoned(q, k, v, window, stride, clip, offset)
    assert torch.equal(out, nat[0]) and torch.equal(lse, nat[1])
    monkeypatch.setenv("TD_CPU_ISA", "avx512")
    assert "avx512" in amx_unavailable(q)
    t_out, t_lse = ops.neighborhood_attention(q, k, v, window, stride, clip, offset)
    assert not torch.equal(out, t_out)  # really another path
    torch.testing.assert_close(out.float(), t_out.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, t_lse, atol=2e-3, rtol=0)


def test_unavailable_reasons():
    assert "float32" in amx_unavailable(torch.empty(1, 1, 1, 1, 72))
    assert "head dim 9" in _native.lib().neighborhood_attention_amx_unavailable(9)
    assert "head dim 258" in _native.lib().neighborhood_attention_amx_unavailable(258)
    # an odd head dim keeps the torch path and stays correct
    q, k, v = inputs(1, 2, 9, 11, 9, torch.bfloat16, seed=2)
    out, lse = ops.neighborhood_attention(q, k, v, (3, 5))
    _check_against_reference(out, lse, q, k, v, (3, 5), (1, 1), False, (0, 0))


def test_bad_inputs():
    q, k, v = inputs(1, 1, 5, 6, 8, torch.bfloat16)
    lo = torch.zeros(5, dtype=torch.int32)
    hi = torch.full((5,), 6, dtype=torch.int32)  # past k's 5 rows
    xl, xh = torch.zeros(6, dtype=torch.int32), torch.full((6,), 6, dtype=torch.int32)
    op = _native.native_op("neighborhood_attention_amx")
    with pytest.raises(RuntimeError, match="outside k's 5 rows"):
        op(q, k, v, lo, hi, xl, xh, 1.0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(q.float(), k.float(), v.float(), lo, hi - 1, xl, xh, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, k, v, lo.long(), hi - 1, xl, xh, 1.0)
