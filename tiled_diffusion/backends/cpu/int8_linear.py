"""CPU W8A8 linear in one kernel call: float x [M, K] -> per-token quantization fused into the kernel's A packing
-> int8 GEMM against the packed weight -> dequantize + bias + cast to x's dtype (csrc/cpu/int8_gemm.cpp,
private op `tiled_diffusion_C::w8a8_linear`, its fake in ops.py; fused on the avx512 and amx paths, quantize-then-GEMM
on the others).

Bit-identical to `int8_gemm_packed(*quantize_per_token(x), w_packed, w_scale, bias, x.dtype)`; it saves the int8
copy of x (a write and a re-read of M·K bytes, fresh pages every call).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..choice import choose
from . import isa


def available() -> bool:
    """Whether the native library has the fused CPU kernel (an older build may not)."""
    return _native.native_has("w8a8_linear", "cpu")


def w8a8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] fp32/bf16/fp16 (CPU), w_packed from ops.pack_int8_weight, w_scale fp32 [N], bias [N] or None ->
    [M, N] in x's dtype."""
    choose("w8a8_linear", x.device, isa.int8_path(x.device), "per-token quantization fused into the A packing")
    return torch.ops.tiled_diffusion_C.w8a8_linear(x, w_packed, w_scale, bias)
