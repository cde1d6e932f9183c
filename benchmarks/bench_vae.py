"""VAE decode / encode: plain vs the exact banded path vs approximate tiles, time, error and peak memory.

Rows per (op, canvas, dtype): `plain` (vae.decode / vae.encode as diffusers runs them, NCHW), `plain channels-last` (tiled_diffusion.vae.banded.decode/encode's plain path), `banded` (tiled_diffusion.vae.banded.decode/encode with a
forced band height of `tile` latent rows: exact canvas GroupNorm and global mid-block attention), `overlap` (the
approximate `tiled_decode`, per-tile GroupNorm), and `diffusers tiling` (the peer: `enable_tiling()` with tiles of `tile` latent px, overlap 0.25, per-tile
GroupNorm, linear cross-fade). `x plain` = time / the plain time of the same row group (the headline: target
<= 1.3 for banded); `rel_rms` = relative RMS difference from the plain result of the same dtype; `peak GB` = the
largest RSS increase while the row ran (CPU), `est GB` = what the memory rule estimates for that method.

Full-size SD/PixArt VAE config (block_out 128/256/512/512, 2 layers per block, 32 groups), random weights; the
latent is noise plus a smooth large-scale field so that bands and tiles have different statistics.

    python benchmarks/bench_vae.py [--quick] [--sizes 1024,2048] [--dtypes bf16,fp32] [--methods plain,banded]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import VAE_QUICK, VAE_SD  # noqa: E402
from bench_pipeline import PeakRSS  # noqa: E402
from harness import environment, print_table  # noqa: E402

from tiled_diffusion.vae import banded as V  # noqa: E402
from tiled_diffusion.vae.plan import _estimates  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_METHODS = ("plain", "plain channels-last", "banded", "diffusers tiling", "overlap")
ENCODE_METHODS = ("plain", "plain channels-last", "banded")


def _vae(config: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**config).eval().to(dtype)


def _latents(h: int, w: int, dtype) -> torch.Tensor:
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    field = torch.stack([xx, yy, xx * yy, torch.sin(3 * xx)])[None]
    return (0.7 * torch.randn(1, 4, h, w) + 1.5 * field).to(dtype)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def _decode_fn(vae, z, method: str, tile: int):
    if method == "plain":  # diffusers' decode as called (NCHW)
        return lambda: vae.decode(z, return_dict=False)[0]
    if method == "plain channels-last":  # tiled_diffusion.vae.banded.decode's plain path: the same in channels-last
        return lambda: V.decode(vae, z, tile=z.shape[-2], progress=False)
    if method == "banded":
        return lambda: V.decode(vae, z, tile=tile, progress=False)
    if method == "overlap":
        return lambda: V.tiled_decode(vae, z, tile=tile, overlap=tile // 4)
    if method == "diffusers tiling":
        f = V.vae_scale_factor(vae)

        def run():
            vae.enable_tiling()
            vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * f
            try:
                return vae.decode(z, return_dict=False)[0]
            finally:
                vae.disable_tiling()
        return run
    raise ValueError(method)


def _encode_fn(vae, x, method: str, tile: int):
    if method == "plain":
        return lambda: vae.encode(x).latent_dist.mean
    if method == "plain channels-last":
        return lambda: V.encode(vae, x, tile=x.shape[-2], sample=False, progress=False)
    return lambda: V.encode(vae, x, tile=tile, sample=False, progress=False)


CLOCK = time.perf_counter  # --cpu-time: time.process_time (with --threads 1: robust to a loaded machine)


def _timed(fn, iters: int):
    """(result, median seconds, peak RSS increase GB) of fn() run `iters` times (the first one is the warmup when
    iters > 1)."""
    times, out, peak = [], None, 0
    for i in range(max(1, iters) + (1 if iters > 1 else 0)):
        with PeakRSS() as p, torch.no_grad():
            t0 = CLOCK()
            out = fn()
            dt = CLOCK() - t0
        peak = max(peak, p.delta)
        if iters == 1 or i > 0:
            times.append(dt)
    times.sort()
    return out, times[len(times) // 2], peak / 2**30


def _est_gb(vae, method: str, H: int, W: int, dtype, tile: int, encode: bool) -> float:
    if method.startswith("plain"):
        e = _estimates(vae, H, W, encode=encode, rows=None, es=torch.finfo(dtype).bits // 8, batch=1)["plain"]
        return e / 2**30
    if method == "banded":
        return sum(V.estimate_banded_bytes(vae, H, W, dtype, tile=tile, encode=encode)) / 2**30
    return float("nan")


def run_rows(config: dict, sizes: list[int], dtypes: list[str], tile: int, iters: int, methods=DECODE_METHODS,
             encode: bool = True) -> list[dict]:
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        vae = _vae(config, dtype)
        f = V.vae_scale_factor(vae)
        for side in sizes:
            z = _latents(side // f, side // f, dtype)
            groups = [("decode", DECODE_METHODS, _decode_fn, z)]
            if encode:
                groups.append(("encode", ENCODE_METHODS, _encode_fn, None))
            for op, all_methods, make, inp in groups:
                ref = t_ref = t_cl = None
                for method in [m for m in all_methods if m in methods]:
                    if op == "encode" and inp is None:  # encode the plain decode of z: a realistic image
                        with torch.no_grad():
                            inp = vae.decode(z, return_dict=False)[0].clamp(-1, 1)
                    out, t, peak = _timed(make(vae, inp, method, tile), iters)
                    if method == "plain":
                        ref, t_ref = out, t
                    if method == "plain channels-last":
                        t_cl = t
                    rows.append({"op": op, "canvas": f"{side}²", "dtype": dname, "method": method,
                                 "tile": tile if not method.startswith("plain") else "", "time_s": t,
                                 "x_plain": t / t_ref if t_ref else float("nan"),
                                 "x_plain_cl": t / t_cl if t_cl else float("nan"),
                                 "rel_rms": _rms(out, ref) if ref is not None else float("nan"),
                                 "peak_GB": peak, "est_GB": _est_gb(vae, method, side, side, dtype, tile, op == "encode")})
                    print(rows[-1], flush=True)
                del ref, out
    return rows


def suite(quick: bool) -> list[dict]:
    if quick:  # a small-channel VAE of the same layout at 128², 4 bands / 2x2 tiles: seconds
        return run_rows(VAE_QUICK, [128], ["fp32"], tile=4, iters=1,
                        methods=("plain", "plain channels-last", "banded", "diffusers tiling", "overlap"))
    return run_rows(VAE_SD, [1024, 2048], ["bf16", "fp32"], tile=64, iters=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1024,2048", help="canvas sides in px, e.g. 1024,2048,4096")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--methods", default=",".join(DECODE_METHODS))
    ap.add_argument("--tile", type=int, default=64, help="latent rows per band / latent px per tile")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true", help="time = process CPU time (use with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    env = environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    if args.quick:
        rows = suite(quick=True)
    else:
        rows = run_rows(VAE_SD, [int(s) for s in args.sizes.split(",")], args.dtypes.split(","), args.tile,
                        args.iters, methods=args.methods.split(","), encode=not args.no_encode)
    print_table("vae", rows)


if __name__ == "__main__":
    main()
