"""seam_blend / blend_lcm_step throughput: GB/s of the CPU path vs a plain copy of the same bytes.

Bytes counted = the minimum an implementation must move: read every tile element once, write the canvas once
(blend_lcm_step: + read sample and noise, write prev_sample and denoised). The copy baseline moves the same number
of bytes (read half, write half) with `Tensor.copy_` into a reused buffer and with `clone()` into a fresh one
(the ops allocate their outputs, so fresh-page faults are part of their cost), so `% of copy` / `% of clone` is the
fraction of this machine's practical memory bandwidth reached. The H100 column is a roofline projection (bytes / 3.35 TB/s), not a measurement.

    python benchmarks/bench_seam_blend.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, measure, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402
from tiled_diffusion.core.tiling import TileGrid  # noqa: E402

H100_BW = 3.35e12


def _case(H, W, tile, overlap, C, B, dtype):
    g = TileGrid(H, W, tile=tile, overlap=overlap, batch=B, patch=1)
    tiles = torch.randn(g.num_tiles, C, g.th, g.tw).to(dtype)
    oy, ox = g.origins()
    return g, tiles, oy, ox, g.blend_weights("cosine")


def _copy_times(nbytes: int, dtype, iters: int) -> tuple[float, float]:
    """(copy into a reused buffer, clone into a fresh allocation) of nbytes/2 read + nbytes/2 written.

    The ops return freshly allocated canvases; on Linux a large fresh allocation is mmap'd and its first touch
    page-faults, which costs about as much as the copy itself, so the clone is the fair baseline."""
    n = max(nbytes // 2 // torch.finfo(dtype).bits * 8, 1)
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    return (measure(lambda: dst.copy_(src), iters=iters)["median_s"],
            measure(lambda: src.clone(), iters=iters)["median_s"])


def suite(quick: bool) -> list[dict]:
    # (name, canvas H, W, tile, overlap, C, B): latent ε-blend of MultiDiffusion (C=4) and the VAE's pixel blend (C=3).
    cases = [("latent 2048px", 256, 256, 128, 32, 4, 1), ("latent 4096px", 512, 512, 128, 32, 4, 1),
             ("vae 2048px", 2048, 2048, 512, 128, 3, 1)]
    if quick:
        cases = [("tiny", 37, 45, 16, 6, 4, 2)]
    iters = 3 if quick else 7
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.finfo(dtype).bits // 8
        for name, H, W, tile, overlap, C, B in cases:
            g, tiles, oy, ox, w = _case(H, W, tile, overlap, C, B, dtype)
            canvas = B * C * H * W
            sample = torch.randn(B, C, H, W).to(dtype)
            noise = torch.randn(B, C, H, W).to(dtype)
            for op, fn, nbytes in (
                ("seam_blend", lambda: ops.seam_blend(tiles, oy, ox, w, B, H, W), (tiles.numel() + canvas) * es),
                ("blend_lcm_step", lambda: ops.blend_lcm_step(tiles, oy, ox, w, sample, noise, 0.3, 0.95, 0.01,
                                                              0.99, 0.6, 0.8), (tiles.numel() + 4 * canvas) * es),
            ):
                t = measure(fn, iters=iters)["median_s"]
                tc, tclone = _copy_times(nbytes, dtype, iters)
                rows.append({"op": op, "case": name, "dtype": str(dtype).replace("torch.", ""),
                             "tiles": g.num_tiles, "coverage": round(tiles.numel() / canvas, 2),
                             "MB": nbytes / 1e6, "ms": t * 1e3, "GB/s": nbytes / t / 1e9,
                             "copy GB/s": nbytes / tc / 1e9, "clone GB/s": nbytes / tclone / 1e9,
                             "% of copy": 100 * tc / t, "% of clone": 100 * tclone / t,
                             "H100 proj us": nbytes / H100_BW * 1e6})
    return rows


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
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(environment())
    print_table("seam_blend (CPU path)", suite(a.quick))
