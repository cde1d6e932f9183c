"""The denoising loop over a canvas: a thin loop over the accelerated transformer's canvas forward.

The tiling modes (cross_tile / multidiffusion / global) live in one place, the canvas forward (canvas.py), which
diffusers' own `pipe(...)` also runs through; this loop adds only what a loop adds: the canvas noise, exactly one
scheduler step per denoising step on the whole canvas (diffusers' schedulers are stateful), the step index the
shifted grid follows, and — for multidiffusion with an LCMScheduler — the blend of the tile outputs fused with
the LCM step (`blend_lcm_step`, the same tile outputs the canvas forward blends with `seam_blend`).
The initial noise is drawn once for the whole canvas (as the diffusers pipeline draws it), so the same seed
gives the same canvas whatever the tile batch size.

Layouts: latents [B, 4, H/f, W/f] (f = the VAE scale factor); prompt_embeds [B, S, C_text] (CFG: uncond first).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .. import ops
from ..core import lcm
from ..core.config import VAE_SCALE_FACTOR, TiledConfig, check_size
from ..core.profiling import phase
from ..model.canvas import pixel_grid
from ..model.positional import release_tables as release_positional_tables
from ..vae.plan import estimate_vae_bytes


def initial_latents(batch: int, channels: int, lat_h: int, lat_w: int, dtype, device, generator) -> torch.Tensor:
    """Canvas noise exactly as PixArtAlphaPipeline.prepare_latents draws it (LCM's init_noise_sigma is 1)."""
    return randn_tensor((batch, channels, lat_h, lat_w), generator=generator, device=torch.device(device),
                        dtype=dtype)


def _state(transformer):
    st = getattr(transformer, "_tiled_diffusion", None)
    if st is None:
        raise RuntimeError("the transformer is not accelerated: call tiled_diffusion.accelerate(pipe) first")
    return st


def uses_micro_conditions(transformer) -> bool:
    """Whether the transformer consumes PixArt-α's resolution / aspect-ratio micro-conditions.

    diffusers' own rule (PixArtTransformer2DModel.__init__): the `use_additional_conditions` config, where None
    means sample_size == 128 (PixArt-α 1024, PixArt-δ/LCM 1024); PixArt-Σ 1024 checkpoints set it to False
    explicitly. The resolved value is the model attribute of the same name, which its forward checks. A model
    that uses them crashes on resolution=None; one that does not ignores whatever it is given.
    """
    flag = getattr(transformer, "use_additional_conditions", None)
    if flag is None:
        flag = getattr(transformer.config, "use_additional_conditions", None)
    if flag is None:
        flag = transformer.config.sample_size == 128
    return bool(flag)


def _added_cond(transformer, batch: int, height: int, width: int, dtype, device) -> dict:
    """The micro-conditions for `batch` rows, built exactly as PixArtAlphaPipeline builds them: resolution
    [batch, 2] = (height, width) in image pixels and aspect_ratio [batch, 1] = height / width, both in the
    prompt embeddings' dtype; None for models that do not use them (see `uses_micro_conditions`)."""
    if not uses_micro_conditions(transformer):
        return {"resolution": None, "aspect_ratio": None}
    res = torch.tensor([height, width]).repeat(batch, 1).to(dtype=dtype, device=device)
    ar = torch.tensor([float(height / width)]).repeat(batch, 1).to(dtype=dtype, device=device)
    return {"resolution": res, "aspect_ratio": ar}


def _predict(transformer, x, t, embeds, mask, guidance_scale, added_cond, tiles_of=None):
    """ε for latents x [n, 4, h, w] through the canvas forward; embeds/mask already hold [uncond; cond] rows when
    CFG is on. tiles_of: a multidiffusion TileGrid (batch = forward rows) to get the per-tile outputs
    [rows·T, 4, th, tw] instead of the blended canvas."""
    cfg_on = guidance_scale > 1.0
    inp = torch.cat([x, x]) if cfg_on else x
    ts = t if torch.is_tensor(t) else torch.tensor(t)
    ts = (ts[None] if ts.dim() == 0 else ts).to(inp.device).expand(inp.shape[0])
    kw = dict(encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=ts, added_cond_kwargs=added_cond,
              cross_attention_kwargs=None, attention_mask=None)
    with phase("transformer"):
        if tiles_of is None:
            out = transformer(inp, return_dict=False, **kw)[0]
        else:
            out = transformer.multidiffusion_tiles(inp, tiles_of, kw, _state(transformer))
    if cfg_on:  # tile outputs are row-major too: the uncond rows' tiles come first
        u, c = out.chunk(2)
        out = u + guidance_scale * (c - u)
    if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma: keep ε
        out = out.chunk(2, dim=1)[0]
    return out


def denoise(transformer, scheduler, prompt_embeds, prompt_mask, *, height: int, width: int, steps: int,
            cfg: TiledConfig, guidance_scale: float = 0.0, generator=None, latents=None, batch: int = 1,
            progress: bool = True, callback=None, strength: Optional[float] = None) -> torch.Tensor:
    """Run the loop on a [batch, 4, height/f, width/f] canvas; returns the final latents (not scaled).

    prompt_embeds/prompt_mask: [B, S, C] / [B, S], or [2B, ...] with uncond rows first when guidance_scale > 1.
    The transformer must have been accelerated. strength (img2img): the schedule starts part-way, as diffusers'
    `set_timesteps(..., strength=)` places it; `latents` must then be the encoded image already noised to the
    first timestep (`first_timestep` gives it).
    """
    cfg.validate()
    check_size(width, height)
    st = _state(transformer)
    vsf = st.vae_scale_factor
    patch = transformer.config.patch_size
    lat_h, lat_w = height // vsf, width // vsf
    dtype = prompt_embeds.dtype
    device = prompt_embeds.device
    cfg_on = guidance_scale > 1.0
    drawn = latents is None
    if drawn:
        if strength is not None:
            raise ValueError("denoise: strength needs the noised image latents (latents=...)")
        latents = initial_latents(batch, transformer.config.in_channels, lat_h, lat_w, dtype, device, generator)
    batch = latents.shape[0]
    timesteps = set_timesteps(scheduler, steps, device, strength)
    if drawn:  # as the pipeline scales its noise, after set_timesteps (Euler's sigma depends on them; LCM's is 1)
        latents = latents * scheduler.init_noise_sigma
    n_in = batch * (2 if cfg_on else 1)
    # The canvas size, as diffusers' pipelines pass it; the canvas forward swaps in the tile size for tile_local.
    added = _batched(_added_cond(transformer, 1, height, width, dtype, device), n_in)
    pgrid = None
    if cfg.mode == "multidiffusion" and cfg.fused_step and _can_fuse(scheduler):
        pgrid = pixel_grid(cfg, lat_h, lat_w, n_in, patch, vsf)
        if pgrid.ny * pgrid.nx == 1:
            pgrid = None  # one tile: the canvas forward runs the plain transformer, nothing to blend
    ctx = st.context
    with ctx.using(cfg):
        try:
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=f"{cfg.mode} {width}x{height}")):
                ctx.step = i
                with phase("step"):
                    x = scheduler.scale_model_input(latents, t)
                    if pgrid is None:
                        eps = _predict(transformer, x, t, prompt_embeds, prompt_mask, guidance_scale, added)
                        out = scheduler.step(eps, t, latents, generator=generator, return_dict=False)
                        latents = out[1] if len(timesteps) == 1 else out[0]
                    else:
                        eps_tiles = _predict(transformer, x, t, prompt_embeds, prompt_mask, guidance_scale, added,
                                             tiles_of=pgrid)
                        latents = _fused_blend_step(scheduler, t, len(timesteps), eps_tiles, pgrid, cfg.profile,
                                                    latents, generator)
                if callback is not None:
                    callback(i, t, latents)
        finally:
            ctx.step = None
            # the canvas's positional table is only needed by the loop: give its bytes to the VAE decode
            release_positional_tables(ctx.cache)
    return latents


