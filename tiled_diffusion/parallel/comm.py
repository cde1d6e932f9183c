"""One image over N processes (torch.distributed): rank r owns a band of tile rows; only halos cross ranks.

Cross-tile attention is windowed: a tile attends to the tiles within `radius` (Chebyshev) of it. So a rank
that owns the tile rows [y0, y1) of the canvas needs, per self-attention, only the K/V of the `radius` tile
rows above and below its band. Those rows are exchanged point to point with the ranks that own them
(send/recv, never an all-gather of the image's K/V, and never stale K/V): traffic per rank grows with the
band's width, not with the image. Everything else in a PixArt block (adaLN, linears, MLP, cross-attention) is
token-wise and stays local.

The canvas forward over ranks (`enable`; the delimited branch in canvas.py): every rank calls the transformer
with the same whole-canvas latents; cross_tile runs only the rank's band of the step's tile grid (the grid's
shift included) and multidiffusion only the rank's share of the tiles, and the outputs (ε: a few channels, well
under 1 % of the halo traffic) are all-gathered once per forward, so every rank returns the whole canvas's
output and runs the same scheduler step with the same generator. That keeps stochastic schedulers (LCM's noise
draw over the whole canvas) and the shifted grids exact with no other change, and the final latents are already
on every rank at the end. CFG-parallel (`cfg_parallel=True`, even world): the two CFG halves run on the two
halves of the ranks, each banded over its half.

Pieces (one place each):

* `setup` / `Dist`: the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT), or an already initialised one; gloo on CPU, NCCL on CUDA, one device per rank (LOCAL_RANK);
  a bounded timeout on every collective so a dead or stuck rank ends the others with an error, never a hang.
* `split_rows`: contiguous bands of tile rows, uneven splits allowed (the first `n % world` bands get one more
  row). More ranks than tile rows is refused with a clear error before any work (idle ranks would still have to
  join every collective, and a band of zero rows has no tokens to run the transformer on).
* `HaloLayout` + `halo_window_attention`: the band's windowed attention. Per call: post the halo send/recv,
  attend the interior tiles (whose whole window lies inside the band) while the halo is in flight, wait, then
  attend the border tiles over band + halo K/V. Every query tile sees exactly the key tiles, in exactly the
  slot order, that the single-process `window_attention` gives it, so the band's rows are bitwise equal to
  the same rows of the single-process result on the CPU path (tests/test_distributed.py).
* `reduce_moments` / `combine_moments`: exact distributed statistics for a parallel GroupNorm (all-reduce of Σx,
  Σx², count in fp64; or all-gathered (count, mean, M2) combined with Chan's formula in rank order): the variance
  includes the spread of the per-rank means, unlike a mean of per-rank variances (xDiT's DistVAE).
* `broadcast_tensors` / `on_main` (text embeddings: rank 0 runs the text encoder), `gather_rows` (uneven bands).
* `generate`: `pipeline.generate` over the ranks; `check_world` refuses too many ranks before any work.
* `run_local`: N local CPU ranks for tests and benchmarks (what torchrun does, from a forkserver);
  `torchrun_command` / `launch_local` for `generate --nproc N`.

Layouts: tiles are tile-major, (b, iy, ix) with iy over the band's rows only: local tile index
(b * band_rows + iy - y0) * nx + ix. q, k, v [B·T_band, H, L, D] as `window_attention`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.config import TiledConfig
from ..core.tiling import TileGrid
from ..model.attention import window_attention
from ..model.canvas import pixel_grid, token_grid
from ..vae.banded import merge_moments
from ..core.profiling import phase

log = logging.getLogger("tiled_diffusion.parallel.comm")

DEFAULT_TIMEOUT_S = 600.0  # covers rank 0 encoding the prompt while the others wait at the broadcast
TIMEOUT_ENV = "TD_DIST_TIMEOUT_S"


# ------------------------------------------------------------------------------------- process group


@dataclasses.dataclass
class Dist:
    """A rank's view of the process group. `owns_group`: `setup` initialised it (so `teardown` destroys it)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    device: torch.device
    timeout: datetime.timedelta
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _timeout(timeout_s: Optional[float]) -> datetime.timedelta:
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"distributed timeout must be > 0 seconds, got {timeout_s!r}")
    return datetime.timedelta(seconds=timeout_s)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) \
        and int(os.environ["WORLD_SIZE"]) > 1


