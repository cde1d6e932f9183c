"""CPU path of `neighborhood_attention`: our AMX-BF16 kernel for bf16, else query blocks through torch's fused CPU
flash attention, grouped by mask.

Layouts as the op: q, k, v [B, H, Ht, Wt, D] (any strides); returns out [B, H, Ht, Wt, D] (q's dtype), lse
[B, H, Ht, Wt] fp32 (natural log).

Which path (`amx_unavailable` says why not the kernel):
* bf16 inputs, a CPU whose ISA probe says amx (backends/cpu/isa.py; TD_CPU_ISA=avx512 forces the torch path) and has
  AMX-BF16 + AVX512-BF16, an even head dim <= 256: the native kernel `tiled_diffusion_C::neighborhood_attention_amx`
  (csrc/cpu/amx_attention.h: 16-query row segments over their exact key rows and the union of their key columns,
  64 x 80 = 5120 keys per query for 64-token windows; online softmax on AVX-512, QKᵀ and PV on AMX tiles), fed
  the per-row and per-column key ranges of `neighborhood_bounds` (any window / stride / clip / offset / band).
* everything else — fp32 and fp16 inputs, CPUs without AMX (AMD Zen 4, older Xeons), odd or > 256 head dims, an
  explicit `block`, other devices — takes the torch path below.

The torch path:
* Each axis is cut into query blocks of `block` tokens (a multiple of the stride, aligned to the stride groups).
  A block's key band is the union of its queries' windows ([min start, max end) per axis), so a 2-D query block
  attends one rectangle of keys, with a boolean mask inside it (the outer AND of the two axes' masks).
* The mask of a block depends only on its queries' window bounds relative to its band: every interior block of an
  axis has the same relative bounds (the window slides with the queries), so the canvas has a handful of distinct
  masks (interior, and a few per border), each built once and broadcast over a whole group of blocks in one
  flash call as an additive [1, 1, nq, nk] mask — or no mask at all where every query of a block sees its whole
  band (a stride >= the block: GNA, where a stride group's queries share one window and nothing is wasted).
* No per-block gather: for each column block the query columns and the key band's columns are copied once, all
  rows, into strips [H, Ht, w, D]; every row block's queries and key band are then contiguous runs of the strip,
  and a group of evenly spaced row blocks is one strided view [G, H, rows·w, D] (overlapping for the key bands),
  which the kernel reads through its strides. Each key is copied (band width / block width) times, ~5x for
  64-token windows and 16-token blocks: small next to the attention's own traffic.
* With stride 1 the band of a b-token block is b + w - 1 tokens per axis for w-token windows: (1 + (b-1)/w)² of
  the computed scores (1.52x for PixArt's 64-token windows at b = 16); `block` trades that against the efficiency
  of small query blocks (see BLOCK).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _native as _native_lib
from ...reference import neighborhood_bounds
from .window_attention import _explicit, _flash_cpu

# Query block side (tokens) for stride-1 windows. The fused CPU kernel packs each call's keys for every block of
# queries, so its throughput grows with the queries sharing one key band; the band grows with the block:
# (1 + (b-1)/w)² of the needed scores. Measured at PixArt width, 64-token windows, 128² tokens (benchmarks/NOTES.md,
# issue 18): b = 8 -> 1.50x today's blocked time, 16 -> 1.14x, 32 -> 1.51x.
BLOCK = 16


def _axis_blocks(n: int, window: int, stride: int, clip: bool, offset: int, block: int,
                 rows: tuple[int, int, int] = None):
    """Query blocks along one axis, aligned to the stride groups (which start at `offset`): list of (q0, q1, band0,
    band1, signature), signature = what the block's mask depends on (its size, its band's size and every query's
    bounds relative to the band). rows (q_top, q_len, k_top): only the queries [q_top, q_top + q_len) of the
    n-token axis, with indices relative to q_top and key bands relative to k_top (a band of the canvas: the blocks
    are the whole canvas's where q_top is on its block grid, so the result is the same bitwise)."""
    lo, hi = neighborhood_bounds(n, window, stride, clip, offset)
    lo, hi = lo.tolist(), hi.tolist()
    q_top, q_len, k_top = rows if rows is not None else (0, n, 0)
    q_end = q_top + q_len
    out = []
    cuts = [q_top] + [c for c in range(offset + block, q_end, block) if c > q_top] + [q_end]
    for q0, q1 in zip(cuts[:-1], cuts[1:]):
        b0, b1 = min(lo[q0:q1]), max(hi[q0:q1])
        b1 = max(b0, b1)
        sig = (q1 - q0, b1 - b0, tuple(x - b0 for x in lo[q0:q1]), tuple(x - b0 for x in hi[q0:q1]))
        out.append((q0 - q_top, q1 - q_top, b0 - k_top, b1 - k_top, sig))
    return out


def _axis_mask(sig) -> torch.Tensor:
    nq, nk, lo, hi = sig
    j = torch.arange(nk)
    return (j[None, :] >= torch.tensor(lo)[:, None]) & (j[None, :] < torch.tensor(hi)[:, None])  # [nq, nk]


def block_size(stride: int, block: Optional[int] = None) -> int:
    """Query block along an axis: a multiple of the stride (whole groups), at least `block` (default BLOCK)."""
    want = BLOCK if block is None else block
    return stride * max(1, -(-want // stride)) if stride < want else stride


def _rows_view(strip: torch.Tensor, starts: list[int], rows: int) -> torch.Tensor:
    """[G, H, rows·w, D] view of a column strip [H, Ht, w, D] (contiguous): G row blocks of `rows` rows starting
    at evenly spaced rows `starts` (overlapping for key bands: the kernel reads them through the strides)."""
    H, Ht, w, D = strip.shape
    step = starts[1] - starts[0] if len(starts) > 1 else 0
    return strip.as_strided((len(starts), H, rows * w, D), (step * w * D, Ht * w * D, D, 1),
                            strip.storage_offset() + starts[0] * w * D)


def _blocks_view(t: torch.Tensor, starts: list[int], rows: int, x0: int, bx: int) -> torch.Tensor:
    """[G, H, rows, bx, ...] view of a contiguous [H, Ht, Wt, ...] tensor (out or lse of one batch row): the G query
    blocks of `rows` rows starting at evenly spaced rows `starts`, columns [x0, x0 + bx) (the kernel's outputs
    are written straight into place)."""
    H, Ht, Wt = t.shape[:3]
    inner = t.stride(2)  # D for out, 1 for lse
    step = starts[1] - starts[0] if len(starts) > 1 else 0
    return t.as_strided((len(starts), H, rows, bx, *t.shape[3:]), (step * Wt * inner, Ht * Wt * inner, Wt * inner,
                        *t.stride()[2:]), t.storage_offset() + (starts[0] * Wt + x0) * inner)


def _even(xs: list[int]) -> bool:
    return len(xs) < 3 or all(b - a == xs[1] - xs[0] for a, b in zip(xs, xs[1:]))


def amx_unavailable(q: torch.Tensor) -> Optional[str]:
    """None when the native AMX kernel takes q (and k, v: same dtype and head dim), else why not, in words."""
    if q.device.type != "cpu":
        return f"not on the CPU ({q.device.type})"
    if q.dtype != torch.bfloat16:
        return f"{q.dtype} inputs (the kernel takes bfloat16)"
    lib = _native_lib.lib()
    if lib is None:
        return "tiled_diffusion._C is not built"
    try:
        why = lib.neighborhood_attention_amx_unavailable(q.shape[-1])
    except (AttributeError, RuntimeError):
        return "tiled_diffusion._C has no neighborhood_attention_amx (rebuild it)"
    return why or None


def _amx(q, k, v, window, stride, clip, offset, scale, band):
    """The native kernel: per query row its key rows (relative to k's rows), per column its key columns."""
    Ht, Wt, D = q.shape[2], q.shape[3], q.shape[4]
    canvas_h, q_top, k_top = band if band[0] else (Ht, 0, 0)
    ylo, yhi = neighborhood_bounds(canvas_h, window[0], stride[0], clip, offset[0])
    xlo, xhi = neighborhood_bounds(Wt, window[1], stride[1], clip, offset[1])
    rows = slice(q_top, q_top + Ht)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _native_lib.native_op("neighborhood_attention_amx")(
        q, k, v, i32(ylo[rows] - k_top), i32(yhi[rows] - k_top), i32(xlo), i32(xhi), scale, q_top)


def neighborhood_attention_cpu(q, k, v, window, stride=(1, 1), clip: bool = False, offset=(0, 0),
                               scale: Optional[float] = None, band=(0, 0, 0), block: Optional[int] = None):
    """Inputs are assumed checked (ops.check_neighborhood_attention; band as there). bf16 on an AMX-BF16 CPU runs
    the native kernel (unless `block` asks for the torch path's query blocks); off the CPU (until a kernel
    exists) the same blocks run through public SDPA with an explicit logsumexp."""
    B, H, Ht, Wt, D = q.shape
    dev = q.device
    attend = _flash_cpu if dev.type == "cpu" else _explicit
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if B * H * Ht * Wt * D == 0:
        return q.new_zeros((B, H, Ht, Wt, D)), torch.full((B, H, Ht, Wt), -math.inf, device=dev)
    if block is None and amx_unavailable(q) is None:
        return _amx(q, k, v, window, stride, clip, offset, scale, band)
    canvas_h, q_top, k_top = band if band[0] else (Ht, 0, 0)
    ys = _axis_blocks(canvas_h, window[0], stride[0], clip, offset[0], block_size(stride[0], block),
                      (q_top, Ht, k_top))
    xs = _axis_blocks(Wt, window[1], stride[1], clip, offset[1], block_size(stride[1], block))
    if any(b[3] == b[2] for b in ys + xs):  # some blocks have no key (clip past the border): they stay 0 / -inf
        out = q.new_zeros((B, H, Ht, Wt, D))
        lse = torch.full((B, H, Ht, Wt), -math.inf, dtype=torch.float32, device=dev)
    else:  # every query is written by its block
        out = q.new_empty((B, H, Ht, Wt, D))
        lse = torch.empty((B, H, Ht, Wt), dtype=torch.float32, device=dev)
    ygroups: dict = {}
    for y in ys:
        ygroups.setdefault(y[4], []).append(y)
    masks: dict = {}
    for x0, x1, kx0, kx1, sx in xs:
        bx, bw = x1 - x0, kx1 - kx0
        if bw == 0:
            continue  # empty band (clip past the border): out 0, lse -inf (already)
        # The column strip's queries and its key band, all rows, copied once: every row block's queries and key
        # band are then contiguous runs of the strip (a strided view per group, no per-block gather).
        qs, ks, vs = (t[:, :, :, a:b].contiguous() for t, a, b in ((q, x0, x1), (k, kx0, kx1), (v, kx0, kx1)))
        for sy, blocks in ygroups.items():
            rows, band = sy[0], sy[1]
            if band == 0:
                continue
            if (sy, sx) not in masks:
                allowed = (_axis_mask(sy)[:, None, :, None] & _axis_mask(sx)[None, :, None, :]).reshape(
                    rows * bx, band * bw)
                empty = ~allowed.any(dim=1)  # queries whose window is empty (clip): 0 / -inf afterwards
                mask = None
                if not bool(allowed.all()):
                    # 0 / -inf are exact in every float dtype; in q's dtype the fused kernel runs ~1.8x faster
                    # than with an fp32 mask on bf16 inputs (benchmarks/NOTES.md, issue 18)
                    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~(allowed | empty[:, None]),
                                                                                   -math.inf)
                    mask = mask[None, None].to(dev)
                masks[(sy, sx)] = (mask, empty.to(dev) if bool(empty.any()) else None)
            mask, empty = masks[(sy, sx)]
            qstarts, kstarts = [b[0] for b in blocks], [b[2] for b in blocks]
            parts = [blocks] if _even(qstarts) and _even(kstarts) else [[b] for b in blocks]
            for part in parts:
                qst, kst = [b[0] for b in part], [b[2] for b in part]
                for bi in range(B):
                    o, l = attend(_rows_view(qs[bi], qst, rows), _rows_view(ks[bi], kst, band),
                                  _rows_view(vs[bi], kst, band), mask, scale)
                    if empty is not None:
                        o = o.masked_fill(empty[:, None], 0)
                        l = l.float().masked_fill(empty, -math.inf)
                    _blocks_view(out[bi], qst, rows, x0, bx).copy_(o.reshape(len(qst), H, rows, bx, D))
                    _blocks_view(lse[bi], qst, rows, x0, bx).copy_(l.reshape(len(qst), H, rows, bx))
    return out, lse
