"""CUDA int8 GEMM / per-token quantize (csrc/cuda/int8_gemm.cu).

Two kinds of tests:
- host emulation (runs everywhere with g++): tests/backends/cuda/int8_gemm_mma_emulation.cpp includes the kernel's
  csrc/cuda/mma_layout.h and emulates every block, warp and lane of the kernel on the CPU, so a wrong lane
  mapping, swizzle, stage index or epilogue coordinate fails here without a GPU;
- GPU tests (@pytest.mark.cuda) against torch._int_mm and the fp64 reference.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion import reference
from tests.helpers import ROOT, build_emulator

EMU_SRC = os.path.join(ROOT, "tests", "backends", "cuda", "int8_gemm_mma_emulation.cpp")
LAYOUT_DIR = os.path.join(ROOT, "csrc", "cuda")

# ------------------------------------------------------------------------------------------ host emulation


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "mma_emu", EMU_SRC, f"-I{LAYOUT_DIR}")


@pytest.mark.parametrize(
    "m,n,k",
    [
        (130, 136, 256),  # aligned K (cp.async path), M and N one block + a ragged edge
        (150, 200, 200),  # K % 16 != 0: byte-wise zero-filled path, 4 k-tiles (ring wraps), ragged tail
        (1, 7, 5),        # tiny: one row, fewer columns than one n8 tile, K shorter than one k32 step
        (257, 129, 448),  # 3 x 2 blocks, 7 k-tiles (> kStages, every stage reused)
    ],
    ids=["aligned_ragged", "odd_k", "tiny", "multi_block"],
)
def test_mma_emulation(emulator, m, n, k):
    r = subprocess.run([emulator, str(m), str(n), str(k), "7"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK"), r.stdout


@pytest.mark.parametrize("m,n", [(8 * 1024 * 1024, 1152), (33554432, 4608), (1, 1), (129, 10240)],
                         ids=["16384sq_4img_cfg", "multidiffusion_256_all_tiles", "one", "t5_ff"])
def test_mma_emulation_grid(emulator, m, n):
    """blockIdx.x -> output tile (mma_layout.h block_origin) covers every tile once on grid.x alone; the first
    case has ceil(M / 128) = 65536 M-tiles, one more than grid.y allows (where the old launch put them)."""
    r = subprocess.run([emulator, "grid", str(m), str(n)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK grid"), r.stdout


# ------------------------------------------------------------------------------------------ GPU tests

needs_kernel = pytest.mark.skipif(
    not ops.native_has("int8_gemm", "cuda"), reason="tiled_diffusion._C was built without CUDA kernels")


def _poison_allocator(shape, dtype):
    """Leave NaN/garbage in the caching allocator's next block so unwritten outputs cannot pass by luck."""
    t = torch.empty(shape, dtype=dtype, device="cuda")
    t.fill_(float("nan") if dtype.is_floating_point else -77)
    del t


