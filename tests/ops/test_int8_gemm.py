"""CPU int8 GEMM ops: quantize_per_token, int8_gemm, pack_int8_weight, int8_gemm_packed (csrc/cpu/int8_gemm.cpp)
and the fused private op w8a8_linear.

Every ISA path (amx, avx512, avx2, ref) is one parametrize id, forced with TD_CPU_ISA (read by the kernels at
each call); an ISA this machine cannot run is skipped with the probe's reason (tiled_diffusion/backends/cpu/isa.py).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.backends.cpu import isa as cpu_isa

pytestmark = pytest.mark.skipif(ops._C is None, reason="tiled_diffusion._C not built")


def _usable():
    if ops._C is None:
        return {}
    os.environ.pop("TD_CPU_ISA", None)
    return {name: cpu_isa.usable(name) for name in cpu_isa.ISAS}


USABLE = _usable()
ISAS = [name for name, (ok, _) in USABLE.items() if ok]


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {why}"))
                        for name, (ok, why) in USABLE.items()] or ["none"])
def isa(request, monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", request.param)
    return request.param


def rand_i8(*shape, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8)


SHAPES = [(1, 3, 5), (17, 67, 129), (17, 1153, 5), (70, 1153, 129), (0, 67, 129), (130, 64, 48), (300, 67, 33)]
ids = [f"M{m}K{k}N{n}" for m, k, n in SHAPES]


# --------------------------------------------------------------------------------- exact integer part


@pytest.mark.parametrize("M,K,N", SHAPES, ids=ids)
def test_exact_accumulation(isa, M, K, N):
    """scales = 1, no bias, fp32 out: out = float32(a @ wᵀ); with |acc| < 2^24 that is the integer itself,
    so any accumulation error (overflow, saturation, wrong compensation) shows as a mismatch."""
    a, w = rand_i8(M, K), rand_i8(N, K)
    ref = a.long() @ w.long().t()
    assert ref.abs().max().item() < 2**24 if ref.numel() else True
    out = ops.int8_gemm(a, torch.ones(M), w, torch.ones(N), None, torch.float32)
    assert torch.equal(out.long(), ref)


@pytest.mark.parametrize("sign", ["same", "opposite"])
def test_exact_extremes(isa, sign):
    """Worst case for int16/int32 saturation: every product ±127² (u8 x s8 with a+128 = 255 on avx512)."""
    M, K, N = 9, 1031, 33  # 127² * 1031 = 16,629,. < 2^24: exact in fp32
    a = torch.full((M, K), 127, dtype=torch.int8)
    a[1::2] = -127
    w = torch.full((N, K), 127 if sign == "same" else -127, dtype=torch.int8)
    ref = a.long() @ w.long().t()
    out = ops.int8_gemm(a, torch.ones(M), w, torch.ones(N), None, torch.float32)
    assert torch.equal(out.long(), ref)


def test_exact_with_minus_128(isa):
    """-128 is outside the quantizer's range but a valid int8: the avx512 and amx paths are exact for it, the avx2
    path (vpmaddubsw would saturate on w = -128) hands such weights to the reference kernel."""
    M, K, N = 13, 259, 37
    a, w = rand_i8(M, K, lo=-128), rand_i8(N, K, lo=-128)
    a[0] = -128
    w[:, 0] = -128
    ref = a.long() @ w.long().t()
    out = ops.int8_gemm(a, torch.ones(M), w, torch.ones(N), None, torch.float32)
    assert torch.equal(out.long(), ref)


# ---------------------------------------------------------------------------------------- epilogue

# Ours: fp32 fma(float(acc), a_scale*w_scale, bias), then one rounding to out dtype; the reference rounds
# once from fp64. fp32: a few fp32 ulps. bf16/fp16: the two differ by at most one ulp of the out dtype.
TOL = {torch.float32: (4 * 2**-24, 1e-6), torch.bfloat16: (2**-8, 1e-6), torch.float16: (2**-11, 1e-4)}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,K,N", SHAPES[:4], ids=ids[:4])
def test_epilogue(isa, M, K, N, out_dtype, with_bias):
    a, w = rand_i8(M, K), rand_i8(N, K)
    a_scale = torch.rand(M) * 1e-3 + 1e-4
    w_scale = torch.rand(N) * 1e-3 + 1e-4
    bias = torch.randn(N).to(out_dtype if out_dtype != torch.float32 else torch.bfloat16) if with_bias else None
    ref = reference.int8_gemm(a, a_scale, w, w_scale, bias, torch.float64)
    out = ops.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_isa_paths_bit_identical(out_dtype, monkeypatch):
    """All paths share the epilogue formula, so they agree bit for bit."""
    M, K, N = 37, 1153, 129
    a, w = rand_i8(M, K), rand_i8(N, K)
    a_scale, w_scale, bias = torch.rand(M) * 1e-3, torch.rand(N) * 1e-3, torch.randn(N)
    outs = {}
    for name in ISAS:
        monkeypatch.setenv("TD_CPU_ISA", name)
        outs[name] = ops.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    for name, o in outs.items():
        assert torch.equal(o, outs["ref"]), name


@pytest.mark.parametrize("M,K,N", SHAPES, ids=ids)
def test_packed_equals_unpacked(isa, M, K, N):
    a, w = rand_i8(M, K), rand_i8(N, K)
    a_scale, w_scale, bias = torch.rand(M), torch.rand(N), torch.randn(N)
    packed = ops.pack_int8_weight(w)
    assert packed.dtype == torch.int8 and packed.dim() == 1 and packed.numel() == ops.packed_numel_cpu(N, K)
    out = ops.int8_gemm_packed(a, a_scale, packed, w_scale, bias, torch.bfloat16)
    nan = torch.full_like(out, float("nan"))
    assert torch.equal(out, ops.int8_gemm(a, a_scale, w, w_scale, bias, torch.bfloat16))
    assert not torch.isnan(out).any() and not torch.equal(out, nan) if M else True


@pytest.mark.parametrize("N,K", [(1, 1), (17, 67), (129, 1153), (48, 64)], ids=["N1K1", "N17K67", "N129K1153", "N48K64"])
def test_pack_paths_agree(N, K, monkeypatch):
    """The AVX-512 weight packing (16x16 dword transposes) writes the same bytes as the scalar one."""
    if "avx512" not in ISAS:
        pytest.skip(f"avx512: {USABLE.get('avx512', (False, 'no native library'))[1]}")
    w = rand_i8(N, K, lo=-128)
    monkeypatch.setenv("TD_CPU_ISA", "ref")
    ref = ops.pack_int8_weight(w)
    monkeypatch.setenv("TD_CPU_ISA", "avx512")
    assert torch.equal(ops.pack_int8_weight(w), ref)


W8A8_SHAPES = [(1, 3, 5), (17, 1153, 129), (70, 67, 33), (0, 67, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,K,N", W8A8_SHAPES, ids=[f"M{m}K{k}N{n}" for m, k, n in W8A8_SHAPES])
def test_w8a8_linear_fused_equals_quantize_then_gemm(isa, M, K, N, dtype):
    """The fused op (quantization inside the A packing on avx512/amx) is bit-identical to the two-op path."""
    x = (torch.randn(M, K) * torch.rand(M, 1) * 5).to(dtype)
    if M > 1:
        x[1] = 0  # scale 0 row: zeros, no NaN
    w, w_scale, bias = rand_i8(N, K), torch.rand(N) * 1e-2, torch.randn(N).bfloat16()
    packed = ops.pack_int8_weight(w)
    out = ops.w8a8_linear(x, packed, w_scale, bias)
    ref = ops.int8_gemm_packed(*ops.quantize_per_token(x), packed, w_scale, bias, dtype)
    assert out.dtype == dtype and out.shape == (M, N)
    assert torch.equal(out, ref)
    assert not out.isnan().any()


def test_w8a8_linear_opcheck():
    w = rand_i8(9, 7)  # the private native op's fake is registered by ops.py
    torch.library.opcheck(torch.ops.tiled_diffusion_C.w8a8_linear.default,
                          (torch.randn(5, 7), ops.pack_int8_weight(w), torch.rand(9), torch.randn(9)))


def test_noncontiguous_inputs():
    a = rand_i8(40, 66)[:, ::2]  # [40, 33] strided
    w = rand_i8(33, 70).t()  # [70, 33] column-major
    a_scale, w_scale = torch.rand(80)[::2], torch.rand(140)[::2]
    out = ops.int8_gemm(a, a_scale, w, w_scale, None, torch.float32)
    torch.testing.assert_close(out, reference.int8_gemm(a, a_scale, w, w_scale, None, torch.float32))


# ---------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,K", [(1, 3), (17, 67), (33, 1153), (0, 16)], ids=["M1K3", "M17K67", "M33K1153", "M0"])
def test_quantize_bit_exact(isa, M, K, dtype):
    """Same fp32 operations as the reference (absmax/127, 1/scale, x*inv, round-half-even): bit-exact."""
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype)
    if M > 2:
        x[1] = 0  # all-zero row -> scale 0, zeros, no NaN
        x[2, : min(K, 6)] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])[: min(K, 6)].to(dtype)  # ties
        x[2, 6:] = 0
    q, s = ops.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq) and torch.equal(s, rs)
    if M > 2:
        assert s[1].item() == 0 and not q[1].any()
        assert not torch.isnan(s).any()


# -------------------------------------------------------------------------------------------- accuracy


def test_w8a8_sqnr_with_outlier_channels():
    """Per-token A8 x per-channel W8 against the fp32 Linear, on activations with a few large channels (as in
    DiT MLP inputs). Torchao's bar for int8 GEMMs: >= 28 dB."""
    M, K, N = 512, 1152, 384
    x = torch.randn(M, K)
    outliers = torch.randperm(K)[:8]
    x[:, outliers] *= 8.0
    w = torch.randn(N, K) / math.sqrt(K)
    bias = torch.randn(N) * 0.1
    ref = torch.nn.functional.linear(x, w, bias)
    w_scale = w.abs().amax(dim=1) / 127
    w_i8 = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    x_i8, x_scale = ops.quantize_per_token(x)
    out = ops.int8_gemm_packed(x_i8, x_scale, ops.pack_int8_weight(w_i8), w_scale, bias, torch.float32)
    sqnr = 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    print(f"W8A8 SQNR with outlier channels: {sqnr:.1f} dB")
    assert sqnr >= 28.0, sqnr


