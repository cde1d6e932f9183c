"""window_attention: the Triton kernel (interpreter on CPU tensors here) and the CPU path vs the fp64 reference.

Tolerances: outputs `err(ours) <= 2 * err(naive attention in the same dtype) + eps` against the fp64 reference
(flash-attention's rule); lse is fp32 state in every implementation, so it gets a fixed absolute tolerance.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.core.tiling import TileGrid
from tiled_diffusion.backends.triton.window_attention import AOT_CONFIGS
from tiled_diffusion.backends.triton.window_attention import split_head_dim
from tiled_diffusion.backends.triton.window_attention import supports_head_dim
from tiled_diffusion.backends.triton.window_attention import window_attention_triton as _window_attention_triton
from tests.helpers import on_triton_device

window_attention_triton = on_triton_device(_window_attention_triton)  # CUDA tensors on a GPU, else interpreted

ops.register_triton_ops()  # the opcheck tests call torch.ops.tiled_diffusion.* directly

IMPLS = ("triton", "cpu")
LSE_ATOL = 2e-3


def run(impl, q, k, v, nb, bias=None, scale=None):
    if impl == "triton":
        T, H, L, D = q.shape
        out = torch.full_like(q, math.nan)  # poison: every element must be written
        lse = torch.full((T, H, L), math.nan, dtype=torch.float32)
        return window_attention_triton(q, k, v, nb, bias, scale, out=out, lse=lse)
    return ops.window_attention(q, k, v, nb, bias, scale)  # CPU tensors -> the CPU path


def inputs(T, H, L, D, dtype, mult=1.0):
    return tuple((torch.randn(T, H, L, D) * mult).to(dtype) for _ in range(3))


def random_neighbours(T, NB, p_empty=0.25):
    nb = torch.randint(0, T, (T, NB), dtype=torch.int32)
    nb[torch.rand(T, NB) < p_empty] = -1
    nb[:, 0] = torch.arange(T, dtype=torch.int32)  # self
    return nb


def naive_same_dtype(q, k, v, nb, bias, scale):
    """Plain attention computed in the inputs' dtype: the error baseline."""
    T, H, L, D = q.shape
    idx = nb.long().clamp(min=0)
    kg = k[idx].permute(0, 2, 1, 3, 4).reshape(T, H, -1, D)
    vg = v[idx].permute(0, 2, 1, 3, 4).reshape(T, H, -1, D)
    b = torch.zeros(nb.shape) if bias is None else bias.clone()
    b[nb < 0] = -math.inf
    s = (q @ kg.transpose(-1, -2)) * scale + b.repeat_interleave(L, 1)[:, None, None, :].to(q.dtype)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ vg


def assert_matches_reference(impl, q, k, v, nb, bias=None, scale=None):
    D = q.shape[-1]
    sc = 1 / math.sqrt(D) if scale is None else scale
    out, lse = run(impl, q, k, v, nb, bias, scale)
    ref_out, ref_lse = reference.window_attention(q.double(), k.double(), v.double(), nb, bias, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    base = (naive_same_dtype(q, k, v, nb, bias, sc).double() - ref_out).abs().max().item()
    err = (out.double() - ref_out).abs().max().item()
    eps = 1e-5 if q.dtype == torch.float32 else 1e-3
    assert err <= 2 * base + eps, f"{impl}: err {err:.3g} vs same-dtype baseline {base:.3g}"
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)
    return out, lse


