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
rank 0. Result: the one-process decode up to fp order (tests/test_distributed.py), store memory ∝ 1/N.

Why not A1111's tile queue: it pauses every tile at every GroupNorm and keeps all tiles (with 11 latent px of
padding, so more than the canvas) paused in memory: the same canvas-sized store, plus the padding's extra compute,
and its convolutions are not exact beyond the padding. Bands with a 1-row halo per convolution are the limit of
that scheme with the padding recomputed per layer instead of per network.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .. import ops
from ..core.tiling import TileGrid

log = logging.getLogger("tiled_diffusion")


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------- the network as a list of steps
#
# A step is (kind, module): "conv" (a plain conv, e.g. conv_in), "res" (ResnetBlock2D), "attn" (the mid-block
# Attention), "up" (Upsample2D), "down" (Downsample2D), "out" (conv_norm_out, conv_act, conv_out). Each step but
# conv/up/down starts with a GroupNorm of its input: the step before it accumulates that GroupNorm's statistics.


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise NotImplementedError(f"vae: banded decode/encode supports the SD/PixArt AutoencoderKL layout; {what}")


def _mid_steps(mid) -> list[tuple[str, nn.Module]]:
    steps = [("res", mid.resnets[0])]
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            steps.append(("attn", attn))
        steps.append(("res", res))
    return steps


def _decoder_steps(dec) -> list[tuple[str, nn.Module]]:
    steps = [("conv", dec.conv_in)] + _mid_steps(dec.mid_block)
    for ub in dec.up_blocks:
        _check(not hasattr(ub, "attentions"), f"up block {type(ub).__name__} has attention")
        steps += [("res", r) for r in ub.resnets]
        steps += [("up", u) for u in (ub.upsamplers or [])]
    steps.append(("out", dec))
    return _validated(steps)


def _encoder_steps(enc) -> list[tuple[str, nn.Module]]:
    steps = [("conv", enc.conv_in)]
    for db in enc.down_blocks:
        _check(not hasattr(db, "attentions"), f"down block {type(db).__name__} has attention")
        steps += [("res", r) for r in db.resnets]
        steps += [("down", d) for d in (db.downsamplers or [])]
    steps += _mid_steps(enc.mid_block)
    steps.append(("out", enc))
    return _validated(steps)


def _validated(steps):
    for kind, m in steps:
        if kind == "res":
            _check(type(m).__name__ == "ResnetBlock2D" and isinstance(m.norm1, nn.GroupNorm)
                   and isinstance(m.norm2, nn.GroupNorm) and m.time_emb_proj is None and m.upsample is None
                   and m.downsample is None, f"unsupported resnet {type(m).__name__}")
            _check(m.conv_shortcut is None or m.conv_shortcut.kernel_size == (1, 1), "3x3 conv_shortcut")
        elif kind == "attn":
            _check(isinstance(m.group_norm, nn.GroupNorm) and m.spatial_norm is None and m.norm_q is None
                   and m.norm_k is None and not m.is_cross_attention and m.residual_connection,
                   "unsupported mid-block attention")
        elif kind == "up":
            _check(type(m).__name__ == "Upsample2D" and m.interpolate and m.use_conv and not m.use_conv_transpose
                   and m.norm is None, "unsupported upsampler")
        elif kind == "down":
            _check(type(m).__name__ == "Downsample2D" and m.use_conv and m.norm is None
                   and m.conv.stride == (2, 2) and m.conv.kernel_size == (3, 3), "unsupported downsampler")
        elif kind == "out":
            _check(isinstance(m.conv_norm_out, nn.GroupNorm), "conv_norm_out is not a GroupNorm (SpatialNorm?)")
        elif kind == "conv":
            _check(m.stride == (1, 1) and m.kernel_size[0] % 2 == 1, "conv_in")
    return steps


def _input_norm(step) -> Optional[nn.GroupNorm]:
    kind, m = step
    return {"res": lambda: m.norm1, "attn": lambda: m.group_norm, "out": lambda: m.conv_norm_out}.get(
        kind, lambda: None)()


