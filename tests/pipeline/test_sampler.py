"""The tiled LCM sampler on the built-in tiny model (CPU, fp32).

Tolerances: paths that run the same float ops as diffusers are compared bitwise. Paths that reorder float
arithmetic (window attention over tiles, fp64 blend + fused step, GEMMs with another batch size) are compared
relative to max|reference|: their ε differs by fp32 rounding (~1e-7 relative), and LCM's first step at t=999
amplifies ε errors by 1/sqrt(alpha_bar_999) ≈ 156, so 1e-4 relative leaves ~6x headroom.
"""
import pytest
import torch

from tiled_diffusion import pipeline as P
from tiled_diffusion.core.config import TiledConfig
from tiled_diffusion.pipeline.sampler import check_memory
from tiled_diffusion.pipeline.sampler import estimate_memory
from tiled_diffusion.tiny import tiny_pipeline
from tests.helpers import rel_err

PROMPT = "a photo of a red house by the lake"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def accel(pipe):
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256)
    yield pipe
    P.restore(pipe)


def plain_latents(pipe, w, h, steps=2, guidance_scale=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                use_resolution_binning=False, output_type="latent", clean_caption=False).images


def tiled(pipe, w, h, steps=2, **kw):
    return P.generate(pipe, PROMPT, width=w, height=h, steps=steps, seed=0, output_type="latent", progress=False,
                      **kw)


def assert_one_tile_matches_diffusers(pipe, mode):
    """A canvas that is one tile: global is bitwise the plain pipeline, the tiled modes within 1e-4."""
    ref = plain_latents(pipe, 256, 256)
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256, window=None)  # one 256-px tile
    try:
        out = tiled(pipe, 256, 256, mode=mode)
    finally:
        P.restore(pipe)
    if mode == "global":
        assert torch.equal(out, ref)
    else:
        assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("mode", ["global", "cross_tile", "multidiffusion"])
def test_one_tile_matches_diffusers(pipe, mode):
    assert_one_tile_matches_diffusers(pipe, mode)


def test_one_tile_with_cfg_matches_diffusers(pipe):
    ref = plain_latents(pipe, 256, 256, guidance_scale=3.0)
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256, window=None)  # one 256-px tile
    try:
        out = P.generate(pipe, PROMPT, width=256, height=256, steps=2, seed=0, guidance_scale=3.0,
                         output_type="latent", progress=False, mode="cross_tile")
    finally:
        P.restore(pipe)
    assert rel_err(out, ref) < 1e-4