CASES = [  # (dtype, D, L, NB): L is never a multiple of the 16-row interpreter block
    (torch.float32, 72, 37, 3),
    (torch.bfloat16, 72, 37, 3),
    (torch.float16, 72, 23, 4),
    (torch.bfloat16, 64, 19, 3),
    (torch.float16, 128, 17, 2),
    (torch.float32, 64, 5, 5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,D,L,NB", CASES, ids=[f"{str(c[0])[6:]}-D{c[1]}-L{c[2]}" for c in CASES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_vs_reference(impl, dtype, D, L, NB, with_bias):
    T, H = 4, 2
    q, k, v = inputs(T, H, L, D, dtype)
    nb = random_neighbours(T, NB)
    bias = torch.randn(T, NB) if with_bias else None
    assert_matches_reference(impl, q, k, v, nb, bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_explicit_scale(impl):
    q, k, v = inputs(3, 2, 21, 72, torch.float32)
    assert_matches_reference(impl, q, k, v, random_neighbours(3, 2), None, scale=0.3)


def _canvas_to_tiles(grid, x):
    """x [B, H, N, D] raster canvas -> [T, H, L, D] tile-major."""
    return grid.to_tile_major(x.transpose(1, 2)).transpose(1, 2).contiguous()


def _tiles_to_canvas(grid, x):
    return grid.from_tile_major(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [(0, 0), (1, 3)])
def test_all_neighbours_equals_global_attention(impl, shift):
    grid = TileGrid.for_tokens(12, 16, 6, batch=2, shift=shift)  # 6x8 tokens, 3x4-token tiles: L = 12
    assert (grid.tile_tokens_h, grid.tile_tokens_w, grid.ny, grid.nx) == (3, 4, 2, 2)
    B, H, D, N = 2, 2, 72, grid.tokens_h * grid.tokens_w
    qc, kc, vc = (torch.randn(B, H, N, D) for _ in range(3))
    nb = grid.neighbours(max(grid.ny, grid.nx))  # every tile of the same batch item
    out, lse = run(impl, *(_canvas_to_tiles(grid, x) for x in (qc, kc, vc)), nb)
    expect = F.scaled_dot_product_attention(qc.double(), kc.double(), vc.double())
    torch.testing.assert_close(_tiles_to_canvas(grid, out).double(), expect, atol=1e-5, rtol=1e-5)
    s = (qc.double() @ kc.double().transpose(-1, -2)) / math.sqrt(D)
    lse_canvas = _tiles_to_canvas(grid, lse[..., None])[..., 0]
    torch.testing.assert_close(lse_canvas.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias_kind", ["none", "zero", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_global_fast_path(bias_kind, dtype):
    """2x2 tiles at radius 1: every tile sees every tile once, so the CPU path makes one global flash call when
    there is no bias (a bias, even all zero, takes the gathered path). Both against the fp64 reference, with the
    neighbour slots in a different order per tile (key order must not matter)."""
    grid = TileGrid.for_tokens(2 * 2 * 5, 2 * 2 * 3, (10, 6), patch=2)  # 2x2 tiles of 5x3 = 15 tokens (odd L)
    nb = grid.neighbours(1).to(torch.int32)
    valid = nb.sort(dim=1, descending=True).values[:, :4].flip(1)  # the (2r+1)² slots, -1 where off the grid
    assert (nb >= 0).sum(1).eq(4).all() and (valid == torch.arange(4, dtype=torch.int32)).all()
    q, k, v = inputs(4, 3, grid.tokens_per_tile, 72, dtype)
    bias = {"none": None, "zero": torch.zeros(nb.shape), "random": torch.randn(nb.shape)}[bias_kind]
    assert_matches_reference("cpu", q, k, v, nb, bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_self_only_equals_per_tile_attention(impl):
    grid = TileGrid(16, 24, 8)  # 8x12 tokens, 4x4-token tiles
    q, k, v = inputs(grid.num_tiles, 2, grid.tokens_per_tile, 64, torch.float32)
    out, _ = run(impl, q, k, v, grid.neighbours(0))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_of_disjoint_halves_equals_whole(impl):
    T, H, L, D, NB = 5, 2, 19, 72, 4
    q, k, v = inputs(T, H, L, D, torch.float32)
    nb = random_neighbours(T, NB, p_empty=0.0)
    nb[3] = -1  # an empty row in both halves
    bias = torch.randn(T, NB)
    first = torch.zeros(T, NB, dtype=torch.bool)
    first[:, :2] = True
    nb1 = torch.where(first, nb, torch.full_like(nb, -1))
    nb2 = torch.where(~first, nb, torch.full_like(nb, -1))
    o1, l1 = run(impl, q, k, v, nb1, bias)
    o2, l2 = run(impl, q, k, v, nb2, bias)
    o, l = run(impl, q, k, v, nb, bias)
    mo, ml = ops.merge_attention(o1, l1, o2, l2)
    torch.testing.assert_close(mo, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml, l, atol=1e-5, rtol=0)
    assert (o[3] == 0).all() and (l[3] == -math.inf).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_inf_bias_slots_ignored(impl):
    T, H, L, D = 3, 2, 17, 72
    q, k, v = inputs(T, H, L, D, torch.float32)
    k[2] *= 1e3  # a tile that would dominate if its slot were not skipped
    v[2] = math.nan  # and would poison the output
    nb = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 1, 0]], dtype=torch.int32)
    bias = torch.tensor([[0.0, 0.3, -math.inf], [0.0, -math.inf, -0.5], [-math.inf, -math.inf, 0.2]])
    out, lse = run(impl, q, k, v, nb, bias)
    nb_drop = torch.where(bias == -math.inf, torch.full_like(nb, -1), nb)
    out2, lse2 = run(impl, q, k, v, nb_drop, torch.where(bias == -math.inf, torch.zeros_like(bias), bias))
    assert not out.isnan().any()
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows(impl):
    T, H, L, D = 3, 2, 18, 64
    q, k, v = inputs(T, H, L, D, torch.bfloat16)
    nb = torch.tensor([[0, 1], [-1, -1], [2, -1]], dtype=torch.int32)
    bias = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-math.inf, 0.0]])
    out, lse = run(impl, q, k, v, nb, bias)
    for t in (1, 2):
        assert (out[t] == 0).all() and (lse[t] == -math.inf).all()
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_large_logits(impl):
    T, H, L, D = 3, 2, 21, 72
    q, k, v = inputs(T, H, L, D, torch.float16, mult=30.0)  # logits ~ 1e4: exp overflows fp16 without fp32 state
    out, lse = assert_matches_reference(impl, q, k, v, random_neighbours(T, 3), None)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    T, H, L, D = 4, 2, 9, 72
    q, k, v = inputs(T, H, L, D, torch.float32)
    nb = random_neighbours(T, 3)
    bias = torch.randn(T, 3) if with_bias else None
    torch.library.opcheck(torch.ops.tiled_diffusion.window_attention.default, (q, k, v, nb, bias, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_cpu_path_chunks():
    """Chunked gathers (tiny max_gather_bytes) give the same result as one chunk."""
    from tiled_diffusion.backends.cpu.window_attention import window_attention_cpu

    q, k, v = inputs(7, 2, 11, 72, torch.float32)
    nb = random_neighbours(7, 3)
    bias = torch.randn(7, 3)
    a = window_attention_cpu(q, k, v, nb, bias)
    b = window_attention_cpu(q, k, v, nb, bias, max_gather_bytes=1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_head_dim_split():
    assert split_head_dim(72) == (64, 16)  # 80 computed columns for 72: 11.1% extra, not 78% (pad to 128)
    assert split_head_dim(64) == (64, 0) and split_head_dim(128) == (128, 0)
    assert all(supports_head_dim(d) for d in (64, 72, 80, 96, 128))
    assert not supports_head_dim(40) and not supports_head_dim(8)
    names = {c["name"] for c in AOT_CONFIGS}
    assert any("bf16" in n for n in names) and any("fp16" in n for n in names)
    assert all(c["constexprs"]["HEAD_D"] == 72 and c["expects_mma"] for c in AOT_CONFIGS)


def _ok():
    return inputs(3, 2, 8, 72, torch.float32) + (torch.tensor([[0, 1], [1, -1], [2, 0]], dtype=torch.int32),)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0][0], *a[1:]), "q must be 4-D"),
    (lambda a: (a[0], a[1][:, :, :5], *a[2:]), "k must have q's shape"),
    (lambda a: (a[0], a[1], a[2].half(), a[3]), "v must have q's dtype"),
    (lambda a: (a[0].int(), a[1].int(), a[2].int(), a[3]), "q must be float32"),
    (lambda a: (*a[:3], a[3][:2]), "neighbours must be"),
    (lambda a: (*a[:3], a[3].float()), "neighbours must be int32"),
    (lambda a: (*a[:3], a[3] + 1), r"neighbours must hold tile indices in \[0, T=3\)"),
    (lambda a: (*a[:3], a[3] - 1), "neighbours must hold tile indices"),
    (lambda a: (*a, torch.zeros(3, 3)), "bias must be"),
    (lambda a: (*a, torch.zeros(3, 2, dtype=torch.float64)), "bias must be float32"),
    (lambda a: (*a, None, -1.0), "scale must be"),
])
def test_bad_inputs(mutate, match):
    with pytest.raises(ValueError, match=match):
        ops.window_attention(*mutate(_ok()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_vs_reference(dtype):
    grid = TileGrid.for_tokens(192, 160, 64, batch=2)  # 96x80 tokens -> 32x40 tiles, L = 1280
    T, H, L, D = grid.num_tiles, 4, grid.tokens_per_tile, 72
    q, k, v = (torch.randn(T, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    nb = grid.neighbours(1, "cuda")
    bias = torch.randn(nb.shape, device="cuda")
    out, lse = ops.window_attention(q, k, v, nb, bias)
    ref_out, ref_lse = reference.window_attention(q.double(), k.double(), v.double(), nb, bias)
    base = (naive_same_dtype(q, k, v, nb, bias.cpu().cuda(), 1 / math.sqrt(D)).double() - ref_out).abs().max()
    assert (out.double() - ref_out).abs().max() <= 2 * base + 1e-3
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)


def test_neighbour_check_is_cached_but_sees_in_place_changes():
    q = torch.randn(3, 2, 5, 8)
    nb = torch.tensor([[0, 1], [1, 2], [2, -1]], dtype=torch.int32)
    ops.window_attention(q, q, q, nb)
    ops.window_attention(q, q, q, nb)  # second call: cached check
    nb[0, 0] = 7  # bumps the tensor's version: checked again
    with pytest.raises(ValueError, match="neighbours must hold tile indices"):
        ops.window_attention(q, q, q, nb)


def test_pinned_config_for_reproducible_gpu_runs(monkeypatch):
    """Issue 21 risk: autotuning by timing can pick another BLOCK_N (another summation order) per run; the env
    var pins one config (no tuning), and a bad value is one clear error."""
    from tiled_diffusion.backends.triton import window_attention as wa

    monkeypatch.delenv(wa.PIN_ENV, raising=False)
    assert wa.pinned_config() is None
    monkeypatch.setenv(wa.PIN_ENV, "1")
    assert wa.pinned_config() == wa.TUNE_CONFIGS[1]
    monkeypatch.setenv(wa.PIN_ENV, "9")
    with pytest.raises(ValueError, match="index 0..2"):
        wa.pinned_config()