# ----------------------------------------------------------------------------- exact canvas GroupNorm statistics


def merge_moments(n_a: int, mean_a: Optional[torch.Tensor], m2_a: Optional[torch.Tensor], n_b: int,
                  mean_b: torch.Tensor, m2_b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise combination of two parts' (count, mean, M2 = Σ(x - mean)²): the M2s plus the spread
    of the two means (never a mean of variances). n_a = 0 (mean_a, m2_a None) is the empty part. The one place this
    formula lives: bands of one canvas (_Stats) and ranks of a distributed one (distributed.combine_moments)."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


def band_moments(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-(image, group) mean and M2 = Σ(x - mean)² of a band [B, C, rows, W] (any layout, float dtype), fp64
    [B, G], and the element count per group.

    On the CPU: aten's group-norm kernel (vectorised, channels-last aware, mixed dtype; 6x faster there than
    torch.var_mean): fp32 weights make it return fp32 moments for bf16/fp16 input, eps = 0 so var = rstd^-2 exactly.
    Elsewhere that op is no option — CUDA's native_group_norm wants contiguous NCHW input and one dtype for input
    and weights (bf16 moments would round the mean to 8 bits), and bands are channels-last slices — so they are a
    Welford var_mean in fp32 over (channels of the group, rows, W), a few groups at a time so the fp32 copy of a
    half-precision band stays at most half the band's own bytes."""
    B, C = t.shape[:2]
    cpg = C // groups
    nb = t[0, 0].numel() * cpg
    if t.device.type == "cpu":
        one = torch.ones(C, dtype=torch.float32, device=t.device)
        _, mean, rstd = torch.ops.aten.native_group_norm(t, one, torch.zeros_like(one), B, C, t[0, 0].numel(),
                                                         groups, 0.0)
        mean = mean.double().view(B, groups)
        return mean, rstd.double().view(B, groups).pow(-2) * nb, nb
    mean, m2 = var_mean_moments(t, groups)
    return mean, m2, nb


def var_mean_moments(t: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """band_moments' path for every device but the CPU (callable on the CPU too, so the CPU tests cover it)."""
    B, C = t.shape[:2]
    cpg = C // groups
    nb = t[0, 0].numel() * cpg
    step = groups if t.dtype == torch.float32 else max(1, groups // 4)
    means, vars_ = [], []
    for g0 in range(0, groups, step):
        x = t[:, g0 * cpg:min(groups, g0 + step) * cpg].float().unflatten(1, (-1, cpg))  # [B, g, cpg, rows, W]
        var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0)
        means.append(mean)
        vars_.append(var)
    return torch.cat(means, 1).double(), torch.cat(vars_, 1).double() * nb


class _Stats:
    """Per-(image, group) mean and M2 of a canvas, accumulated band by band (Chan et al.'s pairwise combination)."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        self.gn = gn
        self.n = 0
        self.mean = self.m2 = None  # fp64 [B, G]

    def add(self, t: torch.Tensor) -> None:
        """t: a band of the canvas [B, C, rows, W]; each canvas position must be added exactly once."""
        mean, m2, nb = band_moments(t, self.gn.num_groups)
        self.n, self.mean, self.m2 = merge_moments(self.n, self.mean, self.m2, nb, mean, m2)

    def norm_args(self) -> tuple[torch.Tensor, ...]:
        """(mean, var, weight, bias) per image and channel, fp32 [B·C]: GroupNorm with these statistics is
        batch_norm in inference form over the B·C channels."""
        gn = self.gn
        B = self.mean.shape[0]
        cpg = gn.num_channels // gn.num_groups
        mean = self.mean.repeat_interleave(cpg, dim=1).flatten().float()
        var = (self.m2 / self.n).repeat_interleave(cpg, dim=1).flatten().float()
        if gn.affine:
            w, b = gn.weight.detach().float().repeat(B), gn.bias.detach().float().repeat(B)
        else:
            w, b = torch.ones_like(mean), torch.zeros_like(mean)
        return mean, var, w, b


def _normed(x: torch.Tensor, stats: _Stats) -> torch.Tensor:
    """GroupNorm of a band with the canvas statistics, computed in fp32 and returned in x's dtype (like the CPU and
    CUDA group_norm kernels): one batch_norm over [1, B·C, rows, W] (2.4x faster than an fp32 addcmul for bf16)."""
    B, C = x.shape[:2]
    args = [a.to(x.device) for a in stats.args]
    y = F.batch_norm(x.reshape(1, B * C, *x.shape[2:]), args[0], args[1], args[2], args[3], False, 0.0,
                     stats.gn.eps)
    return y.view(x.shape)


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

    def put(self, out: Act, y0: int, t: torch.Tensor, stats: Optional[_Stats]) -> None:
        if stats is not None:
            stats.add(t)
        out.rows(y0, y0 + t.shape[-2]).copy_(t)

    def finish(self, st: Optional[_Stats]) -> None:
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

    # --- steps: each takes the stored input and the _Stats of its input GroupNorm (None for conv/up/down) and
    # returns the stored output with the _Stats of the next step's GroupNorm (nxt)

    def conv(self, conv: nn.Conv2d, x, norm, nxt):
        p = conv.kernel_size[0] // 2
        out, st = self.empty(x, conv.out_channels, x.H, x.t.shape[-1]), _stats(nxt)
        for y0, y1 in self.bands(x.H):
            c, a = self.crop(x, y0, y1, p)
            self.put(out, y0, conv(c)[:, :, y0 - a:y1 - a], st)
        return out, st

    def res(self, m, x, norm, nxt):
        H, W = x.H, x.t.shape[-1]
        h, st2 = self.empty(x, m.conv1.out_channels, H, W), _Stats(m.norm2)
        for y0, y1 in self.bands(H):
            c, a = self.crop(x, y0, y1, 1)
            self.put(h, y0, m.conv1(m.nonlinearity(_normed(c, norm)))[:, :, y0 - a:y1 - a], st2)
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
        st = _stats(nxt)
        for y0, y1 in self.bands(H):
            c, a = self.crop(h, y0, y1, 1)
            t = m.conv2(m.dropout(m.nonlinearity(_normed(c, st2))))[:, :, y0 - a:y1 - a]
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
            tok = _normed(x.rows(y0, y1).to(self.device), norm).flatten(2).transpose(1, 2)
            for buf, lin in zip(qkv, (m.to_q, m.to_k, m.to_v)):
                buf[:, (y0 - lo) * W:(y1 - lo) * W].copy_(lin(tok))
        if self.part is not None:  # every query attends to every key of the canvas
            qkv[1:] = [self.part.all_rows(t, H, W) for t in qkv[1:]]
        heads = m.heads
        d = qkv[1].shape[-1] // heads
        k, v = (t.to(self.device).view(B, H * W, heads, d).transpose(1, 2) for t in qkv[1:])
        st = _stats(nxt)
        for y0, y1 in self.bands(H):
            q = qkv[0][:, (y0 - lo) * W:(y1 - lo) * W].to(self.device).view(B, -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, heads * d).to(q.dtype)
            o = m.to_out[1](m.to_out[0](o)).transpose(-1, -2).reshape(B, C, y1 - y0, W)
            self.put(x, y0, (o + x.rows(y0, y1).to(self.device)) / m.rescale_output_factor, st)
        return x, st

    def up(self, m, x, norm, nxt):
        H, W = x.H, x.t.shape[-1]
        out, st = self.empty(x, m.conv.out_channels, 2 * H, 2 * W), _stats(nxt)
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
        out, st = self.empty(x, m.conv.out_channels, Ho, Wo), _stats(nxt)
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
            self.put(out, y0, conv(m.conv_act(_normed(c, norm)))[:, :, y0 - a:y1 - a], None)
        return out, None

    def run(self, steps, x: Act) -> Act:
        st = None
        for i, (kind, m) in enumerate(steps):
            nxt = _input_norm(steps[i + 1]) if i + 1 < len(steps) else None
            self.finish(st)
            x, st = getattr(self, kind)(m, x, st, nxt)
            if i + 1 < len(steps):
                self.shared(x)
        return x


def _stats(gn: Optional[nn.GroupNorm]) -> Optional[_Stats]:
    return _Stats(gn) if gn is not None else None


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
    steps = _decoder_steps(vae.decoder)
    dev = latents.device
    z = latents.to(next(vae.decoder.parameters()).dtype)
    a, b = (0, z.shape[-2]) if part is None else part.held(z.shape[-2])
    z = z[:, :, a:b]
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)  # 1x1 at the latent resolution: the whole share at once is small
    with _progress(progress, steps, "VAE decode (banded)") as pbar, _channels_last_weights(vae.decoder):
        run = _Runner(tile, latents.shape[-2], dev, store or dev, pbar, part)
        out = run.run(steps, Act(_fast_layout(z.to(run.store)), latents.shape[-2], a))
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
    steps = _encoder_steps(vae.encoder)
    dev = images.device
    f = vae_scale_factor(vae)
    with _progress(progress, steps, "VAE encode (banded)") as pbar, _channels_last_weights(vae.encoder):
        run = _Runner(tile, max(1, images.shape[-2] // f), dev, store or dev, pbar)
        x = _fast_layout(images.to(next(vae.encoder.parameters()).dtype).to(run.store))
        m = run.run(steps, Act(x, x.shape[-2])).t.to(dev)
    return vae.quant_conv(m) if vae.quant_conv is not None else m


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """The layout both paths run in: channels-last (every conv, norm and activation after it follows it). Measured
    on the CPU (AMD EPYC Zen 5, oneDNN, 1 thread), a 256-channel 3x3 conv on a 130x512 band: bf16 429 -> 248 ms,
    fp32 709 -> 521 ms."""
    return x.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _channels_last_weights(module: nn.Module) -> Iterator[None]:
    """Conv weights in channels-last for the call (oneDNN otherwise reorders them on every call: 295 -> 248 ms for the
    conv above, bf16); the original tensors are put back afterwards, so the caller's module is unchanged."""
    saved = []
    try:
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and \
                    not m.weight.is_contiguous(memory_format=torch.channels_last):
                saved.append((m, m.weight.data))
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for m, w in saved:
            m.weight.data = w


def check_input(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"vae: {name} must be [B, C, H, W], got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- memory: one rule for plan and estimate


def _shapes(steps, C: int, H: int, W: int) -> Iterator[tuple[str, nn.Module, int, int, int, int, int, int]]:
    """(kind, module, C_in, H_in, W_in, C_out, H_out, W_out) of every step for an input [C, H, W]."""
    for kind, m in steps:
        Ho, Wo = H, W
        if kind == "conv":
            Co = m.out_channels
        elif kind == "res":
            Co = m.conv2.out_channels
        elif kind == "attn":
            Co = C
        elif kind == "up":
            Co, Ho, Wo = m.conv.out_channels, 2 * H, 2 * W
        elif kind == "down":
            Co, Ho, Wo = m.conv.out_channels, (H - 1) // 2 + 1, (W - 1) // 2 + 1
        else:
            Co = m.conv_out.out_channels
        yield kind, m, C, H, W, Co, Ho, Wo
        C, H, W = Co, Ho, Wo


def _plain_elems(kind, m, C, H, W, Co, Ho, Wo) -> int:
    """Live activation elements at the peak of one step of the plain forward (per image). Counted from diffusers'
    code: a resnet keeps its input while norm, activation and conv outputs of the residual branch come and go."""
    i, o = C * H * W, Co * Ho * Wo
    if kind == "res":
        mid = m.conv1.out_channels * H * W
        return max(3 * i, 2 * i + mid, i + 2 * mid, i + mid + o, i + 2 * o)
    if kind == "attn":
        return 6 * i  # input, normed, q, k, v, attention output (CPU and GPU SDPA kernels stream over keys)
    if kind == "up":
        return i + C * Ho * Wo + o  # input, nearest-upsampled copy, conv output
    if kind == "out":
        return 3 * i + o
    return 2 * i + o  # conv_in; down (its padded copy)


def _band_elems(kind, m, C, H, W, Co, Ho, Wo, rows: int, lat_h: int) -> tuple[int, int]:
    """(stored canvas elements, fp32 band working-set elements) of one banded step (per image). The band holds
    about 3 fp32 copies of its widest tensor (the input upcast for the normalisation, its output, the conv output
    upcast for the statistics)."""
    i, o = C * H * W, Co * Ho * Wo
    r = min(Ho, rows * Ho // lat_h + 4)  # band rows of the output + halo, at the output resolution
    r_in = min(H, rows * H // lat_h + 4)
    band = 3 * max(C * r_in * W, Co * r * Wo, (m.conv1.out_channels if kind == "res" else 0) * r * Wo)
    if kind == "res":
        mid = m.conv1.out_channels * H * W
        return i + mid + (o if Co > C else 0), band
    if kind == "attn":
        return i + 3 * m.to_q.out_features * H * W, band + 2 * m.to_q.out_features * H * W
    return i + o, band


def _meta_vae(config):
    """An AutoencoderKL with parameters on the meta device, from its config (a dict or a FrozenDict): shapes only."""
    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(config))


def _estimates(vae, H: int, W: int, *, encode: bool, rows: Optional[int], es: int, batch: int) -> dict:
    if not isinstance(vae, nn.Module):
        vae = _meta_vae(vae)
    f = vae_scale_factor(vae)
    if encode:
        steps, C0, h0, w0, lat_h = _encoder_steps(vae.encoder), vae.config.in_channels, H, W, max(1, H // f)
    else:
        steps, C0, h0, w0, lat_h = _decoder_steps(vae.decoder), vae.config.latent_channels, H // f, W // f, H // f
    plain, store, band = 0, 0, 0
    for sh in _shapes(steps, C0, h0, w0):
        plain = max(plain, _plain_elems(*sh))
        if rows is not None:
            s, b = _band_elems(*sh, rows=rows, lat_h=lat_h)
            store, band = max(store, s), max(band, b)
    io = batch * 3 * H * W * es  # the image (output of decode, input of encode)
    # + one copy of the conv weights (channels-last for the call; oneDNN's reorders). The plain count is scaled by
    # what was measured (allocator and oneDNN scratch): decode peak RSS / count 1.48 at 512² bf16, 1.26 at 1024²
    # and 1.23 at 2048² fp32 -> 1.25; encode 1.64 (plain) and 1.66 (channels-last) at 2048² fp32 -> 1.7.
    weights = sum(p.numel() for p in (vae.encoder if encode else vae.decoder).parameters()) * es
    scale = 1.7 if encode else 1.25
    return {"plain": int(scale * batch * plain * es) + io + weights, "store": batch * store * es + io + weights,
            "band": batch * band * 4}


def estimate_decode_bytes(vae, height: int, width: int, dtype=None, batch: int = 1) -> int:
    """Peak activation bytes of a plain `vae.decode` of a height×width image (weights not counted). `vae`: the
    AutoencoderKL or its config dict (then `dtype` is required).

    `decode` decodes plain exactly when this fits the budget; otherwise the banded decode needs about
    `estimate_banded_bytes` (the run's memory estimate should count min(this, that))."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    return _estimates(vae, height, width, encode=False, rows=None, es=es, batch=batch)["plain"]


def estimate_vae_bytes(vae, height: int, width: int, dtype=None, batch: int = 1, encode: bool = False) -> int:
    """What `decode` (or `encode`) needs at most under its own rule: the plain peak, or the banded store plus bands
    of 64 latent rows if that is smaller (the rule takes shorter bands when memory is short). For the run's estimate."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    e = _estimates(vae, height, width, encode=encode, rows=64, es=es, batch=batch)
    return min(e["plain"], e["store"] + e["band"])


def estimate_banded_bytes(vae, height: int, width: int, dtype=None, *, tile: int = 64, batch: int = 1,
                          encode: bool = False) -> tuple[int, int]:
    """(store, band) peak bytes of the banded decode (or encode) with `tile` latent rows per band: the canvas
    activations held in the store, and one band's working set on the compute device."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    e = _estimates(vae, height, width, encode=encode, rows=tile, es=es, batch=batch)
    return e["store"], e["band"]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        # the driver's free bytes miss what torch's caching allocator holds but no tensor uses (reserved -
        # allocated): after a denoise loop that is gigabytes this process can reuse without asking the driver
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# Banded decode on the CPU: short bands are faster than the tallest that fit (bf16, SD VAE, 1 thread: 16 vs 64 latent
# rows 0.91x the CPU time at 1024², 8 vs 64 rows 0.91x at 2048², with 30% less peak memory; benchmarks/NOTES.md).
CPU_BAND_ROWS = 16


def band_rows(rows: int, device: torch.device) -> int:
    return min(rows, CPU_BAND_ROWS) if device.type == "cpu" else rows


def plan_method(vae, x: torch.Tensor, *, encode: bool, max_memory_gb: Optional[float], tile: Optional[int]) -> dict:
    """Which method and band height: plain if it fits, else the tallest bands whose store + band fit (at most
    CPU_BAND_ROWS on the CPU)."""
    f = vae_scale_factor(vae)
    B = x.shape[0]
    H, W = (x.shape[-2], x.shape[-1]) if encode else (f * x.shape[-2], f * x.shape[-1])
    lat_h = max(1, H // f)
    es = torch.finfo(vae.dtype).bits // 8
    if tile is not None:
        if tile < 1:
            raise ValueError(f"vae: tile must be >= 1 latent rows, got {tile}")
        return {"method": "plain" if tile >= lat_h else "banded", "tile": tile, "store": x.device}
    budget = max_memory_gb * 2**30 if max_memory_gb is not None else _free_bytes(x.device)
    if _estimates(vae, H, W, encode=encode, rows=None, es=es, batch=B)["plain"] <= budget:
        return {"method": "plain", "tile": lat_h, "store": x.device}
    stores = [x.device] + ([torch.device("cpu")] if x.device.type != "cpu" else [])
    # the band's working set is linear in its rows: the tallest band that fits beside the store
    s1, b1 = estimate_banded_bytes(vae, H, W, vae.dtype, tile=1, batch=B, encode=encode)
    _, b2 = estimate_banded_bytes(vae, H, W, vae.dtype, tile=2, batch=B, encode=encode)
    for store in stores:
        # a store on the compute device shares the budget with the band; a CPU store behind a GPU gets host memory
        room = budget - b1 - (s1 if store == x.device else 0)
        if room >= 0 and (store == x.device or s1 <= _free_bytes(store)):
            rows = band_rows(int(min(lat_h - 1, 1 + room // max(1, b2 - b1))), x.device)
            return {"method": "banded", "tile": max(1, rows), "store": store}
    return {"method": "overlap", "tile": None, "store": x.device}


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
            with _channels_last_weights(vae):
                img = type(vae).decode(vae, _fast_layout(latents.to(vae.dtype)), return_dict=False)[0]
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
            with _channels_last_weights(vae):  # the class's encode, as in decode
                dist = type(vae).encode(vae, _fast_layout(images.to(vae.dtype))).latent_dist
        elif plan["method"] == "banded":
            dist = DiagonalGaussianDistribution(
                banded_encode_moments(vae, images, tile=plan["tile"], store=plan["store"], progress=progress))
        else:
            raise MemoryError(f"vae.encode: {tuple(images.shape)} does not fit "
                              f"{max_memory_gb if max_memory_gb else 'the free memory'} GB even banded")
        return dist.sample(generator) if sample else dist.mean


# ----------------------------------------------------------------------------- approximate overlap-tiled decode


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
