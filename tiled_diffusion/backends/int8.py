"""The int8 path, decided here and nowhere else in Python.

- `auto_mode(device)`: which int8 mode `int8="auto"` takes on a device (w8a8, or None for bf16), and why.
- `packs_weight(mode, device)`: whether a W8A8 layer keeps the CPU kernel's blocked weight layout.
- `route(op, device, reference=)`: which implementation an int8 op runs, logged through `choose`.

`model/int8.py` (resolve_mode, Int8Linear) and `ops.py` (the int8 ops' bodies) ask these functions and only act
on the answer. Below this line the native library picks the CPU instruction set at run time (csrc/cpu/isa.cpp,
surfaced by `backends/cpu/isa.py`): that is a property of the machine, not a second policy.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .._native import native_has
from .choice import choose
from .cpu import isa

log = logging.getLogger("tiled_diffusion")

# Where "auto" turns W8A8 on for a CPU ISA, with the evidence (benchmarks/NOTES.md, "CPU kernels"). Only measured
# wins are listed as True: a default a user pays for is worse than no default.
AUTO_W8A8_CPU = {
    "avx512": (True, "AVX-512 VNNI int8 kernel: the W8A8 linear (bf16 in/out, quantization included) measured "
                     "1.4-2.0x bf16 nn.Linear on the PixArt and T5 shapes (AMD Zen 5, loaded; Zen 4 idle 1.7-1.9x), "
                     "denoise 1024² 1.6x"),
    "amx": (True, "AMX int8 kernel: the W8A8 linear (bf16 in/out, quantization included) measured 0.60-0.94x the time "
                  "of bf16 nn.Linear (itself on AMX-BF16 through oneDNN) on PixArt-XL shapes, M = 4096, 1 thread "
                  "(Intel Xeon, loaded; benchmarks/NOTES.md)"),
    "avx2": (False, "AVX2 only: the int8 path (vpmaddubsw emulation of VNNI) has not been measured against bf16"),
    "ref": (False, "no SIMD int8 kernel for this CPU: the reference int8 GEMM is slower than bf16"),
    "none": (False, "tiled_diffusion._C is not built: no CPU int8 kernels"),
}


def auto_mode(device) -> tuple[Optional[str], str]:
    """The mode `int8="auto"` takes on `device` and why: w8a8 only where it was measured faster than bf16 on that
    device / ISA (AUTO_W8A8_CPU for CPUs), else None (bf16). The reason is logged at INFO level."""
    dev = torch.device(device)
    if dev.type == "cpu":
        name = isa.cpu_isa()
        pays, why = AUTO_W8A8_CPU.get(name, (False, f"unknown CPU int8 path {name!r}"))
        mode, reason = ("w8a8" if pays else None), f"CPU int8 path {name}: {why}"
    elif dev.type == "cuda":
        # Only measured wins turn W8A8 on (as for CPUs). On H100 cuBLAS bf16 runs wgmma near peak while the int8
        # kernel is mma.sync plus a separate per-token quantize pass: its 2x MMA rate is not a measured win.
        mode, reason = None, ("CUDA: bf16 (cuBLAS) until the int8 GEMM (mma.sync + a quantize pass) is measured "
                              "faster on a GPU (benchmarks/gpu_check.sh); pass int8='w8a8' to use it")
    else:
        mode, reason = None, f"no int8 kernels for device type {dev.type!r}: the reference is slower than bf16"
    log.info("int8='auto' on %s -> %s (%s)", dev, mode, reason)
    return mode, reason


def packs_weight(mode: str, device: torch.device) -> bool:
    """Whether a layer of `mode` on `device` holds the packed weight layout (`pack_int8_weight`): only the CPU
    kernels read one; on other devices the packed weight is the plain [N, K] one."""
    return mode == "w8a8" and device.type == "cpu"


def _native_name(device: torch.device) -> str:
    """The native path's name for the log: "C++ <isa>" on the CPU. cpu_isa() is an op call (~µs): only asked for
    when the choice is actually logged (never while compiling: the logger check would break the graph on every
    layer)."""
    if device.type != "cpu" or torch.compiler.is_compiling() or not log.isEnabledFor(logging.DEBUG):
        return "C++"
    isa.log_choice()  # the ISA with the probe's reasons, once
    return f"C++ {isa.cpu_isa()}"


def route(op: str, device: torch.device, *, reference: bool = False) -> str:
    """The implementation int8 op `op` runs on `device`; `reference`: TD_IMPL routes it to its reference twin.

    Answers (each logged once through `choose`, with its reason):
      "reference"  the pure-torch twin (TD_IMPL, or a device type without native kernels)
      "native"     the C++/CUDA kernel (`_native.native_for` names the fix when the build lacks it)
      "identity"   pack_int8_weight off the CPU: the plain layout is the packed one
      "plain"      int8_gemm_packed off the CPU: the same as int8_gemm
      "composite"  w8a8_linear without a fused kernel: quantize_per_token + int8_gemm_packed (bit-identical)
    """
    if op == "pack_int8_weight":  # a layout, not a computation: TD_IMPL does not apply
        if packs_weight("w8a8", device):
            choose(op, device, "C++", "the CPU kernel's VNNI layout")
            return "native"
        choose(op, device, "identity", "only the CPU kernel uses a packed layout")
        return "identity"
    if reference:
        choose(op, device, "reference", "TD_IMPL")
        return "reference"
    if op == "w8a8_linear":
        if device.type == "cpu" and native_has("w8a8_linear", "cpu"):
            choose(op, device, _native_name(device), "per-token quantization fused into the A packing")
            return "native"
        choose(op, device, "quantize_per_token + int8_gemm_packed", "no fused kernel for this device")
        return "composite"
    if op == "int8_gemm_packed":
        if packs_weight("w8a8", device):
            choose(op, device, _native_name(device), "CPU packed layout")
            return "native"
        return "plain"  # int8_gemm's route is logged by int8_gemm itself
    if op not in ("quantize_per_token", "int8_gemm"):
        raise ValueError(f"route: {op!r} is not an int8 op")
    if device.type in ("cpu", "cuda"):
        choose(op, device, _native_name(device), "native kernel")
        return "native"
    choose(op, device, "reference", "no native kernel for this device type")
    return "reference"