def setup(group: Optional[dist.ProcessGroup] = None, *, backend: Optional[str] = None,
          device: Optional[str] = None, timeout_s: Optional[float] = None) -> Dist:
    """The process group to run on.

    group: an initialised group to use as is (the Python API's way in), else the default group if one is
    initialised, else one is initialised from torchrun's environment (env://). backend: default NCCL when
    CUDA is available, else gloo. device: default cuda:LOCAL_RANK with NCCL (one device per rank), else cpu.
    timeout_s: bound on every collective and halo wait (default TD_DIST_TIMEOUT_S or 600 s).
    """
    timeout = _timeout(timeout_s)
    owns = False
    if group is None and not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"distributed: no process group and no torchrun environment (missing "
                               f"{', '.join(missing)}); launch with `torchrun --nproc-per-node N -m tiled_diffusion "
                               f"generate ...` or pass an initialised group")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        kwargs = {}
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend, init_method="env://", timeout=timeout, **kwargs)
        owns = True
    pg = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if device is None:
        if dist.get_backend(pg) == "nccl":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(group=pg, rank=rank, world=world, device=dev, timeout=timeout, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(d: Dist):
    """Run a rank's work; if it raises, tear the process group down before re-raising, so the peers' pending
    send/recv and collectives fail at once (closed connections) instead of waiting out the timeout. A rank
    that is killed closes its connections too; one that hangs is caught by the timeout."""
    try:
        yield d
    except BaseException:
        log.error("rank %d/%d failed; aborting the process group so the other ranks stop", d.rank, d.world)
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
        raise


def _wait(works, d_timeout: datetime.timedelta, what: str, on_stream: bool = False) -> None:
    """Wait for works within the timeout. on_stream (NCCL works, CUDA tensors): make the current CUDA stream wait
    on them instead — NCCL's Work.wait(timeout) blocks the host, spinning until the compute stream has drained,
    which serialises kernel launch with compute at every halo; the group's timeout still holds there, enforced by
    NCCL's watchdog (the timeout given to init_process_group / new_group), which aborts the communicator."""
    for w in works:
        try:
            ok = w.wait() if on_stream else w.wait(d_timeout)
        except RuntimeError as e:  # a peer died or aborted: one clear line, the cause chained
            raise RuntimeError(f"distributed: {what} failed (a peer rank exited or timed out): {e}") from e
        if ok is False:
            raise RuntimeError(f"distributed: {what} timed out after {d_timeout.total_seconds():g} s")


# -------------------------------------------------------------------------------------------- bands


def split_rows(n_rows: int, world: int) -> list[tuple[int, int]]:
    """Contiguous bands [(y0, y1)] of `n_rows` tile rows over `world` ranks; the first n_rows % world bands get
    one row more. Raises if a rank would get no row."""
    if world < 1:
        raise ValueError(f"distributed: world size must be >= 1, got {world}")
    if n_rows < world:
        raise ValueError(f"distributed: {world} ranks but the canvas has only {n_rows} tile rows (a rank owns at "
                         f"least one row); use at most {n_rows} ranks, a smaller --tile, or a taller canvas")
    base, extra = divmod(n_rows, world)
    bands, y = [], 0
    for r in range(world):
        h = base + (1 if r < extra else 0)
        bands.append((y, y + h))
        y += h
    return bands


class HaloLayout:
    """Which tiles a rank attends, sends and receives, for one token grid (ny × nx tiles) and radius.

    Built once per grid; tables are cached per batch size and device. `bytes_sent` / `bytes_received` count
    the halo payload this rank has actually sent / received (the benchmark reads them).
    """

    def __init__(self, grid, bands: Sequence[tuple[int, int]], rank: int, radius: int):
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"HaloLayout: radius must be an int >= 0, got {radius!r}")
        if len(bands) < 1 or not 0 <= rank < len(bands):
            raise ValueError(f"HaloLayout: rank {rank} out of range for {len(bands)} bands")
        if bands[0][0] != 0 or bands[-1][1] != grid.ny or any(a[1] != b[0] for a, b in zip(bands, bands[1:])) \
                or any(y1 <= y0 for y0, y1 in bands):
            raise ValueError(f"HaloLayout: bands {list(bands)} must cover the {grid.ny} tile rows contiguously")
        self.grid, self.bands, self.rank, self.radius = grid, list(bands), rank, radius
        self.ny, self.nx = grid.ny, grid.nx
        self.y0, self.y1 = bands[rank]
        self.rows = self.y1 - self.y0
        self.band_tiles = self.rows * self.nx  # per image
        # The single-process neighbour table (batch 1): slot order is the oracle's, so keep it verbatim.
        self._nb = grid.neighbours(radius)[: self.ny * self.nx].tolist()
        # Rows this rank needs from each peer, and rows each peer needs from it: [(peer, a, b)] row ranges.
        self.recv_from = [(p, a, b) for p, (a, b) in self._needs(rank) if p != rank]
        self.send_to = []
        for p in range(len(self.bands)):
            if p == rank:
                continue
            for q, (a, b) in self._needs(p):
                if q == rank:
                    self.send_to.append((p, a, b))
        # interior: every window tile inside the band (or off the canvas); border: the rest
        self.interior, self.border = [], []
        for iy in range(self.y0, self.y1):
            for ix in range(self.nx):
                rows = {g // self.nx for g in self._nb[iy * self.nx + ix] if g >= 0}
                (self.interior if all(self.y0 <= r < self.y1 for r in rows) else self.border).append((iy, ix))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_s = 0.0  # time spent blocked on the halo after the interior tiles were done
        self._tables: dict = {}

    def _needs(self, r: int) -> list[tuple[int, tuple[int, int]]]:
        """[(owner, (a, b))]: the halo rows band r needs, split by the rank that owns them."""
        y0, y1 = self.bands[r]
        want = [(max(0, y0 - self.radius), y0), (y1, min(self.ny, y1 + self.radius))]
        out = []
        for p, (p0, p1) in enumerate(self.bands):
            for a, b in want:
                lo, hi = max(a, p0), min(b, p1)
                if lo < hi:
                    out.append((p, (lo, hi)))
        return out

    # ------------------------------------------------------------------ tables

    def _local(self, b: int, iy: int, ix: int) -> int:
        return (b * self.rows + iy - self.y0) * self.nx + ix

    def tables(self, batch: int, device) -> dict:
        """Index tables for `batch` images (cached):

        interior_nb int32 [B·T_band, NB]: band-local key tiles for interior query tiles, -1 rows for border tiles
        border_q int64 [n_border]: band-local indices of the border query tiles
        border_k int64 [n_band_keys]: band-local key tiles of the border pass (border tiles first, in border_q
          order, so the padded q of that pass lines up); halo tiles follow them in the key buffer
        border_nb int32 [n_band_keys + n_halo, NB]: the border pass's table (rows past n_border: -1)
        """
        key = (batch, str(torch.device(device) if device is not None else "cpu"))
        t = self._tables.get(key)
        if t is not None:
            return t
        nx, NB = self.nx, len(self._nb[0])
        interior = [[-1] * NB for _ in range(batch * self.band_tiles)]
        for b in range(batch):
            for iy, ix in self.interior:
                row = self._nb[iy * nx + ix]
                interior[self._local(b, iy, ix)] = [-1 if g < 0 else self._local(b, g // nx, g % nx) for g in row]
        border_q = [self._local(b, iy, ix) for b in range(batch) for iy, ix in self.border]
        # key buffer slots: band tiles (border ones first), then every halo tile, peer by peer as received
        slot: dict = {}
        for q in border_q:
            slot[("band", q)] = len(slot)
        for b in range(batch):
            for iy, ix in self.border:
                for g in self._nb[iy * nx + ix]:
                    if g >= 0 and self.y0 <= g // nx < self.y1 and ("band", self._local(b, g // nx, g % nx)) not in slot:
                        slot[("band", self._local(b, g // nx, g % nx))] = len(slot)
        border_k = [k[1] for k in slot]  # dict keeps insertion order
        n_band_keys = len(border_k)
        halo_off = n_band_keys
        halo_slot = {}
        for p, a, bb in self.recv_from:
            for b in range(batch):
                for iy in range(a, bb):
                    for ix in range(nx):
                        halo_slot[(b, iy, ix)] = halo_off + (b * (bb - a) + iy - a) * nx + ix
            halo_off += batch * (bb - a) * nx
        n_keys = halo_off
        border_nb = [[-1] * NB for _ in range(n_keys)]
        for j, (b, (iy, ix)) in enumerate([(b, t) for b in range(batch) for t in self.border]):
            row = []
            for g in self._nb[iy * nx + ix]:
                if g < 0:
                    row.append(-1)
                elif self.y0 <= g // nx < self.y1:
                    row.append(slot[("band", self._local(b, g // nx, g % nx))])
                else:
                    row.append(halo_slot[(b, g // nx, g % nx)])
            border_nb[j] = row
        if len(border_q) > n_keys:  # cannot happen: each border tile is its own key (self slot)
            raise AssertionError("HaloLayout: border pass has more queries than keys")
        t = {
            "interior_nb": torch.tensor(interior, dtype=torch.int32, device=device).reshape(-1, NB),
            "border_q": torch.tensor(border_q, dtype=torch.int64, device=device),
            "border_k": torch.tensor(border_k, dtype=torch.int64, device=device),
            "border_nb": torch.tensor(border_nb, dtype=torch.int32, device=device).reshape(-1, NB),
        }
        self._tables[key] = t
        return t

    # ------------------------------------------------------------------ halo exchange

    def start_exchange(self, k: torch.Tensor, v: torch.Tensor, d: Dist):
        """Post the halo send/recv of K and V (one message per peer and direction: [2, B, rows, nx, H, L, D]).
        Returns (works, recv buffers, send buffers); the send buffers must live until the works finish."""
        B = k.shape[0] // self.band_tiles
        H, L, D = k.shape[1:]
        k6 = k.unflatten(0, (B, self.rows, self.nx))
        v6 = v.unflatten(0, (B, self.rows, self.nx))
        ops, sends, recvs = [], [], []
        for p, a, b in self.send_to:
            buf = torch.stack([k6[:, a - self.y0:b - self.y0], v6[:, a - self.y0:b - self.y0]])
            sends.append(buf)
            ops.append(dist.P2POp(dist.isend, buf, _global_rank(d, p), d.group))
            self.bytes_sent += buf.numel() * buf.element_size()
        for p, a, b in self.recv_from:
            buf = k.new_empty((2, B, b - a, self.nx, H, L, D))
            recvs.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, _global_rank(d, p), d.group))
            self.bytes_received += buf.numel() * buf.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        return works, recvs, sends


def send_recv(pairs: Sequence[tuple[int, torch.Tensor, torch.Tensor]], d: Dist, what: str) -> int:
    """Blocking point-to-point exchange: for each (peer group rank, tensor to send, contiguous buffer to receive
    into), both posted in one batch and waited for within the group's timeout. Returns the bytes sent."""
    ops, staged = [], []
    for peer, snd, rcv in pairs:
        g = _global_rank(d, peer)
        # Tensors not on the group's device (a VAE store kept on the CPU under NCCL) go through a copy there: NCCL
        # sends only CUDA memory, gloo only host memory.
        snd = snd.to(d.device)
        buf = rcv if rcv.device == d.device else torch.empty_like(rcv, device=d.device)
        staged.append((rcv, buf))
        ops += [dist.P2POp(dist.isend, snd, g, d.group), dist.P2POp(dist.irecv, buf, g, d.group)]
    if ops:
        _wait(dist.batch_isend_irecv(ops), d.timeout, what, on_stream=_nccl(d))
    for rcv, buf in staged:
        if buf is not rcv:
            rcv.copy_(buf)
    return sum(snd.numel() * snd.element_size() for _, snd, _ in pairs)


def _nccl(d: Dist) -> bool:
    """Whether d's works are NCCL's (stream-ordered): only those are waited for on the stream (`_wait`)."""
    return d.device.type == "cuda" and dist.is_initialized() and dist.get_backend(d.group) == "nccl"


def _global_rank(d: Dist, group_rank: int) -> int:
    if d.group is None or d.group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(d.group, group_rank)


def _timed_wait(layout: HaloLayout, works, d: Dist) -> None:
    if not works:
        return
    t0 = time.perf_counter()  # on CUDA the wait is the stream's: this counts host time only, not the transfer
    with phase("halo_exchange"):
        _wait(works, d.timeout, "halo exchange", on_stream=_nccl(d))
    layout.wait_s += time.perf_counter() - t0


def halo_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HaloLayout, d: Dist,
                          head_chunk: Optional[int] = None) -> torch.Tensor:
    """Windowed attention of a rank's band: q, k, v [B·T_band, H, L, D] (tile-major, band-local order) ->
    out [B·T_band, H, L, D], equal to the band's rows of the single-process `window_attention` over the canvas.

    The halo K/V is exchanged point to point while the interior tiles are attended (they need no halo)."""
    if q.shape[0] % layout.band_tiles:
        raise ValueError(f"halo_window_attention: q has {q.shape[0]} tiles, not a multiple of the band's "
                         f"{layout.band_tiles} ({layout.rows} rows x {layout.nx} tiles)")
    B = q.shape[0] // layout.band_tiles
    t = layout.tables(B, q.device)
    works, recvs, sends = layout.start_exchange(k, v, d)
    out = window_attention(q, k, v, t["interior_nb"], head_chunk)  # border rows: no key -> 0, overwritten below
    if t["border_q"].numel() == 0:
        _timed_wait(layout, works, d)
        return out
    band_k = k.index_select(0, t["border_k"])
    band_v = v.index_select(0, t["border_k"])
    _timed_wait(layout, works, d)
    del sends
    H, L, D = q.shape[1:]
    kb = torch.cat([band_k] + [r[0].reshape(-1, H, L, D) for r in recvs])
    vb = torch.cat([band_v] + [r[1].reshape(-1, H, L, D) for r in recvs])
    nq = t["border_q"].numel()
    qb = q.new_zeros(kb.shape)  # the op takes q and k of one shape; rows past nq have no key and cost nothing
    qb[:nq] = q.index_select(0, t["border_q"])
    ob = window_attention(qb, kb, vb, t["border_nb"], head_chunk)
    out.index_copy_(0, t["border_q"], ob[:nq])
    return out


# ------------------------------------------------------------------------- the canvas forward over ranks


class Band:
    """This rank's share of one cross_tile canvas forward: the tile rows [y0, y1) of the step's token grid.

    grid: the band's own token TileGrid (the same tiles; the grid's row shift is folded into which canvas rows the
    band holds, its column shift kept). rows: int64 latent rows of the canvas the band holds, in order (they wrap
    around the canvas bottom for the last band of a row-shifted grid). offsets int64 [1, 2]: the band's top-left
    canvas token for the patch embedding's positions (negative when the band wraps: positions are looked up
    with Python indexing, so row -1 is the canvas's last row). layout: the halo plan.
    """

    def __init__(self, grid, bands: Sequence[tuple[int, int]], rank: int, layout: HaloLayout, d: Dist,
                 row_span: Optional[tuple[int, int]] = None, mirror: Optional[Dist] = None):
        tth, p = grid.tile_tokens_h, grid.patch
        sy, sx = grid.shift
        Ht = grid.tokens_h

        def token_rows(r: int) -> torch.Tensor:
            y0, y1 = bands[r]
            return (torch.arange(y0 * tth, y1 * tth) + sy) % Ht

        def latent_rows(r: int) -> torch.Tensor:
            t = token_rows(r)
            return (t[:, None] * p + torch.arange(p)).reshape(-1)

        y0, y1 = bands[rank]
        n_tok = (y1 - y0) * tth
        self.grid = TileGrid(n_tok * p, grid.width, (grid.th, grid.tw), overlap=0, patch=p, shift=(0, sx))
        top = y0 * tth + sy
        self.offsets = torch.tensor([[top - Ht if top + n_tok > Ht else top, 0]], dtype=torch.long)
        self.rows = latent_rows(rank)
        self.all_rows = [latent_rows(r) for r in range(len(bands))]
        cat = torch.cat(self.all_rows)
        # decided here on the host (gather used to compare a device copy with .cpu(): a sync every forward)
        self._rows_in_order = torch.equal(cat, torch.arange(cat.numel()))
        self._cat_rows: dict = {}  # device -> the concatenated rows there
        self.layout, self.d, self.row_span, self.mirror = layout, d, row_span, mirror

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

    def gather(self, out: torch.Tensor, stats: "CommStats") -> torch.Tensor:
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


@dataclasses.dataclass
class CommStats:
    """What this rank's canvas forwards communicated (payload bytes this rank sent, and time blocked waiting).
    gather_bytes counts what a ring all-gather sends: the rank's part once to each of the world - 1 peers."""

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


class DistState:
    """The process group a transformer's canvas forward runs over (`enable` attaches one to its TileContext as
    `context.partition`). The canvas forward asks it for this rank's band (cross_tile) or tile share
    (multidiffusion) and gathers the outputs, so every rank returns the whole canvas's output."""

    def __init__(self, d: Dist, cfg_parallel: bool = False):
        self.dist = d
        self.current: Optional[Band] = None  # the band of the forward in progress (read by `attend`)
        self.stats = CommStats()
        self._layouts: dict = {}
        self.half = self.mirror = None
        if cfg_parallel:
            self.half, self.mirror = _cfg_groups(d)

    def band(self, grid, radius: int, batch: int = 1) -> Band:
        """This rank's band of `grid` (a token TileGrid of batch 1 for the whole canvas) for `batch` input rows;
        becomes `current`. Under CFG-parallel with an even batch (the CFG halves) rank r works on half r // m of
        the rows (m = world / 2) and its band over the m ranks of that half; otherwise over all ranks."""
        split = self.half is not None and batch % 2 == 0
        bd = self.half if split else self.dist
        bands = split_rows(grid.ny, bd.world)
        key = (grid.ny, grid.nx, grid.tokens_per_tile, radius, split)
        layout = self._layouts.get(key)
        if layout is None:  # the neighbour structure ignores the shift: one layout serves every step
            layout = self._layouts[key] = HaloLayout(grid, bands, bd.rank, radius)
            self.stats.layouts.append(layout)
        span = None
        if split:
            h = self.mirror.rank
            span = (h * batch // 2, (h + 1) * batch // 2)
        self.current = Band(grid, bands, bd.rank, layout, bd, span, self.mirror if split else None)
        self.stats.forwards += 1
        return self.current

    def gather_band(self, out: torch.Tensor) -> torch.Tensor:
        """The band output [B', C, band_h, w] of the forward in progress -> the canvas [B, C, h, w], every rank."""
        return self.current.gather(out, self.stats)

    def tile_share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [a, b) of n multidiffusion tiles (rows × tiles, in seam_blend's order)."""
        if n < self.dist.world:
            raise ValueError(f"distributed: {self.dist.world} ranks but only {n} multidiffusion tiles (a rank runs "
                             f"at least one); use at most {n} ranks or a smaller --tile")
        self.stats.forwards += 1
        return split_rows(n, self.dist.world)[self.dist.rank]

    def gather_tiles(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's tile outputs [b - a, ...] -> all n tiles [n, ...] on every rank (one all-gather)."""
        t0 = time.perf_counter()
        out = gather_rows(part, split_rows(n, self.dist.world), self.dist, dim=0)
        self.stats.gather_s += time.perf_counter() - t0
        self.stats.gather_bytes += part.numel() * part.element_size() * (self.dist.world - 1)
        return out

    def attend(self, q, k, v, head_chunk: Optional[int]) -> torch.Tensor:
        return halo_window_attention(q, k, v, self.current.layout, self.current.d, head_chunk)


def _cfg_groups(d: Dist) -> tuple[Dist, Dist]:
    """CFG-parallel groups (xDiT's CFG parallel): the two halves [0, m) and [m, 2m) of the ranks (each runs one
    CFG half of the rows, banded over its m ranks), and the mirror pairs {i, i + m} that swap the halves' outputs.
    Every rank creates every group, in the same order (new_group is collective)."""
    if d.world < 2 or d.world % 2:
        raise ValueError(f"distributed: CFG-parallel needs an even number of ranks, got {d.world}")
    m = d.world // 2
    g = [_global_rank(d, r) for r in range(d.world)]
    halves = [dist.new_group(g[h * m:(h + 1) * m], timeout=d.timeout) for h in (0, 1)]
    mirrors = [dist.new_group([g[i], g[i + m]], timeout=d.timeout) for i in range(m)]
    h, i = divmod(d.rank, m)
    return (Dist(group=halves[h], rank=i, world=m, device=d.device, timeout=d.timeout),
            Dist(group=mirrors[i], rank=h, world=2, device=d.device, timeout=d.timeout))


def _transformer(pipe):
    tr = getattr(pipe, "transformer", pipe)
    if getattr(tr, "_tiled_diffusion", None) is None:
        raise RuntimeError("distributed: the pipeline is not accelerated; call tiled_diffusion.accelerate(pipe) "
                           "first")
    return tr


def enable(pipe, group: Optional[dist.ProcessGroup] = None, *, d: Optional[Dist] = None, cfg_parallel: bool = False,
           **setup_kwargs) -> DistState:
    """Make an accelerated pipeline's (or transformer's) canvas forward run over the ranks of `group` (or the
    torchrun group, see `setup`): cross_tile bands with halo attention, multidiffusion tiles dealt; every rank
    gets the whole canvas's output, so sampler, schedulers and `pipe(...)` run unchanged on every rank. Every
    rank must call the forward with the same inputs. cfg_parallel (even world): with guidance on, the two CFG
    halves run on the two halves of the ranks (cross_tile; multidiffusion's tile deal splits them anyway).
    `disable` reverts."""
    tr = _transformer(pipe)
    ctx = tr._tiled_diffusion.context
    if ctx.partition is not None:
        return ctx.partition
    d = d or setup(group, **setup_kwargs)
    ds = DistState(d, cfg_parallel)
    ctx.partition = ds
    return ds


def dist_of(pipe) -> Optional[Dist]:
    """The process group a pipeline's canvas runs over (`enable`), or None."""
    ctx = getattr(getattr(getattr(pipe, "transformer", None), "_tiled_diffusion", None), "context", None)
    ds = None if ctx is None else ctx.partition
    return None if ds is None else ds.dist


def disable(pipe) -> None:
    """Undo `enable` (the process group itself is left as it is)."""
    tr = _transformer(pipe)
    ctx = tr._tiled_diffusion.context
    ctx.partition = None


def check_world(pipe, world: int, *, width: int, height: int, guidance_scale: float = 0.0,
                cfg_parallel: bool = False, **overrides) -> None:
    """Refuse, before any work, a canvas with fewer cross_tile tile rows (or multidiffusion tiles, CFG rows
    included) than ranks (per CFG half under CFG-parallel with guidance on). overrides: TiledConfig fields for
    this call (others are ignored)."""
    tr = _transformer(pipe)
    st = tr._tiled_diffusion
    names = {f.name for f in dataclasses.fields(TiledConfig)}
    cfg = dataclasses.replace(st.config, **{k: v for k, v in overrides.items() if k in names})
    patch, vsf = tr.config.patch_size, st.vae_scale_factor
    lat_h, lat_w = height // vsf, width // vsf
    rows = 2 if guidance_scale > 1.0 else 1
    ranks = world // 2 if cfg_parallel and rows == 2 else world
    if cfg.mode == "cross_tile" and (cfg.window is not None or cfg.shift):
        raise ValueError("distributed: multi-process cross_tile runs tile-blocked windows only for now "
                         "(window=None / --window 0, no shift); token-centred windows run on one process")
    if cfg.mode == "cross_tile":
        grid = token_grid(cfg, lat_h, lat_w, patch, 0, vsf)
        if grid.ny * grid.nx > 1:
            split_rows(grid.ny, ranks)
    elif cfg.mode == "multidiffusion":
        n = pixel_grid(cfg, lat_h, lat_w, 1, patch, vsf).num_tiles * rows
        if n > rows and n < world:
            raise ValueError(f"distributed: {world} ranks but only {n} multidiffusion tiles (a rank runs at least "
                             f"one); use at most {n} ranks or a smaller --tile")


# ------------------------------------------------------------------------------ collectives for the run


def on_main(fn: Callable[[], Sequence[Optional[torch.Tensor]]], d: Optional[Dist]) -> list[Optional[torch.Tensor]]:
    """fn() on rank 0 only, its tensors broadcast to every rank (the text encoder: the other ranks never load
    it). Without a group (d None): fn()."""
    if d is None:
        return list(fn())
    return broadcast_tensors(fn() if d.is_main else None, d)


def combine_moments(n: int, mean: torch.Tensor, m2: torch.Tensor, d: Dist) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The (count, mean, M2) form (vae._Stats): every rank's partial [B, G] statistics all-gathered and combined
    with Chan et al.'s pairwise formula in rank order, so every rank gets bitwise the same canvas statistics
    (M2 = Σ(x - mean)²: the per-rank M2s plus the spread of the per-rank means, never a mean of variances)."""
    shape = mean.shape
    mine = torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean.double().reshape(-1).cpu(),
                      m2.double().reshape(-1).cpu()]).to(d.device)
    parts = [torch.empty_like(mine) for _ in range(d.world)]
    work = dist.all_gather(parts, mine, group=d.group, async_op=True)
    _wait([work], d.timeout, "GroupNorm statistics all-gather")
    k = mean.numel()
    tot_n, tot_mean, tot_m2 = 0, None, None
    for p in parts:
        p = p.cpu()
        pn = int(p[0].item())
        if pn:
            tot_n, tot_mean, tot_m2 = merge_moments(tot_n, tot_mean, tot_m2, pn, p[1:1 + k], p[1 + k:])
    if tot_mean is None:
        raise RuntimeError("combine_moments: no rank counted any element")
    return tot_n, tot_mean.reshape(shape).to(mean.device), tot_m2.reshape(shape).to(mean.device)


def broadcast_tensors(tensors: Optional[Sequence[Optional[torch.Tensor]]], d: Dist, src: int = 0
                      ) -> list[Optional[torch.Tensor]]:
    """Rank `src` sends a list of tensors (or Nones: e.g. prompt embeds, mask, negative embeds); the others
    pass None and get them, on their device. Shapes and dtypes travel first as a small object."""
    if d.rank == src:
        if tensors is None:
            raise ValueError("broadcast_tensors: the source rank must pass the tensors")
        meta = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
    else:
        meta = None
    box = [meta]
    dist.broadcast_object_list(box, src=_global_rank(d, src), group=d.group,
                               device=d.device if d.device.type == "cuda" else None)
    meta = box[0]
    out: list[Optional[torch.Tensor]] = []
    works = []
    for i, m in enumerate(meta):
        if m is None:
            out.append(None)
            continue
        if d.rank == src:
            t = tensors[i].to(d.device).contiguous()
        else:
            t = torch.empty(m[0], dtype=m[1], device=d.device)
        works.append(dist.broadcast(t, src=_global_rank(d, src), group=d.group, async_op=True))
        out.append(t)
    _wait(works, d.timeout, "broadcast from rank 0")
    return out


def _padded(band: torch.Tensor, bands_px: Sequence[tuple[int, int]], d: Dist, dim: int) -> torch.Tensor:
    """A rank's band padded to the largest band along dim (collectives need equal shapes), on the group's device."""
    mine = bands_px[d.rank][1] - bands_px[d.rank][0]
    if band.shape[dim] != mine:
        raise ValueError(f"gather_rows: rank {d.rank} holds {band.shape[dim]} rows along dim {dim}, its band "
                         f"{bands_px[d.rank]} has {mine}")
    pad_shape = list(band.shape)
    pad_shape[dim] = max(b - a for a, b in bands_px)
    x = band.new_zeros(pad_shape)
    x.narrow(dim, 0, mine).copy_(band)
    return x.to(d.device)


def gather_rows(band: torch.Tensor, bands_px: Sequence[tuple[int, int]], d: Dist, dim: int = -2) -> torch.Tensor:
    """Every rank's band [..., rows_r, ...] (rows along `dim`) -> the whole tensor on every rank, bands in rank
    order. bands_px: each rank's (start, stop) along dim; uneven bands are padded to the largest for the
    all-gather and trimmed after."""
    dim = dim % band.dim()
    x = _padded(band, bands_px, d, dim)
    parts = [torch.empty_like(x) for _ in range(d.world)]
    work = dist.all_gather(parts, x, group=d.group, async_op=True)
    _wait([work], d.timeout, "gather of the band latents")
    return torch.cat([p.narrow(dim, 0, b - a) for p, (a, b) in zip(parts, bands_px)], dim=dim).to(band.device)


def gather_rows_to_main(band: torch.Tensor, bands_px: Sequence[tuple[int, int]], d: Dist, dim: int = -2
                        ) -> Optional[torch.Tensor]:
    """As gather_rows, but only rank 0 receives (and returns) the whole tensor; the others return None (a decoded
    image: only rank 0 writes it, and no other rank should hold a copy)."""
    dim = dim % band.dim()
    x = _padded(band, bands_px, d, dim)
    parts = [torch.empty_like(x) for _ in range(d.world)] if d.is_main else None
    work = dist.gather(x, parts, dst=_global_rank(d, 0), group=d.group, async_op=True)
    _wait([work], d.timeout, "gather of the decoded rows on rank 0")
    if not d.is_main:
        return None
    return torch.cat([p.narrow(dim, 0, b - a) for p, (a, b) in zip(parts, bands_px)], dim=dim).to(band.device)


# ------------------------------------------------------------------------------ local ranks (tests, bench)


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """`tiled-diffusion <argv> --nproc N` -> the torchrun command that runs the same request on N local ranks
    (`--nproc` removed; `--standalone` picks a free rendezvous port)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tiled_diffusion", *out]


def launch_local(argv: Sequence[str], nproc: int, grace_s: float = 30.0) -> int:
    """Run `tiled-diffusion <argv>` on `nproc` local ranks through torchrun; returns its exit status.

    SIGTERM / SIGINT to this launcher (a supervisor, `kill PID`, Ctrl-C) are forwarded to torchrun, which stops
    its workers (SIGTERM, then SIGKILL after its own grace period); the launcher waits for it, so no worker outlives
    the command, and returns 128 + the signal. torchrun runs in a session of its own so a terminal's Ctrl-C
    reaches it once, through here; each worker also dies with torchrun (`die_with_parent`, set in the CLI)."""
    import signal
    import subprocess

    proc = subprocess.Popen(torchrun_command(argv, nproc), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=grace_s if received else None)
                break
            except subprocess.TimeoutExpired:  # torchrun did not stop its workers in time: end the lot
                proc.kill()
                rc = proc.wait()
                break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else rc


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent exits (a torchrun worker whose torchrun was killed)."""
    _die_with_parent()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the process that forked it exits (a killed test or benchmark must not leave
    ranks computing). Best effort elsewhere."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _local_entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, threads: int) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        res = fn(rank, world, *args)
        torch.save({"ok": res, "elapsed": time.monotonic() - t0, "ended_at": time.monotonic()}, path)
    except BaseException as e:  # report, then exit non-zero
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(),
                    "elapsed": time.monotonic() - t0, "ended_at": time.monotonic()}, path)
        os._exit(1)


def run_local(fn: Callable, world: int, args: tuple = (), *, timeout_s: float = 120.0, threads: int = 1,
              preload: Sequence[str] = ("torch", "tiled_diffusion.parallel.comm")) -> list[dict]:
    """Run fn(rank, world, *args) on `world` local processes with torchrun's environment variables set (so
    `setup()` inside fn initialises the group exactly as under torchrun). One dict per rank: {"ok": result} or
    {"error": "Type: message", "trace": ...}, both with "elapsed" and "ended_at" (time.monotonic(), one clock
    for every process of the machine); {"missing": True} for a rank that died without a report. Raises if a
    rank is still running after timeout_s (a hang).

    fn must be importable (module level). Processes fork from a forkserver that imported `preload` once: a
    fresh interpreter per rank costs seconds of imports, and the server never ran a torch op, so there is no
    thread pool to break by forking."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="td-ranks-") as out_dir:
        procs = [ctx.Process(target=_local_entry, args=(r, world, port, fn, args, out_dir, threads), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        if hung:
            raise TimeoutError(f"run_local: ranks {hung} still running after {timeout_s:g} s (a hang)")
        out = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"missing": True})
    return out
