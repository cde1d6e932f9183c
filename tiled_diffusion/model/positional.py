"""Canvas-aware patch + positional embedding for tokens cut from a large canvas.

`CanvasPatchEmbed` is a subclass of diffusers' `PatchEmbed` that is swapped in by changing the instance's class
(`accelerate` does it, `restore` swaps back), so parameters, buffers and state-dict keys are untouched. With no
canvas set on its state it is exactly `PatchEmbed.forward`.

Positional modes (PixArt uses a 2-D sincos embedding; its grid is `arange(h) / (h / base) / interpolation_scale`,
i.e. every input size is stretched onto the trained range [0, base / interpolation_scale)):

- ``canvas_stretched`` (default): the whole canvas grid is stretched onto the trained range, and each tile gets
  its crop of it. This is what diffusers itself does for a canvas of that size (so `global` mode equals the
  plain pipeline), every token keeps a unique position (no tile thinks it is the whole image, which is what makes
  tile-local embeddings repeat objects in every tile), and no position leaves the trained range.
  Cost: tokens are denser in position space than in training (2x at 2048² for the 1024 model).
- ``canvas_native``: the grid at the model's native density (position = index / interpolation_scale), cropped
  per tile and extended beyond the trained range on large canvases (extrapolation: local detail stays at the
  trained scale, but far positions were never seen).
- ``tile_local``: every tile gets the embedding of a full image of the tile's size (what naive tiling does);
  content repeats across tiles.

Where the embedding is added, and what the grid shift does to it: PixArt adds its positional embedding once, in
the patch embedding, before the first block; no later layer sees positions again, so whatever grid the
patch embedding uses is the one every layer's tokens carry. The sampler sets one TileGrid per denoising step
(`cfg.shift`: shifted by half a tile on odd steps) and the whole forward of that step, patch embedding
included, runs on it; there is no per-layer shift. Per mode:

- ``canvas_stretched`` / ``canvas_native``: positions are absolute canvas coordinates, added in raster order
  before the tile-major permutation, so a shifted grid changes which tokens share an attention window and never
  a token's position.
- ``tile_local`` in multidiffusion: each input is one tile, and gets the tile's embedding (the pixel-level grid
  has no shift).
- ``tile_local`` in cross_tile: the tile's embedding is laid over the grid of tile-blocked windows (window=None,
  no shift: TiledConfig refuses the other combinations, since token-centred windows have no grid and the shifted
  grid of issue 18 has partial border tiles): canvas token (y, x) lies in a tile at local position
  (y mod th, x mod tw) and gets that position's embedding. (TileGrid's cyclic `shift` is no longer used by the
  canvas forward: `shift` moves the blocked windows through `neighborhood_attention`'s offset, without wrap.)
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid

def _grid_embed(mode: str, dim: int, h: int, w: int, base: int, interp: float, device,
                cache: Optional[dict] = None) -> torch.Tensor:
    """fp32 [h, w, dim] embedding of an h x w token grid (the canvas, or one tile for tile_local). cache: a dict
    that keeps it for the next call (the accelerated pipeline's TileContext.cache: it can be GBs at 16384², so it
    lives, is counted and is freed with the acceleration, not in a process-wide cache)."""
    key = ("pos", mode, dim, h, w, base, interp, str(device))
    if cache is not None and key in cache:
        return cache[key]
    device = torch.device(device)
    if mode in ("canvas_stretched", "tile_local"):
        # Exactly diffusers' own computation, so the whole-canvas case matches the plain pipeline bitwise.
        emb = get_2d_sincos_pos_embed(dim, (h, w), base_size=base, interpolation_scale=interp, device=device,
                                      output_type="pt")
    else:  # canvas_native: the density of the base grid (h == base), extended beyond it
        gh = torch.arange(h, device=device, dtype=torch.float32) / interp
        gw = torch.arange(w, device=device, dtype=torch.float32) / interp
        grid = torch.stack(torch.meshgrid(gw, gh, indexing="xy"), dim=0).reshape(2, 1, h, w)
        emb = get_2d_sincos_pos_embed_from_grid(dim, grid, output_type="pt")
    emb = emb.float().reshape(h, w, dim)
    if cache is not None:
        cache[key] = emb
    return emb


def release_tables(cache: dict) -> None:
    """Drop the embedding tables `_grid_embed` kept in `cache` (fp32 [h, w, dim] per canvas size and device: 4.8 GB
    at 16384² for PixArt-XL). The next forward rebuilds its table (milliseconds on a GPU; bitwise the same)."""
    for key in [k for k in cache if k[0] == "pos"]:
        del cache[key]


def positional_embedding(mode: str, dim: int, canvas: tuple[int, int], tile: tuple[int, int],
                         offsets: Optional[torch.Tensor], base: int, interp: float,
                         device: torch.device, cache: Optional[dict] = None) -> torch.Tensor:
    """Embedding of tile-sized token grids cut from a canvas.

    canvas (Ht, Wt) and tile (h, w) in tokens; offsets int64 [n, 2] (top, left) of each input's tile on the canvas
    in tokens, or None (one tile at (0, 0) shared by the whole batch). Returns fp32 [n or 1, h*w, dim].
    cache: see `_grid_embed`.
    """
    h, w = tile
    if mode == "tile_local":
        return _grid_embed(mode, dim, h, w, base, float(interp), device, cache).reshape(1, h * w, dim)
    emb = _grid_embed(mode, dim, canvas[0], canvas[1], base, float(interp), device, cache)
    if offsets is None:
        return emb[:h, :w].reshape(1, h * w, dim)
    ys = offsets[:, 0:1].to(device) + torch.arange(h, device=device)  # [n, h]
    xs = offsets[:, 1:2].to(device) + torch.arange(w, device=device)  # [n, w]
    return emb[ys[:, :, None], xs[:, None, :]].reshape(offsets.shape[0], h * w, dim)


def patch_tokens(proj: torch.nn.Conv2d, latent: torch.Tensor) -> torch.Tensor:
    """PatchEmbed's conv (kernel = stride = p, no padding) as one GEMM over the tokens' flattened patches: latent
    [B, C, h·p, w·p] -> [B, h·w, D] in raster order, the same products as the conv. Why: each token's row of a GEMM
    is the same dot product whatever the number of rows, while the conv's oneDNN kernel choice depends on the
    input's extent (lab model v1.6, 4->96 channels, p 2: the rows of a 64-row band differed by 1 ulp from the
    same rows of the 160-row canvas's conv), so a rank's band (parallel/) embeds bitwise as the one-process canvas
    does only this way."""
    if (proj.kernel_size != proj.stride or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1
            or proj.kernel_size[0] != proj.kernel_size[1]):
        return proj(latent).flatten(2).transpose(1, 2)  # not a patchify conv: diffusers' own path
    B, C, H, W = latent.shape
    p = proj.kernel_size[0]
    t = latent.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    t = t.reshape(B, (H // p) * (W // p), C * p * p)  # the conv weight's (C, p, p) order per token
    return torch.nn.functional.linear(t, proj.weight.reshape(proj.out_channels, -1), proj.bias)


class CanvasPatchEmbed(PatchEmbed):
    """PatchEmbed that knows where its input sits on the canvas (read from `self._td_state`, a TileContext).

    Input latent [B, C, h*p, w*p] -> tokens [B, h*w, dim]: the positional embedding is added in raster order;
    when the context has a token TileGrid (cross_tile mode) the tokens are then permuted to tile-major order
    ONCE here (every other op of a PixArt block is token-wise, so order only matters to self-attention), and the
    transformer's norm_out pre-hook puts them back (see pipeline.py).
    """

    _td_state = None

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        st = self._td_state
        if st is None or st.canvas_tokens is None or self.pos_embed is None or self.pos_embed_max_size:
            return super().forward(latent)
        h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        if st.grid is not None or st.neighborhood is not None:  # a canvas cut into windows: maybe into bands
            x = patch_tokens(self.proj, latent)
        else:  # one whole input (global, a multidiffusion tile): diffusers' conv, so global equals the plain pipeline
            x = self.proj(latent).flatten(2).transpose(1, 2)  # BCHW -> BNC (raster order)
        if self.layer_norm:
            x = self.norm(x)
        if st.positional == "tile_local" and st.grid is not None:
            pos = _tile_local_canvas(st.grid, self.pos_embed.shape[-1], self.base_size, self.interpolation_scale,
                                     x.device, st.cache)
        else:
            pos = positional_embedding(st.positional, self.pos_embed.shape[-1], st.canvas_tokens, (h, w),
                                       st.offsets, self.base_size, self.interpolation_scale, x.device, st.cache)
        if pos.shape[0] > 1 and pos.shape[0] != x.shape[0]:  # CFG doubled the batch: offsets repeat
            pos = pos.repeat(x.shape[0] // pos.shape[0], 1, 1)
        x = (x + pos).to(x.dtype)
        if st.grid is not None:
            x = st.to_tile_major(x)
        return x


def _tile_local_canvas(grid, dim: int, base: int, interp: float, device, cache: Optional[dict] = None
                       ) -> torch.Tensor:
    """cross_tile + tile_local: the tile embedding laid over the canvas along the grid's tiles, raster order
    [1, N, dim]. The tiles start at canvas token `grid.shift`, so the repeated embedding is rolled by it:
    token (y, x) gets tile position ((y - sy) mod th, (x - sx) mod tw)."""
    th, tw = grid.tile_tokens_h, grid.tile_tokens_w
    emb = _grid_embed("tile_local", dim, th, tw, base, float(interp), device, cache)
    emb = emb.repeat(grid.ny, grid.nx, 1)
    sy, sx = grid.shift
    if sy or sx:
        emb = torch.roll(emb, shifts=(sy, sx), dims=(0, 1))
    return emb.reshape(1, -1, dim)
