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
GOP/s counts 2·M·N·K for every row (the useful multiply-adds). `pct_of_peak` is against the register-only peak of the
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
import harness  # noqa: E402
from harness import environment, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402
from tiled_diffusion.backends.cpu import isa as cpu_isa  # noqa: E402
from tiled_diffusion.model.int8 import Int8Linear  # noqa: E402

SHAPES_FULL = [(4096, k, n) for k, n in ((1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152))] + [(120, 4096, 10240)]
SHAPES_QUICK = [(64, 96, 80)]


# isa_peak_gops names and the cycles of one loop iteration per thread (for a ~`seconds` run): 12 zmm instructions,
# or 4 tile instructions of 16 cycles.
_PEAK_PROBES = {"avx512": 12, "avx512_bf16": 12, "amx": 64, "amx_bf16": 64}


def _probe_names() -> list[str]:
    """The peak probes this CPU can run. A forced TD_CPU_ISA below amx also keeps the probes off the tile unit (the
    way to benchmark on a host whose AMX is advertised but faults)."""
    forced = os.environ.get("TD_CPU_ISA")
    out = []
    spin = torch.ops.tiled_diffusion_C.isa_peak_gops
    for name in _PEAK_PROBES:
        if forced and forced != "amx" and name.startswith("amx"):
            continue
        try:
            spin(name, 1)
        except RuntimeError:
            continue  # not on this CPU (the reason: cpu_isa.report())
        out.append(name)
    return out


def isa_peaks(seconds: float = 0.25) -> dict:
    """Register-only peaks (GOP/s, best of 3) of every probe this CPU can run: {name: GOP/s}."""
    spin = torch.ops.tiled_diffusion_C.isa_peak_gops
    return {name: max(spin(name, max(100, int(seconds * 3e9 / _PEAK_PROBES[name]))) for _ in range(3))
            for name in _probe_names()}


def _peak_fns(seconds: float, readings: dict) -> dict:
    """Peak probes as round-robin entries: each call appends its GOP/s reading to readings[name]."""
    spin = torch.ops.tiled_diffusion_C.isa_peak_gops

    def probe(name, iters):
        return lambda: readings[name].append(spin(name, iters))

    fns = {}
    for name in _probe_names():
        readings[name] = []
        fns[f"peak {name}"] = probe(name, max(100, int(seconds * 3e9 / _PEAK_PROBES[name])))
    return fns


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
        "ours w8a8_linear": lambda: ops.w8a8_linear(x, w_packed, w_scale, bias_b),
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


CASE_KEYS = ("m", "k", "n_out", "impl")


def add_arguments(p) -> None:
    p.add_argument("--shape", action="append", default=None, metavar="M,K,N",
                   help="a GEMM shape: M tokens, K in, N out (repeatable; default: PixArt/T5 shapes, quick 64,96,80)")
    p.add_argument("--impl", action="append", default=None,
                   help="only the rows whose impl name contains this (repeatable), e.g. --impl ours --impl bf16")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.split(","))
        assert m > 0 and k > 0 and n > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"bench gemm: --shape must be M,K,N (three positive integers), got {text!r}") from None
    return m, k, n


def suite(quick: bool, args=None) -> list[dict]:
    shapes = [_shape(s) for s in args.shape] if getattr(args, "shape", None) else (
        SHAPES_QUICK if quick else SHAPES_FULL)
    only = getattr(args, "impl", None)
    warmup = args.warmup if getattr(args, "warmup", None) is not None else 1
    rows = []
    ours = ops.cpu_isa()
    probes = {}
    for M, K, N in shapes:
        impls, notes = _impls(M, K, N)
        if only:  # the two baselines stay: the x_int_mm / x_bf16 ratios need them
            impls = {k: v for k, v in impls.items() if any(s in k for s in only) or k in ("torch _int_mm",
                                                                                           "torch bf16 Linear")}
        ops_count = 2 * M * N * K
        big = ops_count > 1e11
        iters = args.iters if getattr(args, "iters", None) is not None else (3 if big else 7)
        # Round robin (every impl once per round, median over rounds), the peak probes in the same round robin:
        # on a shared machine a burst of someone else's work then hits the rows and their peak alike.
        readings: dict = {}
        fns = {**impls, **_peak_fns(0.02 if quick else 0.1, readings)}
        ms = harness.interleaved(fns, warmup=warmup, rounds=iters)
        peaks = {name: statistics.median(v) for name, v in readings.items()}
        probe_why = []
        for name in readings:
            probe = probes.setdefault(name, harness.Probe(f"peak {name}"))
            probe_why += probe.check(ms[f"peak {name}"])
        times = {name: ms[name]["median_s"] for name in impls}
        for name, t in times.items():
            gops = ops_count / t / 1e9
            isa = _row_isa(name, ours, peaks)
            row = {"m": M, "k": K, "n_out": N, "impl": name, "isa": isa, **harness.timing(ms[name]),
                   "gop_per_s": gops, "pct_of_peak": 100 * gops / peaks[isa] if isa in peaks else None,
                   "peak_gop_per_s": peaks.get(isa),
                   "x_int_mm": times["torch _int_mm"] / t, "x_bf16": times["torch bf16 Linear"] / t}
            rows.append(harness.mark_noisy(row, ms[name], probe_why if isa in peaks else ()))
        for name, note in notes.items():
            rows.append({"m": M, "k": K, "n_out": N, "impl": name, "note": note})
    return rows


COLUMNS = ["m", "k", "n_out", "impl", "isa", "n", "median", "p20", "p80", "gop_per_s", "pct_of_peak", "x_int_mm",
           "x_bf16", "noisy", "note"]


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
    add_arguments(p)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--denoise", type=int, metavar="SIZE", help="instead: end-to-end cross_tile denoise at SIZE² px, "
                   "int8=w8a8 vs None alternated (denoise_rows)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    env = environment()
    print(harness.describe(env))
    if args.denoise:
        rows = denoise_rows(args.denoise, args.rounds)
        print_table(f"denoise w8a8 vs bf16 (CPU, {cpu_isa.describe()})", rows,
                    ["size", "int8", "s (median)", "runs", "x bf16"])
        return
    rows = suite(args.quick, args)
    print_table(f"int8 GEMM (CPU, {cpu_isa.describe()}; times in ms)", rows, COLUMNS)


if __name__ == "__main__":
    main()
