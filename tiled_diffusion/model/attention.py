"""CrossTileAttnProcessor: a diffusers attention processor whose self-attention is `window_attention`.

The canvas forward (canvas.py) sets a `TileContext` (shared by every processor of one transformer and by its
CanvasPatchEmbed) around each inner forward. In cross_tile mode the patch embedding has already permuted the canvas tokens to
tile-major order, so inside the processor the sequence [B, N, C] is viewed (no copy) as [B*T, L, C] tiles, and
each tile attends to the keys of its neighbour tiles (TileGrid.neighbours). With no grid set the processor is
AttnProcessor2_0, exactly.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                  FusedAttnProcessor2_0)

from .. import ops
from .int8 import Int8Linear

# The processors the tiled one stands in for: plain softmax attention, which CrossTileAttnProcessor computes
# windowed over neighbour tiles (and as they do, through them, when no canvas is set).
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)


class TileContext:
    """What one forward of the transformer needs to know about the canvas. Set by the canvas forward
    (canvas.py) around each inner forward, read by the attn1 processors and the CanvasPatchEmbed.

    config: the TiledConfig in force (accelerate's, or a per-call override set by `using`).
    canvas_tokens: (Ht, Wt) canvas size in tokens, or None (untouched diffusers behaviour).
    offsets: int64 [n, 2] token offsets (top, left) of each input tile on the canvas (multidiffusion), or None.
    grid: token-level TileGrid (cross_tile, tile-blocked windows) or None. neighborhood: canvas.Neighborhood
    (cross_tile's token-centred or shifted windows: attn1 is `neighborhood_attention` on raster tokens) or None.
    radius / positional / head_chunk: read from `config`.
    extras: name -> canvas-shaped latent [B, C, h, w] that a caller attaches (e.g. a ControlNet's control latent);
    the canvas forward crops each exactly like the hidden states and exposes the crop of the running inner
    forward as `current_extras[name]`.
    step: the denoising step index the shifted grid follows (`shift`): set by the sampler, or counted from the
    timesteps the forward sees (see `step_for`).
    partition: None on one process; the slot parallel/ plugs a process group's partition into (`parallel.halo.
    enable`): the canvas forward asks it for this rank's band or tile share, and `attend` hands it the band's
    attention (a halo exchange instead of a local gather).
    """

    def __init__(self, config):
        self.config = config
        self.canvas_tokens: Optional[tuple[int, int]] = None
        self.offsets: Optional[torch.Tensor] = None
        self.grid = None
        self.neighborhood = None
        self.extras: dict = {}
        self.current_extras: dict = {}
        self.step: Optional[int] = None
        self._last_t: Optional[float] = None
        self._last_view: Optional[tuple] = None  # (last timestep tensor, (storage address, version, offset))
        self._counted_step = 0
        self._nb_cache: dict = {}
        self.partition = None
        # Device tensors derived from the canvas geometry (positional tables, token grids with their neighbour
        # tables): they belong to this acceleration and go with it (restore drops the context).
        self.cache: dict = {}

    @property
    def positional(self) -> str:
        return self.config.positional

    @property
    def radius(self) -> int:
        return self.config.radius

    @property
    def head_chunk(self) -> Optional[int]:
        return self.config.head_chunk

    @contextlib.contextmanager
    def using(self, config):
        """Run with another TiledConfig (per-call overrides), restoring the accelerate-time one afterwards."""
        old, self.config = self.config, config
        self._nb_cache.clear()
        try:
            yield self
        finally:
            self.config = old
            self._nb_cache.clear()

    def clear(self) -> None:
        self.canvas_tokens, self.offsets, self.grid, self.current_extras = None, None, None, {}
        if self.partition is not None:
            self.partition.current = None
        self.neighborhood = None

    def set_grid(self, grid) -> None:
        if grid is not self.grid:
            self._nb_cache.clear()
        self.grid = grid

    def step_for(self, timestep) -> int:
        """The step index of a forward: `step` when a sampler set it, else counted from the timesteps seen —
        a timestep above the last one starts a new run (step 0), a lower one is the next step, an equal one the
        same step (diffusers' pipelines run one forward per step, CFG halves batched). Only `shift` reads it."""
        if self.step is not None:
            return self.step
        view = None
        if torch.is_tensor(timestep):
            # diffusers' loops pass views of scheduler.timesteps (t = timesteps[i], then t[None] / expand): their
            # place in that tensor orders them like their values (a schedule decreases), read on the host — a
            # CUDA timestep's value would be a device sync per forward. Valid only while that storage is the last
            # forward's (kept alive by the reference held below, so its address is not reused) and unwritten
            # (same version); anything else reads the value.
            view = (timestep.untyped_storage().data_ptr(), timestep._version, timestep.storage_offset())
            last = self._last_view
            if last is not None and view[:2] == last[1][:2]:
                if view[2] > last[1][2]:
                    self._counted_step += 1
                elif view[2] < last[1][2]:
                    self._counted_step = 0
                self._last_view, self._last_t = (timestep, view), None  # value unknown: a value read restarts
                return self._counted_step
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if self._last_t is None or t > self._last_t:
            self._counted_step = 0
        elif t < self._last_t:
            self._counted_step += 1
        self._last_t = t
        self._last_view = (timestep, view) if view is not None else None
        return self._counted_step

    # Token order: [B, N, C] raster <-> [B, N, C] tile-major (tiles contiguous, each tile raster inside). The
    # grid is built for batch 1 and its permutation is batch-agnostic, so CFG / batched images reuse it.
    def to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.grid.permutation(x.device))

    def from_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.grid.inverse_permutation(x.device))

    def neighbours(self, batch: int, device: torch.device) -> torch.Tensor:
        """int32 [batch * T, NB]: the grid's table repeated per batch element (tiles never see other images)."""
        key = (batch, str(device), self.radius)
        nb = self._nb_cache.get(key)
        if nb is None:
            # built and checked on the host, then copied: no device sync for a new table (every step under shift)
            base = self.grid.neighbours(self.radius).to(dtype=torch.int32)
            T = self.grid.ny * self.grid.nx
            if base.shape[0] != T:
                raise ValueError(f"TileGrid.neighbours gave {base.shape[0]} rows for a {self.grid.ny}x"
                                 f"{self.grid.nx} grid of batch 1")
            parts = [torch.where(base >= 0, base + b * T, base) for b in range(batch)]
            if torch.compiler.is_compiling():  # traced as graph ops (a host check would break the graph); the
                nb = torch.cat(parts).to(device)  # op checks the real table once when the graph first runs
            else:
                nb = ops.neighbours_to(torch.cat(parts), batch * T, device)
            self._nb_cache[key] = nb
        return nb

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Windowed self-attention of every tile over its neighbour tiles: q, k, v [B·T, H, L, D] (tile-major,
        B images of T tiles) -> out [B·T, H, L, D]. The one place keys are gathered: replace this method (e.g. with
        a halo exchange between processes) to change where neighbour K/V come from."""
        if self.partition is not None and self.partition.current is not None:
            return self.partition.attend(q, k, v, self.head_chunk)
        T = self.grid.ny * self.grid.nx
        return window_attention(q, k, v, self.neighbours(q.shape[0] // T, q.device), self.head_chunk)


    def token_rows(self) -> int:
        """Token rows of the inner forward's input: the canvas's, or this rank's band's over a process group."""
        band = self.partition.current if self.partition is not None else None
        return band.token_rows if band is not None else self.canvas_tokens[0]

    def attend_neighborhood(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Token-centred windowed self-attention on the canvas: q, k, v [B, H, Ht, Wt, D] (any strides) -> out
        [B, H, Ht, Wt, D], over chunks of `head_chunk` heads (over a process group: the band's rows, its K/V halo
        exchanged)."""
        if self.partition is not None and self.partition.current is not None:
            return self.partition.attend(q, k, v, self.head_chunk)
        hood = self.neighborhood
        H = q.shape[1]
        step = H if not self.head_chunk else max(1, min(H, self.head_chunk))
        outs = [ops.neighborhood_attention(q[:, h0:h0 + step], k[:, h0:h0 + step], v[:, h0:h0 + step],
                                           hood.window, hood.stride, hood.clip, hood.offset)[0]
                for h0 in range(0, H, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def window_attention(q, k, v, neighbours, head_chunk: Optional[int] = None) -> torch.Tensor:
    """ops.window_attention (out only), over chunks of heads to bound memory: q, k, v [T, H, L, D],
    neighbours int32 [T, NB]."""
    H = q.shape[1]
    step = H if not head_chunk else max(1, min(H, head_chunk))
    if step == H:
        return ops.window_attention(q, k, v, neighbours)[0]
    outs = [ops.window_attention(q[:, h0:h0 + step], k[:, h0:h0 + step], v[:, h0:h0 + step], neighbours)[0]
            for h0 in range(0, H, step)]
    return torch.cat(outs, dim=1)


class CrossTileAttnProcessor:
    """Self-attention (attn1) over neighbour tiles of the canvas; AttnProcessor2_0 whenever no grid is set.

    hidden_states [B, N, C] must be in tile-major token order (CanvasPatchEmbed does that once per forward).
    plain: the processor used when no canvas is set (AttnProcessor2_0, or the one it was put in place of: e.g.
    FusedAttnProcessor2_0 after `fuse_qkv_projections`). Fused projections (`attn.to_qkv`) are read as such.
    """

    def __init__(self, context: TileContext, plain=None):
        self.context = context
        self._plain = plain if plain is not None else AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctx = self.context
        if ((ctx.grid is None and ctx.neighborhood is None) or encoder_hidden_states is not None
                or attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None):
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        B, N, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # one GEMM, as FusedAttnProcessor2_0
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        inner = key.shape[-1]
        H = attn.heads
        D = inner // H
        if ctx.neighborhood is not None:  # token-centred windows: raster order, N = Ht·Wt canvas (band) tokens
            Ht, Wt = ctx.token_rows(), ctx.canvas_tokens[1]
            if Ht * Wt != N:
                raise ValueError(f"CrossTileAttnProcessor: {N} tokens for a {Ht}x{Wt}-token canvas")
            # [B, N, H*D] -> [B, H, Ht, Wt, D] views (no copy; the op gathers its query blocks and key bands itself)
            q, k, v = (t.view(B, Ht, Wt, H, D).permute(0, 3, 1, 2, 4) for t in (query, key, value))
        else:  # tile-blocked windows: [B, T*L, H*D] -> [B*T, H, L, D], a tile is a contiguous run of L tokens
            L = ctx.grid.tokens_per_tile
            q, k, v = (t.reshape(B * (N // L), L, H, D).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if ctx.neighborhood is not None:
            out = ctx.attend_neighborhood(q, k, v).permute(0, 2, 3, 1, 4)
        else:
            if q.device.type != "cpu":  # the CPU path reads these token-major views as they are (no copy)
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out = ctx.attend(q, k, v).transpose(1, 2)
        out = out.reshape(B, N, inner).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class TiledProcessors:
    """Mixin of the accelerated transformer class (canvas.canvas_class): diffusers' processor API keeps tiling.

    `set_attn_processor` (and so `set_default_attn_processor`, `fuse_qkv_projections`, `unfuse_qkv_projections`)
    would otherwise replace the tiled self-attention and silently turn the canvas into global O(N²) attention.
    Design: a plain softmax processor (PLAIN_PROCESSORS) asked for an attn1 is taken as "compute attention this
    way": it becomes the tiled processor's no-canvas fallback, so tiling stays and nothing changes numerically for
    a single tile. Any other processor is installed as asked (the user's own attention wins) with a warning that
    the canvas's self-attention is then no longer tiled. `fuse_qkv_projections` also fuses int8 layers (exactly:
    per-channel scales concatenate)."""

    def set_attn_processor(self, processor):
        st = self.__dict__.get("_tiled_diffusion")
        if st is None:  # accelerate / restore in progress: plain diffusers behaviour
            return super().set_attn_processor(processor)
        names = list(self.attn_processors)
        procs = processor if isinstance(processor, dict) else {k: processor for k in names}
        custom = []

        def tiled(name, p):
            if not name.endswith("attn1.processor") or isinstance(p, CrossTileAttnProcessor):
                return p
            if type(p) in PLAIN_PROCESSORS:
                return CrossTileAttnProcessor(st.context, plain=p)
            custom.append(type(p).__name__)
            return p

        procs = {k: tiled(k, v) for k, v in procs.items()}
        if custom:
            warnings.warn(f"tiled_diffusion: {sorted(set(custom))[0]} replaces the tiled self-attention of "
                          f"{len(custom)} block(s): their attention now spans the whole canvas (O(N²) memory and "
                          f"time); set a plain processor (AttnProcessor2_0) or call tiled_diffusion.restore() and "
                          f"accelerate() again to tile it", stacklevel=2)
        return super().set_attn_processor(procs)

    def fuse_qkv_projections(self):
        if self.__dict__.get("_tiled_diffusion") is None:
            return super().fuse_qkv_projections()
        self.original_attn_processors = self.attn_processors
        for m in self.modules():
            if not isinstance(m, Attention):
                continue
            names = ("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v")
            layers = [getattr(m, n) for n in names]
            if any(isinstance(layer, Int8Linear) for layer in layers):  # diffusers' fusion builds int8 nn.Linear
                setattr(m, "to_kv" if m.is_cross_attention else "to_qkv", Int8Linear.concat(layers))
                m.fused_projections = True
            else:
                m.fuse_projections(fuse=True)
        self.set_attn_processor(FusedAttnProcessor2_0())
