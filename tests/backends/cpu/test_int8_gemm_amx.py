"""AMX int8 GEMM (csrc/cpu/amx_gemm.h, tile instructions behind csrc/cpu/amx_tile.h).

Two kinds of tests, like the CUDA kernel's:
- host emulation (runs on any AVX-512 machine with g++): tests/backends/cpu/amx_emulation.cpp builds the kernel with
  TD_AMX_EMULATE=1 (a scalar TILELOADD/TDPBSSD/TILESTORED with the hardware's shape rules), runs its packing,
  fused quantization, task split and epilogue, and compares bit for bit with the documented formula; the packed
  weight ends at a PROT_NONE page, so a tile load past it faults;
- real AMX tests through the ops with TD_CPU_ISA=amx, skipped with the probe's reason where AMX cannot run
  (no AMX-INT8 in cpuid, tile state off, or the OS refused the tile-data permission).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.backends.cpu import isa as cpu_isa
from tests.helpers import ROOT, build_emulator

EMU_SRC = os.path.join(ROOT, "tests", "backends", "cpu", "amx_emulation.cpp")

# ------------------------------------------------------------------------------------------ host emulation


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "amx_emu", EMU_SRC, "-Wno-maybe-uninitialized",
                          f"-I{os.path.join(ROOT, 'csrc', 'cpu')}")


# (M, K, N, out dtype, bias, A input): odd shapes around the 16-row / 64-byte / 16-column tile and the
# 32x32 tile pair, the M = 1, K = 4608 and N = 130, every output dtype, bias on and off, int8 A and
# float A quantized inside the packing.
EMU_CASES = [
    (1, 4608, 130, "bf16", 1, "bf16"),   # M = 1, K = 4608 (72 chunks: 9 K slices), N = 130 (odd block count)
    (1, 5, 3, "f32", 0, "i8"),           # smaller than one tile in every dimension
    (33, 67, 130, "bf16", 1, "i8"),      # a single row tile after a pair, K tail of 3 bytes
    (17, 1153, 129, "f16", 1, "f16"),    # K % 64 = 1, N % 16 = 1
    (300, 200, 70, "f32", 1, "f32"),     # two row blocks (kMC = 256), fp32 A
    (257, 130, 33, "bf16", 0, "bf16"),   # one row past a block
    (40, 64, 32, "f16", 0, "i8"),        # K exactly one chunk, N exactly one pair
    (64, 4096, 48, "f32", 1, "bf16"),    # many K slices with a partial last slice (64 chunks = 8 x 8)
    (0, 5, 3, "f32", 1, "i8"),           # empty M
    (3, 0, 20, "bf16", 1, "f32"),        # K = 0: out = bias
]


@pytest.mark.parametrize("m,k,n,out,bias,a", EMU_CASES,
                         ids=[f"M{m}K{k}N{n}-{o}-{'bias' if b else 'nobias'}-{a}" for m, k, n, o, b, a in EMU_CASES])
def test_amx_emulation(emulator, m, k, n, out, bias, a):
    r = subprocess.run([emulator, str(m), str(k), str(n), "7", out, str(bias), a, "2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.startswith("OK"), r.stdout


def test_library_holds_the_tile_kernel():
    """Static check of the shipped library (the AMX path cannot run here): the task loop and the peak probe are
    compiled to real tile instructions, with LDTILECFG before and TILERELEASE after."""
    objdump = shutil.which("objdump")
    if objdump is None or ops._C is None:
        pytest.skip("needs objdump and the built tiled_diffusion._C")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", ops._C.__file__], capture_output=True, text=True,
                         timeout=120).stdout
    for insn in ("ldtilecfg", "tileloadd", "tdpbssd", "tilestored", "tilezero", "tilerelease", "tdpbf16ps"):
        assert insn in asm, f"{insn} missing from {ops._C.__file__}"


# -------------------------------------------------------------------------------------- real AMX (if any)

AMX_OK, AMX_WHY = cpu_isa.usable("amx") if ops._C is not None else (False, "tiled_diffusion._C not built")
needs_amx = pytest.mark.skipif(not AMX_OK, reason=f"amx: {AMX_WHY}")


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", "amx")


def rand_i8(*shape, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8)


SHAPES = [(1, 4608, 130), (33, 67, 130), (17, 1153, 129), (300, 200, 70), (257, 4608, 33)]


@needs_amx
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}K{k}N{n}" for m, k, n in SHAPES])
def test_amx_exact_accumulation(amx, M, K, N):
    """scales 1, no bias, fp32 out: the int32 accumulation itself (exact while |acc| < 2^24)."""
    a, w = rand_i8(M, K, lo=-127), rand_i8(N, K, lo=-127)
    a[:, :8] = 127  # large partial sums in the first chunk
    ref = a.long() @ w.long().t()
    out = ops.int8_gemm(a, torch.ones(M), w, torch.ones(N), None, torch.float32)
    exact = ref.abs() < 2**24
    assert torch.equal(out.long()[exact], ref[exact])


@needs_amx
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,K,N", SHAPES[:3], ids=[f"M{m}K{k}N{n}" for m, k, n in SHAPES[:3]])
def test_amx_equals_reference_path(amx, monkeypatch, M, K, N, out_dtype, with_bias):
    """Bit-identical to the reference ISA path (same epilogue formula), packed and fused-quantization ops."""
    x = torch.randn(M, K).to(out_dtype)
    w, w_scale = rand_i8(N, K), torch.rand(N) * 1e-2
    bias = torch.randn(N) if with_bias else None
    packed = ops.pack_int8_weight(w)
    a, a_scale = ops.quantize_per_token(x)
    got = (ops.int8_gemm_packed(a, a_scale, packed, w_scale, bias, out_dtype),
           ops.w8a8_linear(x, packed, w_scale, bias))
    monkeypatch.setenv("TD_CPU_ISA", "ref")
    want = ops.int8_gemm_packed(a, a_scale, packed, w_scale, bias, out_dtype)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    torch.testing.assert_close(want.double(), reference.int8_gemm(a, a_scale, w, w_scale, bias, torch.float64),
                               rtol=2**-7, atol=1e-3)


@needs_amx
def test_amx_peak_probe_runs():
    gops = torch.ops.tiled_diffusion_C.isa_peak_gops("amx", 20000)
    assert gops > 0
