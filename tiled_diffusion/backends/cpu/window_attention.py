"""CPU path of `window_attention`: torch's fused CPU flash attention over gathered neighbour K/V.

Layouts as the op: q, k, v [T, H, L, D]; neighbours int32 [T, NB] (-1 empty); bias fp32 [T, NB] or None.
Returns out [T, H, L, D] (q's dtype), lse [T, H, L] fp32 (natural log).

How:
* Slots that are empty (-1) or excluded (bias -inf) are dropped up front, and tiles are grouped by how many
  valid slots they keep (interior tiles 9, edges 6, corners 4 at radius 1), so no key is ever masked out and
  no FLOP is spent on a border pad. Tiles with no valid slot get out 0, lse -inf directly.
* Each group gathers its key tiles into [Tg, H, c*L, D] and calls
  `aten._scaled_dot_product_flash_attention_for_cpu`, which returns the logsumexp beside the output (public
  SDPA does not on CPU), so lse costs nothing extra. An additive attn_mask [Tg, 1, 1, c*L] carries the
  per-slot bias only for groups where some bias is non-zero.
* K and V are first transposed once to [H, T, L, D] so that one `index_select` along T yields the gathered
  keys contiguous per head ([H, Tg*c*L, D]); the kernel takes the [Tg, H, c*L, D] view through its strides.
  That is 1 + c copies of K instead of the 2c of gather-then-permute. The gather is memory traffic of about
  c·L·H·D·4 bytes per tile against 4·L·c·L·H·D FLOPs, i.e. ≈1/L of the work: negligible at L ≥ 256.
* Groups are processed in chunks of tiles so the gathered K/V stay below `max_gather_bytes`.
* When every tile sees every tile exactly once (small canvases: 2×2 tiles at radius 1) and there is no bias,
  window attention IS global attention over the canvas (key order does not matter): one flash call on the
  [1, H, T·L, D] views, no gather (copies q, k, v, out once instead of K and V T times).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

MAX_GATHER_BYTES = 128 << 20


def _flash_cpu(q, k, v, mask, scale):
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    except (RuntimeError, AttributeError):  # pragma: no cover - older/newer torch without this private op
        return _explicit(q, k, v, mask, scale)


def _explicit(q, k, v, mask, scale):
    """Fallback: SDPA for the output and an explicit fp32 logsumexp (one extra QKᵀ)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    return out, torch.logsumexp(s, dim=-1)


def _sees_every_tile_once(nb: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether each tile's valid slots hold every tile index exactly once (then the op is global attention)."""
    T = nb.shape[0]
    if T == 0 or not bool((counts == T).all()):
        return False
    keys = torch.where(valid, nb, T).sort(dim=1).values[:, :T]
    return bool((keys == torch.arange(T)).all())


def window_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, neighbours: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         max_gather_bytes: int = MAX_GATHER_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs are assumed checked (ops.check_window_attention)."""
    T, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = q.new_empty((T, H, L, D))
    lse = torch.full((T, H, L), -math.inf, dtype=torch.float32, device=q.device)
    if T == 0 or H == 0 or L == 0:
        return out, lse

    nb = neighbours.long()
    valid = nb >= 0
    if bias is not None:
        valid &= bias > -math.inf
    counts = valid.sum(dim=1)
    if _sees_every_tile_once(nb, valid, counts) and (bias is None or not bool(bias[valid].any())):
        seq = lambda x: x.transpose(0, 1).reshape(1, H, T * L, D)  # noqa: E731  [H, T*L, D] as one sequence
        o, l = _flash_cpu(seq(q), seq(k), seq(v), None, scale)
        out.copy_(o.view(H, T, L, D).transpose(0, 1))
        lse.copy_(l.float().view(H, T, L).transpose(0, 1))
        return out, lse
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        out.index_fill_(0, empty, 0)  # no valid key: out 0, lse -inf (already)
    # Stable sort puts each row's valid slots first, keeping their order (the order does not change the result).
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    nb_c = torch.gather(nb, 1, order)
    bias_c = None if bias is None else torch.gather(bias.float(), 1, order)

    kh = k.transpose(0, 1).contiguous()  # [H, T, L, D]; one copy also from token-major views
    vh = v.transpose(0, 1).contiguous()
    qc = q.contiguous()
    per_tile_bytes = 2 * H * L * D * k.element_size()  # K + V of one key tile
    kbuf = vbuf = None  # gather buffers reused by every chunk: fresh pages cost more here than the copy

    for c in torch.unique(counts).tolist():
        if c == 0:
            continue  # no valid key: out 0, lse -inf (already)
        tiles = torch.nonzero(counts == c).flatten()
        chunk = max(1, max_gather_bytes // (per_tile_bytes * c))
        for s0 in range(0, tiles.numel(), chunk):
            tq = tiles[s0:s0 + chunk]
            tg = tq.numel()
            keys = nb_c[tq, :c]  # [tg, c]
            flat = keys.reshape(-1)
            n = tg * c * L * H * D
            if kbuf is None or kbuf.numel() < n:
                kbuf, vbuf = kh.new_empty(n), vh.new_empty(n)
            kg = torch.index_select(kh, 1, flat, out=kbuf[:n].view(H, tg * c, L, D))
            vg = torch.index_select(vh, 1, flat, out=vbuf[:n].view(H, tg * c, L, D))
            kg = kg.view(H, tg, c * L, D).transpose(0, 1)  # [tg, H, c*L, D] view
            vg = vg.view(H, tg, c * L, D).transpose(0, 1)
            mask = None
            if bias_c is not None:
                b = bias_c[tq, :c]
                if bool((b != 0).any()):
                    mask = b.repeat_interleave(L, dim=1)[:, None, None, :]  # [tg, 1, 1, c*L] fp32
            o, l = _flash_cpu(qc[tq], kg, vg, mask, scale)
            out[tq] = o.to(q.dtype)
            lse[tq] = l.float()
    return out, lse
