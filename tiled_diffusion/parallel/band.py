"""A rank's rows of one canvas forward: what the tile-blocked band (halo.Band) and the token-centred band
(hood.HoodBand) share — cropping the canvas-shaped inputs to the rank's latent rows (and its CFG half), and
all-gathering the band outputs back into the whole canvas — and the per-rank communication counters."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch

from ..core.profiling import phase
from .comm import Dist, _nccl, _wait, gather_rows


@dataclasses.dataclass
class CommStats:
    """What this rank's canvas forwards communicated (payload bytes this rank sent, and time blocked waiting).
    gather_bytes counts what a ring all-gather sends: the rank's part once to each of the world - 1 peers.
    layouts: the halo plans used (each counts its own bytes_sent / wait_s)."""

    gather_bytes: int = 0
    gather_s: float = 0.0
    forwards: int = 0
    layouts: list = dataclasses.field(default_factory=list)

    @property
    def halo_bytes(self) -> int:
        return sum(lay.bytes_sent for lay in self.layouts)

    @property
    def halo_wait_s(self) -> float:
        return sum(lay.wait_s for lay in self.layouts)

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "halo_bytes": self.halo_bytes, "halo_wait_s": self.halo_wait_s,
                "gather_bytes": self.gather_bytes, "gather_s": self.gather_s}


class RowBand:
    """This rank's latent rows of the canvas. rows: int64 latent rows the band holds, in order; all_rows: every
    rank's (the gather's order); d: the group the band is split over; row_span: this rank's input rows under
    CFG-parallel (else None), mirror: the group that swaps the CFG halves' outputs. offsets int64 [1, 2]: the
    band's top-left canvas token (the patch embedding's positions). grid: the band's token TileGrid (tile-blocked
    windows) or None."""

    grid = None

    def __init__(self, all_rows: Sequence[torch.Tensor], rank: int, offsets: torch.Tensor, d: Dist,
                 row_span: Optional[tuple[int, int]] = None, mirror: Optional[Dist] = None):
        self.rows = all_rows[rank]
        self.all_rows = list(all_rows)
        self.offsets = offsets
        cat = torch.cat(self.all_rows)
        # decided here on the host (gather used to compare a device copy with .cpu(): a sync every forward)
        self._rows_in_order = torch.equal(cat, torch.arange(cat.numel()))
        self._cat_rows: dict = {}  # device -> the concatenated rows there
        self.d, self.row_span, self.mirror = d, row_span, mirror

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """A canvas-shaped latent [B, C, h, w] -> the band's rows [B', C, band_h, w] (B' = B, or this rank's CFG
        half of the input rows under CFG-parallel)."""
        if self.row_span is not None:
            x = x[self.row_span[0]:self.row_span[1]]
        return x.index_select(2, self.rows.to(x.device))

    def crop_kwargs(self, kw: dict, n: int) -> dict:
        """The forward's keyword inputs for this rank's input rows: every tensor with n rows (text, masks,
        timesteps, micro-conditions, also inside dicts) is cut like the hidden states; the rest is shared."""
        if self.row_span is None:
            return kw
        a, b = self.row_span

        def cut(v):
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n:
                return v[a:b]
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            return v

        return {k: cut(v) for k, v in kw.items()}

    def gather(self, out: torch.Tensor, stats: CommStats) -> torch.Tensor:
        """Every rank's band output [B', C, band_h, w] -> the canvas [B, C, h, w] on every rank (the band group's
        all-gather along rows, then, under CFG-parallel, the two halves' along the batch)."""
        d = self.d
        spans, a = [], 0
        for r in self.all_rows:
            spans.append((a, a + r.numel()))
            a += r.numel()
        t0 = time.perf_counter()
        cat = gather_rows(out, spans, d, dim=2)
        stats.gather_s += time.perf_counter() - t0
        stats.gather_bytes += out.numel() * out.element_size() * (d.world - 1)
        if self._rows_in_order:
            full = cat
        else:
            rows = self._cat_rows.get(cat.device)
            if rows is None:
                rows = self._cat_rows[cat.device] = torch.cat(self.all_rows).to(cat.device)
            full = torch.empty_like(cat).index_copy_(2, rows, cat)
        if self.mirror is None:
            return full
        half = full.shape[0]
        t0 = time.perf_counter()
        both = gather_rows(full, [(0, half), (half, 2 * half)], self.mirror, dim=0)
        stats.gather_s += time.perf_counter() - t0
        stats.gather_bytes += full.numel() * full.element_size()
        return both


def timed_wait(layout, works, d: Dist) -> None:
    """Wait for a halo exchange's works, adding the time blocked to `layout.wait_s` (HaloLayout, HoodLayout)."""
    if not works:
        return
    t0 = time.perf_counter()  # on CUDA the wait is the stream's: this counts host time only, not the transfer
    with phase("halo_exchange"):
        _wait(works, d.timeout, "halo exchange", on_stream=_nccl(d))
    layout.wait_s += time.perf_counter() - t0
