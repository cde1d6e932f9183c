"""The LCM denoising loop over a canvas, in three tiling modes.

- ``global`` (reference): the transformer sees the whole canvas, full self-attention.
- ``multidiffusion`` (baseline): overlapping tiles (stride = tile·(1 - overlap)) run as independent batched
  forwards; their ε-predictions are merged on the canvas with a window profile and the LCM step is applied to
  the canvas (one fused `blend_lcm_step` when the scheduler is an LCMScheduler, else `seam_blend` +
  `scheduler.step`).
- ``cross_tile`` (default): one forward over all canvas tokens; tokens are permuted tile-major once at the patch
  embedding and every self-attention is `window_attention` over each tile's neighbour tiles (radius r). No
  overlap, no redundant compute, attention crosses every seam. `shift=True` moves the tile grid by half a tile on
  every other step (Swin-style).

Exactly one scheduler step per denoising step on the whole canvas (diffusers' schedulers are stateful).
The initial noise is drawn once for the whole canvas (as the diffusers pipeline draws it), so the same seed
gives the same canvas whatever the tile batch size.

Layouts: latents [B, 4, H/8, W/8]; prompt_embeds [B, S, C_text] (CFG: uncond first, as diffusers).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from . import ops
from .positional import check_mode

MODES = ("cross_tile", "multidiffusion", "global")

# Default tile size per mode, in image pixels. multidiffusion runs each tile as an independent image, so its tiles
# are the model's native 1024². cross_tile tiles only set the attention window ((2r+1)² tiles): 512 px with radius 1
# lets every token see a 1536² neighbourhood — more context than the 1024² the model was trained on — at 9·1024 keys
# per query, so cost stays linear in area (1024-px tiles would be 9·4096 keys, barely cheaper than global at 4096²).
DEFAULT_TILE_PX = {"cross_tile": 512, "multidiffusion": 1024, "global": 1024}


@dataclasses.dataclass
class TiledConfig:
    """Knobs of the tiled sampler. `tile` is in image pixels (the latent tile is tile / vae_scale_factor)."""

    mode: str = "cross_tile"
    tile: Optional[int] = None  # None: DEFAULT_TILE_PX[mode]
    radius: int = 1
    shift: bool = False
    overlap: float = 0.5
    profile: str = "cosine"
    positional: str = "canvas_stretched"
    tile_batch_size: Optional[int] = None  # multidiffusion: tiles per forward (None: all at once)
    head_chunk: Optional[int] = None  # cross_tile: heads per window_attention call (bounds attention memory)
    fused_step: bool = True  # multidiffusion: blend + LCM step in one op

    @property
    def tile_px(self) -> int:
        return DEFAULT_TILE_PX[self.mode] if self.tile is None else self.tile

    def validate(self) -> "TiledConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_mode(self.positional)
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile <= 0 or self.tile % 16):
            raise ValueError(f"tile must be a positive multiple of 16 pixels, got {self.tile!r}")
        if not isinstance(self.radius, int) or self.radius < 0:
            raise ValueError(f"radius must be an int >= 0, got {self.radius!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if self.tile_batch_size is not None and self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1 or None, got {self.tile_batch_size!r}")
        return self


def check_size(width: int, height: int, multiple: int = 16) -> None:
    """Canvas sizes must be multiples of 16 px (VAE factor 8 × patch 2) so every token is whole."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name}={v!r} must be a positive multiple of {multiple} pixels "
                             f"(VAE factor 8 x patch 2); e.g. {max(multiple, (int(v) // multiple) * multiple)}")


def initial_latents(batch: int, channels: int, lat_h: int, lat_w: int, dtype, device, generator) -> torch.Tensor:
    """Canvas noise exactly as PixArtAlphaPipeline.prepare_latents draws it (LCM's init_noise_sigma is 1)."""
    from diffusers.utils.torch_utils import randn_tensor

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


