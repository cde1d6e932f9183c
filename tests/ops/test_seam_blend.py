"""seam_blend and blend_lcm_step: CPU path (via the op), Triton launchers (interpreter on CPU), reference, diffusers."""
import textwrap

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.core.lcm import lcm_coefficients
from tiled_diffusion.core.lcm import step_args
from tiled_diffusion.core.tiling import TileGrid
from tiled_diffusion.backends.triton import seam_blend as _sb
from tiled_diffusion.backends.triton.seam_blend import coverage_tables
from tests.helpers import compiled_env, on_triton_device, run_python

# the launchers on CUDA tensors where a GPU is (compiled kernels), else on CPU tensors under the interpreter
seam_blend_triton = on_triton_device(_sb.seam_blend_triton)
blend_lcm_step_triton = on_triton_device(_sb.blend_lcm_step_triton)

ops.register_triton_ops()  # the opcheck tests call torch.ops.tiled_diffusion.* directly

PROFILES = ("uniform", "linear", "cosine", "gaussian")


def _grid(H, W, tile, overlap, B):
    return TileGrid(H, W, tile=tile, overlap=overlap, batch=B, patch=1)


def _inputs(grid, C, dtype, profile="cosine"):
    tiles = torch.randn(grid.num_tiles, C, grid.th, grid.tw).to(dtype)
    oy, ox = grid.origins()
    return tiles, oy, ox, grid.blend_weights(profile)


def _assert_close_blend(out, tiles, oy, ox, w, B, H, W):
    """fp32: relative 1e-5 of the canvas scale (fp32 accumulation of a few terms). bf16/fp16: the kernel
    accumulates in fp32 and rounds once, so each pixel may be off by at most one rounding (≤ eps·|exact|;
    half an ulp is the best possible, one ulp allows for the fp32 sum landing on the other side of a tie)."""
    exact = reference.seam_blend(tiles.double(), oy, ox, w, B, H, W)
    assert out.dtype == tiles.dtype and out.shape == exact.shape
    err = (out.double() - exact).abs()
    if tiles.dtype == torch.float32:
        bound = 1e-5 * exact.abs().max().item()
    else:
        bound = torch.finfo(tiles.dtype).eps * exact.abs() + 1e-6
    assert (err <= bound).all(), f"max error {err.max().item():.3g}"


# ------------------------------------------------------------------------------------------ seam_blend

# (H, W, tile, overlap, B, C): odd canvases with a ragged (clamped) last tile, overlap 0 and > 0, B > 1.
CASES = {
    "odd_overlap": (37, 45, 16, 5, 2, 4),
    "no_overlap_ragged": (33, 29, 10, 0, 1, 4),
    "tile_covers_canvas": (13, 17, 32, 4, 2, 3),
    "wide_overlap": (41, 23, 12, 9, 1, 4),
}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("case", list(CASES))
def test_seam_blend_cpu_profiles(case, profile):
    H, W, tile, overlap, B, C = CASES[case]
    g = _grid(H, W, tile, overlap, B)
    tiles, oy, ox, w = _inputs(g, C, torch.float32, profile)
    _assert_close_blend(ops.seam_blend(tiles, oy, ox, w, B, H, W), tiles, oy, ox, w, B, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["odd_overlap", "no_overlap_ragged"])
def test_seam_blend_cpu_dtypes(case, dtype):
    H, W, tile, overlap, B, C = CASES[case]
    g = _grid(H, W, tile, overlap, B)
    tiles, oy, ox, w = _inputs(g, C, dtype, "gaussian")
    _assert_close_blend(ops.seam_blend(tiles, oy, ox, w, B, H, W), tiles, oy, ox, w, B, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["odd_overlap", "no_overlap_ragged", "tile_covers_canvas"])
def test_seam_blend_triton(case, dtype):
    H, W, tile, overlap, B, C = CASES[case]
    g = _grid(H, W, tile, overlap, B)
    tiles, oy, ox, w = _inputs(g, C, dtype, "cosine")
    _assert_close_blend(seam_blend_triton(tiles, oy, ox, w, B, H, W), tiles, oy, ox, w, B, H, W)


def _zero_weight_inputs():
    """Tiles with gaps between them and weights that vanish on the tile border: many pixels have Σw = 0."""
    B, C, H, W, th, tw = 2, 4, 23, 31, 8, 9
    oy = torch.tensor([0, 10, 15], dtype=torch.int32)  # rows 8-9 uncovered; 15..22 overlaps 10..17
    ox = torch.tensor([1, 12, 22], dtype=torch.int32)  # column 0, 10-11, 21 uncovered
    w = torch.rand(th, tw) + 0.1
    w[0, :] = 0
    w[:, -1] = 0
    tiles = torch.randn(B * 3 * 3, C, th, tw)
    return tiles, oy, ox, w, B, H, W


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_seam_blend_zero_weight_pixels(impl):
    tiles, oy, ox, w, B, H, W = _zero_weight_inputs()
    fn = ops.seam_blend if impl == "cpu" else seam_blend_triton
    out = fn(tiles, oy, ox, w, B, H, W)
    assert torch.isfinite(out).all()
    assert (out[:, :, 8:10] == 0).all() and (out[..., 0] == 0).all()
    _assert_close_blend(out, tiles, oy, ox, w, B, H, W)


