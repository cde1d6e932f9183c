"""CrossTileAttnProcessor: a diffusers attention processor whose self-attention is `window_attention`.

The sampler sets a `TileContext` (shared by every processor of one transformer and by its CanvasPatchEmbed)
before each forward. In cross_tile mode the patch embedding has already permuted the canvas tokens to
tile-major order, so inside the processor the sequence [B, N, C] is viewed (no copy) as [B*T, L, C] tiles, and
each tile attends to the keys of its neighbour tiles (TileGrid.neighbours). With no grid set the processor is
AttnProcessor2_0, exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from . import ops


class TileContext:
    """What one forward of the transformer needs to know about the canvas. Set by the sampler.

    canvas_tokens: (Ht, Wt) canvas size in tokens, or None (untouched diffusers behaviour).
    offsets: int64 [n, 2] token offsets (top, left) of each input tile on the canvas (multidiffusion), or None.
    grid: token-level TileGrid (cross_tile) or None; radius: neighbour radius in tiles.
    positional: one of positional.MODES. head_chunk: heads per window_attention call (bounds peak memory).
    """

    def __init__(self, positional: str = "canvas_stretched", radius: int = 1, head_chunk: Optional[int] = None):
        self.positional = positional
        self.radius = radius
        self.head_chunk = head_chunk
        self.canvas_tokens: Optional[tuple[int, int]] = None
        self.offsets: Optional[torch.Tensor] = None
        self.grid = None
        self._nb_cache: dict = {}

    def clear(self) -> None:
        self.canvas_tokens, self.offsets, self.grid = None, None, None

    def set_grid(self, grid) -> None:
        if grid is not self.grid:
            self._nb_cache.clear()
        self.grid = grid

    # Token order: [B, N, C] raster <-> [B, N, C] tile-major (tiles contiguous, each tile raster inside). The
    # grid is built for batch 1 and its permutation is batch-agnostic, so CFG / batched images reuse it.
    def to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.grid.permutation(x.device))

    def from_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.grid.inverse_permutation(x.device))

    def neighbours(self, batch: int, device: torch.device) -> torch.Tensor:
        """int32 [batch * T, NB]: the grid's table repeated per batch element (tiles never see other images)."""
        key = (batch, str(device))
        nb = self._nb_cache.get(key)
        if nb is None:
            base = self.grid.neighbours(self.radius, device).to(device=device, dtype=torch.int32)
            T = self.grid.ny * self.grid.nx
            if base.shape[0] != T:
                raise ValueError(f"TileGrid.neighbours gave {base.shape[0]} rows for a {self.grid.ny}x"
                                 f"{self.grid.nx} grid of batch 1")
            parts = [torch.where(base >= 0, base + b * T, base) for b in range(batch)]
            nb = torch.cat(parts).contiguous()
            self._nb_cache[key] = nb
        return nb


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
    """

    def __init__(self, context: TileContext):
        self.context = context
        self._plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctx = self.context
        if (ctx.grid is None or encoder_hidden_states is not None or attention_mask is not None
                or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None):
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        B, N, _ = hidden_states.shape
        L = ctx.grid.tokens_per_tile
        T = N // L
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner = key.shape[-1]
        H = attn.heads
        D = inner // H
        # [B, T*L, H*D] -> [B*T, H, L, D]: tokens are tile-major, so a tile is a contiguous run of L tokens.
        q, k, v = (t.reshape(B * T, L, H, D).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if q.device.type != "cpu":  # the CPU path reads these token-major views as they are (no copy)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = window_attention(q, k, v, ctx.neighbours(B, q.device), ctx.head_chunk)
        out = out.transpose(1, 2).reshape(B, N, inner).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_flops(tokens_q: int, keys_per_query: float, heads: int, head_dim: int) -> float:
    """FLOPs of one attention (QKᵀ and PV): 4 * Nq * Nk * H * D."""
    return 4.0 * tokens_q * keys_per_query * heads * head_dim

