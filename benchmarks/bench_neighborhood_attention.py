"""neighborhood_attention at PixArt-XL width on the CPU: 16 heads, D = 72, bf16, a 2048² canvas (128² tokens), B = 2
(classifier-free guidance).

Rows (one process, alternated runs, medians): ours with token-centred windows of 64 tokens (PixArt's 1024-px
training field) at stride 1 (pure neighbourhood attention) and at a GNA stride of 8 tokens, each through the AMX
kernel (where the CPU has AMX-BF16: csrc/cpu/amx_attention.h) and through the torch path (TD_CPU_ISA=avx512:
16x16-token query blocks through torch's fused flash attention); today's tile-blocked `window_attention` (32-token
tiles, radius 1: 96-token windows); plain SDPA over the SAME number of computed query-key scores as the AMX kernel
at stride 1 (one [B, H, N, K] call: the throughput ceiling of the fused CPU kernel); and torch's compiled
`flex_attention` with the stride-1 neighbourhood mask (block-sparse).
GFLOP/s count the scores each method computes (4·D per score and head: QKᵀ and PV); `keys/query` is what each
computes per query (the window itself is 4096): the AMX kernel's row-pair key rows x its segments' key columns
(5200 at stride 1), the torch path's 16x16 block bands (6241).

Run: python benchmarks/bench_neighborhood_attention.py [--quick] [--no-flex]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, measure, print_table  # noqa: E402

from tiled_diffusion import ops  # noqa: E402
from tiled_diffusion import reference  # noqa: E402
from tiled_diffusion.backends.cpu.neighborhood_attention import _axis_blocks, amx_unavailable, block_size  # noqa: E402
from tiled_diffusion.core.tiling import TileGrid  # noqa: E402

HEADS, HEAD_DIM, BATCH = 16, 72, 2


def computed_scores(n: int, window: int, stride: int) -> int:
    """Query-key scores per head the CPU path computes on an n x n canvas (query blocks x their key bands)."""
    ax = _axis_blocks(n, window, stride, False, 0, block_size(stride))
    per_axis = sum((q1 - q0) * (b1 - b0) for q0, q1, b0, b1, _ in ax)
    return per_axis * per_axis


def amx_computed_scores(n: int, window: int, stride: int) -> int:
    """Query-key scores per head the AMX kernel computes on an n x n canvas: per 16-query column segment the union
    of its key columns rounded up to 16, per step the union of the key rows of its one or two query rows. Mirrors
    task() in csrc/cpu/amx_attention.h (rows pair from even rows when their key rows nearly coincide)."""
    lo, hi = (t.tolist() for t in reference.neighborhood_bounds(n, window, stride))
    # per segment: 16 queries (padded) x its key columns rounded up to 16
    cols = sum(16 * 16 * -(-(max(hi[x0:x0 + 16]) - min(lo[x0:x0 + 16])) // 16) for x0 in range(0, n, 16))
    rows, y = 0, 0
    while y < n:
        nr, u = 1, hi[y] - lo[y]
        if y + 1 < n and y % 2 == 0:
            v = max(hi[y], hi[y + 1]) - min(lo[y], lo[y + 1])
            big = max(hi[y] - lo[y], hi[y + 1] - lo[y + 1])
            if v <= big + 1 + big // 8:
                nr, u = 2, v
        rows += nr * u
        y += nr
    return rows * cols


def _torch_path(fn):
    """fn with TD_CPU_ISA=avx512: the CPU path's torch flash attention instead of the AMX kernel."""
    def run():
        old = os.environ.get("TD_CPU_ISA")
        os.environ["TD_CPU_ISA"] = "avx512"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["TD_CPU_ISA"]
            else:
                os.environ["TD_CPU_ISA"] = old
    return run


