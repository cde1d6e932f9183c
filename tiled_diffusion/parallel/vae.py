"""The VAE decode over several processes, plugged into the banded decode from outside.

`RowPartition` is what `vae.banded.banded_decode(part=)` asks of a partition: rank r owns a share of the latent
rows (every resolution's share is the same canvas fraction) and holds it plus HALO rows each side; after every pass
the margin rows come from the two neighbour ranks (point to point), each GroupNorm's moments are combined across
ranks exactly (Chan's formula over (count, mean, M2), the same result on every rank), the mid-block attention
all-gathers K and V (it is global; latent resolution), and the output rows are gathered on rank 0. Result: the
one-process decode up to fp order (tests/parallel/test_distributed.py), store memory ∝ 1/N.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import vae as vae_mod
from ..vae.banded import HALO, Act, band_rows, banded_decode, check_input, plan_method
from . import comm

log = logging.getLogger("tiled_diffusion")


class RowPartition:
    """A rank's share of a distributed banded run: the latent rows [lo, hi) of `shares[rank]` (every resolution's
    share is the same canvas fraction), the halo rows exchanged with the two neighbour ranks after each pass, the
    GroupNorm moments combined across ranks (exactly: Chan's formula over the ranks' (count, mean, M2)), the
    mid-block attention's K/V all-gathered (it is global), and the output rows gathered on rank 0."""

    def __init__(self, d: comm.Dist, lat_h: int) -> None:
        self.d, self.lat_h = d, lat_h
        self.shares = comm.split_rows(lat_h, d.world)  # refuses more ranks than latent rows
        self.bytes_sent = 0

    def own(self, H: int, rank: Optional[int] = None) -> tuple[int, int]:
        lo, hi = self.shares[self.d.rank if rank is None else rank]
        return lo * H // self.lat_h, hi * H // self.lat_h

    def held(self, H: int) -> tuple[int, int]:
        lo, hi = self.own(H)
        return max(0, lo - HALO), min(H, hi + HALO)

    def exchange(self, x: Act) -> None:
        """Fill x's margin rows from the neighbours' shares (each sends at most its own rows: a deeper margin is
        never read, since every step's halo is at most the rows any rank owns at that resolution)."""
        H, r = x.H, self.d.rank
        lo, hi = self.own(H)
        pairs, spans = [], []
        for peer in (r - 1, r + 1):
            if not 0 <= peer < self.d.world:
                continue
            if peer < r:  # my first rows are its bottom margin; its last rows are my top margin
                mine, theirs = (lo, min(hi, lo + HALO)), (max(x.a, self.own(H, peer)[0]), lo)
            else:
                mine, theirs = (max(lo, hi - HALO), hi), (hi, min(x.a + x.t.shape[-2], self.own(H, peer)[1]))
            pairs.append((peer, x.rows(*mine).contiguous(),
                          torch.empty_like(x.rows(*theirs), memory_format=torch.contiguous_format)))
            spans.append(theirs)
        self.bytes_sent += comm.send_recv(pairs, self.d, "VAE halo exchange")
        for (_, _, rcv), (a, b) in zip(pairs, spans):
            x.rows(a, b).copy_(rcv)

    def combine(self, st) -> None:
        st.n, st.mean, st.m2 = comm.combine_moments(st.n, st.mean, st.m2, self.d)

    def all_rows(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens [B, rows·W, C] of this rank's share -> every token of the canvas [B, H·W, C], every rank."""
        bands = [tuple(v * W for v in self.own(H, r)) for r in range(self.d.world)]
        self.bytes_sent += t.numel() * t.element_size() * (self.d.world - 1)
        return comm.gather_rows(t, bands, self.d, dim=1)

    def to_main(self, x: Act) -> Optional[torch.Tensor]:
        """The output's share of every rank -> the whole canvas on rank 0 (None on the others)."""
        mine = x.rows(*self.own(x.H)).contiguous()
        self.bytes_sent += mine.numel() * mine.element_size() * (self.d.rank != 0)
        return comm.gather_rows_to_main(mine, [self.own(x.H, r) for r in range(self.d.world)], self.d)




def decode(vae, latents: torch.Tensor, d: comm.Dist, *, max_memory_gb: Optional[float] = None,
           tile: Optional[int] = None, progress: bool = True) -> Optional[torch.Tensor]:
    """`vae.decode` over the ranks of `d`, each passing the same latents: each rank decodes its share of the rows
    (`banded_decode` with a RowPartition), the memory rule applied to a rank's share; the image on rank 0, None on
    the others. One rank: the plain `vae.decode`."""
    if d.world == 1:
        return vae_mod.decode(vae, latents, max_memory_gb=max_memory_gb, tile=tile, progress=progress)
    check_input(latents, "latents")
    h = latents.shape[-2]
    share = max(b - a for a, b in comm.split_rows(h, d.world)) + 2 * HALO  # the largest store any rank holds
    if tile is None:  # the memory rule on a rank's share: bands as tall as the device likes when it fits plainly
        plan = plan_method(vae, latents[:, :, :min(h, share)], encode=False, max_memory_gb=max_memory_gb, tile=None)
        if plan["method"] == "overlap":
            raise MemoryError(f"vae.decode: a rank's share ({share} latent rows of {h}) does not fit "
                              f"{max_memory_gb if max_memory_gb else 'the free memory'} GB even banded; "
                              f"use more ranks")
        tile = band_rows(h, latents.device) if plan["method"] == "plain" else plan["tile"]
        store = plan["store"]
    else:
        store = latents.device
    log.debug("vae.decode %s over %d ranks: %d-row bands", tuple(latents.shape), d.world, tile)
    return banded_decode(vae, latents, tile=tile, store=store, progress=progress and d.is_main,
                         part=RowPartition(d, h))
