"""CPU W8A8 GEMM: our kernels (the ISA path in use: amx / avx512 / avx2 / ref) against torch and bitsandbytes, on
PixArt-α/δ Linear shapes and T5-XXL's FFN shape at M = 120.

Rows per shape (M tokens, K in, N out):
  ours gemm_packed     int8_gemm_packed, int8 A + packed W, fused epilogue (scales, bias, bf16 out)
  ours gemm plain w    int8_gemm on the plain int8 [N, K] weight (packing included in the time)
  ours quant+gemm      quantize_per_token(bf16 x) + int8_gemm_packed (two ops)
  ours w8a8_linear     what Int8Linear does per forward: bf16 x -> quantization fused into the A packing -> bf16
  torch fp32 Linear    F.linear in fp32
  torch bf16 Linear    F.linear in bf16 (oneDNN AMX/AVX512-BF16)
  torch _int_mm        torch._int_mm(a, wᵀ) -> int32, no epilogue (the integer part alone)
  torch W8A8 composed  per-token quantize with torch ops + _int_mm + dequantize/bias with torch ops -> bf16
  torch dynamic int8   torch.ao.quantization.quantize_dynamic Linear (fp32 in/out, fbgemm)
  bnb int8 matmul      bitsandbytes.functional.int8_linear_matmul -> int32, no epilogue
GOP/s counts 2·M·N·K for every row (the useful multiply-adds). "%peak" is against the register-only peak of the
row's own ISA measured in the same run by the private op isa_peak_gops: int8 rows (ours, _int_mm, bnb, composed,
dynamic) against the int8 peak of the ISA (ours: the path in use; torch: the best the CPU has, amx or avx512),
bf16 Linear against the bf16 peak (tdpbf16ps / vdpbf16ps), fp32 rows have none. Column `isa` says which.
Ratios are time(baseline) / time(row), > 1 = faster than it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, measure, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402
from tiled_diffusion.backends.cpu import int8_linear  # noqa: E402
from tiled_diffusion.backends.cpu import isa as cpu_isa  # noqa: E402
from tiled_diffusion.model.int8 import Int8Linear  # noqa: E402

SHAPES_FULL = [(4096, k, n) for k, n in ((1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152))] + [(120, 4096, 10240)]
SHAPES_QUICK = [(64, 96, 80)]


# isa_peak_gops names and the cycles of one loop iteration per thread (for a ~`seconds` run): 12 zmm instructions,
# or 4 tile instructions of 16 cycles.
_PEAK_PROBES = {"avx512": 12, "avx512_bf16": 12, "amx": 64, "amx_bf16": 64}


def isa_peaks(seconds: float = 0.25) -> dict:
    """Register-only peaks (GOP/s, best of 3) of every probe this CPU can run: {name: GOP/s}."""
    out = {}
    spin = torch.ops.tiled_diffusion_C.isa_peak_gops
    for name, cycles in _PEAK_PROBES.items():
        try:
            spin(name, 1)
        except RuntimeError:
            continue  # not on this CPU (the reason: cpu_isa.report())
        iters = max(100, int(seconds * 3e9 / cycles))
        out[name] = max(spin(name, iters) for _ in range(3))
    return out


def _row_isa(name: str, ours: str, peaks: dict) -> str:
    """Which ISA (and peak) a row is measured against."""
    if name.startswith("ours"):
        return ours
    if "fp32" in name:
        return "fp32"
    best = "amx" if "amx" in peaks else "avx512"
    return best + "_bf16" if "bf16" in name else best


def _torch_w8a8(x, w_t, w_scale, bias):
    """The composed baseline: everything a user without our kernels would write with torch ops."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.round(xf / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(q, w_t)
    return (acc.float() * s * w_scale + bias).to(torch.bfloat16)


def _impls(M, K, N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(N, generator=g) * 0.1
    w_scale = w.abs().amax(dim=1) / 127
    w_i8 = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    w_packed = ops.pack_int8_weight(w_i8)
    a_i8, a_scale = ops.quantize_per_token(x)
    w_t = w_i8.t()  # _int_mm wants [K, N]; a transposed view of a row-major [N, K] is what oneDNN prefers
    xf, wf = x.float(), w
    xb, wb, bb = x, w.bfloat16(), bias.bfloat16()
    lin_b = torch.nn.Linear(K, N, dtype=torch.bfloat16)
    with torch.no_grad():
        lin_b.weight.copy_(wb)
        lin_b.bias.copy_(bb)
    qlin = Int8Linear.from_linear(lin_b, "w8a8")
    bias_b = bias.bfloat16()
    impls = {
        "ours gemm_packed": lambda: ops.int8_gemm_packed(a_i8, a_scale, w_packed, w_scale, bias_b, torch.bfloat16),
        "ours gemm plain w": lambda: ops.int8_gemm(a_i8, a_scale, w_i8, w_scale, bias_b, torch.bfloat16),
        "ours quant+gemm": lambda: ops.int8_gemm_packed(*ops.quantize_per_token(x), w_packed, w_scale, bias_b,
                                                        torch.bfloat16),
        "ours w8a8_linear": lambda: int8_linear.w8a8_linear(x, w_packed, w_scale, bias_b),
        "ours Int8Linear": lambda: qlin(x),
        "torch fp32 Linear": lambda: F.linear(xf, wf, bias),
        "torch bf16 Linear": lambda: F.linear(xb, wb, bb),
        "torch _int_mm": lambda: torch._int_mm(a_i8, w_t),
        "torch W8A8 composed": lambda: _torch_w8a8(x, w_t, w_scale, bias),
    }
    notes = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin = torch.nn.Linear(K, N)
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(bias)
            dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                         dtype=torch.qint8)
            dyn(xf[:2])
        impls["torch dynamic int8"] = lambda: dyn(xf)
    except Exception as e:  # pragma: no cover - depends on the torch build
        notes["torch dynamic int8"] = f"skipped: {type(e).__name__}: {e}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnbf

            bnbf.int8_linear_matmul(a_i8[:2], w_i8)
        impls["bnb int8 matmul"] = lambda: bnbf.int8_linear_matmul(a_i8, w_i8)
    except Exception as e:  # pragma: no cover - optional dependency
        notes["bnb int8 matmul"] = f"skipped: {type(e).__name__}: {e}"
    return impls, notes