def _flex(q, k, v, n: int, window: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def na_mask(b, h, q_idx, kv_idx):  # raster tokens; NATTEN's window, shifted inward at the border
        qy, qx, ky, kx = q_idx // n, q_idx % n, kv_idx // n, kv_idx % n
        sy = (qy - window // 2).clamp(0, n - window)
        sx = (qx - window // 2).clamp(0, n - window)
        return (ky >= sy) & (ky < sy + window) & (kx >= sx) & (kx < sx + window)

    mask = create_block_mask(na_mask, None, None, n * n, n * n, device="cpu")
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask), mask


def _row(name, n, scores, med, count, batch=BATCH):
    return {"method": name, "tokens": n * n, "keys/query": scores / (n * n), "ms": med * 1e3,
            "GFLOP/s": 4 * scores * HEAD_DIM * HEADS * batch / med / 1e9, "n": count}


def suite(quick: bool, flex: bool = True) -> list[dict]:
    torch.manual_seed(0)
    n = 32 if quick else 128  # tokens per side (2048 px / 16)
    window = 16 if quick else 64
    tile = window // 2
    stride = window // 8
    iters = 2 if quick else 3
    q, k, v = (torch.randn(BATCH, HEADS, n, n, HEAD_DIM, dtype=torch.bfloat16) for _ in range(3))
    s1, s8 = computed_scores(n, window, 1), computed_scores(n, window, stride)
    a1, a8 = amx_computed_scores(n, window, 1), amx_computed_scores(n, window, stride)
    kc = a1 // (n * n)
    qf = q.reshape(BATCH, HEADS, n * n, HEAD_DIM)
    ks, vs = (t.reshape(BATCH, HEADS, n * n, HEAD_DIM)[:, :, :kc].contiguous() for t in (k, v))
    grid = TileGrid.for_tokens(2 * n, 2 * n, 2 * tile, batch=BATCH)
    tm = lambda t: grid.to_tile_major(t.permute(0, 2, 3, 1, 4).reshape(BATCH, n * n, HEADS, HEAD_DIM)).transpose(1, 2)  # noqa: E731
    qt, kt, vt = (tm(t).contiguous() for t in (q, k, v))
    nb = grid.neighbours(1)
    blocked_scores = int((nb >= 0).sum()) * grid.tokens_per_tile ** 2 // BATCH  # per canvas
    na1 = lambda: ops.neighborhood_attention(q, k, v, (window, window))  # noqa: E731
    na8 = lambda: ops.neighborhood_attention(q, k, v, (window, window), (stride, stride))  # noqa: E731
    amx = amx_unavailable(q) is None
    fns = {}
    if amx:
        fns[f"ours AMX kernel, window {window} stride 1"] = (na1, a1)
        fns[f"ours AMX kernel, window {window} stride {stride} (GNA)"] = (na8, a8)
    fns.update({
        f"ours torch path, window {window} stride 1": (_torch_path(na1), s1),
        f"ours torch path, window {window} stride {stride} (GNA)": (_torch_path(na8), s8),
        f"today: window_attention {tile}-token tiles r1": (lambda: ops.window_attention(qt, kt, vt, nb),
                                                           blocked_scores),
        f"SDPA, {kc} keys/query (the AMX kernel's scores at stride 1)": (
            lambda: F.scaled_dot_product_attention(qf, ks, vs), a1),
    })
    samples = {name: [] for name in fns}
    for fn, _ in fns.values():
        fn()
    for _ in range(iters):
        for name, (fn, _) in fns.items():
            samples[name].append(measure(fn, warmup=0, iters=1)["median_s"])
    rows = [_row(name, n, fns[name][1], statistics.median(t), len(t)) for name, t in samples.items()]
    sdpa = rows[-1]["GFLOP/s"]
    for r in rows:
        r["x SDPA GFLOP/s"] = r["GFLOP/s"] / sdpa
    base = rows[-2]["ms"]
    for r in rows:
        r["x today's time"] = r["ms"] / base
    if not flex:
        return rows
    try:
        fn, mask = _flex(qf[:1], qf[:1].clone(), qf[:1].clone(), n, window)
        fn()  # compile
        m = measure(fn, warmup=0, iters=iters)
        flex_scores = int(mask.kv_num_blocks.sum()) * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1]  # block-level work
        row = _row(f"flex (compiled) window {window} stride 1, B 1", n, flex_scores, m["median_s"], m["n"], batch=1)
        row["x today's time"] = row["ms"] / base
        row["x SDPA GFLOP/s"] = row["GFLOP/s"] / sdpa
        rows.append(row)
    except Exception as e:  # noqa: BLE001 - report why FlexAttention cannot run here
        rows.append({"method": "flex (compiled)", "note": f"failed: {e!r}"[:120]})
    return rows


def test_neighborhood_attention_tiny(benchmark):
    q, k, v = (torch.randn(1, 2, 21, 19, HEAD_DIM, dtype=torch.bfloat16) for _ in range(3))
    out, lse = benchmark(ops.neighborhood_attention, q, k, v, (9, 9))
    assert out.shape == q.shape and torch.isfinite(lse).all()


if __name__ == "__main__":
    print(environment())
    print("load avg before:", os.getloadavg(), "threads:", torch.get_num_threads())
    print_table("neighborhood_attention (B=2, 16 heads, D=72, bf16, 2048² canvas)",
                suite("--quick" in sys.argv, flex="--no-flex" not in sys.argv),
                ["method", "tokens", "keys/query", "ms", "GFLOP/s", "x SDPA GFLOP/s", "x today's time", "n", "note"])
    print("load avg after:", os.getloadavg())