def _inputs(m, n, k, bias_dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a_scale = torch.rand(m, generator=g) * 0.02 + 1e-3
    w_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = None if bias_dtype is None else (torch.randn(n, generator=g) * 3).to(bias_dtype)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    return dev(a), dev(a_scale), dev(w), dev(w_scale), dev(bias)


SHAPES = [(1, 1152, 1152), (97, 333, 1152), (300, 77, 200), (256, 4608, 1152), (4096, 1152, 4608), (33, 40, 24),
          (129, 131, 17)]
SHAPE_IDS = ["m1", "odd_n", "odd_k", "pixart_up", "pixart_down", "small", "k17"]


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("m,n,k", SHAPES, ids=SHAPE_IDS)
def test_int8_gemm_accumulator_matches_int_mm(m, n, k):
    """Unit scales, fp32 out: the int32 accumulation must equal torch._int_mm (exact below 2**24)."""
    a, _, w, _, _ = _inputs(m, n, k, None)
    ones_m = torch.ones(m, device="cuda")
    ones_n = torch.ones(n, device="cuda")
    _poison_allocator((m, n), torch.float32)
    out = ops.int8_gemm(a, ones_m, w, ones_n, None, torch.float32)
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        ref = torch._int_mm(a, w.t().contiguous()).double()  # _int_mm wants K, N multiples of 8, M > 16
    else:
        ref = (a.double() @ w.double().t())
    torch.testing.assert_close(out.double(), ref, rtol=6e-8, atol=0)  # int32 -> fp32 rounding only


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=["nobias", "bias32", "bias16"])
@pytest.mark.parametrize("m,n,k", SHAPES[:4] + SHAPES[5:], ids=SHAPE_IDS[:4] + SHAPE_IDS[5:])
def test_int8_gemm_matches_reference(m, n, k, out_dtype, bias_dtype):
    a, a_scale, w, w_scale, bias = _inputs(m, n, k, bias_dtype)
    _poison_allocator((m, n), out_dtype)
    out = ops.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # reference.int8_gemm's formula in fp64, evaluated on the GPU (the CPU int64 matmul is slow at these sizes;
    # fp64 holds every int32 accumulator exactly). reference.int8_gemm itself is compared at the smallest shape.
    prod = (a.double() @ w.double().t()) * a_scale.double()[:, None] * w_scale.double()[None, :]
    ref64 = prod if bias is None else prod + bias.double()[None, :]
    if m * n * k <= 64 * 64 * 64:
        torch.testing.assert_close(ref64.cpu(), reference.int8_gemm(a.cpu(), a_scale.cpu(), w.cpu(), w_scale.cpu(),
                                   None if bias is None else bias.cpu(), torch.float64), rtol=1e-15, atol=0)
    assert torch.isfinite(out).all()
    # fp32 epilogue: a few fp32 roundings of |acc * sa * ws| + |bias|; 16-bit outputs: one rounding of the cast.
    mag = prod.abs() if bias is None else prod.abs() + bias.double().abs()[None, :]
    rel = {torch.float32: 4 * 2.0**-24, torch.bfloat16: 2.0**-8 + 4 * 2.0**-24, torch.float16: 2.0**-11 + 4 * 2.0**-24}
    err = (out.double() - ref64).abs()
    floor = 2.0**-25 if out_dtype == torch.float16 else 1e-30  # fp16 subnormal spacing near 0
    bound = rel[out_dtype] * mag + floor
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


@pytest.mark.cuda
@needs_kernel
def test_int8_gemm_packed_uses_plain_layout_on_cuda():
    a, a_scale, w, w_scale, bias = _inputs(65, 96, 160, torch.float32)
    wp = ops.pack_int8_weight(w)
    out = ops.int8_gemm_packed(a, a_scale, wp, w_scale, bias, torch.bfloat16)
    torch.testing.assert_close(out, ops.int8_gemm(a, a_scale, w, w_scale, bias, torch.bfloat16), rtol=0, atol=0)


@pytest.mark.cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("m,k", [(1, 1152), (97, 1152), (33, 77), (300, 4608), (5, 3)],
                         ids=["m1", "rows97", "odd_k_scalar_path", "pixart_k", "tiny"])
def test_quantize_per_token_matches_reference(m, k, dtype):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 4).to(dtype).cuda()
    x[m // 2] = 0  # an all-zero row: scale 0, zeros, no NaN
    _poison_allocator((m, k), torch.int8)
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = reference.quantize_per_token(x)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    assert s[m // 2].item() == 0 and (q[m // 2] == 0).all()


@pytest.mark.cuda
@needs_kernel
def test_quantize_then_gemm_sqnr():
    """End to end W8A8 against a fp32 matmul: >= 28 dB SQNR (torchao's bar for int8 GEMMs)."""
    x = torch.randn(300, 1152, device="cuda")
    wf = torch.randn(640, 1152, device="cuda") / 34
    xq, xs = ops.quantize_per_token(x)
    wq, ws = ops.quantize_per_token(wf)
    out = ops.int8_gemm(xq, xs, wq, ws, None, torch.float32)
    ref = x @ wf.t()
    sqnr = 20 * torch.log10(ref.norm() / (out - ref).norm())
    assert sqnr.item() >= 28, sqnr.item()


@pytest.mark.cuda
@needs_kernel
def test_opcheck_cuda():
    a, a_scale, w, w_scale, bias = _inputs(37, 48, 64, torch.float32)
    torch.library.opcheck(torch.ops.tiled_diffusion.int8_gemm.default, (a, a_scale, w, w_scale, bias, torch.bfloat16))
    torch.library.opcheck(torch.ops.tiled_diffusion.quantize_per_token.default,
                          (torch.randn(37, 72, device="cuda", dtype=torch.bfloat16),))


@pytest.mark.cuda
@needs_kernel
def test_int8_gemm_bad_input_names_argument():
    a, a_scale, w, w_scale, _ = _inputs(8, 8, 32, None)
    with pytest.raises((ValueError, RuntimeError), match="w_scale"):
        ops.int8_gemm(a, a_scale, w, w_scale[:4], None, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="a must be int8"):
        ops.int8_gemm(a.float(), a_scale, w, w_scale, None, torch.float32)