# ---------------------------------------------------------------------------------- opcheck / errors


def _gemm_args(M=5, K=7, N=9):
    return rand_i8(M, K), torch.rand(M), rand_i8(N, K), torch.rand(N), torch.randn(N)


@pytest.mark.parametrize("op", ["quantize_per_token", "int8_gemm", "pack_int8_weight", "int8_gemm_packed"])
def test_opcheck(op):
    a, a_scale, w, w_scale, bias = _gemm_args()
    args = {
        "quantize_per_token": (torch.randn(5, 7),),
        "int8_gemm": (a, a_scale, w, w_scale, bias, torch.bfloat16),
        "pack_int8_weight": (w,),
        "int8_gemm_packed": (a, a_scale, ops.pack_int8_weight(w), w_scale, None, torch.float32),
    }[op]
    torch.library.opcheck(getattr(torch.ops.tiled_diffusion, op).default, args)


def test_bad_isa_env(monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", "sse9")
    a, a_scale, w, w_scale, bias = _gemm_args()
    with pytest.raises(RuntimeError, match="TD_CPU_ISA"):
        ops.int8_gemm(a, a_scale, w, w_scale, bias, torch.float32)


def test_wrong_packed_size():
    a, a_scale, w, w_scale, bias = _gemm_args()
    packed = ops.pack_int8_weight(w)
    with pytest.raises(RuntimeError, match="w_packed"):
        ops.int8_gemm_packed(a, a_scale, packed[:-1], w_scale, bias, torch.float32)
    with pytest.raises(RuntimeError, match="w_packed"):  # packed for another K
        ops.int8_gemm_packed(rand_i8(5, 12), a_scale, packed, w_scale, bias, torch.float32)


def test_device_mismatch():
    a, a_scale, w, w_scale, bias = _gemm_args()
    # Through the dispatcher a meta tensor selects the fake kernel; the CPU/CUDA path checks devices itself.
    with pytest.raises(ValueError, match="w is on meta"):
        ops._int8_gemm_impl(a, a_scale, w.to("meta"), w_scale, bias, torch.float32)


_DT = st.sampled_from([torch.int8, torch.uint8, torch.int32, torch.float32, torch.bfloat16, torch.float16])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(0, 6), k=st.integers(1, 9), n=st.integers(1, 9),
    a_dt=_DT, w_dt=_DT, as_dt=_DT, ws_dt=_DT, b_dt=st.one_of(st.none(), _DT),
    a_dim=st.integers(1, 3), as_len=st.integers(0, 7), ws_len=st.integers(0, 10), wk=st.integers(1, 9),
    out_dtype=_DT,
)
def test_argument_checking_fuzz(m, k, n, a_dt, w_dt, as_dt, ws_dt, b_dt, a_dim, as_len, ws_len, wk, out_dtype):
    """Any argument combination either runs and matches the reference or fails with a ValueError naming the op."""
    a_shape = {1: (m * k,), 2: (m, k), 3: (1, m, k)}[a_dim]
    a = torch.randint(-127, 128, a_shape).to(a_dt)
    w = torch.randint(-127, 128, (n, wk)).to(w_dt)
    a_scale, w_scale = torch.rand(as_len).to(as_dt), torch.rand(ws_len).to(ws_dt)
    bias = None if b_dt is None else torch.randn(n).to(b_dt)
    try:
        out = ops.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    except ValueError as e:
        assert "int8_gemm" in str(e)
        return
    ref = reference.int8_gemm(a, a_scale, w, w_scale, bias, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(dt=_DT, dim=st.integers(1, 3))
def test_quantize_argument_checking_fuzz(dt, dim):
    x = torch.randn((4, 5, 6)[:dim]).to(dt)
    try:
        q, s = ops.quantize_per_token(x)
    except ValueError as e:
        assert "quantize_per_token" in str(e)
        return
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