def test_coverage_tables():
    o = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    first, count = coverage_tables(o, 5, 14)
    for p in range(14):
        covering = [i for i, v in enumerate(o.tolist()) if v <= p < v + 5]
        assert count[p].item() == len(covering)
        if covering:
            assert first[p].item() == covering[0]


def test_seam_blend_poisoned_output_fully_written():
    """Every canvas pixel is written by the kernel: NaN in freshly allocated memory must not survive."""
    g = _grid(37, 45, 16, 5, 2)
    tiles, oy, ox, w = _inputs(g, 4, torch.float32)
    real_empty = torch.empty

    def nan_empty(*a, **k):
        return real_empty(*a, **k).fill_(float("nan"))

    torch.empty = nan_empty
    try:
        out = seam_blend_triton(tiles, oy, ox, w, 2, 37, 45)
    finally:
        torch.empty = real_empty
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- blend_lcm_step

LCM_CASES = {"odd_overlap": (37, 45, 16, 5, 2, 4), "no_overlap_ragged": (33, 29, 10, 0, 1, 4)}


def _lcm_check(prev, den, tiles, oy, ox, w, sample, noise, coeffs):
    p_ref, d_ref = reference.blend_lcm_step(tiles, oy, ox, w, sample.double(), None if noise is None else
                                            noise.double(), *coeffs)
    for got, exp in ((prev, p_ref), (den, d_ref)):
        assert got.dtype == sample.dtype
        scale = exp.abs().max().item()
        tol = 1e-5 if sample.dtype == torch.float32 else 2 * torch.finfo(sample.dtype).eps
        assert (got.double() - exp).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_noise", [True, False], ids=["noise", "last_step"])
@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_blend_lcm_step_vs_reference(impl, with_noise, dtype):
    H, W, tile, overlap, B, C = LCM_CASES["odd_overlap"]
    g = _grid(H, W, tile, overlap, B)
    tiles, oy, ox, w = _inputs(g, C, dtype, "cosine")
    sample = torch.randn(B, C, H, W).to(dtype)
    noise = torch.randn(B, C, H, W).to(dtype) if with_noise else None
    coeffs = (0.35, 0.937, 0.02, 0.98, 0.6, 0.8)
    fn = ops.blend_lcm_step if impl == "cpu" else blend_lcm_step_triton
    prev, den = fn(tiles, oy, ox, w, sample, noise, *coeffs)
    _lcm_check(prev, den, tiles, oy, ox, w, sample, noise, coeffs)


def _pixart_lcm_scheduler(prediction_type="epsilon"):
    from diffusers import LCMScheduler

    s = LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type=prediction_type)
    s.set_timesteps(4)
    return s


def test_lcm_schedule_is_pixart_lcm():
    assert _pixart_lcm_scheduler().timesteps.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("case", list(LCM_CASES))
def test_blend_lcm_step_matches_diffusers_every_step(case, impl, prediction):
    """Every step of a 4-step schedule: the fused op equals LCMScheduler.step on the blended canvas of model
    outputs (ε, or v through lcm_coefficients' rewritten pair), with the noise the scheduler's own generator draws."""
    H, W, tile, overlap, B, C = LCM_CASES[case]
    g = _grid(H, W, tile, overlap, B)
    oy, ox = g.origins()
    w = g.blend_weights("gaussian")
    sched = _pixart_lcm_scheduler(prediction)
    gen_sched = torch.Generator().manual_seed(1234)
    gen_ours = torch.Generator().manual_seed(1234)
    sample = torch.randn(B, C, H, W)
    ours = sample.clone()
    fn = ops.blend_lcm_step if impl == "cpu" else blend_lcm_step_triton
    for i, t in enumerate(sched.timesteps):
        tiles = torch.randn(g.num_tiles, C, g.th, g.tw)
        co = lcm_coefficients(sched, i)
        assert co["timestep"] == int(t)
        eps = reference.seam_blend(tiles, oy, ox, w, B, H, W)
        exp_prev, exp_den = sched.step(eps, t, sample, generator=gen_sched, return_dict=False)
        noise = None if co["last"] else torch.randn(B, C, H, W, generator=gen_ours)
        prev, den = fn(tiles, oy, ox, w, ours, noise, *step_args(co))
        for got, exp in ((prev, exp_prev), (den, exp_den)):
            err = (got - exp).abs().max().item()
            assert err <= 2e-5 * exp.abs().max().item(), f"step {i} (t={int(t)}): error {err:.3g}"
        sample, ours = exp_prev, exp_prev.clone()  # follow the scheduler's trajectory: errors stay per step
    assert sched.step_index == 4


# -------------------------------------------------------------------------------------- opcheck, errors


