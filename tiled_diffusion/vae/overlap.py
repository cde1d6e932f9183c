"""The approximate VAE decode: overlapping tiles decoded independently and cross-faded with `seam_blend`
(`decode` falls back to it only when even the banded store does not fit)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import ops
from ..core.tiling import TileGrid
from .steps import vae_scale_factor


def tiled_decode(vae, latents: torch.Tensor, tile: int = 64, overlap: int = 16, profile: str = "cosine",
                 tile_batch: int = 1, progress: bool = False) -> torch.Tensor:
    """Approximate decode of latents [B, C_lat, h, w] (already divided by the VAE's scaling factor) to images
    [B, 3, f·h, f·w] in overlapping tiles, cross-faded: memory = one tile batch + the output. `decode` is exact.

    Each tile sees zero padding instead of its neighbours where the decoder's receptive field (≈ 18 latent px for
    the SD VAE) exceeds the overlap, and normalises with its own GroupNorm statistics.
    tile / overlap: in latent pixels. profile: the seam_blend window ("uniform", "linear", "cosine", "gaussian").
    GroupNorm is per tile, like diffusers' tiling (shared statistics from a first pass were measured no better
    until about as many passes as the decoder has GroupNorms; `decode`'s banded pass is the exact answer).
    tile_batch: tiles decoded together (memory ∝ tile_batch · tile²; one 512² tile of the SD/PixArt VAE
    needs ≈ 0.5 GB, and batching tiles buys little once a tile fills the device). Returns the decoder's dtype.
    """
    if latents.dim() != 4:
        raise ValueError(f"tiled_decode: latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    if tile_batch < 1:
        raise ValueError(f"tiled_decode: tile_batch must be >= 1, got {tile_batch}")
    B, _, h, w = latents.shape
    f = vae_scale_factor(vae)
    grid = TileGrid(h, w, tile=tile, overlap=min(overlap, max(min(tile, h, w) - 1, 0)), batch=B, patch=1)

    def decode_batch(batch: list[tuple[int, int]]) -> torch.Tensor:
        z = torch.cat([latents[:, :, grid.origins_y[iy]:grid.origins_y[iy] + grid.th,
                               grid.origins_x[ix]:grid.origins_x[ix] + grid.tw] for iy, ix in batch])
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)  # [len(batch)·B, 3, f·th, f·tw], tile-major

    # Pixel-space window, separable: w = wy ⊗ wx (up to scale, which the normalisation cancels).
    wpix = TileGrid(f * h, f * w, tile=(f * grid.th, f * grid.tw), overlap=f * grid.overlap, patch=1) \
        .blend_weights(profile).to(latents.device)
    wy, wx = wpix.sum(1), wpix.sum(0)
    if not torch.allclose(torch.outer(wy, wx) / wpix.sum(), wpix, rtol=1e-4, atol=1e-7):
        raise ValueError(f"tiled_decode: profile {profile!r} is not separable")
    wx_2d = wx[None, :].expand(f * grid.th, -1).contiguous()
    ox = torch.tensor([f * o for o in grid.origins_x], dtype=torch.int32, device=latents.device)
    oy0 = torch.zeros(1, dtype=torch.int32, device=latents.device)

    with torch.no_grad():
        H, W = f * h, f * w
        out = torch.zeros(B, vae.config.out_channels, H, W, dtype=torch.float32, device=latents.device)
        wsum = torch.zeros(H, 1, dtype=torch.float32, device=latents.device)
        rows = range(grid.ny)
        if progress:
            rows = tqdm(rows, desc="VAE decode (tile rows)")
        for iy in rows:
            row = [(iy, ix) for ix in range(grid.nx)]
            dec = torch.cat([decode_batch(row[i:i + tile_batch]) for i in range(0, grid.nx, tile_batch)])
            # tile-major [nx·B, 3, ph, pw] -> seam_blend's (b, ix) order
            dec = dec.reshape(grid.nx, B, *dec.shape[1:]).transpose(0, 1).reshape(B * grid.nx, *dec.shape[1:])
            strip = ops.seam_blend(dec, oy0, ox, wx_2d.to(torch.float32), B, f * grid.th, W)
            y0 = f * grid.origins_y[iy]
            out[:, :, y0:y0 + f * grid.th] += strip.float() * wy[None, None, :, None]
            wsum[y0:y0 + f * grid.th] += wy[:, None]
    out /= wsum
    return out.to(dec.dtype)
