"""The AMX-BF16 neighbourhood attention kernel built with the scalar tile emulation (tests/backends/cpu/
amx_attention_emulation.cpp) against the fp64 reference: its packing, row pairing, masks and softmax proven on
any machine with g++ and AVX512-BF16 (AMD Zen 4 included), where test_neighborhood_attention_amx.py skips.

The emulator gets the problem through a file (window bounds from `reference.neighborhood_bounds`, as the op
passes them) and writes its outputs from NaN-poisoned buffers that end at a guard page. Tolerances are the AMX
tests' (out: 2x plain bf16 masked attention's error + 1e-3; lse 2e-4 from the exp2 polynomial). Where the real
kernel runs too, the emulation must agree with it to a bf16 ulp of out (measured: at most 1 ulp on a few elements;
the emulated TDPBF16PS rounds each pair's sum to fp32 before accumulating, which the hardware need not do).
"""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from tests.backends.cpu.test_neighborhood_attention_amx import LSE_ATOL, WHY, kernel_bounds, native_poisoned
from tests.helpers import ROOT, build_emulator
from tests.ops.test_neighborhood_attention import _check_against_reference, inputs
from tiled_diffusion import reference

EMU_SRC = os.path.join(ROOT, "tests", "backends", "cpu", "amx_attention_emulation.cpp")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "na_emu", EMU_SRC, "-pthread", f"-I{os.path.join(ROOT, 'csrc', 'cpu')}")


def emulated(emulator, tmp_path, q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), band=None, threads=2):
    """The emulated kernel's (out, lse) for q [B, H, Hq, W, D] and k/v [B, H, Hk, W, D] (bf16)."""
    B, H, Hq, W, D = q.shape
    ylo, yhi, xlo, xhi, q_top = kernel_bounds(q, window, stride, clip, offset, band)
    bits = lambda t: t.contiguous().view(torch.int16).numpy().tobytes()  # noqa: E731
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(np.array([B, H, Hq, k.shape[2], W, D, q_top], np.int64).tobytes()
                    + np.float32(1 / math.sqrt(D)).tobytes() + bits(q) + bits(k) + bits(v)
                    + b"".join(t.numpy().astype(np.int32).tobytes() for t in (ylo, yhi, xlo, xhi)))
    r = subprocess.run([emulator, str(src), str(dst), str(threads)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.startswith("OK"), r.stdout
    raw = dst.read_bytes()
    n = q.numel() * 2
    out = torch.frombuffer(bytearray(raw[:n]), dtype=torch.bfloat16).reshape(q.shape)
    lse = torch.frombuffer(bytearray(raw[n:]), dtype=torch.float32).reshape(q.shape[:4])
    return out, lse


CASES = [  # (B, H, Ht, Wt, D, window, stride, clip[, offset]): the AMX tests' shapes, small enough for scalar tiles
    (2, 2, 13, 11, 72, (5, 7), (1, 1), False),  # odd canvas, odd windows, CFG rows; Wt < 16
    (1, 2, 11, 37, 72, (6, 12), (1, 1), False),  # even windows, 3 column segments (the last partial)
    (1, 1, 9, 20, 72, (16, 16), (1, 1), False),  # window > canvas rows: global along y
    (1, 2, 13, 17, 40, (9, 7), (3, 2), False),  # GNA stride, partial last groups (rows do not pair)
    (2, 1, 12, 15, 72, (12, 15), (4, 5), True),  # tile-blocked r1 (clip)
    (1, 1, 13, 17, 72, (9, 12), (3, 4), True, (-1, -2)),  # blocked r1, half-tile shift
    (1, 2, 11, 21, 8, (5, 9), (1, 1), False),  # D 8: the padded d chunk spans several key rows
    (1, 1, 7, 19, 128, (7, 9), (1, 1), False),  # D 128: 4 d chunks, 2 groups of O tiles
    (1, 1, 5, 5, 256, (3, 5), (1, 1), False),  # the largest D
    (1, 1, 26, 24, 72, (21, 21), (1, 1), False),  # key rows x columns > one softmax block
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}x{c[3]}-D{c[4]}-w{c[5]}-s{c[6]}-{'clip' if c[7] else 'in'}"
                                             f"{'-o' + str(c[8]) if len(c) > 8 else ''}" for c in CASES])
def test_emulated_kernel_vs_reference(emulator, tmp_path, case):
    B, H, Ht, Wt, D, window, stride, clip = case[:8]
    offset = case[8] if len(case) > 8 else (0, 0)
    q, k, v = inputs(B, H, Ht, Wt, D, torch.bfloat16, seed=Ht * Wt + D)
    out, lse = emulated(emulator, tmp_path, q, k, v, window, stride, clip, offset)
    _check_against_reference(out, lse, q, k, v, window, stride, clip, offset)
    ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, stride, clip, offset)[1]
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)
    if WHY is None:  # the real kernel runs here: the emulation models it
        real_out, real_lse = native_poisoned(q, k, v, window, stride, clip, offset)
        torch.testing.assert_close(out.float(), real_out.float(), atol=1e-3, rtol=2 ** -7)  # a bf16 ulp apart
        torch.testing.assert_close(lse, real_lse, atol=1e-5, rtol=0)


def test_emulated_band_is_the_canvas_rows(emulator, tmp_path):
    """A band (q rows [5, 13) of a 17-row canvas, k the rows its windows reach) cut at an odd row: the rows pair
    differently from the whole canvas's, so the results agree to rounding, against the reference's rows."""
    window, Ht, Wt = (7, 5), 17, 19
    q, k, v = inputs(1, 2, Ht, Wt, 72, torch.bfloat16, seed=3)
    lo, hi = reference.neighborhood_bounds(Ht, window[0], 1, False, 0)
    q_top, q_bot = 5, 13
    k_top, k_bot = int(lo[q_top:q_bot].min()), int(hi[q_top:q_bot].max())
    out, lse = emulated(emulator, tmp_path, q[:, :, q_top:q_bot], k[:, :, k_top:k_bot], v[:, :, k_top:k_bot], window,
                        band=(Ht, q_top, k_top), threads=1)
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), window)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out[:, :, q_top:q_bot], atol=2e-2, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse[:, :, q_top:q_bot].double(), atol=LSE_ATOL, rtol=0)