def test_opcheck_seam_blend():
    g = _grid(37, 45, 16, 5, 2)
    tiles, oy, ox, w = _inputs(g, 4, torch.float32)
    torch.library.opcheck(torch.ops.tiled_diffusion.seam_blend.default, (tiles, oy, ox, w, 2, 37, 45))


@pytest.mark.parametrize("with_noise", [True, False], ids=["noise", "last_step"])
def test_opcheck_blend_lcm_step(with_noise):
    g = _grid(37, 45, 16, 5, 2)
    tiles, oy, ox, w = _inputs(g, 4, torch.float32)
    sample = torch.randn(2, 4, 37, 45)
    noise = torch.randn(2, 4, 37, 45) if with_noise else None
    torch.library.opcheck(torch.ops.tiled_diffusion.blend_lcm_step.default,
                          (tiles, oy, ox, w, sample, noise, 0.35, 0.937, 0.02, 0.98, 0.6, 0.8))


def _bad(**change):
    g = _grid(37, 45, 16, 5, 2)
    tiles, oy, ox, w = _inputs(g, 4, torch.float32)
    args = dict(tiles=tiles, origins_y=oy, origins_x=ox, weights=w, batch=2, height=37, width=45)
    args.update(change)
    return args


BAD = {
    "tiles_count": (dict(tiles=torch.randn(23, 4, 16, 16)), "N=23"),
    "tiles_3d": (dict(tiles=torch.randn(24, 16, 16)), "tiles must be 4-D"),
    "origins_int64": (dict(origins_y=torch.tensor([0, 11, 21])), "origins_y must be a non-empty 1-D int32"),
    "weights_shape": (dict(weights=torch.rand(16, 15)), "weights must be float32"),
    "weights_dtype": (dict(weights=torch.rand(16, 16).double()), "weights must be float32"),
    "origin_outside": (dict(origins_x=torch.tensor([0, 11, 22, 30], dtype=torch.int32)), "outside the canvas"),
    "origin_negative": (dict(origins_y=torch.tensor([-1, 11, 21], dtype=torch.int32)), "outside the canvas"),
    "unsorted": (dict(origins_y=torch.tensor([11, 0, 21], dtype=torch.int32)), "must be sorted"),
    "int_tiles": (dict(tiles=torch.zeros(24, 4, 16, 16, dtype=torch.int32)), "tiles must be float32"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_seam_blend_bad_input(name):
    change, msg = BAD[name]
    with pytest.raises(ValueError, match=msg):
        ops.seam_blend(**_bad(**change))


def test_blend_lcm_step_bad_input():
    a = _bad()
    sample = torch.randn(2, 4, 37, 45)
    coeffs = (0.35, 0.937, 0.02, 0.98, 0.6, 0.8)
    with pytest.raises(ValueError, match="noise must have sample's shape"):
        ops.blend_lcm_step(a["tiles"], a["origins_y"], a["origins_x"], a["weights"], sample,
                           torch.randn(2, 4, 37, 44), *coeffs)
    with pytest.raises(ValueError, match="C=4 channels but sample has 3"):
        ops.blend_lcm_step(a["tiles"], a["origins_y"], a["origins_x"], a["weights"], sample[:, :3], None, *coeffs)
    with pytest.raises(ValueError, match="outside the canvas"):
        ops.blend_lcm_step(a["tiles"], a["origins_y"], a["origins_x"], a["weights"], sample[..., :40], None,
                           *coeffs)


# ---------------------------------------------------------------------------------- ahead-of-time compile


def test_aot_compile_sm80_sm90():
    """Every AOT config compiles for sm_80 and sm_90 without a GPU (fresh process: no TRITON_INTERPRET)."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from tiled_diffusion.backends.triton.seam_blend import AOT_CONFIGS
        for cfg in AOT_CONFIGS:
            fn = cfg["kernel"]
            sig = dict(cfg["signature"], **{k: "constexpr" for k in cfg["constexprs"]})
            consts = {(fn.arg_names.index(k),): v for k, v in cfg["constexprs"].items()}
            for cc in (80, 90):
                k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
                assert k.asm["cubin"], cfg["name"]
                assert ".local" not in k.asm["ptx"], cfg["name"] + ": local memory"
                print(cfg["name"], cc, "ok")
    """)
    r = run_python("-c", script, env=compiled_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" ok") == 2 * 9


def test_cpu_weight_cache_sees_inplace_change_and_new_tensors():
    g = _grid(37, 45, 16, 5, 2)
    tiles, oy, ox, w = _inputs(g, 4, torch.float32, "cosine")
    ops.seam_blend(tiles, oy, ox, w, 2, 37, 45)
    w.mul_(torch.rand_like(w) + 0.5)  # same object, new version: must not reuse the cached maps
    _assert_close_blend(ops.seam_blend(tiles, oy, ox, w, 2, 37, 45), tiles, oy, ox, w, 2, 37, 45)
    for profile in PROFILES:  # fresh tensors that may reuse freed memory
        w2 = g.blend_weights(profile)
        _assert_close_blend(ops.seam_blend(tiles, oy, ox, w2, 2, 37, 45), tiles, oy, ox, w2, 2, 37, 45)
