"""The canvas forward over ranks: each rank runs a band of the canvas's rows — tile rows with tile-blocked windows
(self-attention exchanges only the `radius` tile rows of K/V above and below the band: HaloLayout +
halo_window_attention, overlapped with the interior tiles), token rows with token-centred windows (hood.py) — and
the outputs are all-gathered once per forward. `enable` plugs a process group into an accelerated transformer's
TileContext.partition; `disable` unplugs it. See comm.py's docstring for the whole design.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..core.config import TiledConfig
from ..core.tiling import TileGrid
from ..model.attention import window_attention
from ..model.canvas import neighborhood, pixel_grid, token_grid, training_field
from .band import CommStats, RowBand, timed_wait
from .comm import Dist, _global_rank, gather_rows, setup, split_rows
from .hood import HoodBand, HoodLayout, split_token_rows

log = logging.getLogger("tiled_diffusion.parallel.halo")


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
        timed_wait(layout, works, d)
        return out
    band_k = k.index_select(0, t["border_k"])
    band_v = v.index_select(0, t["border_k"])
    timed_wait(layout, works, d)
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


class Band(RowBand):
    """This rank's share of one tile-blocked cross_tile canvas forward: the tile rows [y0, y1) of the step's token
    grid.

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

        def latent_rows(r: int) -> torch.Tensor:
            y0, y1 = bands[r]
            t = (torch.arange(y0 * tth, y1 * tth) + sy) % Ht
            return (t[:, None] * p + torch.arange(p)).reshape(-1)

        y0, y1 = bands[rank]
        n_tok = (y1 - y0) * tth
        top = y0 * tth + sy
        offsets = torch.tensor([[top - Ht if top + n_tok > Ht else top, 0]], dtype=torch.long)
        super().__init__([latent_rows(r) for r in range(len(bands))], rank, offsets, d, row_span, mirror)
        self.grid = TileGrid(n_tok * p, grid.width, (grid.th, grid.tw), overlap=0, patch=p, shift=(0, sx))
        self.layout = layout

    def attend(self, q, k, v, head_chunk: Optional[int]) -> torch.Tensor:
        return halo_window_attention(q, k, v, self.layout, self.d, head_chunk)


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

    def _group(self, batch: int):
        """(the group this forward's rows are banded over, this rank's input rows or None, the mirror group or
        None). Under CFG-parallel with an even batch (the CFG halves) rank r works on half r // m of the rows
        (m = world / 2) and its band over the m ranks of that half; otherwise over all ranks."""
        if self.half is None or batch % 2:
            return self.dist, None, None
        h = self.mirror.rank
        return self.half, (h * batch // 2, (h + 1) * batch // 2), self.mirror

    def _layout(self, key, build):
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = build()
            self.stats.layouts.append(layout)
        return layout

    def band(self, grid, radius: int, batch: int = 1) -> Band:
        """This rank's band of `grid` (a token TileGrid of batch 1 for the whole canvas) for `batch` input rows;
        becomes `current` (see `_group` for CFG-parallel)."""
        bd, span, mirror = self._group(batch)
        bands = split_rows(grid.ny, bd.world)
        # the neighbour structure ignores the shift: one layout serves every step
        layout = self._layout(("tiles", grid.ny, grid.nx, grid.tokens_per_tile, radius, bd.world),
                              lambda: HaloLayout(grid, bands, bd.rank, radius))
        self.current = Band(grid, bands, bd.rank, layout, bd, span, mirror)
        self.stats.forwards += 1
        return self.current

    def hood_band(self, hood, token_rows: int, patch: int, batch: int = 1) -> HoodBand:
        """This rank's band of token rows for token-centred windows `hood` (canvas.Neighborhood) on a canvas of
        `token_rows` rows, for `batch` input rows; becomes `current`."""
        bd, span, mirror = self._group(batch)
        bands = split_token_rows(token_rows, hood, bd.world)
        layout = self._layout(("hood", token_rows, hood, bd.world),
                              lambda: HoodLayout(token_rows, bands, bd.rank, hood))
        self.current = HoodBand(bands, bd.rank, patch, layout, bd, span, mirror)
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
        """The self-attention of the forward in progress over its band (window_attention's or
        neighborhood_attention's layout, as the band's kind)."""
        return self.current.attend(q, k, v, head_chunk)


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
    """Refuse, before any work, a canvas with fewer cross_tile row bands (tile rows, or row blocks of token rows)
    or multidiffusion tiles (CFG rows included) than ranks (per CFG half under CFG-parallel with guidance on).
    overrides: TiledConfig fields for this call (others are ignored)."""
    tr = _transformer(pipe)
    st = tr._tiled_diffusion
    names = {f.name for f in dataclasses.fields(TiledConfig)}
    cfg = dataclasses.replace(st.config, **{k: v for k, v in overrides.items() if k in names})
    check_ranks(cfg, tr.config, st.vae_scale_factor, world, width=width, height=height,
                guidance_scale=guidance_scale, cfg_parallel=cfg_parallel)


def check_ranks(cfg: TiledConfig, model_config, vsf: int, world: int, *, width: int, height: int,
                guidance_scale: float = 0.0, cfg_parallel: bool = False) -> None:
    """check_world's test from the config alone (the transformer's config: patch_size, sample_size), so a
    launcher can refuse a request before any rank starts or any model loads."""
    patch = model_config.patch_size
    lat_h, lat_w = height // vsf, width // vsf
    rows = 2 if guidance_scale > 1.0 else 1
    ranks = world // 2 if cfg_parallel and rows == 2 else world
    if cfg.mode == "cross_tile":
        grid = token_grid(cfg, lat_h, lat_w, patch, 0, vsf)
        field = training_field(model_config, lat_h)
        hood = neighborhood(cfg, lat_h, lat_w, patch, 0, field, vsf)
        if hood is None:  # tile-blocked windows: bands of tile rows
            if grid.ny * grid.nx > 1:
                split_rows(grid.ny, ranks)
        elif not (hood.covers(lat_h // patch, lat_w // patch) or (hood.clip and grid.ny * grid.nx == 1)):
            for step in (0, 1) if cfg.shift else (0,):  # bands of token rows, on even and (shift) odd steps
                split_token_rows(lat_h // patch, neighborhood(cfg, lat_h, lat_w, patch, step, field, vsf), ranks)
    elif cfg.mode == "multidiffusion":
        n = pixel_grid(cfg, lat_h, lat_w, 1, patch, vsf).num_tiles * rows
        if n > rows and n < world:
            raise ValueError(f"distributed: {world} ranks but only {n} multidiffusion tiles (a rank runs at least "
                             f"one); use at most {n} ranks or a smaller --tile")