def suite(quick: bool) -> list[dict]:
    rows = []
    peaks = isa_peaks(0.02 if quick else 0.25)
    ours = ops.cpu_isa()
    for M, K, N in SHAPES_QUICK if quick else SHAPES_FULL:
        impls, notes = _impls(M, K, N)
        ops_count = 2 * M * N * K
        big = ops_count > 1e11
        # Round robin (every impl once per round, median over rounds): on a shared machine a burst of someone
        # else's work then hits all rows alike instead of whichever row happened to run during it.
        samples = {name: [] for name in impls}
        for fn in impls.values():
            measure(fn, warmup=0, iters=1)
        for _ in range(3 if big else 7):
            for name, fn in impls.items():
                samples[name].append(measure(fn, warmup=0, iters=1)["median_s"])
        times = {name: statistics.median(v) for name, v in samples.items()}
        if not quick:  # re-measured beside every shape: on a shared machine the best one is the idle one
            peaks = {k: max(v, isa_peaks(0.25).get(k, 0.0)) for k, v in peaks.items()}
        for name, t in times.items():
            gops = ops_count / t / 1e9
            isa = _row_isa(name, ours, peaks)
            rows.append({
                "shape": f"{M}x{K}x{N}", "impl": name, "isa": isa, "ms": t * 1e3, "GOP/s": gops,
                "%peak": 100 * gops / peaks[isa] if isa in peaks else float("nan"),
                "x _int_mm": times["torch _int_mm"] / t, "x bf16": times["torch bf16 Linear"] / t,
            })
        for name, note in notes.items():
            rows.append({"shape": f"{M}x{K}x{N}", "impl": name, "note": note})
    for r in rows:
        r["cpu isa"] = cpu_isa.describe()
        for name, v in peaks.items():
            r[f"peak {name}"] = v
    return rows


def denoise_rows(size: int = 1024, rounds: int = 2, steps: int = 4, tile: int = 512, layers: int = 2) -> list[dict]:
    """End to end: the cross_tile denoise of the PixArt-XL-width transformer (`layers` blocks, synthetic weights,
    bf16, 120 synthetic prompt tokens) with int8="w8a8" against int8=None, the two runs alternated `rounds` times
    in this process (each median is over the same load). Slow: minutes at 2048² on 2 cores; not in suite()."""
    from bench_pipeline import PROMPT_LEN, TEXT_DIM, _scheduler, run_denoise, xl_transformer

    from tiled_diffusion import pipeline as P

    models = {}
    for name, mode in (("bf16", None), ("w8a8", "w8a8")):
        tr = xl_transformer(layers, torch.bfloat16)
        P.accelerate(tr, mode="cross_tile", int8=mode)
        models[name] = tr
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, PROMPT_LEN, TEXT_DIM, generator=g).bfloat16()
    mask = torch.ones(1, PROMPT_LEN, dtype=torch.long)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, tr in models.items():
            t0 = time.perf_counter()
            run_denoise(tr, sched, embeds, mask, size, "cross_tile", tile, steps)
            times[name].append(time.perf_counter() - t0)
            print(f"  {size}² {name}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    return [{"size": f"{size}²", "int8": name, "s (median)": med[name], "runs": " ".join(f"{t:.2f}" for t in v),
             "x bf16": med["bf16"] / med[name], "cpu isa": cpu_isa.describe()} for name, v in times.items()]


def test_int8_gemm_packed_tiny(benchmark):
    impls, _ = _impls(*SHAPES_QUICK[0])
    benchmark(impls["ours quant+gemm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", help="M,K,N;M,K,N... instead of the default list")
    p.add_argument("--denoise", type=int, metavar="SIZE", help="instead: end-to-end cross_tile denoise at SIZE² px, "
                   "int8=w8a8 vs None alternated (denoise_rows)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    env = environment()
    print(env)
    if args.denoise:
        rows = denoise_rows(args.denoise, args.rounds)
        print_table(f"denoise w8a8 vs bf16 (CPU, {cpu_isa.describe()})", rows,
                    ["size", "int8", "s (median)", "runs", "x bf16"])
        return
    if args.shapes:
        SHAPES_FULL[:] = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rows = suite(args.quick)
    print_table(f"int8 GEMM (CPU, {cpu_isa.describe()}, load {env['load_avg']:.2f} -> {os.getloadavg()[0]:.2f})",
                rows, ["shape", "impl", "isa", "ms", "GOP/s", "%peak", "x _int_mm", "x bf16", "note"])
    print("register-only peaks (GOP/s): " + ", ".join(f"{k[5:]} {v:.0f}" for k, v in rows[0].items()
                                                      if k.startswith("peak ")))


if __name__ == "__main__":
    main()
