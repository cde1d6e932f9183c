"""Tiled VAE decode with GroupNorm statistics shared across tiles, merged with `seam_blend`.

Decoding a large latent in one piece needs activation memory proportional to the canvas (≈ 60 GB at 8192² for
the SD/PixArt VAE), so the latent is cut into overlapping tiles that are decoded one batch at a time. Naive
tiling changes the result in two ways: (1) every GroupNorm normalises with the tile's own statistics, so tiles
with different content get different brightness/contrast and seams appear (diffusers' `enable_tiling` does this);
(2) convolutions near a tile border see zero padding instead of the neighbour. (2) is hidden by overlapping the
tiles and cross-fading them with `seam_blend`; (1) is fixed here by sharing the statistics, as A1111's Tiled VAE
does:

* Each `nn.GroupNorm` of the decoder is temporarily swapped (table-driven, reverted afterwards) for
  `_SharedGroupNorm`, which can *record* the canvas-wide statistics of its input and *apply* fixed statistics.
* A recording pass decodes every tile and accumulates, per image and group, Σx, Σx² and the count over each
  tile's *core* region (the tiles' cores partition the canvas, cutting each overlap in the middle, so each
  canvas position counts once and tile borders, which see padding, mostly do not count).
* The statistics of a deep GroupNorm depend on how every earlier GroupNorm normalised, so exact canvas-wide
  statistics need one pass per GroupNorm layer. We iterate instead: pass 1 records with per-tile normalisation,
  pass k records while applying the statistics of pass k-1 (after k passes the first k layers are exact up to
  border effects), and the final pass decodes with the last statistics and blends. `stats_passes=1` (two decodes)
  already removes most of the tile-to-tile variation; see tests/test_vae.py and benchmarks/NOTES.md for errors.
* Not fixable by tiling: the decoder's mid-block self-attention is global over the canvas; tiled, each tile
  attends only within itself (A1111 and diffusers do the same).

Memory: the output canvas (fp32 accumulator) + one row of decoded tiles + one tile batch's activations.
The merge is separable: each tile row is blended along x with `ops.seam_blend` (weights 1 ⊗ wx), and the rows
are accumulated along y with wy; for a separable window w = wy ⊗ wx this equals the 2-D `seam_blend` of all tiles.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn

from . import ops
from .tiling import TileGrid


class _Session:
    """What the swapped GroupNorms need to know about the tile batch being decoded."""

    def __init__(self) -> None:
        self.record = False
        self.images = 1  # B: images per tile (the decoder batch is tiles × images, tile-major)
        self.tile_hw = (1, 1)  # latent size of every tile
        self.cores: list[tuple[int, int, int, int]] = []  # per tile in the batch: (y0, y1, x0, x1) latent px


class _SharedGroupNorm(nn.Module):
    """Drop-in for nn.GroupNorm on [N, C, *spatial] that records canvas statistics or applies fixed ones."""

    def __init__(self, gn: nn.GroupNorm, session: _Session) -> None:
        super().__init__()
        self.gn = gn
        self.session = session
        self.fixed: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (mean, rstd) fp32 [B, G]
        self._sum = self._sumsq = None
        self._count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.session.record:
            self._record(x)
        if self.fixed is None:
            return self.gn(x)
        return self._apply(x)

    def _spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x as [tiles, B, G, C/G, h, w] and the scale of this feature map w.r.t. the latent."""
        s = self.session
        k = x.shape[0] // s.images
        lh, lw = s.tile_hw
        if x.dim() == 4:
            h, w = x.shape[-2:]
        else:  # attention's GroupNorm sees [N, C, h·w]
            f = math.isqrt(x.shape[-1] // (lh * lw))
            h, w = lh * f, lw * f
        if h % lh or w % lw or h // lh != w // lw:
            raise RuntimeError(f"tiled_decode: feature map {h}x{w} is not an integer scale of the tile {lh}x{lw}")
        G = self.gn.num_groups
        return x.reshape(k, s.images, G, x.shape[1] // G, h, w), h // lh

    def _group_step(self) -> int:
        # fp32 work is done a few groups at a time: a whole-tensor fp32 copy of a 512² tile's 128-channel feature
        # map is 128 MB, and the decoder's own activations at that size are only a few such maps.
        return max(1, self.gn.num_groups // 8)

    def _record(self, x: torch.Tensor) -> None:
        xv, f = self._spatial(x)
        total = torch.zeros(2, xv.shape[1], xv.shape[2], dtype=torch.float64, device=x.device)
        G, step = xv.shape[2], self._group_step()
        for j, (y0, y1, x0, x1) in enumerate(self.session.cores):
            for g in range(0, G, step):
                core = xv[j, :, g:g + step, :, y0 * f:y1 * f, x0 * f:x1 * f].float()
                var, mean = torch.var_mean(core, dim=(2, 3, 4), correction=0)  # accurate per tile, then combined
                n = core[0, 0].numel()
                total[0, :, g:g + step] += mean.double() * n
                total[1, :, g:g + step] += (var.double() + mean.double() ** 2) * n
            self._count += n
        if self._sum is None:
            self._sum, self._sumsq = total[0], total[1]
        else:
            self._sum += total[0]
            self._sumsq += total[1]

    def finish_recording(self) -> None:
        if self._count == 0:
            raise RuntimeError("tiled_decode: a GroupNorm recorded nothing (is it outside the decoder path?)")
        mean = self._sum / self._count
        var = (self._sumsq / self._count - mean**2).clamp_min(0)
        self.fixed = (mean.float(), torch.rsqrt(var + self.gn.eps).float())
        self._sum = self._sumsq = None
        self._count = 0

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        xv, _ = self._spatial(x)
        out = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
        mean, rstd = self.fixed  # [B, G]
        G, cpg, step = xv.shape[2], xv.shape[3], self._group_step()
        for g in range(0, G, step):
            # out of place first: for an fp32 input .float() is x itself, which the resnet still needs
            y = xv[:, :, g:g + step].float() - mean[None, :, g:g + step, None, None, None]
            y.mul_(rstd[None, :, g:g + step, None, None, None])
            if self.gn.affine:
                wb = slice(g * cpg, (g + step) * cpg)
                y.mul_(self.gn.weight[wb].float().reshape(-1, cpg, 1, 1)).add_(
                    self.gn.bias[wb].float().reshape(-1, cpg, 1, 1))
            out[:, :, g:g + step] = y
        return out.reshape(x.shape)


# Module swaps: which module class gets which replacement (Liger-style table, reverted by _swapped).
_SWAPS = {nn.GroupNorm: _SharedGroupNorm}


@contextlib.contextmanager
def _swapped(root: nn.Module, session: _Session) -> Iterator[list[_SharedGroupNorm]]:
    """Swap every module listed in _SWAPS under `root` for its replacement; always revert."""
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, mod in list(root.named_modules()):
            for child_name, child in list(mod.named_children()):
                new_cls = _SWAPS.get(type(child))
                if new_cls is not None:
                    setattr(mod, child_name, new_cls(child, session))
                    done.append((mod, child_name, child))
        yield [getattr(m, n) for m, n, _ in done]
    finally:
        for mod, child_name, child in reversed(done):
            setattr(mod, child_name, child)


def _cores(origins: tuple[int, ...], tile: int, size: int) -> list[tuple[int, int]]:
    """Each tile's share of [0, size): overlaps cut in the middle. Relative to the tile's origin."""
    bounds = [0] + [(origins[i] + origins[i - 1] + tile) // 2 for i in range(1, len(origins))] + [size]
    return [(bounds[i] - o, bounds[i + 1] - o) for i, o in enumerate(origins)]


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiled_decode(vae, latents: torch.Tensor, tile: int = 64, overlap: int = 16, profile: str = "cosine",
                 stats_passes: int = 1, tile_batch: int = 1, progress: bool = False) -> torch.Tensor:
    """Decode latents [B, C_lat, h, w] (already divided by the VAE's scaling factor) to images [B, 3, f·h, f·w].

    tile / overlap: in latent pixels. profile: the seam_blend window ("uniform", "linear", "cosine", "gaussian").
    stats_passes: recording passes for the shared GroupNorm statistics (0 = per-tile GroupNorm, like diffusers'
    tiling). tile_batch: tiles decoded together (memory ∝ tile_batch · tile²; one 512² tile of the SD/PixArt VAE
    needs ≈ 0.5 GB, and batching tiles buys little once a tile fills the device). Returns the decoder's dtype.
    """
    if latents.dim() != 4:
        raise ValueError(f"tiled_decode: latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    if stats_passes < 0 or tile_batch < 1:
        raise ValueError(f"tiled_decode: stats_passes must be >= 0 and tile_batch >= 1, got {stats_passes}, "
                         f"{tile_batch}")
    B, _, h, w = latents.shape
    f = vae_scale_factor(vae)
    grid = TileGrid(h, w, tile=tile, overlap=min(overlap, max(min(tile, h, w) - 1, 0)), batch=B, patch=1)
    cores_y = _cores(grid.origins_y, grid.th, h)
    cores_x = _cores(grid.origins_x, grid.tw, w)
    tiles = [(iy, ix) for iy in range(grid.ny) for ix in range(grid.nx)]

    session = _Session()
    session.images, session.tile_hw = B, (grid.th, grid.tw)

    def decode_batch(batch: list[tuple[int, int]]) -> torch.Tensor:
        session.cores = [cores_y[iy] + cores_x[ix] for iy, ix in batch]
        z = torch.cat([latents[:, :, grid.origins_y[iy]:grid.origins_y[iy] + grid.th,
                               grid.origins_x[ix]:grid.origins_x[ix] + grid.tw] for iy, ix in batch])
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)  # [len(batch)·B, 3, f·th, f·tw], tile-major

    def batches(items, desc):
        chunks = [items[i:i + tile_batch] for i in range(0, len(items), tile_batch)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=desc)
        return chunks

    # Pixel-space window, separable: w = wy ⊗ wx (up to scale, which the normalisation cancels).
    wpix = TileGrid(f * h, f * w, tile=(f * grid.th, f * grid.tw), overlap=f * grid.overlap, patch=1) \
        .blend_weights(profile).to(latents.device)
    wy, wx = wpix.sum(1), wpix.sum(0)
    if not torch.allclose(torch.outer(wy, wx) / wpix.sum(), wpix, rtol=1e-4, atol=1e-7):
        raise ValueError(f"tiled_decode: profile {profile!r} is not separable")
    wx_2d = wx[None, :].expand(f * grid.th, -1).contiguous()
    ox = torch.tensor([f * o for o in grid.origins_x], dtype=torch.int32, device=latents.device)
    oy0 = torch.zeros(1, dtype=torch.int32, device=latents.device)

    with torch.no_grad(), _swapped(vae.decoder, session) as norms:
        for p in range(stats_passes):
            session.record = True
            for batch in batches(tiles, f"VAE stats pass {p + 1}/{stats_passes}"):
                decode_batch(batch)
            session.record = False
            for n in norms:
                n.finish_recording()

        H, W = f * h, f * w
        out = torch.zeros(B, vae.config.out_channels, H, W, dtype=torch.float32, device=latents.device)
        wsum = torch.zeros(H, 1, dtype=torch.float32, device=latents.device)
        rows = range(grid.ny)
        if progress:
            from tqdm.auto import tqdm

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
