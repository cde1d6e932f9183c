"""seam_blend / blend_lcm_step throughput: GB/s of the CPU path vs a plain copy of the same bytes.

Bytes counted = the minimum an implementation must move: read every tile element once, write the canvas once
(blend_lcm_step: + read sample and noise, write prev_sample and denoised). The copy baseline moves the same number
of bytes (read half, write half) with `Tensor.copy_` into a reused buffer and with `clone()` into a fresh one
(the ops allocate their outputs, so fresh-page faults are part of their cost), so `pct_of_copy` / `pct_of_clone` is the
fraction of this machine's practical memory bandwidth reached. The H100 column is a roofline projection (bytes / 3.35 TB/s), not a measurement.

    python benchmarks/bench_seam_blend.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import environment, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402
from tiled_diffusion.core.tiling import TileGrid  # noqa: E402

H100_BW = 3.35e12


def _case(H, W, tile, overlap, C, B, dtype):
    g = TileGrid(H, W, tile=tile, overlap=overlap, batch=B, patch=1)
    tiles = torch.randn(g.num_tiles, C, g.th, g.tw).to(dtype)
    oy, ox = g.origins()
    return g, tiles, oy, ox, g.blend_weights("cosine")


def _copy_fns(nbytes: int, dtype) -> dict:
    """copy into a reused buffer and clone into a fresh allocation, of nbytes/2 read + nbytes/2 written.

    The ops return freshly allocated canvases; on Linux a large fresh allocation is mmap'd and its first touch
    page-faults, which costs about as much as the copy itself, so the clone is the fair baseline."""
    n = max(nbytes // 2 // torch.finfo(dtype).bits * 8, 1)
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    return {"copy": lambda: dst.copy_(src), "clone": lambda: src.clone()}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASE_KEYS = ("op", "label", "height", "width", "tile", "overlap", "channels", "batch", "dtype")


def _canvas(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--canvas must be HEIGHTxWIDTH in latent pixels (e.g. 256x512), "
                                         f"got {text!r}") from None
    return h, w


def add_arguments(p) -> None:
    p.add_argument("--canvas", type=_canvas, action="append", default=None, metavar="HxW",
                   help="canvas in latent pixels, repeatable (default: latent 2048px/4096px and a VAE 2048px case)")
    p.add_argument("--tile", type=int, default=None, help="tile side (default 128; with --canvas)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap (default tile/4; with --canvas)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(_DTYPES), action="append", default=None,
                   help="repeatable (default: fp32 and bf16)")


def suite(quick: bool, args=None) -> list[dict]:
    a = args
    # (name, canvas H, W, tile, overlap, C, B): latent ε-blend of MultiDiffusion (C=4) and the VAE's pixel blend (C=3).
    cases = [("latent 2048px", 256, 256, 128, 32, 4, 1), ("latent 4096px", 512, 512, 128, 32, 4, 1),
             ("vae 2048px", 2048, 2048, 512, 128, 3, 1)]
    if quick:
        cases = [("tiny", 37, 45, 16, 6, 4, 2)]
    if getattr(a, "canvas", None):
        tile = a.tile or 128
        overlap = a.overlap if a.overlap is not None else tile // 4
        cases = [(f"{H}x{W}", H, W, min(tile, H, W), overlap, a.channels, a.batch) for H, W in a.canvas]
    dtypes = [_DTYPES[d] for d in getattr(a, "dtype", None) or ("fp32", "bf16")]
    iters = a.iters if getattr(a, "iters", None) is not None else (7 if quick else 7)
    warmup = a.warmup if getattr(a, "warmup", None) is not None else 1
    rows = []
    for dtype in dtypes:
        es = torch.finfo(dtype).bits // 8
        for name, H, W, tile, overlap, C, B in cases:
            try:
                g, tiles, oy, ox, w = _case(H, W, tile, overlap, C, B, dtype)
            except ValueError as e:
                raise SystemExit(f"bench blend: {e}") from None
            canvas = B * C * H * W
            sample = torch.randn(B, C, H, W).to(dtype)
            noise = torch.randn(B, C, H, W).to(dtype)
            for op, fn, nbytes in (
                ("seam_blend", lambda: ops.seam_blend(tiles, oy, ox, w, B, H, W), (tiles.numel() + canvas) * es),
                ("blend_lcm_step", lambda: ops.blend_lcm_step(tiles, oy, ox, w, sample, noise, 0.3, 0.95, 0.01,
                                                              0.99, 0.6, 0.8), (tiles.numel() + 4 * canvas) * es),
            ):
                # the op and its copy/clone baselines round robin: a busy spell slows all three alike
                ms = harness.interleaved({"op": fn, **_copy_fns(nbytes, dtype)}, warmup=warmup, rounds=iters)
                t, tc, tclone = (ms[k]["median_s"] for k in ("op", "copy", "clone"))
                why = [w for k in ("copy", "clone") for w in harness.Probe(k).check(ms[k])]
                row = {"op": op, "label": name, "height": H, "width": W, "tile": tile, "overlap": overlap,
                       "channels": C, "batch": B, "dtype": str(dtype).replace("torch.", ""),
                       "tiles": g.num_tiles, "coverage": round(tiles.numel() / canvas, 2),
                       "mb": nbytes / 1e6, **harness.timing(ms["op"]), "gb_per_s": nbytes / t / 1e9,
                       "copy_gb_per_s": nbytes / tc / 1e9, "clone_gb_per_s": nbytes / tclone / 1e9,
                       "pct_of_copy": 100 * tc / t, "pct_of_clone": 100 * tclone / t,
                       "h100_proj_us": nbytes / H100_BW * 1e6}
                rows.append(harness.mark_noisy(row, ms["op"], why))
    return rows


COLUMNS = ["op", "label", "dtype", "tiles", "mb", "n", "median", "p20", "p80", "gb_per_s", "copy_gb_per_s",
           "pct_of_copy", "pct_of_clone", "h100_proj_us", "noisy"]


def test_seam_blend_cpu(benchmark):
    g, tiles, oy, ox, w = _case(37, 45, 16, 6, 4, 2, torch.float32)
    benchmark(ops.seam_blend, tiles, oy, ox, w, 2, 37, 45)


def test_blend_lcm_step_cpu(benchmark):
    g, tiles, oy, ox, w = _case(37, 45, 16, 6, 4, 2, torch.float32)
    s, z = torch.randn(2, 4, 37, 45), torch.randn(2, 4, 37, 45)
    benchmark(ops.blend_lcm_step, tiles, oy, ox, w, s, z, 0.3, 0.95, 0.01, 0.99, 0.6, 0.8)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a loaded machine)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    add_arguments(p)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(harness.describe(environment()))
    print_table("seam_blend (CPU path; ms)", suite(a.quick, a), COLUMNS)
