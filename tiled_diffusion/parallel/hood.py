"""Token-centred windows over ranks: rank r runs the token rows [a, b) of the canvas, and each self-attention gets
the K/V rows its queries' windows reach beyond the band (at most the window's half-height above and below, more
where the window is shifted inward at the canvas border) point to point from the ranks that own them.

Exactness: the band's attention is `neighborhood_attention` with `band=(canvas rows, q_top, k_top)`, which gives a
query the window it has on the whole canvas. Band edges are cut on the row grid of `row_unit` tokens (a multiple
of the CPU path's query block and of the Triton kernel's), so every query block of a band is a query block of the
one-process call with the same keys: N ranks equal one process bitwise on the CPU path (tests/parallel/test_distributed.py).
Overlap: the rows whose windows lie inside the band are attended while the halo is in flight; the top and bottom
border rows after it arrives, each over only the K/V rows it needs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..backends.cpu.neighborhood_attention import block_size
from ..reference import neighborhood_bounds
from .band import RowBand, timed_wait
from .comm import Dist, _global_rank, split_rows

# The Triton kernel's query-block height (backends/triton/neighborhood_attention.CONFIG["TM_Y"], checked equal by
# tests/parallel/test_distributed.py; not imported: triton is optional).
TRITON_BLOCK_ROWS = 8


def row_unit(stride: int) -> int:
    """Band edges fall on multiples of this many token rows (from the stride groups' origin): whole query blocks of
    the CPU path and of the Triton kernel, so a band's blocks are the one-process call's."""
    return math.lcm(block_size(stride), TRITON_BLOCK_ROWS)


def split_token_rows(rows: int, hood, world: int) -> list[tuple[int, int]]:
    """Contiguous bands [(a, b)] of a canvas's `rows` token rows over `world` ranks, cut on the row grid of
    `row_unit` tokens (which starts at the stride groups' offset); the first bands get one block more."""
    unit = row_unit(hood.stride[0])
    cuts = [0] + [c for c in range(hood.offset[0] + unit, rows, unit) if c > 0] + [rows]
    n = len(cuts) - 1
    if n < world:
        raise ValueError(f"distributed: {world} ranks but the canvas has only {n} row blocks of {unit} tokens "
                         f"({rows} token rows; a rank owns at least one block); use at most {n} ranks or a "
                         f"taller canvas")
    return [(cuts[i], cuts[j]) for i, j in split_rows(n, world)]  # whole blocks, dealt as split_rows deals rows


class HoodLayout:
    """The halo plan of one rank for one canvas height and window geometry (rows in canvas token rows).

    need[r] = [ka, kb): the K/V rows band r's windows reach. recv_from / send_to: [(peer, a, b)] row ranges.
    parts: [(q0, q1, k0, k1)] the attention calls of this band in order — the interior rows (windows inside the
    band: keys are its own rows, attended before the halo arrives), then the top and bottom border rows, each over
    only the K/V rows it needs. bytes_sent / bytes_received / wait_s as HaloLayout's.
    """

    def __init__(self, rows: int, bands: Sequence[tuple[int, int]], rank: int, hood):
        self.rows, self.bands, self.rank, self.hood = rows, list(bands), rank, hood
        self.a, self.b = bands[rank]
        lo, hi = neighborhood_bounds(rows, hood.window[0], hood.stride[0], hood.clip, hood.offset[0])
        self._lo, self._hi = lo.tolist(), hi.tolist()
        self.need = [self._keys(a, b) for a, b in self.bands]
        ka, kb = self.need[rank]
        self.recv_from = [(p, max(ka, pa), min(kb, pb)) for p, (pa, pb) in enumerate(self.bands)
                          if p != rank and max(ka, pa) < min(kb, pb)]
        self.send_to = [(p, max(na, self.a), min(nb, self.b)) for p, (na, nb) in enumerate(self.need)
                        if p != rank and max(na, self.a) < min(nb, self.b)]
        self.parts = self._parts(row_unit(hood.stride[0]))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_s = 0.0

    def _keys(self, a: int, b: int) -> tuple[int, int]:
        """[k0, k1): the union of the windows of rows [a, b) (empty windows, possible with clip, need nothing)."""
        spans = [(lo, hi) for lo, hi in zip(self._lo[a:b], self._hi[a:b]) if hi > lo]
        if not spans:
            return a, a
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def _parts(self, unit: int) -> list[tuple[int, int, int, int]]:
        a, b = self.a, self.b
        rows_keys = ((y, *self._keys(y, y + 1)) for y in range(a, b))
        inside = [y for y, k0, k1 in rows_keys if a <= k0 and k1 <= b]  # windows inside the band
        grid = [c for c in range(self.hood.offset[0], b + unit, unit) if a <= c <= b] + [a, b]
        ia = min((c for c in grid if inside and c >= inside[0]), default=b)  # interior snapped to the row grid
        ib = max((c for c in grid if inside and c <= inside[-1] + 1), default=a)
        if ia >= ib:  # no whole block of interior rows: one call over every row
            return [(a, b, *self.need[self.rank])]
        parts = [(ia, ib, a, b)]
        parts += [(q0, q1, *self._keys(q0, q1)) for q0, q1 in ((a, ia), (ib, b)) if q1 > q0]
        return parts

    def start_exchange(self, k: torch.Tensor, v: torch.Tensor, d: Dist):
        """Post the halo send/recv of K and V rows (one message per peer and direction: [2, B, H, rows, Wt, D]).
        k, v: the band's [B, H, b - a, Wt, D]. Returns (works, [(a, b, buffer)] received, send buffers (they must
        live until the works finish))."""
        ops_, sends, recvs = [], [], []
        for p, a, b in self.send_to:
            buf = torch.stack([k[:, :, a - self.a:b - self.a], v[:, :, a - self.a:b - self.a]])
            sends.append(buf)
            ops_.append(dist.P2POp(dist.isend, buf, _global_rank(d, p), d.group))
            self.bytes_sent += buf.numel() * buf.element_size()
        for p, a, b in self.recv_from:
            shape = (2, *k.shape[:2], b - a, *k.shape[3:])
            buf = k.new_empty(shape)
            recvs.append((a, b, buf))
            ops_.append(dist.P2POp(dist.irecv, buf, _global_rank(d, p), d.group))
            self.bytes_received += buf.numel() * buf.element_size()
        works = dist.batch_isend_irecv(ops_) if ops_ else []
        return works, recvs, sends


def _key_rows(k0: int, k1: int, pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the canvas rows [k0, k1) from pieces [(a, b, k, v)] that tile them (a view when one piece
    holds them all)."""
    ks, vs = [], []
    for a, b, k, v in sorted(pieces, key=lambda p: p[0]):
        lo, hi = max(a, k0), min(b, k1)
        if lo < hi:
            ks.append(k[:, :, lo - a:hi - a])
            vs.append(v[:, :, lo - a:hi - a])
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def hood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HoodLayout, d: Dist,
                   head_chunk: Optional[int] = None) -> torch.Tensor:
    """Token-centred attention of a rank's band: q, k, v [B, H, b - a, Wt, D] (any strides) -> out [B, H, b - a, Wt,
    D], equal to the band's rows of the one-process `neighborhood_attention` over the canvas."""
    hood, a = layout.hood, layout.a
    if q.shape[2] != layout.b - a:
        raise ValueError(f"hood_attention: q has {q.shape[2]} token rows, the band [{a}, {layout.b}) has "
                         f"{layout.b - a}")
    works, recvs, sends = layout.start_exchange(k, v, d)
    H = q.shape[1]
    step = H if not head_chunk else max(1, min(H, head_chunk))
    out = q.new_empty(q.shape)
    pieces = [(a, layout.b, k, v)]
    for i, (q0, q1, k0, k1) in enumerate(layout.parts):
        if i == 1 or (i == 0 and (k0 < a or k1 > layout.b)):  # the first part needing the halo: wait for it
            timed_wait(layout, works, d)
            works = []
            pieces += [(ra, rb, buf[0], buf[1]) for ra, rb, buf in recvs]
        kk, vv = _key_rows(k0, k1, pieces)
        qq = q[:, :, q0 - a:q1 - a]
        for h0 in range(0, H, step):
            o, _ = ops.neighborhood_attention(qq[:, h0:h0 + step], kk[:, h0:h0 + step], vv[:, h0:h0 + step],
                                              hood.window, hood.stride, hood.clip, hood.offset,
                                              band=(layout.rows, q0, k0))
            out[:, h0:h0 + step, q0 - a:q1 - a] = o
    timed_wait(layout, works, d)  # nothing was needed from the halo: still complete the exchange
    del sends
    return out


class HoodBand(RowBand):
    """This rank's share of one token-centred canvas forward: the token rows [a, b) (latent rows [a·p, b·p)).
    token_rows: b - a; layout: the halo plan."""

    def __init__(self, bands: Sequence[tuple[int, int]], rank: int, patch: int, layout: HoodLayout, d: Dist,
                 row_span: Optional[tuple[int, int]] = None, mirror: Optional[Dist] = None):
        all_rows = [torch.arange(a * patch, b * patch) for a, b in bands]
        a, b = bands[rank]
        super().__init__(all_rows, rank, torch.tensor([[a, 0]], dtype=torch.long), d, row_span, mirror)
        self.token_rows = b - a
        self.layout = layout

    def attend(self, q, k, v, head_chunk: Optional[int]) -> torch.Tensor:
        return hood_attention(q, k, v, self.layout, self.d, head_chunk)
