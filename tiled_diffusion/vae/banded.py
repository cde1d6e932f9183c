"""VAE decode and encode of canvases of any size: exact canvas-wide GroupNorm, bounded working memory.

Two methods, chosen by memory (`decode` / `encode`; `estimate_decode_bytes` is the rule's plain-decode term):

1. **Plain** (`vae.decode` / `vae.encode`) whenever its estimated peak fits the budget (`max_memory_gb`, else the
   device's free memory). A canvas that fits in one tile is always decoded plain, so it is bitwise the plain decode.

2. **Banded, exact** (`banded_decode` / `banded_encode`): the network runs layer by layer over the whole canvas,
   and every layer is applied one band of rows at a time. The canvas-sized activations live in a *store* (the
   device, or CPU memory when the device is too small); only a band and its halo are on the compute device.
   * GroupNorm is exact: each layer that feeds a GroupNorm accumulates, while it writes its bands, per-image and
     per-group mean and M2 of the band (fp32 `var_mean`), combined across bands in fp64 with Chan's parallel
     formula (count-weighted means plus the spread of the band means, not a mean of variances). The
     normalisation is then one fused scale/shift per (image, channel) applied to each band in fp32.
   * Convolutions are exact: a band reads its 3x3 halo (1 row each side; 2 for a stride-2 downsample) from the
     stored input, the canvas's own zero padding applies at the canvas border only. Bands span the full width,
     so there is no column halo. Overhead: 2 halo rows per band per convolution (3 % at 64-row bands).
   * The mid-block self-attention is exact and global: q, k, v of every latent token are stored (3 tensors at the
     latent resolution, small), and the attention runs one query band at a time against all keys.
   So the banded result equals the plain one up to floating-point order (tests: relative RMS ≈ 1e-6 in fp32).
   Memory: the largest stored step holds 2 canvas activations (a resnet's input and its conv1 output, or an
   upsampler's input and output) — for the SD VAE at 1024² (bf16) 0.27 GB + 0.27 GB, at 8192² 17 GB + 17 GB — plus
   one band's working set, which the band height bounds.

3. **Approximate, bounded** (`tiled_decode`, kept for its callers): overlapping tiles decoded independently and
   cross-faded with `seam_blend`; memory = one tile + the output. GroupNorm is per tile (as diffusers'
   `enable_tiling`).
   `decode` falls back to it only when even the banded store does not fit the budget.

Over N processes (`parallel.vae.decode`, which hands `banded_decode` a row partition; a generation over ranks and
torchrun generate use it): rank r runs the banded decode on its share of the latent rows only — its store holds that share plus HALO
rows each side, refreshed from the two neighbour ranks (point to point) after every pass; the GroupNorm moments of
each pass are combined across ranks exactly (Chan's formula over (count, mean, M2), the same result on every rank);
the mid-block attention all-gathers K and V (it is global; latent resolution); the output rows are gathered on
rank 0. Result: the one-process decode up to fp order (tests/parallel/test_distributed.py), store memory ∝ 1/N.

Why not A1111's tile queue: it pauses every tile at every GroupNorm and keeps all tiles (with 11 latent px of
padding, so more than the canvas) paused in memory: the same canvas-sized store, plus the padding's extra compute,
and its convolutions are not exact beyond the padding. Bands with a 1-row halo per convolution are the limit of
that scheme with the padding recomputed per layer instead of per network.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .moments import GroupStats, group_stats, normed
from .overlap import tiled_decode
from .plan import plan_method
from .steps import (channels_last_weights, check_input, decoder_steps, encoder_steps, fast_layout, input_norm,
                    vae_scale_factor)
# Re-exported: this module's names before the split (parallel/vae.py and parallel/comm.py import them from here)
from .moments import band_moments, merge_moments, var_mean_moments  # noqa: F401
from .plan import (CPU_BAND_ROWS, _free_bytes, band_rows, estimate_banded_bytes, estimate_decode_bytes,  # noqa: F401
                   estimate_vae_bytes)

log = logging.getLogger("tiled_diffusion")

# ----------------------------------------------------------------------------- the banded runner

HALO = 2  # rows of margin each rank's store keeps above and below its share (a stride-2 downsample reads 2)


class Act:
    """A canvas activation [B, C, H, W] of which this process holds the canvas rows [a, a + t.shape[-2]) in t
    (one process: all of them; a rank of a distributed decode: its share plus HALO rows each side)."""

    __slots__ = ("t", "H", "a")

    def __init__(self, t: torch.Tensor, H: int, a: int = 0) -> None:
        self.t, self.H, self.a = t, H, a

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        return self.t[:, :, y0 - self.a:y1 - self.a]


class _Runner:
    """Runs steps over a canvas stored on `store`, computing bands of `rows` latent rows on `device`; with a
    `part`, only this rank's share of every canvas."""

    def __init__(self, rows: int, lat_h: int, device: torch.device, store: torch.device, pbar,
                 part=None) -> None:
        self.rows, self.lat_h, self.device, self.store, self.pbar = rows, lat_h, device, store, pbar
        self.part = part

    def own(self, H: int) -> tuple[int, int]:
        return (0, H) if self.part is None else self.part.own(H)

    def bands(self, H: int) -> Iterator[tuple[int, int]]:
        r = max(1, self.rows * H // self.lat_h)  # the same canvas fraction at every resolution
        if H > self.lat_h and r % 2:
            r += 1  # even above the latent resolution, so a x2 step maps band edges to integers
        lo, hi = self.own(H)
        for y0 in range(lo, hi, r):
            yield y0, min(hi, y0 + r)
        if self.pbar is not None:
            self.pbar.update(1)

    def crop(self, x: Act, y0: int, y1: int, halo: int) -> tuple[torch.Tensor, int]:
        a = max(0, y0 - halo)
        return x.rows(a, min(x.H, y1 + halo)).to(self.device, non_blocking=True), a

    def empty(self, like: Act, C: int, H: int, W: int) -> Act:
        # channels-last: a band of rows is then one contiguous block (no copy before the conv or the norms), and
        # the convolutions are faster in it (CPU, oneDNN: 1.7x bf16, 1.36x fp32 on a 256-channel 3x3 conv)
        a, b = (0, H) if self.part is None else self.part.held(H)
        return Act(torch.empty(like.t.shape[0], C, b - a, W, dtype=like.t.dtype, device=self.store,
                                memory_format=torch.channels_last), H, a)

    def put(self, out: Act, y0: int, t: torch.Tensor, stats: Optional[GroupStats]) -> None:
        if stats is not None:
            stats.add(t)
        out.rows(y0, y0 + t.shape[-2]).copy_(t)

    def finish(self, st: Optional[GroupStats]) -> None:
        """The statistics of a completed canvas pass become the GroupNorm's arguments (across ranks: combined)."""
        if st is not None:
            if self.part is not None:
                self.part.combine(st)
            st.args = st.norm_args()

    def shared(self, x: Act) -> Act:
        """After a pass: the margin rows from the neighbour ranks (nothing to do in one process)."""
        if self.part is not None:
            self.part.exchange(x)
        return x

    # --- steps: each takes the stored input and the GroupStats of its input GroupNorm (None for conv/up/down) and
    # returns the stored output with the GroupStats of the next step's GroupNorm (nxt)

    def conv(self, conv: nn.Conv2d, x, norm, nxt):
        p = conv.kernel_size[0] // 2
        out, st = self.empty(x, conv.out_channels, x.H, x.t.shape[-1]), group_stats(nxt)
        for y0, y1 in self.bands(x.H):
            c, a = self.crop(x, y0, y1, p)
            self.put(out, y0, conv(c)[:, :, y0 - a:y1 - a], st)
        return out, st

    def res(self, m, x, norm, nxt):
        H, W = x.H, x.t.shape[-1]
        h, st2 = self.empty(x, m.conv1.out_channels, H, W), GroupStats(m.norm2)
        for y0, y1 in self.bands(H):
            c, a = self.crop(x, y0, y1, 1)
            self.put(h, y0, m.conv1(m.nonlinearity(normed(c, norm)))[:, :, y0 - a:y1 - a], st2)
        self.finish(st2)
        self.shared(h)
        # The output overwrites x in place (its first C_out channels when the shortcut narrows them): the second
        # pass reads x only at its own rows, before it writes them.
        Co, xt = m.conv2.out_channels, x.t
        if Co == xt.shape[1]:
            out = x
        elif Co < xt.shape[1] and xt.shape[0] == 1 and xt.is_contiguous(memory_format=torch.channels_last):
            # a compact [1, Co, rows, W] channels-last tensor over x's memory: band rows [y0, y1) of it lie within
            # x's rows < y1, which every band up to this one has already read
            L = xt.shape[-2]
            out = Act(torch.empty(0, dtype=xt.dtype, device=xt.device).set_(
                xt.untyped_storage(), xt.storage_offset(), (1, Co, L, W), (Co * L * W, 1, W * Co, Co)), H, x.a)
        else:
            out = self.empty(x, Co, H, W)
        st = group_stats(nxt)
        for y0, y1 in self.bands(H):
            c, a = self.crop(h, y0, y1, 1)
            t = m.conv2(m.dropout(m.nonlinearity(normed(c, st2))))[:, :, y0 - a:y1 - a]
            s = x.rows(y0, y1).to(self.device)
            if m.conv_shortcut is not None:
                s = m.conv_shortcut(s.contiguous())
            self.put(out, y0, (s + t) / m.output_scale_factor, st)
        return out, st

    def attn(self, m, x, norm, nxt):
        """Global self-attention over every token of the canvas (AttnProcessor2_0's math), one query band a time."""
        B, C, W = x.t.shape[0], x.t.shape[1], x.t.shape[-1]
        H = x.H
        lo, hi = self.own(H)
        qkv = [torch.empty(B, (hi - lo) * W, lin.out_features, dtype=x.t.dtype, device=self.store)
               for lin in (m.to_q, m.to_k, m.to_v)]
        for y0, y1 in self.bands(H):
            tok = normed(x.rows(y0, y1).to(self.device), norm).flatten(2).transpose(1, 2)
            for buf, lin in zip(qkv, (m.to_q, m.to_k, m.to_v)):
                buf[:, (y0 - lo) * W:(y1 - lo) * W].copy_(lin(tok))
        if self.part is not None:  # every query attends to every key of the canvas
            qkv[1:] = [self.part.all_rows(t, H, W) for t in qkv[1:]]
        heads = m.heads
        d = qkv[1].shape[-1] // heads
        k, v = (t.to(self.device).view(B, H * W, heads, d).transpose(1, 2) for t in qkv[1:])
        st = group_stats(nxt)
        for y0, y1 in self.bands(H):
            q = qkv[0][:, (y0 - lo) * W:(y1 - lo) * W].to(self.device).view(B, -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, heads * d).to(q.dtype)
            o = m.to_out[1](m.to_out[0](o)).transpose(-1, -2).reshape(B, C, y1 - y0, W)
            self.put(x, y0, (o + x.rows(y0, y1).to(self.device)) / m.rescale_output_factor, st)
        return x, st

    def up(self, m, x, norm, nxt):
        H, W = x.H, x.t.shape[-1]
        out, st = self.empty(x, m.conv.out_channels, 2 * H, 2 * W), group_stats(nxt)
        for y0, y1 in self.bands(2 * H):
            c, a = self.crop(x, y0 // 2, (y1 + 1) // 2, 1)
            self.put(out, y0, m(c)[:, :, y0 - 2 * a:y1 - 2 * a], st)
        return out, st

    def down(self, m, x, norm, nxt):
        H, W = x.H, x.t.shape[-1]
        # output rows [y0, y1) read input rows [2·y0 - 1, 2·y1 + 1); a halo of 2 keeps the crop start even. The
        # module's own padding lands on the crop's edges: at the canvas border it is the real one, inside the canvas
        # it only touches the outermost output row of the crop, which the halo cuts away.
        p = m.conv.padding[0]
        Ho = (H + 2 * p + (1 if m.padding == 0 else 0) - 3) // 2 + 1
        Wo = (W + 2 * p + (1 if m.padding == 0 else 0) - 3) // 2 + 1
        out, st = self.empty(x, m.conv.out_channels, Ho, Wo), group_stats(nxt)
        for y0, y1 in self.bands(Ho):
            c, a = self.crop(x, 2 * y0, 2 * y1, 2)
            self.put(out, y0, m(c)[:, :, y0 - a // 2:y1 - a // 2], st)
        return out, st

    def out(self, m, x, norm, nxt):
        conv = m.conv_out
        p = conv.kernel_size[0] // 2
        a, b = self.own(x.H)  # the network's output: this process's own rows only
        out = Act(torch.empty(x.t.shape[0], conv.out_channels, b - a, x.t.shape[-1], dtype=x.t.dtype,
                               device=self.store), x.H, a)
        for y0, y1 in self.bands(x.H):
            c, a = self.crop(x, y0, y1, p)
            self.put(out, y0, conv(m.conv_act(normed(c, norm)))[:, :, y0 - a:y1 - a], None)
        return out, None

    def run(self, steps, x: Act) -> Act:
        st = None
        for i, (kind, m) in enumerate(steps):
            nxt = input_norm(steps[i + 1]) if i + 1 < len(steps) else None
            self.finish(st)
            x, st = getattr(self, kind)(m, x, st, nxt)
            if i + 1 < len(steps):
                self.shared(x)
        return x


def _progress(progress: bool, steps, desc: str):
    if not progress:
        return contextlib.nullcontext(None)
    # one tick per band pass over the canvas (a resnet is 2 passes, attention 2, the others 1)
    total = sum({"res": 2, "attn": 2}.get(k, 1) for k, _ in steps)
    return tqdm(total=total, desc=desc, unit="pass")


@torch.no_grad()
def banded_decode(vae, latents: torch.Tensor, *, tile: int = 64, store: Optional[torch.device] = None,
                  progress: bool = False, part=None) -> Optional[torch.Tensor]:
    """Exact decode of latents [B, C_lat, h, w] (already divided by the scaling factor) to [B, 3, f·h, f·w].

    tile: latent rows per band (every resolution's band covers the same canvas rows). store: where the canvas
    activations live (default: the latents' device). Returns the decoder's dtype, on the latents' device.
    part: a partition of the latent rows over several processes (`parallel.vae.RowPartition`: own / held rows, the
    halo exchange, the moments' combination, the K/V all-gather, the gather on rank 0): this process decodes its
    share only and returns the image on rank 0 (None elsewhere), the one-process decode up to floating-point order.
    """
    check_input(latents, "latents")
    steps = decoder_steps(vae.decoder)
    dev = latents.device
    z = latents.to(next(vae.decoder.parameters()).dtype)
    a, b = (0, z.shape[-2]) if part is None else part.held(z.shape[-2])
    z = z[:, :, a:b]
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)  # 1x1 at the latent resolution: the whole share at once is small
    with _progress(progress, steps, "VAE decode (banded)") as pbar, channels_last_weights(vae.decoder):
        run = _Runner(tile, latents.shape[-2], dev, store or dev, pbar, part)
        out = run.run(steps, Act(fast_layout(z.to(run.store)), latents.shape[-2], a))
        if part is None:
            return out.t.to(dev)
        img = part.to_main(out)
        return None if img is None else img.to(dev)


@torch.no_grad()
def banded_encode_moments(vae, images: torch.Tensor, *, tile: int = 64, store: Optional[torch.device] = None,
                          progress: bool = False) -> torch.Tensor:
    """Exact encoder (+ quant_conv) of images [B, 3, H, W] in [-1, 1]: the moments [B, 2·C_lat, H/f, W/f].

    tile: latent rows per band, as in banded_decode."""
    check_input(images, "images")
    steps = encoder_steps(vae.encoder)
    dev = images.device
    f = vae_scale_factor(vae)
    with _progress(progress, steps, "VAE encode (banded)") as pbar, channels_last_weights(vae.encoder):
        run = _Runner(tile, max(1, images.shape[-2] // f), dev, store or dev, pbar)
        x = fast_layout(images.to(next(vae.encoder.parameters()).dtype).to(run.store))
        m = run.run(steps, Act(x, x.shape[-2])).t.to(dev)
    return vae.quant_conv(m) if vae.quant_conv is not None else m


def decode(vae, latents: torch.Tensor, *, max_memory_gb: Optional[float] = None, tile: Optional[int] = None,
           progress: bool = True) -> Optional[torch.Tensor]:
    """Decode latents [B, C_lat, h, w] (already divided by vae.config.scaling_factor) to images [B, 3, f·h, f·w] in
    [-1, 1], in the decoder's dtype, exactly (up to floating-point order) like `vae.decode`.

    Plain when the plain decode fits `max_memory_gb` (default: the device's free memory) or `tile` >= h; else banded
    with the tallest bands that fit (or `tile` latent rows); if even the banded store does not fit, the approximate
    overlap-tiled decode (per-tile GroupNorm, logged as a warning). Over several processes: `parallel.vae.decode`."""
    check_input(latents, "latents")
    plan = plan_method(vae, latents, encode=False, max_memory_gb=max_memory_gb, tile=tile)
    log.debug("vae.decode %s: %s", tuple(latents.shape), plan)
    with torch.no_grad():
        if plan["method"] == "plain":  # the class's decode: after accelerate, pipe.vae.decode is this function
            with channels_last_weights(vae):
                img = type(vae).decode(vae, fast_layout(latents.to(vae.dtype)), return_dict=False)[0]
            return img.contiguous()
        if plan["method"] == "banded":
            return banded_decode(vae, latents, tile=plan["tile"], store=plan["store"], progress=progress)
    log.warning("vae.decode: the exact banded decode does not fit %s; decoding in overlapping tiles with per-tile "
                "GroupNorm (approximate)", f"{max_memory_gb} GB" if max_memory_gb else "the free memory")
    return tiled_decode(vae, latents.to(vae.dtype), progress=progress)


def encode(vae, images: torch.Tensor, *, max_memory_gb: Optional[float] = None, tile: Optional[int] = None,
           progress: bool = True, generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """Encode images [B, 3, H, W] in [-1, 1] to latents [B, C_lat, H/f, W/f] (not yet multiplied by the scaling
    factor): a sample of the posterior (`sample=True`, drawn from `generator` exactly as
    `vae.encode(x).latent_dist.sample(generator)` does) or its mean. Plain or banded by the rule of `decode`."""
    check_input(images, "images")
    plan = plan_method(vae, images, encode=True, max_memory_gb=max_memory_gb, tile=tile)
    log.debug("vae.encode %s: %s", tuple(images.shape), plan)
    with torch.no_grad():
        if plan["method"] == "plain":
            with channels_last_weights(vae):  # the class's encode, as in decode
                dist = type(vae).encode(vae, fast_layout(images.to(vae.dtype))).latent_dist
        elif plan["method"] == "banded":
            dist = DiagonalGaussianDistribution(
                banded_encode_moments(vae, images, tile=plan["tile"], store=plan["store"], progress=progress))
        else:
            raise MemoryError(f"vae.encode: {tuple(images.shape)} does not fit "
                              f"{max_memory_gb if max_memory_gb else 'the free memory'} GB even banded")
        return dist.sample(generator) if sample else dist.mean
