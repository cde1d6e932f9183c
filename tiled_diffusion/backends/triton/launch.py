"""Launch plumbing shared by the Triton launchers: CUDA's grid limits, one pure grid function per kernel, and the
device guard.

Grids are plain integer arithmetic (no Triton, no tensors) so that tests/backends/triton/test_launch.py checks them on the CPU
against CUDA's limits for the largest canvases the README promises, and so that torch.compile can evaluate them
on symbolic sizes (`cdiv` is `-(-a // b)`, which SymInts support). The CUDA int8 GEMM computes its grid in C++;
`td_int8_gemm_grid` / `td_quantize_per_token_grid` in `_C` export that very computation for the same test.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake

# CUDA's launch limits (every compute capability we build for): grid.x < 2^31, grid.y and grid.z ≤ 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def cdiv(a, b):
    """ceil(a / b) for non-negative ints (and SymInts)."""
    return -(-a // b)


def check_grid(grid: tuple, kernel: str) -> tuple:
    """The grid padded to 3 axes; a clear error instead of CUDA's 'invalid argument' when an axis is too large."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    for axis, (n, limit) in enumerate(zip(g, MAX_GRID)):
        if isinstance(n, int) and n > limit:
            raise ValueError(f"{kernel}: launch grid {g} exceeds CUDA's limit {limit} on axis {'xyz'[axis]}: "
                             f"the input is too large for one launch")
    return g


def window_attention_launches(tiles: int, heads: int) -> list:
    """(first (tile, head) pair, number of pairs) of each launch of `_window_attention_fwd`: the T·H pairs live on
    axis y, at most 65535 per launch; T·H reaches 524288 at 16384² with 4 images, CFG and 256-px tiles (8 launches
    there, one below 65536 pairs)."""
    n = tiles * heads
    return [(s, min(MAX_GRID[1], n - s)) for s in range(0, n, MAX_GRID[1])]


def window_attention_grid(pairs: int, tokens: int, block_m: int) -> tuple:
    """Grid of one launch: (query blocks of BLOCK_M, (tile, head) pairs). The query blocks of one (tile, head) are
    adjacent programs on axis x, so they run together and share that pair's neighbour K/V in L2. (A 1-D grid
    with the split done in the kernel costs a runtime division that pushed sm_80 over 255 registers: spills.)"""
    return (cdiv(tokens, block_m), pairs)


def seam_blend_grid(batch: int, channels: int, height: int, width: int, block_y: int, block_x: int) -> tuple:
    """Grid of `seam_blend_kernel` and `blend_lcm_step_kernel`: (pixel blocks of one plane, B·C planes). The
    pixel blocks (≥ 65536 from an 8192² latent) sit on axis x; B·C (images × CFG × 4 channels) on axis y."""
    return (cdiv(height, block_y) * cdiv(width, block_x), batch * channels)


def programs_bucket(n: int) -> int:
    """The autotune key's coarse bucket of a launch's program count: the next power of 4 ≥ n (1, 4, 16, ...).
    A config tuned on a 2-tile first call is not reused for a 16384² canvas (different bucket), while canvases
    of similar size share one tuning run."""
    b = 1
    while b < n:
        b *= 4
    return b


def device_guard(t: torch.Tensor):
    """Makes `t`'s GPU current while a kernel launches: Triton takes the device and stream from the current
    device, so without this a launch on cuda:1 tensors from a thread whose current device is cuda:0 runs on the
    wrong GPU / stream (the C++ ops use a CUDAGuard for the same reason). No-op for CPU tensors (interpreter) and
    for fake tensors: tracing (torch.compile) launches nothing, and inductor's generated code guards itself."""
    if t.device.type == "cuda" and not is_fake(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
