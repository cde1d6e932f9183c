"""Launch grids against CUDA's limits, the device guard, and the autotune key — checked on the CPU.

CUDA caps grid.x at 2^31 - 1 and grid.y / grid.z at 65535; a launch past them fails with "invalid argument" only
on a GPU. So every grid is a small pure function (Triton: tiled_diffusion/backends/triton/launch.py; the CUDA int8
GEMM: td_int8_gemm_grid / td_quantize_per_token_grid exported by `_C`, the launchers' own functions), checked here
for the largest canvases the README promises: 16384² px, 4 images with CFG (batch 8), --tile 256 (and the
defaults), in each mode. The Triton launches are also traced on fake CUDA tensors of those sizes (no GPU, no
memory), so the grids the launchers actually pass are checked, not only the helpers.
"""
from __future__ import annotations

import ctypes
import json
import math
import textwrap
import types

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion.tools.inspect import native_library
from tiled_diffusion.core.tiling import TileGrid
from tiled_diffusion.backends.triton import launch
from tiled_diffusion.backends.triton import seam_blend as sb
from tiled_diffusion.backends.triton import window_attention as wa
from tests.helpers import ROOT, compiled_env, run_python


# PixArt-XL: 16 heads of 72, width 1152, 8 output channels (ε and learned σ); its GEMM widths N; T5-XXL's.
HEADS, HEAD_DIM, WIDTH, OUT_CHANNELS = 16, 72, 1152, 8
GEMM_N = (32, 1152, 4608, 6912, 10240)
PX, IMAGES = 16384, 8  # 4 images x CFG

# (mode, tile px, overlap fraction): what `tiled-diffusion generate --size 16384x16384 --tile T` runs.
SCENARIOS = {
    "cross_tile-256": ("cross_tile", 256, 0.0),
    "cross_tile-512": ("cross_tile", 512, 0.0),
    "multidiffusion-256": ("multidiffusion", 256, 0.5),
    "multidiffusion-1024": ("multidiffusion", 1024, 0.5),
    "global": ("global", PX, 0.0),
}


