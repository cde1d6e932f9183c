"""CPU W8A8 GEMM: our VNNI kernel against torch and bitsandbytes, on PixArt-α/δ Linear shapes.

Rows per shape (M tokens, K in, N out):
  ours gemm_packed     int8_gemm_packed, int8 A + packed W, fused epilogue (scales, bias, bf16 out)
  ours quant+gemm      what Int8Linear does per forward: quantize_per_token(bf16 x) + int8_gemm_packed
  torch fp32 Linear    F.linear in fp32
  torch bf16 Linear    F.linear in bf16 (oneDNN AMX/AVX512-BF16)
  torch _int_mm        torch._int_mm(a, wᵀ) -> int32, no epilogue (the integer part alone)
  torch W8A8 composed  per-token quantize with torch ops + _int_mm + dequantize/bias with torch ops -> bf16
  torch dynamic int8   torch.ao.quantization.quantize_dynamic Linear (fp32 in/out, fbgemm)
  bnb int8 matmul      bitsandbytes.functional.int8_linear_matmul -> int32, no epilogue
GOP/s counts 2·M·N·K for every row (the useful multiply-adds); "%peak" is against the VNNI peak measured by
the private op vnni_peak_gops in the same run; ratios are time(baseline) / time(row), > 1 = faster than it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, measure, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402

SHAPES_FULL = [(m, k, n) for m in (4096, 16384) for k, n in ((1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152))]
SHAPES_QUICK = [(64, 96, 80)]


def vnni_peak(seconds: float = 0.25) -> float:
    """Measured int8 VNNI peak in GOP/s over torch's thread count (best of 3 short runs), 0 without VNNI."""
    if ops.cpu_isa() != "avx512":
        return 0.0
    spin = torch.ops.tiled_diffusion_C.vnni_peak_gops
    iters = max(1000, int(seconds * 3.5e9 / 12))
    return max(spin(iters) for _ in range(3))


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
    bias_b = bias.bfloat16()
    impls = {
        "ours gemm_packed": lambda: ops.int8_gemm_packed(a_i8, a_scale, w_packed, w_scale, bias_b, torch.bfloat16),
        "ours quant+gemm": lambda: ops.int8_gemm_packed(*ops.quantize_per_token(x), w_packed, w_scale, bias_b,
                                                        torch.bfloat16),
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
    peak = vnni_peak(0.05 if quick else 0.3)
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
        if not quick:
            peak = max(peak, vnni_peak(0.3))
        for name, t in times.items():
            gops = ops_count / t / 1e9
            rows.append({
                "shape": f"{M}x{K}x{N}", "impl": name, "ms": t * 1e3, "GOP/s": gops,
                "%peak": 100 * gops / peak if peak else float("nan"),
                "x _int_mm": times["torch _int_mm"] / t, "x bf16": times["torch bf16 Linear"] / t,
            })
        for name, note in notes.items():
            rows.append({"shape": f"{M}x{K}x{N}", "impl": name, "note": note})
    for r in rows:
        r["peak GOP/s"] = peak
    return rows


def test_int8_gemm_packed_tiny(benchmark):
    impls, _ = _impls(*SHAPES_QUICK[0])
    benchmark(impls["ours quant+gemm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", help="M,K,N;M,K,N... instead of the default list")
    args = p.parse_args()
    env = environment()
    print(env)
    if args.shapes:
        SHAPES_FULL[:] = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rows = suite(args.quick)
    print_table(f"int8 GEMM (CPU, {ops.cpu_isa()}, load {env['load_avg']:.2f} -> {os.getloadavg()[0]:.2f})", rows,
                ["shape", "impl", "ms", "GOP/s", "%peak", "x _int_mm", "x bf16", "note"])
    print(f"measured VNNI peak: {rows[0]['peak GOP/s']:.0f} GOP/s")


if __name__ == "__main__":
    main()
