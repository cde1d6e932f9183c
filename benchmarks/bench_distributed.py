"""One canvas over N ranks: bytes each rank sends per step (COUNTED), time blocked on communication, peak
memory per rank; and a PROJECTION for 8×H100 next to the all-gather traffic of DistriFusion / xDiT.

Measured rows (`kind` = "measured"): N local gloo ranks on this machine (`distributed.run_local`), each running the
accelerated transformer's canvas forward on its band — `windows` = "blocked" (cross_tile, 512-px tiles, radius 1:
bands of tile rows) or "token" (the default token-centred windows, 1x the 1024-px training field: bands of token
rows, K/V rows exchanged as far as the windows reach) — at PixArt-XL width
(16 heads × 72 = 1152, caption 4096 × 120 tokens, bf16, float linears) with `BLOCKS` blocks. One step = one canvas
forward (the scheduler step is element-wise and identical on every rank). Columns:
  halo_MB/step   K/V bytes this rank sent to its neighbour ranks per step (counted by the halo exchange)
  gather_MB/step the band output sent to the other ranks (the ε all-gather; a ring sends the part N-1 times)
  formula_ok     the counted halo bytes equal blocks × Σ_peers 2 (K, V) × rows × W × C × 2 B (rows: tile rows ×
                 tile tokens, or token rows)
  wait %         time blocked on the halo after the interior tiles were done + in the ε all-gather (which also
                 absorbs load imbalance between ranks), as a share of the step
  fwd_peak_MB    peak RSS during the forwards minus RSS before them (activations; model weights excluded)
The 2 ranks share this machine's 2 cores (1 thread each) against 2 threads for the 1-rank row, so `step_s` is a
like-for-like scaling figure for this machine only.

Projection rows (`kind` = "PROJECTION", never measured): 8 ranks on 8×H100 at 4096² and 8192², 28 blocks, bf16.
  compute: FLOPs per step / (989 TFLOP/s × efficiency): linears at GEMM_EFF, window attention at the
           bench_window_attention kernel assumption (H100_EFF); split evenly over the ranks (tile rows divide).
  ours:    the halo bytes of the formula above (checked against the counts of the measured rows), sent in both
           directions at once over NVLink (450 GB/s per direction) or PCIe (25 GB/s); exposed, because with bands
           of 1-2 tile rows every tile is a border tile (no interior attention to hide the exchange behind).
  xDiT / DistriFusion (patch parallel): every layer all-gathers K and V of the whole image; a ring sends
           (N-1)/N of it per rank. Their time is not projected (they hide it behind stale K/V).
  Projected for 512-px tiles (the default) and 256-px tiles: the halo is one tile row per neighbour per radius.

VAE rows (`kind` = "vae decode", measured): one decode of the canvas by `vae.banded_decode` on 1 rank (2 threads)
and over 2 local gloo ranks (1 thread each; `part=`), one band per rank's share; step_s = the decode's seconds,
halo_MB/step = the bytes the rank sent (row halos, the mid-block K/V all-gather, its image rows to rank 0),
fwd_peak_MB = peak RSS minus RSS before (the rank's store + band). The full suite decodes 1024² with the SD VAE
(random weights, bf16); --quick a 4-level 32-channel VAE at 256² in fp32.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, print_table  # noqa: E402

HEADS, HEAD_DIM, CAPTION, TEXT_TOKENS, TILE_PX, RADIUS = 16, 72, 4096, 120, 512, 1
HIDDEN = HEADS * HEAD_DIM
BLOCKS = 2
H100_PEAK = 989e12  # dense bf16, SXM
GEMM_EFF = 0.6  # large bf16 GEMMs (M ≥ 8k, K, N ≥ 1152) on H100: ~600 TFLOP/s
NVLINK, PCIE = 450e9, 25e9  # bytes/s per direction


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _transformer(width: int, heads: int, head_dim: int, caption: int, blocks: int, dtype, sample_size: int = 128):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                      out_channels=8, num_layers=blocks, cross_attention_dim=heads * head_dim,
                                      caption_channels=caption, sample_size=sample_size, patch_size=2,
                                      norm_type="ada_norm_single")
    return tr.to(dtype).eval()


def _worker(rank: int, world: int, p: dict) -> dict:
    """Build the transformer, run `warmup + steps` canvas forwards; per-step timings and counters."""
    from tiled_diffusion import parallel as D
    from tiled_diffusion import pipeline as P

    dtype = getattr(torch, p["dtype"])
    tr = _transformer(p["width"], p["heads"], p["head_dim"], p["caption"], p["blocks"], dtype, p.get("sample_size", 128))
    kw = dict(window=None) if p["windows"] == "blocked" else {}  # {}: the default token-centred windows
    P.accelerate(tr, mode="cross_tile", tile=p["tile"], radius=p["radius"], int8=None, **kw)
    ds = None
    if world > 1:
        ds = D.enable(tr, d=D.setup(backend="gloo", device="cpu", timeout_s=1800))
    g = torch.Generator().manual_seed(0)
    lat_h = lat_w = p["pixels"] // 8
    lat = torch.randn(1, 4, lat_h, lat_w, generator=g).to(dtype)
    emb = torch.randn(1, TEXT_TOKENS, p["caption"], generator=g).to(dtype)
    added = {"resolution": torch.tensor([[p["pixels"], p["pixels"]]], dtype=dtype),
             "aspect_ratio": torch.tensor([[1.0]], dtype=dtype)}
    t = torch.tensor([999])
    rss0 = _rss_mb()
    steps = []
    with torch.no_grad():
        for i in range(p["warmup"] + p["steps"]):
            before = ds.stats.as_dict() if ds else {}
            t0 = time.perf_counter()
            tr(lat, encoder_hidden_states=emb, timestep=t, added_cond_kwargs=added, return_dict=False)
            dt = time.perf_counter() - t0
            if i >= p["warmup"]:
                after = ds.stats.as_dict() if ds else {}
                steps.append({"step_s": dt, **{k: after[k] - before[k] for k in after}})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB
    res = {"steps": steps, "fwd_peak_mb": peak - rss0, "halo_formula_bytes": None}
    if ds is not None:
        lay = ds.stats.layouts[0]
        H, Dh = p["heads"], p["head_dim"]
        if isinstance(lay, D.HoodLayout):  # token rows x canvas width in tokens
            row_tokens, band_rows = lat_w // tr.config.patch_size, lay.b - lay.a
        else:  # tile rows x tiles per row x tokens per tile
            row_tokens, band_rows = lay.nx * lay.grid.tokens_per_tile, lay.rows
        per_layer = sum(2 * (b - a) * row_tokens * H * Dh * torch.finfo(dtype).bits // 8 for _, a, b in lay.send_to)
        res["halo_formula_bytes"] = per_layer * p["blocks"]
        res["band_rows"] = band_rows
        D.teardown(ds.dist)
    return res


def _ranks(fn, world: int, p: dict, timeout_s: float, kind: str, preload: tuple) -> list[tuple[int, dict, dict]]:
    """fn on `world` local gloo ranks (2 // world threads each: the 2 cores split evenly); per rank (rank, its
    report or None, the row's common columns, with the failure as a note)."""
    from tiled_diffusion import parallel as D

    results = D.run_local(fn, world, (p,), timeout_s=timeout_s, threads=max(1, 2 // world),
                          preload=("torch", "tiled_diffusion.parallel.comm") + preload + (__name__,))
    out = []
    for r, res in enumerate(results):
        row = {"kind": kind, "canvas": f"{p['pixels']}²", "ranks": world, "rank": r, "windows": p.get("windows")}
        if "ok" not in res:
            row["note"] = f"failed: {res.get('error', 'no report')}"[:160]
        out.append((r, res.get("ok"), row))
    return out


def _measure(pixels: int, world: int, p: dict, timeout_s: float) -> list[dict]:
    rows = []
    for r, x, row in _ranks(_worker, world, dict(p, pixels=pixels), timeout_s, "measured",
                            ("tiled_diffusion.pipeline.swaps", "diffusers.models.transformers.pixart_transformer_2d")):
        rows.append(row)
        if x is None:
            continue
        st = sorted(x["steps"], key=lambda s: s["step_s"])[len(x["steps"]) // 2]  # the median step
        row.update({"width": p["width"], "blocks": p["blocks"], "step_s": st["step_s"],
                    "fwd_peak_MB": x["fwd_peak_mb"]})
        if world > 1:
            row.update({"band_rows": x["band_rows"], "halo_MB/step": st["halo_bytes"] / 2**20,
                        "formula_ok": st["halo_bytes"] == x["halo_formula_bytes"],
                        "gather_MB/step": st["gather_bytes"] / 2**20,
                        "wait %": 100 * (st["halo_wait_s"] + st["gather_s"]) / st["step_s"],
                        "halo_wait %": 100 * st["halo_wait_s"] / st["step_s"]})
    for row in rows:
        row["load"] = os.getloadavg()[0]  # the machine is shared: figures taken at a high load are noisy
    return rows


# ------------------------------------------------------------------------------------------ projection


def step_flops(pixels: int, blocks: int, hidden: int = HIDDEN, tile_px: int = TILE_PX, radius: int = RADIUS,
               text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one canvas forward: linears (attn1 q/k/v/out, attn2 q/out, MLP 4x: 14·C² MACs per token per
    block) and attention (window: 4·keys·C per query token over the tiles each tile really sees; text: 4·S·C)."""
    from tiled_diffusion.core.tiling import TileGrid

    lat = pixels // 8
    grid = TileGrid.for_tokens(lat, lat, tile_px // 8, patch=2)
    n = grid.tokens_h * grid.tokens_w
    keys = int((grid.neighbours(radius) >= 0).sum()) * grid.tokens_per_tile ** 2  # query-key pairs
    return {"linear": blocks * n * 28 * hidden * hidden,
            "attention": blocks * (4 * keys * hidden + 4 * n * text_tokens * hidden), "tokens": n, "grid": grid}


def halo_bytes_per_step(pixels: int, ranks: int, blocks: int, hidden: int = HIDDEN, tile_px: int = TILE_PX,
                        radius: int = RADIUS, elem: int = 2) -> dict:
    """K/V bytes a middle rank sends per step (both neighbours), from the same HaloLayout the run uses."""
    from tiled_diffusion import parallel as D
    from tiled_diffusion.core.tiling import TileGrid

    lat = pixels // 8
    grid = TileGrid.for_tokens(lat, lat, tile_px // 8, patch=2)
    bands = D.split_rows(grid.ny, ranks)
    per_rank = []
    for r in range(ranks):
        lay = D.HaloLayout(grid, bands, r, radius)
        per_rank.append(sum(2 * (b - a) * grid.nx * grid.tokens_per_tile * hidden * elem for _, a, b in lay.send_to))
    # each direction is its own link: the time is set by the larger of the two sends
    one_dir = max((b - a) * grid.nx * grid.tokens_per_tile * 2 * hidden * elem
                  for r in range(ranks) for _, a, b in D.HaloLayout(grid, bands, r, radius).send_to)
    return {"max_rank": blocks * max(per_rank), "one_direction": blocks * one_dir, "band_rows": bands[0][1]}


def projection(pixels: int, ranks: int = 8, blocks: int = 28, tile_px: int = TILE_PX) -> list[dict]:
    """The halo is `radius` tile rows per neighbour and the all-gather (N-1)/N of the image, so per rank
    ours/allgather ≈ 2·radius·tile_px·N / ((N-1)·canvas_px): it falls with smaller tiles and larger canvases."""
    import bench_window_attention as bwa

    f = step_flops(pixels, blocks, tile_px=tile_px)
    t1 = f["linear"] / (H100_PEAK * GEMM_EFF) + f["attention"] / (H100_PEAK * bwa.H100_EFF)
    ours = halo_bytes_per_step(pixels, ranks, blocks, tile_px=tile_px)
    lat = pixels // 8
    eps_gather = 8 * (lat * lat // ranks) * 2 * (ranks - 1)  # the band's ε (8 channels, bf16), sent N-1 times
    kv_all = blocks * 2 * f["tokens"] * HIDDEN * 2  # every layer's K and V of the whole image, bf16
    allgather = kv_all * (ranks - 1) // ranks
    rows = []
    for link, bw in (("NVLink 450 GB/s", NVLINK), ("PCIe 25 GB/s", PCIE)):
        comm = ours["one_direction"] / bw + eps_gather / bw
        tn = t1 / ranks + comm
        rows.append({"kind": "PROJECTION", "canvas": f"{pixels}²", "tile_px": tile_px, "blocks": blocks,
                     "ranks": ranks, "link": link,
                     "band_rows": ours["band_rows"], "t1_step_s": t1, "tN_step_s": tn, "efficiency %": 100 * t1 / (ranks * tn),
                     "ours_MB/step": (ours["max_rank"] + eps_gather) / 2**20,
                     "allgather_MB/step": allgather / 2**20,
                     "ours/allgather": (ours["max_rank"] + eps_gather) / allgather})
    return rows


def projections() -> list[dict]:
    return [r for tile in (TILE_PX, TILE_PX // 2) for px in (4096, 8192) for r in projection(px, tile_px=tile)]


# ------------------------------------------------------------------------------------ parallel VAE decode


def _vae_worker(rank: int, world: int, p: dict) -> dict:
    """One decode of a pixels² canvas (banded, one band per rank's share: `vae.decode` with dist), timed."""
    from tiled_diffusion import parallel as D
    from tiled_diffusion.parallel.vae import RowPartition
    from tiled_diffusion.vae import banded as V

    from bench_memory import VAE_QUICK, VAE_SD
    from bench_vae import _vae

    vae = _vae(VAE_QUICK if p["small"] else VAE_SD, getattr(torch, p["dtype"]))  # the VAE suite's models
    d = D.setup(backend="gloo", device="cpu", timeout_s=3600) if world > 1 else None
    z = torch.randn(1, 4, p["pixels"] // 8, p["pixels"] // 8, generator=torch.Generator().manual_seed(0))
    rss0 = _rss_mb()
    part = RowPartition(d, z.shape[-2]) if d is not None else None
    t0 = time.perf_counter()
    img = V.banded_decode(vae, z, tile=p["pixels"] // 8, part=part)
    dt = time.perf_counter() - t0
    res = {"s": dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
           "sent": 0 if part is None else part.bytes_sent, "image": img if rank == 0 else None}
    if d is not None:
        D.teardown(d)
    return res


def vae_rows(pixels: int, small: bool, dtype: str, worlds=(1, 2)) -> list[dict]:
    """Parallel VAE decode: 1 rank (2 threads) vs N ranks (2 // N threads each) on this machine; rank 0's image
    compared with the one-rank image (relative RMS)."""
    p = dict(pixels=pixels, small=small, dtype=dtype)
    rows, ref, t1 = [], None, None
    for world in worlds:
        for r, x, row in _ranks(_vae_worker, world, p, 3600, "vae decode", ("tiled_diffusion.vae.banded",)):
            rows.append(row)
            if x is None:
                continue
            row.update({"width": "small" if small else "SD", "step_s": x["s"], "fwd_peak_MB": x["peak_mb"],
                        "halo_MB/step": x["sent"] / 2**20, "load": os.getloadavg()[0]})
            if r == 0:
                img = x["image"].double()
                if ref is None:
                    ref, t1 = img, x["s"]
                row["note"] = (f"x1 rank {x['s'] / t1:.2f}, rel RMS vs 1 rank "
                               f"{((img - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item():.1e}")
    return rows


def suite(quick: bool) -> list[dict]:
    if quick:  # 2 gloo ranks, a tiny width (divisible by 3: the micro-condition embedding): the path in seconds
        p = dict(width=24, heads=2, head_dim=12, caption=32, blocks=2, tile=128, radius=1, dtype="float32",
                 warmup=0, steps=1)
        # token rows: a 16-latent-px training field (8-token windows), so 512² has 2 row blocks of 16 tokens
        rows = _measure(512, 2, dict(p, windows="token", sample_size=16), timeout_s=300)
        rows += _measure(256, 2, dict(p, windows="blocked"), timeout_s=300)
        return rows + vae_rows(256, True, "float32") + projections()
    # one timed forward per configuration (after one warm-up at 2048²): a 4096² forward of 2 blocks is ~10 TFLOP
    p = dict(width=HIDDEN, heads=HEADS, head_dim=HEAD_DIM, caption=CAPTION, blocks=BLOCKS, tile=TILE_PX,
             radius=RADIUS, dtype="bfloat16", warmup=1, steps=1)
    rows = []
    for pixels in (2048, 4096):
        q = dict(p, warmup=0) if pixels >= 4096 else p
        for windows in ("token", "blocked"):
            for world in (1, 2):
                rows += _measure(pixels, world, dict(q, windows=windows), timeout_s=3600)
    return rows + vae_rows(1024, False, "bfloat16") + projections()


COLUMNS = ["kind", "canvas", "windows", "tile_px", "width", "blocks", "ranks", "rank", "band_rows", "link", "step_s", "wait %",
           "halo_wait %", "halo_MB/step", "formula_ok", "gather_MB/step", "fwd_peak_MB", "load", "t1_step_s", "tN_step_s",
           "efficiency %", "ours_MB/step", "allgather_MB/step", "ours/allgather", "note"]


if __name__ == "__main__":
    env = environment()
    print(env)
    print_table("distributed (cross_tile over ranks)", suite("--quick" in sys.argv), COLUMNS)
    print("load avg after:", os.getloadavg()[0])