def _scenario(name):
    """(tiles T for window_attention (0 when unused), tokens per tile L, GEMM rows M of one transformer forward)."""
    mode, tile, overlap = SCENARIOS[name]
    latent = PX // 8
    if mode == "cross_tile":
        g = TileGrid.for_tokens(latent, latent, tile // 8, batch=IMAGES)
        return g.num_tiles, g.tokens_per_tile, g.num_tiles * g.tokens_per_tile
    if mode == "multidiffusion":  # every tile in one forward (tile_batch_size unset): the most rows
        g = TileGrid(latent, latent, tile // 8, overlap=int(tile // 8 * overlap), batch=IMAGES)
        return 0, g.tokens_per_tile, g.num_tiles * g.tokens_per_tile
    return 0, (latent // 2) ** 2, IMAGES * (latent // 2) ** 2


def _within_limits(grid):
    g = tuple(grid) + (1,) * (3 - len(grid))
    return all(1 <= n <= lim for n, lim in zip(g, launch.MAX_GRID)), g


# ------------------------------------------------------------------------------------- Triton grids


def test_cross_tile_256_would_break_the_old_window_attention_grid():
    """The canvas these tests use is big enough to catch the bug: T·H on axis y exceeds 65535 there."""
    T, L, _ = _scenario("cross_tile-256")
    assert T * HEADS > launch.MAX_GRID[1]


@pytest.mark.parametrize("block_m", sorted({c["BLOCK_M"] for c in wa.TUNE_CONFIGS} | {16}))
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n.startswith("cross_tile")])
def test_window_attention_grid(name, block_m):
    T, L, _ = _scenario(name)
    launches = launch.window_attention_launches(T, HEADS)
    assert launches[0][0] == 0 and sum(n for _, n in launches) == T * HEADS  # every (tile, head) pair, once
    assert all(s + n == s2 for (s, n), (s2, _) in zip(launches, launches[1:]))
    for _, pairs in launches:
        ok, g = _within_limits(launch.window_attention_grid(pairs, L, block_m))
        assert ok, f"{name}: grid {g}"
        assert g[0] * block_m >= L and g[1] == pairs  # every query block of every pair


def test_window_attention_split_launches_match_reference(monkeypatch):
    """The split into several launches (th0 offsets) computes what one launch does: with axis y's limit lowered
    to 5, 4 tiles x 3 heads run as 3 launches in the interpreter."""
    from tiled_diffusion import reference

    monkeypatch.setattr(launch, "MAX_GRID", (2**31 - 1, 5, 5))
    assert len(launch.window_attention_launches(4, 3)) == 3
    from tests.helpers import on_triton_device  # compiled on CUDA tensors where a GPU is, else interpreted

    q, k, v = (torch.randn(4, 3, 19, 24) for _ in range(3))
    nb = torch.tensor([[0, 1], [1, 2], [2, 3], [3, -1]], dtype=torch.int32)
    out = torch.full_like(q, math.nan)
    lse = torch.full((4, 3, 19), math.nan)
    out, lse = on_triton_device(wa.window_attention_triton)(q, k, v, nb, out=out, lse=lse)
    ref_out, ref_lse = reference.window_attention(q.double(), k.double(), v.double(), nb)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_seam_blend_grid(name):
    """seam_blend / blend_lcm_step blend the model output of the whole canvas (every mode may call them)."""
    latent = PX // 8
    grid = launch.seam_blend_grid(IMAGES, OUT_CHANNELS, latent, latent, sb.BLOCK_Y, sb.BLOCK_X)
    ok, g = _within_limits(grid)
    assert ok, g
    assert g[0] * sb.BLOCK_Y * sb.BLOCK_X >= latent * latent and g[1] == IMAGES * OUT_CHANNELS


def test_check_grid_names_the_axis():
    with pytest.raises(ValueError, match="axis y"):
        launch.check_grid((1, 65536), "k")
    assert launch.check_grid((5,), "k") == (5, 1, 1)


def test_programs_bucket_is_coarse():
    b = launch.programs_bucket
    assert [b(n) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, 64]
    small, huge = b(2 * HEADS), b(_scenario("cross_tile-256")[0] * HEADS)
    assert small != huge  # a config tuned on a 2-tile call is not reused at 16384²
    assert b(1100) == b(1500) == 4096  # neighbouring canvas sizes share a tuning run


def test_autotune_key_has_the_program_bucket():
    assert "programs_bucket" in wa._window_attention_fwd_tuned.keys


# ------------------------------------------------------------------------------------- CUDA int8 grids


def _cuda_grid_fn(name):
    lib = native_library()
    if lib is None:
        pytest.skip("tiled_diffusion._C is not built")
    fn = getattr(ctypes.CDLL(lib), name, None)
    if fn is None:  # the CUDA sources were not compiled in (no nvcc at build; CI has nvcc)
        pytest.skip(f"tiled_diffusion._C was built without CUDA kernels (no {name})")
    return fn


def _int8_gemm_grid(m, n):
    out = (ctypes.c_longlong * 3)()
    _cuda_grid_fn("td_int8_gemm_grid")(ctypes.c_longlong(m), ctypes.c_longlong(n), out)
    return tuple(out)


@pytest.mark.parametrize("n", GEMM_N)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_int8_gemm_grid(name, n):
    _, _, m = _scenario(name)
    ok, g = _within_limits(_int8_gemm_grid(m, n))
    assert ok, f"{name}: M={m} N={n}: grid {g}"
    assert g[0] * g[1] * g[2] == -(-m // 128) * -(-n // 128)  # every 128 x 128 output tile is one block


def test_int8_gemm_grid_rows_beyond_axis_y():
    """8.4 M rows (16384², 4 images, CFG): ceil(M / 128) = 65536 > 65535, so M cannot sit on grid.y."""
    m = IMAGES * (PX // 16) ** 2
    assert -(-m // 128) > launch.MAX_GRID[1]
    assert _within_limits(_int8_gemm_grid(m, 1152))[0]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_quantize_per_token_grid(name):
    _, _, m = _scenario(name)
    out = (ctypes.c_longlong * 3)()
    _cuda_grid_fn("td_quantize_per_token_grid")(ctypes.c_longlong(m), out)
    ok, g = _within_limits(tuple(out))
    assert ok and g[0] * 8 >= m, g


# ------------------------------------------------------------------------------------- device guard


def test_device_guard_targets_the_tensors_device():
    """CPU-side: the guard is torch.cuda.device(<the tensor's device>) for CUDA tensors (constructing it touches no
    GPU), nothing for CPU tensors (interpreter) and fake tensors (tracing launches nothing)."""
    fake_cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # stands in for a tensor on cuda:1
    g = launch.device_guard(fake_cuda1)
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert not isinstance(launch.device_guard(torch.zeros(1)), torch.cuda.device)


@pytest.mark.parametrize("op", ["window_attention", "seam_blend", "blend_lcm_step"])
def test_every_launcher_enters_the_guard(op, monkeypatch):
    """Each Triton launcher launches inside device_guard(<an input>) (run here in the interpreter)."""
    import contextlib

    seen = []

    def recorder(t):
        seen.append(t)
        return contextlib.nullcontext()

    from tests.helpers import TRITON_DEVICE  # compiled on CUDA tensors where a GPU is, else interpreted

    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: real_randn(*a, **k).to(TRITON_DEVICE))
    mod = wa if op == "window_attention" else sb
    monkeypatch.setattr(mod, "device_guard", recorder)
    if op == "window_attention":
        q = torch.randn(2, 1, 5, 16)
        nb = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=TRITON_DEVICE)
        mod.window_attention_triton(q, q, q, nb)
    else:
        g = TileGrid(12, 14, tile=8, overlap=2, batch=1, patch=1)
        tiles = torch.randn(g.num_tiles, 2, g.th, g.tw)
        oy, ox = g.origins(TRITON_DEVICE)
        w = g.blend_weights("cosine", device=TRITON_DEVICE)
        if op == "seam_blend":
            mod.seam_blend_triton(tiles, oy, ox, w, 1, 12, 14)
        else:
            mod.blend_lcm_step_triton(tiles, oy, ox, w, torch.randn(1, 2, 12, 14), None, 0.5, 0.8, 0.1, 0.9, 1, 0)
    assert len(seen) == 1 and torch.is_tensor(seen[0])


@pytest.mark.cuda
def test_launches_on_the_inputs_device():
    """Inputs on the last GPU while another one is current (with 2 GPUs: cuda:1 while cuda:0 is current): every
    Triton op must run on the inputs' device and match the reference; the current device is left alone."""
    from tiled_diffusion import reference

    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(6, 2, 37, 72, device=dev, dtype=torch.bfloat16) for _ in range(3))
    nb = torch.tensor([[0, 1, -1], [1, 0, 2], [2, 1, 3], [3, 2, 4], [4, 3, 5], [5, 4, -1]], dtype=torch.int32,
                      device=dev)
    out, lse = ops.window_attention(q, k, v, nb)
    ref_out, ref_lse = reference.window_attention(q.double(), k.double(), v.double(), nb)
    assert out.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=0)  # bf16 output rounding
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=0)
    g = TileGrid(37, 45, tile=16, overlap=5, batch=2, patch=1)
    tiles = torch.randn(g.num_tiles, 4, g.th, g.tw, device=dev)
    oy, ox = g.origins(dev)
    w = g.blend_weights("cosine", dev)
    canvas = ops.seam_blend(tiles, oy, ox, w, 2, 37, 45)
    torch.testing.assert_close(canvas.double(), reference.seam_blend(tiles.double(), oy, ox, w, 2, 37, 45),
                               atol=1e-5, rtol=1e-5)
    sample, noise = torch.randn(2, 4, 37, 45, device=dev), torch.randn(2, 4, 37, 45, device=dev)
    coeffs = (0.35, 0.937, 0.02, 0.98, 0.6, 0.8)
    prev, den = ops.blend_lcm_step(tiles, oy, ox, w, sample, noise, *coeffs)
    rprev, rden = reference.blend_lcm_step(tiles.double(), oy, ox, w, sample, noise, *coeffs)
    torch.testing.assert_close(prev, rprev, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(den, rden, atol=1e-4, rtol=1e-4)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------- the launches, traced on fake CUDA tensors

_TRACE = textwrap.dedent('''
    import json, sys
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from tiled_diffusion import ops

    T, H, L, D, B, C, S, th, ny = (int(a) for a in sys.argv[1:])
    with FakeTensorMode():
        q = torch.empty(T, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # token-major view
        nb = torch.empty(T, 9, device="cuda", dtype=torch.int32)
        tiles = torch.empty(B * ny * ny, C, th, th, device="cuda", dtype=torch.bfloat16)
        origins = torch.empty(ny, device="cuda", dtype=torch.int32)
        w = torch.empty(th, th, device="cuda")
        sample = torch.empty(B, C, S, S, device="cuda", dtype=torch.bfloat16)

    def f(q, nb, tiles, origins, w, sample):
        return (ops.window_attention(q, q, q, nb), ops.seam_blend(tiles, origins, origins, w, B, S, S),
                ops.blend_lcm_step(tiles, origins, origins, w, sample, sample, 1.0, 0.5, 0.1, 0.9, 0.8, 0.2))

    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(q, nb, tiles, origins, w, sample)
    launches = [{"grid": [list(g) for g in n.kwargs["grid"]],
                 "programs_bucket": n.kwargs["kwargs"].get("programs_bucket")}
                for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    print(json.dumps(launches))
''')


def test_traced_launches_at_the_largest_canvas():
    """The ops' CUDA bodies (torch.library.triton_op) traced on fake CUDA tensors of a 16384² canvas, 4 images,
    CFG, 256-px cross-tile tiles: each must reach its Triton kernel through wrap_triton (what torch.compile sees)
    with every grid — one per autotune config — inside CUDA's limits. Fresh process: TRITON_INTERPRET off."""
    T, L, _ = _scenario("cross_tile-256")
    latent = PX // 8
    g = TileGrid(latent, latent, 1024 // 8, overlap=64, batch=IMAGES)  # multidiffusion defaults: tiles to blend
    args = [T, HEADS, L, HEAD_DIM, IMAGES, OUT_CHANNELS, latent, g.th, g.ny]
    r = run_python("-c", _TRACE, *map(str, args), env=compiled_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    launches = json.loads(r.stdout.strip().splitlines()[-1])
    n_attn = len(launch.window_attention_launches(T, HEADS))
    assert n_attn > 1 and len(launches) == n_attn + 2, launches  # window_attention's, seam_blend, blend_lcm_step
    for attn in launches[:n_attn]:
        assert len(attn["grid"]) == len(wa.TUNE_CONFIGS)  # autotuned: one grid per config
        assert attn["programs_bucket"] == launch.programs_bucket(T * HEADS)
    for lau in launches:
        for grid in lau["grid"]:
            ok, gg = _within_limits(grid)
            assert ok, f"grid {gg} exceeds CUDA's limits"
