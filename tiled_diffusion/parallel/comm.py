"""One image over N processes (torch.distributed): the process group and its collectives (this module), the halo
attention and the canvas forward over ranks (halo.py; token-centred windows: hood.py; what both bands share:
band.py), local launches (launch.py). Rank r owns a band of rows; only halos cross ranks.

Cross-tile attention is windowed. Token-centred windows (the default): a rank that owns the token rows [a, b) needs
the K/V rows its queries' windows reach, about half a window above and below (hood.py). Tile-blocked windows: a
tile attends to the tiles within `radius` (Chebyshev) of it, so a rank that owns the tile rows [y0, y1) of the
canvas needs, per self-attention, only the K/V of the `radius` tile rows above and below its band. Those rows are exchanged point to point with the ranks that own them
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
  the same rows of the single-process result on the CPU path (tests/parallel/test_distributed.py).
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
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..vae.banded import merge_moments

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