def test_one_tile_image_matches_diffusers(pipe):
    gen = torch.Generator().manual_seed(0)
    ref = pipe(PROMPT, width=256, height=256, num_inference_steps=2, guidance_scale=0.0, generator=gen,
               use_resolution_binning=False, output_type="pt", clean_caption=False).images
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256)
    try:
        out = P.generate(pipe, PROMPT, width=256, height=256, steps=2, seed=0, output_type="pt", progress=False,
                         mode="global")
    finally:
        P.restore(pipe)
    # tiled VAE decode with a single 256² (32-latent) canvas: one VAE tile, so the decode is the plain one
    assert (out - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("size", [(512, 384), (384, 320)])
def test_cross_tile_full_radius_equals_global(accel, size):
    w, h = size
    g = tiled(accel, w, h, mode="global")
    c = tiled(accel, w, h, mode="cross_tile", tile=128, radius=3, window=None)  # ≤ 4x3 tiles: r3 covers them
    assert rel_err(c, g) < 1e-4


def test_cross_tile_small_radius_differs_from_global(accel):
    g = tiled(accel, 512, 384, mode="global")
    c = tiled(accel, 512, 384, mode="cross_tile", tile=128, radius=1, window=None)
    assert rel_err(c, g) > 1e-3
    c = tiled(accel, 512, 384, mode="cross_tile", window=1.0)  # token-centred, 128-px windows
    assert rel_err(c, g) > 1e-3


def test_cross_tile_window_covering_the_canvas_equals_global(accel):
    g = tiled(accel, 512, 384, mode="global")
    c = tiled(accel, 512, 384, mode="cross_tile", window=4.0)  # 4 x the 128-px training size covers 512x384
    assert rel_err(c, g) < 1e-4


@pytest.mark.parametrize("tile_batch_size", [1, 2, 5])
def test_multidiffusion_same_result_across_tile_batch_sizes(accel, tile_batch_size):
    ref = tiled(accel, 512, 384, mode="multidiffusion", tile=256)
    out = tiled(accel, 512, 384, mode="multidiffusion", tile=256, tile_batch_size=tile_batch_size)
    # same initial noise (drawn once on the canvas); only GEMM blocking changes with the batch, and the first LCM
    # step divides an ε difference by sqrt(alpha_bar(999)) = 0.0063: measured 1.6e-5 with the trained tiny model
    assert rel_err(out, ref) < 1e-4


def test_same_noise_across_tile_batch_sizes(accel):
    """The canvas noise is drawn once, so the images generate returns agree whatever the tile batch size (up to
    the GEMM blocking that the batch size changes)."""
    kw = dict(width=384, height=256, steps=1, seed=7, output_type="pt", progress=False, mode="multidiffusion",
              tile=256)
    one = P.generate(accel, PROMPT, tile_batch_size=1, **kw)
    all_ = P.generate(accel, PROMPT, tile_batch_size=None, **kw)
    other_seed = P.generate(accel, PROMPT, **{**kw, "seed": 8})
    assert (one - all_).abs().max().item() < 1e-4
    assert (one - other_seed).abs().max().item() > 1e-2


def _cosine_ramp(n: int, overlap: int) -> torch.Tensor:
    """MultiDiffusion window profile written out: 1 inside, a raised-cosine ramp over `overlap` pixels at each
    border, sampled at pixel centres (so it never reaches 0)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.minimum(i, n - i).div(overlap).clamp(max=1.0)
    return 0.5 - 0.5 * torch.cos(torch.pi * r)


def multidiffusion_reference(pipe, w, h, tile_px, steps, seed=0):
    """An independent multidiffusion loop on the PLAIN (un-accelerated) transformer: explicit crops, each tile's
    explicit crop of the canvas sincos positions (patched into PatchEmbed's output), explicit window blend,
    one scheduler step per step on the canvas."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    from diffusers.utils.torch_utils import randn_tensor

    tr, sched = pipe.transformer, pipe.scheduler
    pe = tr.pos_embed
    patch = tr.config.patch_size
    f = pipe.vae_scale_factor
    lat_h, lat_w, t = h // f, w // f, tile_px // f
    overlap = t // 2
    ys = list(range(0, lat_h - t + 1, t - overlap))
    xs = list(range(0, lat_w - t + 1, t - overlap))
    ys += [lat_h - t] if ys[-1] != lat_h - t else []
    xs += [lat_w - t] if xs[-1] != lat_w - t else []
    dim = pe.proj.out_channels
    canvas_pos = get_2d_sincos_pos_embed(dim, (lat_h // patch, lat_w // patch), base_size=pe.base_size,
                                         interpolation_scale=pe.interpolation_scale, output_type="pt")
    canvas_pos = canvas_pos.float().reshape(lat_h // patch, lat_w // patch, dim)
    tile_pos = get_2d_sincos_pos_embed(dim, (t // patch, t // patch), base_size=pe.base_size,
                                       interpolation_scale=pe.interpolation_scale, output_type="pt").float()
    window = (_cosine_ramp(t, overlap)[:, None] * _cosine_ramp(t, overlap)[None, :]).float()
    embeds, mask = P.encode(pipe, PROMPT)
    gen = torch.Generator().manual_seed(seed)
    lat = randn_tensor((1, 4, lat_h, lat_w), generator=gen, dtype=torch.float32)
    sched.set_timesteps(steps)
    where = {}
    hook = pe.register_forward_hook(  # PatchEmbed adds its own tile grid's positions: swap in the canvas crop
        lambda m, args, out: out - tile_pos + canvas_pos[where["y"]:where["y"] + t // patch,
                                                         where["x"]:where["x"] + t // patch].reshape(1, -1, dim))
    try:
        for step_t in sched.timesteps:
            x = sched.scale_model_input(lat, step_t)
            acc = torch.zeros(1, 4, lat_h, lat_w, dtype=torch.float64)
            wsum = torch.zeros(lat_h, lat_w, dtype=torch.float64)
            for y0 in ys:
                for x0 in xs:
                    where.update(y=y0 // patch, x=x0 // patch)
                    eps = tr(x[:, :, y0:y0 + t, x0:x0 + t], encoder_hidden_states=embeds,
                             encoder_attention_mask=mask, timestep=step_t[None],
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
                    eps = eps.chunk(2, dim=1)[0]  # learned sigma
                    acc[:, :, y0:y0 + t, x0:x0 + t] += window * eps.double()
                    wsum[y0:y0 + t, x0:x0 + t] += window
            lat = sched.step((acc / wsum).float(), step_t, lat, generator=gen).prev_sample
    finally:
        hook.remove()
    return lat


@pytest.mark.parametrize("size", [(512, 384), (384, 640)])
def test_multidiffusion_matches_an_independent_reference(size):
    """Non-square canvases and grids (3x2, 2x4 tiles): a y/x mix-up in offsets, positions or blending shows."""
    w, h = size
    pipe = tiny_pipeline()  # its own: the module's pipe is accelerated while the `accel` fixture is alive
    ref = multidiffusion_reference(pipe, w, h, tile_px=256, steps=2)
    P.accelerate(pipe, int8=None, text_encoder_int8=False, mode="multidiffusion", tile=256)
    try:
        out = tiled(pipe, w, h, mode="multidiffusion", tile=256)
    finally:
        P.restore(pipe)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("head_chunk", [1])
def test_cross_tile_head_chunking_is_exact(accel, head_chunk):
    ref = tiled(accel, 512, 384, mode="cross_tile", tile=128)
    out = tiled(accel, 512, 384, mode="cross_tile", tile=128, head_chunk=head_chunk)
    assert rel_err(out, ref) < 1e-5


def test_fused_blend_step_matches_scheduler_step(accel):
    fused = tiled(accel, 512, 384, steps=3, mode="multidiffusion", tile=256)
    plain = tiled(accel, 512, 384, steps=3, mode="multidiffusion", tile=256, fused_step=False)
    assert rel_err(fused, plain) < 1e-4


def test_scheduler_state_consistent_after_fused_steps(accel):
    tiled(accel, 384, 256, steps=4, mode="multidiffusion", tile=256)
    assert accel.scheduler.step_index == 4


@pytest.mark.parametrize("positional", ["canvas_native", "tile_local"])
@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
def test_positional_modes_run(accel, positional, mode):
    # shift moves the grid of tile-blocked windows; tile_local lays its embedding over a fixed grid (no shift)
    out = tiled(accel, 384, 256, mode=mode, tile=128, positional=positional, window=None,
                shift=positional != "tile_local")
    assert torch.isfinite(out).all()


def test_shifted_grid_differs(accel):
    a = tiled(accel, 512, 384, mode="cross_tile", tile=128, radius=0, window=None)
    b = tiled(accel, 512, 384, mode="cross_tile", tile=128, radius=0, window=None, shift=True)
    assert not torch.equal(a, b)  # step 1 (odd) runs on a grid moved by half a tile
    from tiled_diffusion.model.canvas import neighborhood

    cfg = TiledConfig(tile=128, shift=True, window=None, radius=0)
    # 8-token tiles; odd steps: the tile groups start half a tile before the canvas (partial tiles, no wrap)
    assert neighborhood(cfg, 48, 64, 2, 0, 16).offset == (0, 0)
    assert neighborhood(cfg, 48, 64, 2, 1, 16) == neighborhood(cfg, 48, 64, 2, 3, 16)
    assert neighborhood(cfg, 48, 64, 2, 1, 16).offset == (-4, -4)
    assert neighborhood(cfg, 48, 64, 2, 1, 16).window == (8, 8) and neighborhood(cfg, 48, 64, 2, 1, 16).clip


def test_canvas_stretched_crop_is_the_canvas_embedding():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from tiled_diffusion.model.positional import positional_embedding

    full = get_2d_sincos_pos_embed(16, (12, 20), base_size=16, interpolation_scale=1.0, output_type="pt")
    full = full.float().reshape(12, 20, 16)
    offs = torch.tensor([[0, 0], [4, 6], [6, 12]])
    crops = positional_embedding("canvas_stretched", 16, (12, 20), (6, 8), offs, 16, 1.0, torch.device("cpu"))
    for i, (y, x) in enumerate(offs.tolist()):
        assert torch.equal(crops[i], full[y:y + 6, x:x + 8].reshape(48, 16))


def test_canvas_native_equals_stretched_at_base_size():
    from tiled_diffusion.model.positional import positional_embedding

    a = positional_embedding("canvas_native", 16, (16, 16), (16, 16), None, 16, 2.0, torch.device("cpu"))
    b = positional_embedding("canvas_stretched", 16, (16, 16), (16, 16), None, 16, 2.0, torch.device("cpu"))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(mode="tiles"), dict(tile=100), dict(radius=-1), dict(overlap=1.0),
                                 dict(positional="absolute"), dict(tile_batch_size=0)])
def test_bad_config_is_a_clear_error(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        TiledConfig(**bad).validate()


def test_size_not_multiple_of_16_is_a_clear_error(accel):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiled(accel, 250, 256)


def test_memory_estimate_grows_linearly_with_area_in_cross_tile(accel):
    cfg = TiledConfig(mode="cross_tile", tile=1024)
    from tiled_diffusion.tiny import tiny_transformer

    big = tiny_transformer(num_attention_heads=16, attention_head_dim=72, num_layers=2)
    e2 = estimate_memory(big.config, height=2048, width=2048, cfg=cfg)
    e4 = estimate_memory(big.config, height=4096, width=4096, cfg=cfg)
    assert 3.5 < e4["activations"] / e2["activations"] < 4.5


def test_memory_above_limit_is_refused_before_running(accel):
    with pytest.raises(MemoryError, match=r"estimated peak memory .* exceeds .*to fit"):
        P.generate(accel, PROMPT, width=4096, height=4096, steps=1, seed=0, output_type="latent",
                   progress=False, mode="multidiffusion", tile=256, max_memory_gb=1e-3)


@pytest.mark.parametrize("mode,knob", [("multidiffusion", "--tile-batch-size"), ("cross_tile", "--tile"),
                                       ("global", "cross_tile")])
def test_memory_refusal_names_the_knob(mode, knob):
    from tiled_diffusion.tiny import tiny_transformer

    big = tiny_transformer(num_attention_heads=16, attention_head_dim=72, num_layers=2).config
    cfg = TiledConfig(mode=mode, tile=1024)
    est = estimate_memory(big, height=8192, width=8192, cfg=cfg)
    with pytest.raises(MemoryError, match=knob):
        check_memory(est, est["total"] / 2**30 * 0.9, cfg)
    check_memory(est, est["total"] / 2**30 + 1e-6, cfg)  # at the limit: accepted


# ------------------------------------------------------------------------------ micro-conditions


# adaln_single splits its width in three (resolution: 2 x D//3, aspect ratio: D//3), so D must divide by 3
MICRO_WIDTH = dict(num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24)


def micro_pipe(**transformer_kw):
    """The tiny pipeline with its transformer rebuilt with other micro-condition settings (seeded weights)."""
    from diffusers import PixArtAlphaPipeline

    from tiled_diffusion.tiny import tiny_transformer

    base = tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        tr = tiny_transformer(**MICRO_WIDTH, **transformer_kw).eval()
    p = PixArtAlphaPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=tr,
                            scheduler=base.scheduler)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def micro():
    # sample_size 128 is the only size at which PixArtAlphaPipeline itself passes micro-conditions
    p = micro_pipe(sample_size=128, use_additional_conditions=True)
    assert p.transformer.adaln_single.emb.use_additional_conditions
    return p


@pytest.mark.parametrize("sample_size,flag,expected", [(128, None, True), (128, True, True), (128, False, False),
                                                       (32, None, False), (32, True, True), (64, False, False)])
def test_micro_conditions_follow_the_model_rule(sample_size, flag, expected):
    from tiled_diffusion.pipeline.sampler import _added_cond
    from tiled_diffusion.pipeline.sampler import uses_micro_conditions
    from tiled_diffusion.tiny import tiny_transformer

    tr = tiny_transformer(**MICRO_WIDTH, sample_size=sample_size, use_additional_conditions=flag)
    assert uses_micro_conditions(tr) is expected is tr.use_additional_conditions
    added = _added_cond(tr, 3, 256, 384, torch.bfloat16, "cpu")
    if expected:  # as PixArtAlphaPipeline builds them: (height, width) in pixels and height / width
        assert added["resolution"].dtype == added["aspect_ratio"].dtype == torch.bfloat16
        assert added["resolution"].tolist() == [[256.0, 384.0]] * 3
        assert added["aspect_ratio"].float().tolist() == [[float(torch.tensor(256 / 384).bfloat16())]] * 3
    else:
        assert added == {"resolution": None, "aspect_ratio": None}


def test_micro_conditions_change_the_output(micro):
    """Guards the comparisons below: with these weights the micro-conditions are not a no-op."""
    tr = micro.transformer
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def run(h, w):
        cond = {"resolution": torch.tensor([[h, w]], dtype=torch.float32), "aspect_ratio": torch.tensor([[h / w]])}
        return tr(x, encoder_hidden_states=emb, timestep=torch.tensor([999]), added_cond_kwargs=cond,
                  return_dict=False)[0]

    assert rel_err(run(256, 256), run(512, 256)) > 1e-3


@pytest.mark.parametrize("mode", ["global", "cross_tile", "multidiffusion"])
def test_one_tile_with_micro_conditions_matches_diffusers(micro, mode):
    assert_one_tile_matches_diffusers(micro, mode)


def test_cross_tile_full_radius_equals_global_with_micro_conditions(micro):
    """cross_tile passes the canvas size (not its 128-px tile), so a radius covering the canvas is global."""
    P.accelerate(micro, int8=None, text_encoder_int8=False, tile=128)
    try:
        g = tiled(micro, 384, 256, mode="global")
        c = tiled(micro, 384, 256, mode="cross_tile", radius=2, window=None)
    finally:
        P.restore(micro)
    assert rel_err(c, g) < 1e-4


@pytest.mark.parametrize("positional,expected", [("canvas_stretched", (256, 384)), ("tile_local", (128, 128))])
@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
def test_micro_condition_size_per_mode(micro, mode, positional, expected):
    seen = []

    def spy(module, args, kwargs):  # what each inner forward of the canvas forward gives the timestep embedding
        added = args[1] if len(args) > 1 else kwargs["added_cond_kwargs"]
        seen.append((added["resolution"], added["aspect_ratio"]))

    P.accelerate(micro, int8=None, text_encoder_int8=False, tile=128)
    handle = micro.transformer.adaln_single.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        P.generate(micro, PROMPT, width=384, height=256, steps=2, seed=0, guidance_scale=2.0, output_type="latent",
                   progress=False, mode=mode, positional=positional, tile_batch_size=2, window=None,
                   shift=positional != "tile_local")
    finally:
        handle.remove()
        P.restore(micro)
    assert seen
    for res, ar in seen:  # one row per forward row (tiles x CFG halves), all the same size
        assert res.shape == (ar.shape[0], 2) and res.shape[0] >= 2
        assert res.tolist() == [list(map(float, expected))] * res.shape[0]
        assert torch.equal(ar, torch.full_like(ar, expected[0] / expected[1]))


@pytest.mark.parametrize("mode", ["global", "cross_tile"])
def test_micro_conditions_off_at_sample_size_128(mode):
    """PixArt-Σ 1024 style: sample_size 128 with use_additional_conditions=False. diffusers' pipeline still
    passes resolution (its own check is sample_size == 128) and the model ignores it; we pass None."""
    assert_one_tile_matches_diffusers(micro_pipe(sample_size=128, use_additional_conditions=False), mode)


def test_micro_conditions_on_at_another_sample_size():
    """use_additional_conditions=True at sample_size 32: the flag decides, so the model gets its conditions
    (a sample_size == 128 rule would pass None and crash inside adaln_single)."""
    p = micro_pipe(use_additional_conditions=True)
    P.accelerate(p, int8=None, text_encoder_int8=False, tile=128)
    try:
        out = tiled(p, 384, 256, mode="cross_tile", steps=1)
    finally:
        P.restore(p)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------ tile_local and the grid shift


@pytest.mark.parametrize("shift", [(0, 0), (2, 2), (1, 3)])
def test_tile_local_follows_the_shifted_cross_tile_grid(shift):
    """Every tile of the step's grid (shifted or not) carries exactly the embedding of a tile-sized image."""
    from tiled_diffusion.model.positional import _grid_embed
    from tiled_diffusion.model.positional import _tile_local_canvas
    from tiled_diffusion.core.tiling import TileGrid

    grid = TileGrid.for_tokens(24, 32, 8, patch=2, shift=shift)  # 12 x 16 tokens, 3 x 4 tiles of 4 x 4 tokens
    assert (grid.ny, grid.nx, grid.tile_tokens_h, grid.tile_tokens_w) == (3, 4, 4, 4)
    pos = _tile_local_canvas(grid, 16, 16, 1.0, torch.device("cpu"))  # raster order [1, N, 16]
    tiles = pos.index_select(1, grid.permutation()).reshape(grid.ny * grid.nx, grid.tokens_per_tile, 16)
    one = _grid_embed("tile_local", 16, 4, 4, 16, 1.0, "cpu").reshape(16, 16)
    for i in range(grid.ny * grid.nx):
        assert torch.equal(tiles[i], one), i


def test_memory_estimate_text_encoder_resident_or_alone():
    from tiled_diffusion.tiny import tiny_transformer

    cfg = TiledConfig(mode="cross_tile").validate()
    base = estimate_memory(tiny_transformer().config, height=1024, width=1024, cfg=cfg)
    big = 100 * base["total"]
    resident = estimate_memory(tiny_transformer().config, height=1024, width=1024, cfg=cfg, text_encoder_bytes=big)
    alone = estimate_memory(tiny_transformer().config, height=1024, width=1024, cfg=cfg, text_encoder_bytes=big,
                            text_encoder_alone=True)
    small = estimate_memory(tiny_transformer().config, height=1024, width=1024, cfg=cfg, text_encoder_bytes=1,
                            text_encoder_alone=True)
    assert resident["total"] == base["total"] + big and alone["total"] == big and small["total"] == base["total"]
    with pytest.raises(MemoryError, match="text encoder's weights dominate"):
        check_memory(alone, big / 2**30 / 2, cfg)


def test_memory_estimate_counts_the_positional_table_and_denoise_frees_it():
    """Issue 21 risk: the cached fp32 canvas positional table (tokens x hidden x 4 bytes: 4.8 GB at 16384² for
    PixArt-XL) is counted in the estimate, and released when the loop ends (before the VAE decode)."""
    from tiled_diffusion.model import positional
    from tiled_diffusion.tiny import tiny_transformer

    config = tiny_transformer().config
    hidden = config.num_attention_heads * config.attention_head_dim
    for positional_mode, tokens in (("canvas_stretched", (1024 // 16) ** 2), ("tile_local", (512 // 16) ** 2)):
        cfg = TiledConfig(mode="cross_tile", tile=512, positional=positional_mode, window=None).validate()
        est = estimate_memory(config, height=1024, width=1024, cfg=cfg)
        assert est["positional"] == tokens * hidden * 4, positional_mode
    cache = {"grid": "kept"}  # an acceleration's TileContext.cache: only the positional tables are released
    positional._grid_embed("canvas_stretched", 8, 4, 4, 4, 1.0, "cpu", cache)
    assert len(cache) == 2
    positional.release_tables(cache)
    assert cache == {"grid": "kept"}
