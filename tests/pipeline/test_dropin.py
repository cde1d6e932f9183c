"""Drop-in: after `accelerate(pipe)`, diffusers' own `pipe(...)` runs the canvas forward (tiny model, CPU, fp32).

`pipe(...)` and `tiled_diffusion.generate` run the same float ops in the same order (one canvas forward per
step, the same scheduler step, the same generator draws), so they are compared bitwise; the one exception is
multidiffusion with the fused blend + LCM step (generate's default), which rounds differently from
`seam_blend` + `scheduler.step` (fp32 rounding ~1e-7 relative, amplified ≤ 156x by LCM's first step: 1e-4).
"""

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel)

import tiled_diffusion
from tiled_diffusion import pipeline as P
from tiled_diffusion.tiny import tiny_pipeline
from tests.helpers import rel_err, run_python

PROMPT = "a red house by the lake"
W, H = 512, 384  # latent 64x48: cross_tile 128-px tiles -> 4x3 grid; multidiffusion 256-px tiles -> 3x2 tiles


@pytest.fixture()
def pipe():
    p = tiny_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def call(pipe, w=W, h=H, steps=2, guidance_scale=0.0, seed=0, output_type="latent", **kw):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                output_type=output_type, clean_caption=False, **kw).images


def ours(pipe, w=W, h=H, steps=2, guidance_scale=0.0, **kw):
    return P.generate(pipe, PROMPT, width=w, height=h, steps=steps, seed=0, guidance_scale=guidance_scale,
                      output_type="latent", progress=False, **kw)


CASES = [  # (mode, tile, guidance_scale)
    ("cross_tile", 128, 0.0),
    ("cross_tile", 128, 3.0),
    ("multidiffusion", 256, 0.0),
    ("multidiffusion", 256, 3.0),
]


