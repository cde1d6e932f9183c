"""The accelerated transformer's forward over a whole canvas: the one place where every tiling mode lives.

After `accelerate(pipe)` the transformer object's class is swapped (as `CanvasPatchEmbed` is: same object,
parameters and state-dict keys) for a subclass whose forward takes the latents of the WHOLE canvas and returns
the model output for the whole canvas in the configured mode, so every caller — diffusers' own `pipe(...)`,
`pipeline.generate`, `sampler.denoise`, a ControlNet, a multi-process run — goes through the same code:

- ``cross_tile`` (default): one inner forward over all canvas tokens, every attn1 windowed. Default
  (`window` set): token-centred windows — every attn1 is `neighborhood_attention` on the raster token canvas,
  each query's window (window × the model's training field, per side) centred on its stride group and shifted
  inward at the border; away from the border the forward is translation-equivariant, so no seam can form.
  With `window=None`, the tile-blocked windows: the tile grid is derived here from the input's latent size; the
  patch embedding adds canvas positions and permutes the tokens tile-major once, every attn1 is
  `window_attention` over each tile's neighbour tiles (radius r), and the norm_out pre-hook puts the tokens back
  in raster order; with `shift` (odd steps: the grid moved by half a tile, partial tiles at the border, no wrap)
  the same blocked windows run through `neighborhood_attention` (stride = tile, clip, offset).
- ``multidiffusion``: overlapping tiles (stride = tile·(1 - overlap)) cut from the canvas, run as independent
  images in batches of `tile_batch_size`, each with its crop of the canvas positions, and their outputs blended
  on the canvas with `ops.seam_blend` before returning (the Mixture-of-Diffusers form of MultiDiffusion: the
  scheduler step that follows sees one canvas output).
- ``global``, and any canvas that is a single tile: the plain transformer (positions per `positional`; with the
  default `canvas_stretched` that is diffusers' own embedding, so the output is the plain model's, bitwise).

Every input row is an independent canvas (CFG halves, batched images): tiles never mix rows. The micro-conditions
(`added_cond_kwargs`) are taken as given (diffusers' pipelines pass the canvas size) except with
`positional="tile_local"`, where each tile is a whole tile-sized image and gets the tile size
(`micro_condition_size`).

Layouts: hidden_states [B, C_in, h, w] (latent pixels); encoder_hidden_states [B, S, C_text]; output
[B, C_out, h, w].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .. import ops
from ..core.config import VAE_SCALE_FACTOR, TiledConfig
from ..core.tiling import TileGrid
from .attention import TiledProcessors


def token_grid(cfg: TiledConfig, lat_h: int, lat_w: int, patch: int, step: int,
               vae_scale_factor: int = VAE_SCALE_FACTOR, cache: Optional[dict] = None) -> TileGrid:
    """The cross_tile TileGrid of a step (shifted by half a tile on odd steps when cfg.shift). cache: a dict that
    keeps the grid, with the permutations and neighbour tables it builds, for the next forward (TileContext.cache)."""
    tile = max(patch, cfg.tile_px // vae_scale_factor)
    shifted = bool(cfg.shift and step % 2 == 1)
    key = ("grid", lat_h, lat_w, tile, patch, shifted)
    if cache is not None and key in cache:
        return cache[key]
    grid = TileGrid.for_tokens(lat_h, lat_w, tile, patch=patch)
    if shifted:
        grid = TileGrid.for_tokens(lat_h, lat_w, tile, patch=patch,
                                   shift=(grid.tile_tokens_h // 2, grid.tile_tokens_w // 2))
    if cache is not None:
        cache[key] = grid
    return grid


@dataclasses.dataclass(frozen=True)
class Neighborhood:
    """The arguments of `neighborhood_attention` for one canvas, in tokens (see reference.neighborhood_bounds)."""

    window: tuple[int, int]
    stride: tuple[int, int]
    clip: bool = False
    offset: tuple[int, int] = (0, 0)

    def covers(self, tokens_h: int, tokens_w: int) -> bool:
        """Whether every query sees every key (then the forward is the plain transformer's)."""
        if self.clip:
            return False
        return self.window[0] >= tokens_h and self.window[1] >= tokens_w


def neighborhood(cfg: TiledConfig, lat_h: int, lat_w: int, patch: int, step: int, field: int,
                 vae_scale_factor: int = VAE_SCALE_FACTOR) -> Optional[Neighborhood]:
    """cross_tile's windows on a lat_h x lat_w canvas as `neighborhood_attention` arguments, or None for the
    tile-major `window_attention` path (tile-blocked windows without shift). field: the model's training size in
    latent pixels (its config's sample_size)."""
    if cfg.window is not None:
        tokens = field / patch
        w = max(1, round(cfg.window * tokens))
        s = min(w, max(1, round(cfg.stride * tokens)))
        return Neighborhood((w, w), (s, s))
    if not cfg.shift:
        return None
    grid = token_grid(cfg, lat_h, lat_w, patch, 0, vae_scale_factor)
    th, tw = grid.tile_tokens_h, grid.tile_tokens_w
    off = (-(th // 2), -(tw // 2)) if step % 2 == 1 else (0, 0)
    return Neighborhood(((2 * cfg.radius + 1) * th, (2 * cfg.radius + 1) * tw), (th, tw), True, off)


def pixel_grid(cfg: TiledConfig, lat_h: int, lat_w: int, batch: int, patch: int,
               vae_scale_factor: int = VAE_SCALE_FACTOR) -> TileGrid:
    """The multidiffusion TileGrid: latent tiles with overlap rounded to whole tokens."""
    tile = max(patch, (cfg.tile_px // vae_scale_factor) // patch * patch)
    t_eff = min(tile, lat_h, lat_w)
    overlap = int(round(cfg.overlap * t_eff / patch)) * patch
    overlap = min(overlap, t_eff - patch)
    return TileGrid(lat_h, lat_w, tile, overlap=overlap, batch=batch, patch=patch)


def micro_condition_size(cfg: TiledConfig, height: int, width: int, tile_px: tuple[int, int]) -> tuple[int, int]:
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


def _tile_micro_conditions(added: Optional[dict], tile_px: tuple[int, int]) -> Optional[dict]:
    """added_cond_kwargs with resolution / aspect_ratio describing a tile_px image (rows and dtype kept)."""
    if not added or added.get("resolution") is None:
        return added
    res, ar = added["resolution"], added.get("aspect_ratio")
    h, w = tile_px
    out = dict(added)
    out["resolution"] = torch.tensor([h, w], dtype=res.dtype, device=res.device).expand_as(res).clone()
    if ar is not None:
        out["aspect_ratio"] = torch.full_like(ar, h / w)
    return out


def _rows(x, idx: torch.Tensor, n_in: int):
    """Rows `idx` of a per-input-row value (tensor with n_in rows; anything else is shared and passed as is)."""
    if torch.is_tensor(x) and x.dim() >= 1 and x.shape[0] == n_in:
        return x.index_select(0, idx.to(x.device))
    return x


def _repeat_rows(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """A canvas-batched extra latent [b, ...] for n input rows (CFG doubles the rows: the same extra for both)."""
    if x.shape[0] == n:
        return x
    if n % x.shape[0]:
        raise ValueError(f"canvas forward: extra input {what!r} has {x.shape[0]} rows for {n} input rows")
    return x.repeat(n // x.shape[0], *([1] * (x.dim() - 1)))


class CanvasForward:
    """Mixin placed before the transformer's own class (see `canvas_class`): `forward` over a whole canvas."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                timestep: Optional[torch.Tensor] = None, added_cond_kwargs: Optional[dict] = None,
                cross_attention_kwargs: Optional[dict] = None, attention_mask: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, return_dict: bool = True):
        kw = dict(encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                  added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                  attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask)
        st = self.__dict__.get("_tiled_diffusion")
        if st is None:  # accelerate is still swapping modules in, or restore is taking them out
            return super().forward(hidden_states, return_dict=return_dict, **kw)
        ctx, cfg = st.context, st.context.config
        patch, vsf = self.config.patch_size, st.vae_scale_factor
        B, _, lat_h, lat_w = hidden_states.shape
        if lat_h % patch or lat_w % patch:
            raise ValueError(f"canvas forward: latent size {lat_h}x{lat_w} is not a multiple of the patch size "
                             f"{patch} (image sizes must be multiples of {patch * vsf} px)")
        mode = cfg.mode
        grid = pgrid = hood = None
        if mode == "cross_tile":
            hood = neighborhood(cfg, lat_h, lat_w, patch, ctx.step_for(timestep) if cfg.shift else 0,
                                training_field(self.config, lat_h), vsf)
            if hood is None or hood.clip:  # tile-blocked windows: one tile is the whole canvas -> global
                g = token_grid(cfg, lat_h, lat_w, patch, 0, vsf, ctx.cache)
                if g.ny * g.nx == 1:
                    mode, hood = "global", None
                elif hood is None:
                    grid = g
            elif hood.covers(lat_h // patch, lat_w // patch):
                mode, hood = "global", None
        elif mode == "multidiffusion":
            pgrid = pixel_grid(cfg, lat_h, lat_w, B, patch, vsf)
            if pgrid.ny * pgrid.nx == 1:
                mode = "global"
        try:
            ctx.canvas_tokens = (lat_h // patch, lat_w // patch)
            if mode == "multidiffusion":
                out = self._multidiffusion(hidden_states, pgrid, kw, st)
            else:
                crop = None
                # a partition (parallel/, plugged in over a process group) runs this rank's band of rows: tile
                # rows of the grid, or token rows for token-centred windows
                ds = ctx.partition if grid is not None or hood is not None else None
                if ds is not None:
                    band = (ds.band(grid, cfg.radius, B) if grid is not None else
                            ds.hood_band(hood, lat_h // patch, patch, B))
                    grid, ctx.offsets, crop = band.grid, band.offsets, band.crop
                    hidden_states = crop(hidden_states)
                ctx.set_grid(grid)
                ctx.neighborhood = hood
                ctx.current_extras = {k: _repeat_rows(v, B, k) for k, v in ctx.extras.items()}
                if crop is not None:
                    ctx.current_extras = {k: crop(v) for k, v in ctx.current_extras.items()}
                if grid is not None and cfg.positional == "tile_local":
                    kw["added_cond_kwargs"] = _tile_micro_conditions(
                        added_cond_kwargs, (grid.th * vsf, grid.tw * vsf))
                if ds is not None:  # this rank's input rows (its CFG half under CFG-parallel)
                    kw = band.crop_kwargs(kw, B)
                out = super().forward(hidden_states, return_dict=False, **kw)[0]
                if ds is not None:  # every rank returns the whole canvas
                    out = ds.gather_band(out)
        finally:
            ctx.clear()
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _multidiffusion(self, x: torch.Tensor, pgrid, kw: dict, st) -> torch.Tensor:
        """Cut overlapping tiles, run them in batches, blend their outputs on the canvas."""
        tiles_out = self.multidiffusion_tiles(x, pgrid, kw, st)
        oy, ox = pgrid.origins(x.device)
        weights = pgrid.blend_weights(st.context.config.profile, device=x.device)
        return ops.seam_blend(tiles_out, oy, ox, weights, x.shape[0], x.shape[2], x.shape[3]).to(tiles_out.dtype)

    def multidiffusion_tiles(self, x: torch.Tensor, pgrid, kw: dict, st) -> torch.Tensor:
        """Model outputs of every tile of `pgrid`, [B·T, C_out, th, tw] in (row, iy, ix) order (what seam_blend
        and blend_lcm_step gather). Each tile is an independent image carrying its crop of the canvas positions;
        per-row inputs (text, masks, timesteps, micro-conditions, extras) follow the tile's row."""
        ctx, cfg = st.context, st.context.config
        patch, vsf = self.config.patch_size, st.vae_scale_factor
        B = x.shape[0]
        T = pgrid.ny * pgrid.nx
        tiles = pgrid.extract_tiles(x)
        extras = {k: pgrid.extract_tiles(_repeat_rows(v, B, k)) for k, v in ctx.extras.items()}
        offs = torch.tensor([(y // patch, x_ // patch) for y in pgrid.origins_y for x_ in pgrid.origins_x],
                            dtype=torch.long)
        added = kw["added_cond_kwargs"]
        if cfg.positional == "tile_local":
            added = _tile_micro_conditions(added, (pgrid.th * vsf, pgrid.tw * vsf))
        tb = cfg.tile_batch_size or B * T
        ctx.canvas_tokens = (x.shape[2] // patch, x.shape[3] // patch)
        ctx.set_grid(None)
        ds = ctx.partition  # over a process group (parallel/): this rank's share of the tiles
        span = ds.tile_share(B * T) if ds is not None else (0, B * T)
        try:
            out = self._run_tiles(tiles, extras, offs, kw, added, tb, B, T, ctx, span)
        finally:
            ctx.clear()
        if ds is not None:  # every rank gets every tile's output (one all-gather)
            out = ds.gather_tiles(out[span[0]:span[1]], B * T)
        return out

    def _run_tiles(self, tiles, extras, offs, kw, added, tb, B, T, ctx, span):
        out = None
        for s in range(span[0], span[1], tb):
            idx = torch.arange(s, min(s + tb, span[1]))
            rows = idx // T
            ctx.offsets = offs[idx % T]
            ctx.current_extras = {k: v[idx.to(v.device)] for k, v in extras.items()}
            part_kw = {k: _rows(v, rows, B) for k, v in kw.items() if k != "added_cond_kwargs"}
            part_kw["added_cond_kwargs"] = (None if added is None else
                                            {k: _rows(v, rows, B) for k, v in added.items()})
            t = part_kw.get("timestep")
            if torch.is_tensor(t) and t.dim() == 0:
                part_kw["timestep"] = t.expand(idx.numel())
            res = super().forward(tiles[idx.to(tiles.device)], return_dict=False, **part_kw)[0]
            if out is None:
                out = torch.empty((B * T,) + tuple(res.shape[1:]), dtype=res.dtype, device=res.device)
            out[idx.to(out.device)] = res
        return out


def training_field(config, default: int) -> int:
    """The model's training size in latent pixels (its sample_size; `default` when the config has none)."""
    size = getattr(config, "sample_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if size else default


@functools.lru_cache(maxsize=None)
def canvas_class(cls: type) -> type:
    """The subclass of a transformer class with the canvas forward (one per class, so restore can swap back).
    It keeps the base class's __name__, which diffusers writes as `_class_name` into saved configs."""
    return type(cls.__name__, (CanvasForward, TiledProcessors, cls),
                {"__module__": __name__, "__qualname__": f"Canvas{cls.__name__}"})
