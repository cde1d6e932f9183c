"""TD_IMPL (route ops to their reference twin, per op or all), the public tiled_diffusion::w8a8_linear op, and the
ops' docstrings."""
import logging

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion.backends import choice
from tiled_diffusion import reference
from tiled_diffusion.core.tiling import TileGrid


@pytest.fixture
def debug_log(caplog):
    choice._log_choice.cache_clear()  # choices are logged once per process: start afresh
    caplog.set_level(logging.DEBUG, logger="tiled_diffusion")
    yield caplog
    choice._log_choice.cache_clear()


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    grid = TileGrid.for_tokens(24, 36, 12)  # 12x18 tokens, 6x6-token tiles: 2x3 tiles, L = 36
    q, k, v = (torch.randn(grid.num_tiles, 3, grid.tokens_per_tile, 20, generator=g) for _ in range(3))
    return q, k, v, grid.neighbours(1)


def _blend_inputs():
    g = TileGrid(29, 41, tile=16, overlap=6, batch=2, patch=1)
    tiles = torch.randn(g.num_tiles, 3, g.th, g.tw, generator=torch.Generator().manual_seed(1))
    oy, ox = g.origins()
    return tiles, oy, ox, g.blend_weights("cosine"), 2, 29, 41


def test_reference_for_one_op(monkeypatch, debug_log):
    q, k, v, nb = _attention_inputs()
    fast_out, fast_lse = ops.window_attention(q, k, v, nb)
    monkeypatch.setenv("TD_IMPL", "window_attention=reference")
    out, lse = ops.window_attention(q, k, v, nb)
    ops.seam_blend(*_blend_inputs())
    text = debug_log.text
    assert "window_attention on cpu: reference (TD_IMPL)" in text
    assert "seam_blend on cpu: CPU" in text  # not named: its own path
    # fp32 inputs: the fused CPU path and the reference differ by summation order only
    torch.testing.assert_close(out, fast_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, fast_lse, rtol=1e-5, atol=1e-5)


def test_reference_for_all_ops(monkeypatch, debug_log):
    args = _blend_inputs()
    fast = ops.seam_blend(*args)
    monkeypatch.setenv("TD_IMPL", "reference")
    slow = ops.seam_blend(*args)
    q, k, v, nb = _attention_inputs()
    ops.window_attention(q, k, v, nb)
    assert "seam_blend on cpu: reference (TD_IMPL)" in debug_log.text
    assert "window_attention on cpu: reference (TD_IMPL)" in debug_log.text
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-6)  # fp32 accumulation in both


def _w8a8_inputs(M=7, K=37, N=19, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-3
    bias = torch.randn(N, generator=g).to(dtype)
    return x, ops.pack_int8_weight(w), w_scale, bias, w


def test_w8a8_linear_public_op_is_the_two_ops():
    x, wp, ws, b, _ = _w8a8_inputs()
    out = torch.ops.tiled_diffusion.w8a8_linear(x, wp, ws, b)
    two = ops.int8_gemm_packed(*ops.quantize_per_token(x), wp, ws, b, x.dtype)
    assert out.dtype == x.dtype and out.shape == (7, 19)
    assert torch.equal(out, two)  # bit-identical by construction (the fused kernel's contract)


@pytest.mark.parametrize("op", ["w8a8_linear", "int8_gemm_packed"])
def test_int8_reference_within_tolerance(monkeypatch, debug_log, op):
    x, wp, ws, b, w = _w8a8_inputs(dtype=torch.float32)
    fast = ops.w8a8_linear(x, wp, ws, b)
    monkeypatch.setenv("TD_IMPL", f"{op}=reference")
    slow = ops.w8a8_linear(x, wp, ws, b) if op == "w8a8_linear" else ops.int8_gemm_packed(
        *ops.quantize_per_token(x), wp, ws, b, x.dtype)
    assert f"{op} on cpu: reference (TD_IMPL)" in debug_log.text
    # integer products are exact on both paths; only the fp32 epilogue's rounding order may differ
    torch.testing.assert_close(slow, fast, rtol=1e-6, atol=1e-6)
    exact = (x.double() @ w.double().t() * ws.double() + b.double())
    assert (slow.double() - exact).abs().max() < 0.05 * exact.abs().max()  # W8A8 error, not a wrong result


def test_w8a8_linear_opcheck():
    x, wp, ws, b, _ = _w8a8_inputs()
    torch.library.opcheck(torch.ops.tiled_diffusion.w8a8_linear.default, (x, wp, ws, b))


def test_w8a8_linear_bad_weight_is_one_line():
    x, wp, ws, b, _ = _w8a8_inputs()
    with pytest.raises(ValueError, match="w8a8_linear: w_packed must be the CPU packed weight"):
        ops.w8a8_linear(x, wp[:-1], ws, b)


def test_w8a8_linear_named_in_profiler_traces():
    x, wp, ws, b, _ = _w8a8_inputs()
    with torch.profiler.profile() as prof:
        ops.w8a8_linear(x, wp, ws, b)
    assert "tiled_diffusion::w8a8_linear" in {e.name for e in prof.events()}


@pytest.mark.parametrize("spec", ["refrence", "window_attention=fast", "nope=reference"])
def test_bad_td_impl_is_one_clear_error(monkeypatch, spec):
    monkeypatch.setenv("TD_IMPL", spec)
    with pytest.raises(ValueError, match="TD_IMPL"):
        ops.seam_blend(*_blend_inputs())


@pytest.mark.parametrize("name", ["quantize_per_token", "int8_gemm", "pack_int8_weight", "int8_gemm_packed",
                                  "w8a8_linear", "window_attention", "seam_blend", "blend_lcm_step"])
def test_public_ops_are_documented(name):
    doc = getattr(ops, name).__doc__
    assert doc and len(doc) > 120 and "[" in doc  # shapes are spelled out
    packet_doc = getattr(torch.ops.tiled_diffusion, name).__doc__ or ""
    assert doc in packet_doc