@pytest.mark.parametrize("mode,tile,gs", CASES, ids=[f"{m}-cfg{g}" for m, _, g in CASES])
def test_pipe_call_equals_generate_lcm(pipe, mode, tile, gs):
    P.accelerate(pipe, mode=mode, tile=tile, int8=None, text_encoder_int8=False)
    a = call(pipe, guidance_scale=gs)
    b = ours(pipe, guidance_scale=gs, fused_step=False)
    assert a.shape == (1, 4, H // pipe.vae_scale_factor, W // pipe.vae_scale_factor)
    assert torch.equal(a, b)
    if mode == "multidiffusion":  # generate's default fuses the blend with the LCM step
        assert rel_err(ours(pipe, guidance_scale=gs), a) < 1e-4


SCHEDULERS = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
def test_pipe_call_equals_generate_other_schedulers(pipe, name, mode):
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    P.accelerate(pipe, mode=mode, tile=128 if mode == "cross_tile" else 256, int8=None, text_encoder_int8=False)
    a = call(pipe, steps=3, guidance_scale=2.0)
    b = ours(pipe, steps=3, guidance_scale=2.0)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_pipe_call_is_tiled(pipe):
    """The attention really is windowed: with radius 0 the tiles are independent, so the result differs from
    the plain (global) forward of the same canvas; with a radius that covers the canvas it equals it."""
    P.accelerate(pipe, mode="global", int8=None, text_encoder_int8=False)
    g = call(pipe)
    P.restore(pipe)
    P.accelerate(pipe, mode="cross_tile", tile=128, radius=0, window=None, int8=None, text_encoder_int8=False)
    r0 = call(pipe)
    P.restore(pipe)
    P.accelerate(pipe, mode="cross_tile", tile=128, radius=3, window=None, int8=None, text_encoder_int8=False)
    r3 = call(pipe)
    P.restore(pipe)
    # token-centred windows: a small one differs from global, one covering the canvas equals it
    P.accelerate(pipe, mode="cross_tile", window=0.25, int8=None, text_encoder_int8=False)
    w_small = call(pipe)
    P.restore(pipe)
    P.accelerate(pipe, mode="cross_tile", window=100.0, int8=None, text_encoder_int8=False)
    w_all = call(pipe)
    assert rel_err(r0, g) > 1e-3
    assert rel_err(r3, g) < 1e-4
    assert rel_err(w_small, g) > 1e-3
    assert rel_err(w_all, g) < 1e-4


@pytest.mark.parametrize("mode", ["global", "cross_tile", "multidiffusion"])
def test_one_tile_pipe_call_equals_plain_pipeline(pipe, mode):
    before = call(pipe, w=256, h=256, use_resolution_binning=False)
    img_before = call(pipe, w=256, h=256, use_resolution_binning=False, output_type="pt")
    # default tiles cover a 256² canvas; cross_tile's token-centred window is 1x the tiny model's 128-px training
    # size by default, so give it 2x: a window covering the canvas is global attention
    extra = {"window": 2.0} if mode == "cross_tile" else {}
    P.accelerate(pipe, mode=mode, int8=None, text_encoder_int8=False, **extra)
    assert torch.equal(call(pipe, w=256, h=256), before)
    # The accelerated decode (vae.decode) runs the same convolutions channels-last (faster on CPU), which orders
    # the fp32 sums differently: ~1e-7 relative, far below one 8-bit level (4e-3).
    assert (call(pipe, w=256, h=256, output_type="pt") - img_before).abs().max().item() < 1e-5


def test_transformer_sees_the_requested_canvas_with_default_arguments(pipe):
    """Above the bins (the tiny model's are ~256²), diffusers' default binning would shrink the request."""
    seen = []
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        gen = torch.Generator().manual_seed(0)
        out = pipe(PROMPT, width=W, height=H, num_inference_steps=1, generator=gen, clean_caption=False).images
    finally:
        handle.remove()
    f = pipe.vae_scale_factor
    assert seen == [(2, 4, H // f, W // f)]  # diffusers' default guidance_scale 4.5: CFG rows batched
    assert out[0].size == (W, H)
    with pytest.warns(UserWarning, match="binning"):
        call(pipe, steps=1, use_resolution_binning=True)


def test_request_within_the_bins_keeps_diffusers_binning(pipe):
    seen = []
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        # the tiny model (128 px) has no bins in diffusers: never binned
        f = pipe.vae_scale_factor
        call(pipe, w=128, h=96, steps=1)
        assert seen[-1][2:] == (96 // f, 128 // f)
        # a 256-px model has: within them, not a bin -> snapped to the nearest, as diffusers does
        pipe.transformer.register_to_config(sample_size=256 // f)
        call(pipe, w=320, h=160, steps=1)
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[1][2:] != (160 // f, 320 // f)


def test_restore_returns_pipe_call_to_its_original_output(pipe):
    before = call(pipe, use_resolution_binning=False, output_type="pt")
    decode = pipe.vae.decode
    P.accelerate(pipe, mode="multidiffusion", tile=256, int8="w8a8")
    tiled = call(pipe, output_type="pt")
    assert "decode" in pipe.vae.__dict__
    P.restore(pipe)
    assert "decode" not in pipe.vae.__dict__ and pipe.vae.decode == decode
    assert type(pipe) is PixArtAlphaPipeline and type(pipe.transformer) is PixArtTransformer2DModel
    assert tiled.shape == before.shape and not torch.equal(tiled, before)
    assert torch.equal(call(pipe, use_resolution_binning=False, output_type="pt"), before)


def test_output_types_and_callback(pipe):
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    steps = []
    pil = call(pipe, steps=2, output_type="pil", callback=lambda i, t, lat: steps.append((i, tuple(lat.shape))))
    assert pil[0].size == (W, H)
    f = pipe.vae_scale_factor
    assert steps == [(0, (1, 4, H // f, W // f)), (1, (1, 4, H // f, W // f))]
    pt = call(pipe, steps=2, output_type="pt")
    assert pt.shape == (1, 3, H, W) and 0 <= pt.min() and pt.max() <= 1
    ref = P.generate(pipe, PROMPT, width=W, height=H, steps=2, seed=0, output_type="pt", progress=False)
    assert torch.equal(pt, ref)


def test_shared_transformer_joins_and_settings_changes_are_refused(pipe):
    """One state per transformer (issue 22): a second pipeline on it joins with the same settings, restore
    through either reverts both; other settings are refused."""
    from diffusers import PixArtSigmaPipeline

    other = PixArtSigmaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                transformer=pipe.transformer, scheduler=pipe.scheduler)
    P.accelerate(pipe, int8=None, text_encoder_int8=False)
    assert P.accelerate(other, int8=None, text_encoder_int8=False) is other
    assert P.state(other) is P.state(pipe)
    with pytest.raises(RuntimeError, match="other settings"):
        P.accelerate(other, mode="multidiffusion", int8=None, text_encoder_int8=False)
    P.restore(other)
    assert type(pipe) is PixArtAlphaPipeline and type(other) is PixArtSigmaPipeline
    P.accelerate(pipe, int8=None, text_encoder_int8=False)
    with pytest.raises(RuntimeError, match="restore"):
        P.accelerate(pipe, int8=None, text_encoder_int8=False, keep_original_weights=False)
    assert P.accelerate(pipe, int8=None, text_encoder_int8=False) is pipe
    P.restore(pipe)
    assert type(pipe.transformer) is PixArtTransformer2DModel


def test_odd_latent_size_is_a_clear_error(pipe):
    """516 px is not a whole number of the tiny model's 8-px tokens: pipe(...) refuses it in one line (diffusers'
    own divisible-by-8 check speaks first at this geometry; the canvas's own token check: test_sampler)."""
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    with pytest.raises(ValueError, match="divisible by 8"):
        call(pipe, w=516, h=384, steps=1)


def test_top_level_api_and_cheap_import():
    assert tiled_diffusion.accelerate is P.accelerate
    assert tiled_diffusion.restore is P.restore and tiled_diffusion.generate is P.generate
    code = "import sys, tiled_diffusion; print('diffusers' in sys.modules)"
    out = run_python("-c", code, check=True)
    assert out.stdout.strip() == "False"
    assert out.stderr == ""


@pytest.mark.parametrize("gs", [0.0, 3.0], ids=["nocfg", "cfg"])
def test_pipe_call_with_shift_follows_the_steps_without_reading_timesteps(pipe, gs, monkeypatch):
    """Issue 21: under `shift`, pipe(...) counts its steps from where each timestep sits in scheduler.timesteps
    (diffusers passes views of it), not from its value (a device sync per forward on CUDA). Same latents as
    generate (which sets the step), two runs in a row (the second starts at step 0 again), and after each run's
    first forward no timestep value is read."""
    P.accelerate(pipe, mode="cross_tile", tile=128, int8=None, text_encoder_int8=False, shift=True, window=None)
    want = ours(pipe, steps=3, guidance_scale=gs)
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    for _ in range(2):
        reads.clear()
        assert torch.equal(call(pipe, steps=3, guidance_scale=gs), want)
        assert len(reads) <= 1, reads  # the first forward's value only (diffusers itself reads none here)
