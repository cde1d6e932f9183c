"""The prepared GPU check's measurements (run by benchmarks/gpu_check.sh OUTDIR; issue 21).

    python benchmarks/gpu_check.py OUTDIR            # on one H100/H200: ~3 minutes
    python benchmarks/gpu_check.py --dry-run [OUTDIR] # the same code at tiny sizes on the CPU (CI: tests/cli/test_cli.py)
    python benchmarks/gpu_check.py --require          # only the version gate: one line and exit 2 if unmet

Sections, each a list of rows (a failing section is recorded as a row with its error; the others still run):
- kernels: window attention vs SDPA over the same computed scores (each tile's queries against its gathered
  neighbour K/V: equal FLOPs, one dense call), int8 GEMM (ours, ours + per-token quantize) vs cuBLAS bf16 and
  torch._int_mm, seam blend GB/s vs a device copy of the same bytes; each with % of the GPU's dense peak.
- end_to_end: a PixArt-XL-shaped transformer (28 blocks, random weights, 1152 wide, 16 heads of 72) at 2048² and
  4096², 4 LCM steps through the sampler: cross_tile vs multidiffusion vs global SDPA, bf16 and W8A8; wall time
  and peak CUDA memory (torch.cuda.max_memory_allocated).
Writes OUTDIR/gpu_check.json (rows + environment) and OUTDIR/gpu_check.md (one markdown table), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # harness, bench_pipeline
sys.path.insert(0, os.path.dirname(HERE))  # the project, when not installed

try:
    import torch
except ImportError:  # the version gate's one line, even here
    sys.exit(f"gpu_check: needs torch >= 2.6 with CUDA ({sys.executable} cannot import torch)")

# What this script needs (torch.library.triton_op / wrap_triton: torch 2.6; the Triton kernels: triton 3.2). A lent
# GPU machine has torch 2.11 + triton 3.6 (../shared/gpu/README.md).
MIN_TORCH, MIN_TRITON = (2, 6), (3, 2)

# Dense peaks per GPU (bf16 tensor core, int8 tensor core, HBM bytes/s), from the vendors' data sheets (SXM parts).
PEAKS = {"H100": (989e12, 1979e12, 3.35e12), "H200": (989e12, 1979e12, 4.8e12), "A100": (312e12, 624e12, 2.0e12)}


def _version(v: str) -> tuple:
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in v.split("+")[0].split(".")[:2])


def requirement_problem(dry_run: bool) -> str | None:
    """None if this machine can run the check, else one line naming what it needs."""
    have = f"torch {torch.__version__}"
    if _version(torch.__version__) < MIN_TORCH:
        return f"gpu_check: needs torch >= {'.'.join(map(str, MIN_TORCH))} (found {have})"
    if dry_run:
        return None
    try:
        import triton
    except ImportError:
        return f"gpu_check: needs triton >= {'.'.join(map(str, MIN_TRITON))} (not installed; {have})"
    if _version(triton.__version__) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"gpu_check: needs triton >= {need} (found triton {triton.__version__}, {have})"
    if not torch.cuda.is_available():
        return f"gpu_check: needs a CUDA GPU ({have} sees none; use --dry-run for the CPU-side parts)"
    return None


def _peaks(dev: torch.device):
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _time(fn, dev, warmup=2, iters=10) -> float:
    """Median seconds of fn() (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _pct(x, peak):
    return None if peak is None or x is None else round(100 * x / peak, 1)


# ------------------------------------------------------------------------------------------------ kernels


def attention_rows(dev, dry: bool) -> list[dict]:
    import torch.nn.functional as F

    from tiled_diffusion import ops
    from tiled_diffusion.core.tiling import TileGrid

    peaks = _peaks(dev)
    rows = []
    # PixArt-XL: 16 heads of 72; 2048² = 128² tokens in 32x32-token tiles (L = 1024), radius 1 (9 neighbours)
    cases = [("tiny 32x32 tok", 32, 8)] if dry else [("2048² tiles 32²", 128, 32), ("4096² tiles 32²", 256, 32)]
    H, D = (2, 72) if dry else (16, 72)
    for name, tokens, tile in cases:
        grid = TileGrid.for_tokens(tokens, tokens, tile, batch=1, patch=1)
        T, L = grid.num_tiles, grid.tokens_per_tile
        nb = grid.neighbours(1).to(dev)
        q, k, v = (torch.randn(T, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        pairs = int((nb >= 0).sum()) * L * L
        flops = 4 * pairs * D * H
        idx = nb.long().clamp(min=0)
        # SDPA over the same scores: each tile's queries against its gathered neighbours (gather done beforehand;
        # empty slots masked), i.e. exactly the pairs window attention computes, in one dense call
        kg = k[idx].permute(0, 2, 1, 3, 4).reshape(T, H, -1, D)
        vg = v[idx].permute(0, 2, 1, 3, 4).reshape(T, H, -1, D)
        mask = (nb >= 0).repeat_interleave(L, 1)[:, None, None, :]
        impls = {"window_attention (ours)": lambda: ops.window_attention(q, k, v, nb),
                 "SDPA same scores": lambda: F.scaled_dot_product_attention(q, kg, vg, attn_mask=mask)}
        for impl, fn in impls.items():
            t = _time(fn, dev, iters=3 if dry else 10)
            rows.append({"section": "kernels", "what": f"attention {name}", "impl": impl, "ms": t * 1e3,
                         "TFLOP/s": flops / t / 1e12, "% peak": _pct(flops / t, peaks and peaks[0])})
    return rows


def gemm_rows(dev, dry: bool) -> list[dict]:
    from tiled_diffusion import ops

    peaks = _peaks(dev)
    rows = []
    # PixArt-XL linear shapes at 2048² (16384 tokens): qkv/proj 1152->1152, MLP 1152->4608 and 4608->1152
    shapes = [(64, 96, 80)] if dry else [(16384, 1152, 1152), (16384, 1152, 4608), (16384, 4608, 1152)]
    for M, K, N in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).bfloat16().to(dev)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dev)
        w_i8, w_scale = ops.quantize_per_token(w)
        x_i8, x_scale = ops.quantize_per_token(x)
        wb, bias = w.bfloat16(), torch.zeros(N, device=dev, dtype=torch.bfloat16)
        flops = 2 * M * K * N
        impls = {
            "int8 gemm (ours)": (lambda: ops.int8_gemm(x_i8, x_scale, w_i8, w_scale, bias, torch.bfloat16), 1),
            "quantize + int8 gemm (ours)": (lambda: ops.int8_gemm(*ops.quantize_per_token(x), w_i8, w_scale, bias,
                                                                  torch.bfloat16), 1),
            "cuBLAS bf16 (F.linear)": (lambda: torch.nn.functional.linear(x, wb, bias), 0),
            "torch._int_mm": (lambda: torch._int_mm(x_i8, w_i8.t()), 1),
        }
        for impl, (fn, is_int8) in impls.items():
            try:
                t = _time(fn, dev, iters=3 if dry else 20)
            except RuntimeError as e:  # e.g. _int_mm's shape rules on some builds
                rows.append({"section": "kernels", "what": f"gemm {M}x{K}x{N}", "impl": impl,
                             "error": str(e).splitlines()[0][:160]})
                continue
            peak = peaks and peaks[1 if is_int8 else 0]
            rows.append({"section": "kernels", "what": f"gemm {M}x{K}x{N}", "impl": impl, "ms": t * 1e3,
                         "TFLOP/s": flops / t / 1e12, "% peak": _pct(flops / t, peak)})
    return rows


def blend_rows(dev, dry: bool) -> list[dict]:
    from tiled_diffusion import ops
    from tiled_diffusion.core.tiling import TileGrid

    peaks = _peaks(dev)
    # multidiffusion's latent ε blend at 8192² (1024² latent, 128-latent tiles, overlap 64), bf16
    H, W, tile, overlap, C = (37, 45, 16, 6, 4) if dry else (1024, 1024, 128, 64, 4)
    g = TileGrid(H, W, tile=tile, overlap=overlap, batch=1, patch=1)
    tiles = torch.randn(g.num_tiles, C, g.th, g.tw, device=dev, dtype=torch.bfloat16)
    oy, ox = g.origins(dev)
    w = g.blend_weights("cosine", device=dev)
    nbytes = (tiles.numel() + C * H * W) * 2  # tiles read once, canvas written once
    src = torch.randn(nbytes // 4, device=dev, dtype=torch.bfloat16)  # a copy moving the same bytes (read+write)
    dst = torch.empty_like(src)
    rows = []
    for impl, fn in (("seam_blend (ours)", lambda: ops.seam_blend(tiles, oy, ox, w, 1, H, W)),
                     ("device copy, same bytes", lambda: dst.copy_(src))):
        t = _time(fn, dev, iters=3 if dry else 20)
        rows.append({"section": "kernels", "what": f"seam blend {H}x{W} lat, {g.num_tiles} tiles bf16", "impl": impl,
                     "ms": t * 1e3, "GB/s": nbytes / t / 1e9, "% peak": _pct(nbytes / t, peaks and peaks[2])})
    return rows


# --------------------------------------------------------------------------------------------- end to end


def end_to_end_rows(dev, dry: bool) -> list[dict]:
    from bench_pipeline import PROMPT_LEN, TEXT_DIM, run_denoise, xl_transformer
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_scheduler

    layers = 1 if dry else 28
    sizes = [128] if dry else [2048, 4096]
    # tiles in pixels: cross_tile 512 (the project's default for XL), multidiffusion 1024 at 50% overlap
    modes = [("cross_tile", 64 if dry else 512), ("multidiffusion", 64 if dry else 1024), ("global", None)]
    rows = []
    for int8 in (None, "w8a8"):
        tr = xl_transformer(layers, torch.bfloat16).to(dev)
        P.accelerate(tr, int8=int8)
        g = torch.Generator().manual_seed(1)
        embeds = torch.randn(1, 8 if dry else PROMPT_LEN, TEXT_DIM, generator=g).bfloat16().to(dev)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
        for size in sizes:
            for mode, tile in modes:
                row = {"section": "end_to_end", "what": f"XL {layers} blocks {size}² 4 LCM steps",
                       "impl": f"{mode}{'' if tile is None else f' tile {tile}'} {int8 or 'bf16'}"}
                try:
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    if not dry:  # compile/tune the kernels and fill the caches outside the timed run
                        run_denoise(tr, tiny_scheduler(), embeds, mask, size, mode, tile or size, 1)
                    t0 = time.perf_counter()
                    lat = run_denoise(tr, tiny_scheduler(), embeds, mask, size, mode, tile or size, 4)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    row["s"] = time.perf_counter() - t0
                    row["finite"] = bool(torch.isfinite(lat).all())
                    if dev.type == "cuda":
                        row["peak GB"] = torch.cuda.max_memory_allocated() / 2 ** 30
                except Exception as e:  # one configuration failing (e.g. out of memory) must not end the check
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                rows.append(row)
                print(row, flush=True)
        P.restore(tr)
        del tr
    return rows


# ------------------------------------------------------------------------------------------------- report

COLUMNS = ["section", "what", "impl", "ms", "s", "TFLOP/s", "GB/s", "% peak", "peak GB", "finite", "error"]


def markdown(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "/")

    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def environment(dev) -> dict:
    env = {"torch": torch.__version__, "device": str(dev), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(dev)
        env["peaks (bf16, int8 FLOP/s, HBM B/s)"] = _peaks(dev)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (no CUDA needed)")
    ap.add_argument("--require", action="store_true", help="only check the versions (one line, exit 2 if unmet)")
    args = ap.parse_args(argv)
    problem = requirement_problem(args.dry_run)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.require:
        return 0
    if args.outdir is None and not args.dry_run:
        print("gpu_check: usage: gpu_check.py OUTDIR (or --dry-run)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    rows = []
    for section in (attention_rows, gemm_rows, blend_rows, end_to_end_rows):
        t0 = time.perf_counter()
        try:
            rows += section(dev, args.dry_run)
        except Exception as e:
            traceback.print_exc()
            rows.append({"section": section.__name__, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                         if str(e) else type(e).__name__})
        print(f"[{section.__name__}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
        with open(os.path.join(args.outdir, "gpu_check.json"), "w") as f:
            json.dump({"environment": environment(dev), "dry_run": args.dry_run, "rows": rows}, f, indent=1,
                      default=str)
        with open(os.path.join(args.outdir, "gpu_check.md"), "w") as f:
            f.write(f"# gpu_check ({environment(dev).get('gpu', 'CPU dry run')})\n\n{table}\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