def set_timesteps(scheduler, steps: int, device, strength: Optional[float] = None) -> torch.Tensor:
    """The scheduler's timesteps for `steps` steps (from the start, or from `strength` for img2img)."""
    if strength is None:
        scheduler.set_timesteps(steps, device=device)
    else:
        scheduler.set_timesteps(steps, device=device, strength=strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps


def _batched(added: dict, n: int) -> dict:
    """The micro-conditions for n forward rows (images, CFG halves: all rows share one size)."""
    if added["resolution"] is None:
        return added
    return {k: v[:1].repeat(n, 1) for k, v in added.items()}


def _can_fuse(scheduler) -> bool:
    c = scheduler.config
    return (isinstance(scheduler, LCMScheduler) and c.prediction_type in lcm.PREDICTIONS and not c.thresholding
            and not c.clip_sample)


def _fused_blend_step(scheduler, t, steps, eps_tiles, pgrid, profile, latents, generator):
    """seam_blend of the tile outputs + LCMScheduler.step in one op (`blend_lcm_step`); equals the two in turn."""
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    co = lcm.lcm_coefficients(scheduler, scheduler.step_index)
    # The same draw LCMScheduler.step makes (none on the last step), so fused and unfused agree.
    noise = None if co["last"] else randn_tensor(latents.shape, generator=generator, device=latents.device,
                                                 dtype=latents.dtype)
    oy, ox = pgrid.origins(latents.device)
    weights = pgrid.blend_weights(profile, device=latents.device)
    prev, denoised = ops.blend_lcm_step(eps_tiles, oy, ox, weights, latents, noise, *lcm.step_args(co))
    lcm.advance(scheduler)
    return denoised if steps == 1 else prev


# ------------------------------------------------------------------------------------------ memory


def estimate_memory(config, *, height: int, width: int, cfg: TiledConfig, dtype=torch.bfloat16, batch: int = 1,
                    guidance_scale: float = 0.0, int8: Optional[str] = None, param_count: Optional[int] = None,
                    vae=None, text_encoder_bytes: int = 0, text_encoder_alone: bool = False,
                    vae_scale_factor: int = VAE_SCALE_FACTOR) -> dict:
    """Rough peak-memory estimate (bytes) of one run, before it starts. ±50%: it counts the big live tensors.

    text_encoder_bytes: the text encoder's weights, resident through the run (added), or, with
    text_encoder_alone=True, loaded, used and freed before the transformer (`tiled-diffusion generate`): then the
    peak is the larger of the two stages.

    config: the transformer config (hidden = heads·head_dim, patch, num_layers). Terms: weights; activations of
    one forward (≈ 14 hidden-sized tensors per token: residual, norm, q/k/v/attn-out, 4x MLP in and out);
    attention working set (multidiffusion: SDPA per tile; cross_tile: per chunk of 8 query tiles over their
    gathered neighbours); the latent canvas and its positional table; the VAE decode (`vae`: the AutoencoderKL or its config dict, estimated
    by vae.estimate_vae_bytes) and the decoded image.
    """
    es = torch.finfo(dtype).bits // 8
    hidden = config.num_attention_heads * config.attention_head_dim
    heads = config.num_attention_heads
    patch = config.patch_size
    lat_h, lat_w = height // vae_scale_factor, width // vae_scale_factor
    n_canvas = batch * (lat_h // patch) * (lat_w // patch)
    cfg_mult = 2 if guidance_scale > 1.0 else 1
    if param_count is None:
        L = config.num_layers
        param_count = L * (12 * hidden * hidden + 12 * hidden) + 4 * hidden * hidden
    weights = param_count * (1 if int8 else es)
    tile_lat = max(patch, cfg.tile_px // vae_scale_factor)
    L_tile = (min(tile_lat, lat_h) // patch) * (min(tile_lat, lat_w) // patch)
    if cfg.mode == "multidiffusion":
        stride = max(patch, int(tile_lat * (1 - cfg.overlap)))
        T = (math.ceil(max(0, lat_h - tile_lat) / stride) + 1) * (math.ceil(max(0, lat_w - tile_lat) / stride) + 1)
        n_fwd = min(cfg.tile_batch_size or batch * T, batch * T) * L_tile * cfg_mult
        attn = 0  # CPU/GPU SDPA kernels stream over keys: O(tokens)
    else:
        n_fwd = n_canvas * cfg_mult
        if cfg.mode == "cross_tile" and cfg.window is not None:
            # neighborhood_attention's CPU path copies column strips of Q, K, V (K and V bands a little wider):
            # at most ~3 more attention inputs of the canvas
            attn = 3 * n_fwd * heads * config.attention_head_dim * es
        elif cfg.mode == "cross_tile":
            nb = (2 * cfg.radius + 1) ** 2
            h_c = cfg.head_chunk or heads
            attn = min(8, n_fwd // max(1, L_tile)) * h_c * nb * L_tile * config.attention_head_dim * es * 2
        else:
            attn = 0
    act = n_fwd * hidden * es * 14
    canvas = 6 * batch * 4 * lat_h * lat_w * 4
    # the fp32 sincos table of the canvas's token grid (tile_local: of one tile), cached in the acceleration's
    # TileContext.cache and held through the loop (4.8 GB at 16384² for PixArt-XL); `denoise` releases it when the loop ends
    pos_tokens = L_tile if cfg.positional == "tile_local" else (lat_h // patch) * (lat_w // patch)
    positional = pos_tokens * hidden * 4
    if vae is None:  # no VAE given: the SD/PixArt VAE's full-resolution block (128 channels), 512² at a time
        vae_act = 6 * min(512 * 512, height * width) * 128 * 4
    else:  # what vae.decode needs under its own rule (plain if it fits, else banded)
        vae_act = estimate_vae_bytes(vae, height, width, dtype=dtype, batch=batch)
    vae = vae_act + batch * height * width * 3 * 4  # + the decoded image (fp32)
    denoise_stage = weights + max(act + attn + positional, vae) + canvas
    total = max(denoise_stage, text_encoder_bytes) if text_encoder_alone else denoise_stage + text_encoder_bytes
    return {"total": total, "weights": weights, "activations": act, "attention": attn, "canvas": canvas,
            "vae_decode": vae, "text_encoder": text_encoder_bytes, "tokens_per_forward": n_fwd,
            "positional": positional}


def check_memory(estimate: dict, limit_gb: Optional[float], cfg: TiledConfig) -> None:
    """Refuse a request whose estimate exceeds the limit, naming the knob that lowers it."""
    if limit_gb is None:
        return
    gb = estimate["total"] / 2**30
    if gb <= limit_gb:
        return
    if estimate["text_encoder"] * 2 > estimate["total"]:
        knob = ("the text encoder's weights dominate: keep its int8 form (on unless --int8 none) and load it alone "
                "(`tiled-diffusion generate` frees it before denoising)")
    elif estimate["vae_decode"] >= estimate["activations"] + estimate["attention"]:
        knob = "the tiled VAE decode dominates: use a smaller --size (the decoded image itself is the floor)"
    elif cfg.mode == "multidiffusion":
        knob = "lower the tile batch size (--tile-batch-size) or the tile size (--tile)"
    elif cfg.mode == "cross_tile":
        knob = "lower --tile / --radius, set --head-chunk, or use a smaller --size"
    else:
        knob = "use --mode cross_tile (global attention runs on every canvas token at once) or a smaller --size"
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items()
                      if k not in ("total", "tokens_per_forward") and v)
    raise MemoryError(f"estimated peak memory {gb:.2f} GB exceeds --max-memory-gb {limit_gb:g} "
                      f"({parts} GB); to fit: {knob}")