def micro_condition_size(cfg: "TiledConfig", height: int, width: int, tile_px: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels that the micro-conditions describe, in every mode.

    They describe the image whose positional embedding the tokens carry, which is what they described in
    training (PixArt-α's multi-scale data: aspect_ratio = the bin of the crop the model saw, whose positional
    grid is stretched per axis onto the trained range, so the aspect ratio is what tells the model how
    anisotropic its token density is; resolution = the source image's size):
    - canvas_stretched / canvas_native (default): the canvas (height, width), in every mode. Every tile's
      positions are its crop of the canvas grid, so it is part of a canvas-sized image. `global` is then the
      plain pipeline at the canvas size, and a cross_tile forward whose radius covers the canvas equals it.
    - tile_local: the tile (`tile_px`: the multidiffusion tile, or the cross_tile token-grid tile), since every
      tile carries the embedding of a whole tile-sized image. In `global` the tile is the canvas.
    With one tile covering the canvas both are the canvas size: every mode equals the plain pipeline.
    """
    if cfg.positional == "tile_local" and cfg.mode != "global":
        return tile_px
    return height, width


def _predict(transformer, x, t, embeds, mask, guidance_scale, added_cond):
    """ε for latents x [n, 4, h, w]; embeds/mask already hold [uncond; cond] rows when CFG is on."""
    cfg_on = guidance_scale > 1.0
    inp = torch.cat([x, x]) if cfg_on else x
    ts = t if torch.is_tensor(t) else torch.tensor(t)
    ts = (ts[None] if ts.dim() == 0 else ts).to(inp.device).expand(inp.shape[0])
    out = transformer(inp, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=ts,
                      added_cond_kwargs=added_cond, return_dict=False)[0]
    if cfg_on:
        u, c = out.chunk(2)
        out = u + guidance_scale * (c - u)
    if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma: keep ε
        out = out.chunk(2, dim=1)[0]
    return out


def _cfg_rows(t: torch.Tensor, idx: torch.Tensor, cfg_on: bool, batch: int) -> torch.Tensor:
    """Rows `idx` (image indices) of a CFG-stacked tensor [2B, ...] (uncond first) or [B, ...]."""
    if not cfg_on:
        return t[idx]
    return torch.cat([t[idx], t[idx + batch]])


@functools.lru_cache(maxsize=32)
def _grid_for_tokens(lat_h: int, lat_w: int, tile: int, patch: int, shifted: bool):
    # Cached per canvas: the grid caches its permutations and neighbour tables, so they are built once.
    from .tiling import TileGrid

    grid = TileGrid.for_tokens(lat_h, lat_w, tile, patch=patch)
    if shifted:
        grid = TileGrid.for_tokens(lat_h, lat_w, tile, patch=patch,
                                   shift=(grid.tile_tokens_h // 2, grid.tile_tokens_w // 2))
    return grid


def token_grid(cfg: TiledConfig, lat_h: int, lat_w: int, patch: int, step: int, vae_scale_factor: int = 8):
    """The cross_tile TileGrid of a step (shifted by half a tile on odd steps when cfg.shift)."""
    tile = max(patch, cfg.tile_px // vae_scale_factor)
    return _grid_for_tokens(lat_h, lat_w, tile, patch, bool(cfg.shift and step % 2 == 1))


def pixel_grid(cfg: TiledConfig, lat_h: int, lat_w: int, batch: int, patch: int, vae_scale_factor: int = 8):
    """The multidiffusion TileGrid: latent tiles with overlap rounded to whole tokens."""
    from .tiling import TileGrid

    tile = max(patch, (cfg.tile_px // vae_scale_factor) // patch * patch)
    t_eff = min(tile, lat_h, lat_w)
    overlap = int(round(cfg.overlap * t_eff / patch)) * patch
    overlap = min(overlap, t_eff - patch)
    return TileGrid(lat_h, lat_w, tile, overlap=overlap, batch=batch, patch=patch)


def denoise(transformer, scheduler, prompt_embeds, prompt_mask, *, height: int, width: int, steps: int,
            cfg: TiledConfig, guidance_scale: float = 0.0, generator=None, latents=None, batch: int = 1,
            progress: bool = True, callback=None) -> torch.Tensor:
    """Run the LCM loop on a [batch, 4, height/8, width/8] canvas; returns the final latents (not scaled).

    prompt_embeds/prompt_mask: [B, S, C] / [B, S], or [2B, ...] with uncond rows first when guidance_scale > 1.
    The transformer must have been accelerated (its TileContext drives the patch embedding and attention).
    """
    from tqdm.auto import tqdm

    cfg.validate()
    check_size(width, height)
    st = _state(transformer)
    ctx = st.context
    ctx.positional, ctx.radius, ctx.head_chunk = cfg.positional, cfg.radius, cfg.head_chunk
    vsf = 8
    patch = transformer.config.patch_size
    lat_h, lat_w = height // vsf, width // vsf
    dtype = prompt_embeds.dtype
    device = prompt_embeds.device
    cfg_on = guidance_scale > 1.0
    if latents is None:
        latents = initial_latents(batch, transformer.config.in_channels, lat_h, lat_w, dtype, device, generator)
    batch = latents.shape[0]

    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps

    fused = cfg.mode == "multidiffusion" and cfg.fused_step and _can_fuse(scheduler)
    if cfg.mode == "multidiffusion":
        pgrid = pixel_grid(cfg, lat_h, lat_w, batch, patch, vsf)
        oy, ox = pgrid.origins(device)
        weights = pgrid.blend_weights(cfg.profile, device=device)
        T = pgrid.ny * pgrid.nx
        offs = torch.tensor([(y // patch, x // patch) for y in pgrid.origins_y for x in pgrid.origins_x],
                            dtype=torch.long)
        tb = cfg.tile_batch_size or batch * T
        tile_px = (pgrid.th * vsf, pgrid.tw * vsf)
    elif cfg.mode == "cross_tile":
        g0 = token_grid(cfg, lat_h, lat_w, patch, 0, vsf)  # a shifted grid has the same tile size
        tile_px = (g0.th * vsf, g0.tw * vsf)
    else:
        tile_px = (height, width)
    # One size for every forward of the run: the canvas, or the tile with tile_local positions (see
    # micro_condition_size for why); rows are repeated per image, tile and CFG half.
    added = _added_cond(transformer, 1, *micro_condition_size(cfg, height, width, tile_px), dtype, device)

    try:
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=f"{cfg.mode} {width}x{height}")):
            ctx.canvas_tokens = (lat_h // patch, lat_w // patch)
            ctx.offsets = None
            if cfg.mode in ("global", "cross_tile"):
                ctx.set_grid(token_grid(cfg, lat_h, lat_w, patch, i, vsf) if cfg.mode == "cross_tile" else None)
                n_in = batch * (2 if cfg_on else 1)
                eps = _predict(transformer, scheduler.scale_model_input(latents, t), t, prompt_embeds, prompt_mask,
                               guidance_scale, _batched(added, n_in))
                out = scheduler.step(eps, t, latents, generator=generator, return_dict=False)
                latents = out[1] if steps == 1 else out[0]
            else:
                ctx.set_grid(None)
                tiles = pgrid.extract_tiles(scheduler.scale_model_input(latents, t))  # [B*T, 4, th, tw] (b, iy, ix)
                eps_tiles = torch.empty_like(tiles)
                for s in range(0, batch * T, tb):
                    idx = torch.arange(s, min(s + tb, batch * T))
                    img = idx // T
                    ctx.offsets = offs[idx % T]
                    n_in = idx.numel() * (2 if cfg_on else 1)
                    eps_tiles[idx] = _predict(
                        transformer, tiles[idx], t, _cfg_rows(prompt_embeds, img.to(device), cfg_on, batch),
                        _cfg_rows(prompt_mask, img.to(prompt_mask.device), cfg_on, batch), guidance_scale,
                        _batched(added, n_in))
                ctx.offsets = None
                latents = _merge_and_step(scheduler, i, t, steps, eps_tiles, oy, ox, weights, latents, generator,
                                          fused, batch)
            if callback is not None:
                callback(i, t, latents)
    finally:
        ctx.clear()
    return latents


def _batched(added: dict, n: int) -> dict:
    """The micro-conditions for n forward rows (images, tiles, CFG halves: all rows share one size)."""
    if added["resolution"] is None:
        return added
    return {k: v[:1].repeat(n, 1) for k, v in added.items()}


def _can_fuse(scheduler) -> bool:
    from diffusers import LCMScheduler

    c = scheduler.config
    return (isinstance(scheduler, LCMScheduler) and c.prediction_type == "epsilon" and not c.thresholding
            and not c.clip_sample)


def _merge_and_step(scheduler, i, t, steps, eps_tiles, oy, ox, weights, latents, generator, fused, batch):
    B, _, H, W = latents.shape
    if not fused:
        eps = ops.seam_blend(eps_tiles, oy, ox, weights, batch, H, W)
        out = scheduler.step(eps, t, latents, generator=generator, return_dict=False)
        return out[1] if steps == 1 else out[0]
    from diffusers.utils.torch_utils import randn_tensor

    from . import lcm

    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    co = lcm.lcm_coefficients(scheduler, scheduler.step_index)
    # The same draw LCMScheduler.step makes (none on the last step), so fused and unfused agree.
    noise = None if co["last"] else randn_tensor(latents.shape, generator=generator, device=latents.device,
                                                 dtype=latents.dtype)
    prev, denoised = ops.blend_lcm_step(eps_tiles, oy, ox, weights, latents, noise, *lcm.step_args(co))
    lcm.advance(scheduler)
    return denoised if steps == 1 else prev


# ------------------------------------------------------------------------------------------ memory


def estimate_memory(config, *, height: int, width: int, cfg: TiledConfig, dtype=torch.bfloat16, batch: int = 1,
                    guidance_scale: float = 0.0, int8: Optional[str] = None, param_count: Optional[int] = None,
                    vae_channels: int = 128, text_encoder_bytes: int = 0, text_encoder_alone: bool = False) -> dict:
    """Rough peak-memory estimate (bytes) of one run, before it starts. ±50%: it counts the big live tensors.

    text_encoder_bytes: the text encoder's weights, resident through the run (added), or, with
    text_encoder_alone=True, loaded, used and freed before the transformer (`tiled-diffusion generate`): then the
    peak is the larger of the two stages.

    config: the transformer config (hidden = heads·head_dim, patch, num_layers). Terms: weights; activations of
    one forward (≈ 14 hidden-sized tensors per token: residual, norm, q/k/v/attn-out, 4x MLP in and out);
    attention working set (multidiffusion: SDPA per tile; cross_tile: per chunk of 8 query tiles over their
    gathered neighbours); the latent canvas; a tiled VAE decode (512² px tiles) and the decoded image.
    """
    es = torch.finfo(dtype).bits // 8
    hidden = config.num_attention_heads * config.attention_head_dim
    heads = config.num_attention_heads
    patch = config.patch_size
    lat_h, lat_w = height // 8, width // 8
    n_canvas = batch * (lat_h // patch) * (lat_w // patch)
    cfg_mult = 2 if guidance_scale > 1.0 else 1
    if param_count is None:
        L = config.num_layers
        param_count = L * (12 * hidden * hidden + 12 * hidden) + 4 * hidden * hidden
    weights = param_count * (1 if int8 else es)
    tile_lat = max(patch, cfg.tile_px // 8)
    L_tile = (min(tile_lat, lat_h) // patch) * (min(tile_lat, lat_w) // patch)
    if cfg.mode == "multidiffusion":
        stride = max(patch, int(tile_lat * (1 - cfg.overlap)))
        T = (math.ceil(max(0, lat_h - tile_lat) / stride) + 1) * (math.ceil(max(0, lat_w - tile_lat) / stride) + 1)
        n_fwd = min(cfg.tile_batch_size or batch * T, batch * T) * L_tile * cfg_mult
        attn = 0  # CPU/GPU SDPA kernels stream over keys: O(tokens)
    else:
        n_fwd = n_canvas * cfg_mult
        if cfg.mode == "cross_tile":
            nb = (2 * cfg.radius + 1) ** 2
            h_c = cfg.head_chunk or heads
            attn = min(8, n_fwd // max(1, L_tile)) * h_c * nb * L_tile * config.attention_head_dim * es * 2
        else:
            attn = 0
    act = n_fwd * hidden * es * 14
    canvas = 6 * batch * 4 * lat_h * lat_w * 4
    vae = 6 * min(512 * 512, height * width) * vae_channels * 4 + batch * height * width * 3 * 4
    denoise_stage = weights + max(act + attn, vae) + canvas
    total = max(denoise_stage, text_encoder_bytes) if text_encoder_alone else denoise_stage + text_encoder_bytes
    return {"total": total, "weights": weights, "activations": act, "attention": attn, "canvas": canvas,
            "vae_decode": vae, "text_encoder": text_encoder_bytes, "tokens_per_forward": n_fwd}


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
        knob = "lower the tile batch size (tile_batch_size) or the tile size (--tile)"
    elif cfg.mode == "cross_tile":
        knob = "lower --tile / --radius, set head_chunk, or use a smaller --size"
    else:
        knob = "use --mode cross_tile (global attention runs on every canvas token at once) or a smaller --size"
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items()
                      if k not in ("total", "tokens_per_forward") and v)
    raise MemoryError(f"estimated peak memory {gb:.2f} GB exceeds --max-memory-gb {limit_gb:g} "
                      f"({parts} GB); to fit: {knob}")
