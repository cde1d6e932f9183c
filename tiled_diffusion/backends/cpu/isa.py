"""Which instruction set the CPU int8 kernels use, and why (the probe lives in csrc/cpu/isa.cpp).

The native library probes the CPU once per process: cpuid, the OS-enabled register state (xgetbv) and, for AMX,
the tile-data permission asked of Linux (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`). Best first:

    amx     AMX-TILE + AMX-INT8 (tdpbssd), with AVX-512 for the quantization and the epilogue
    avx512  AVX-512 F/BW/VL/DQ + VNNI (vpdpbusd)
    avx2    AVX2 + FMA + F16C (vpmaddubsw/vpmaddwd)
    ref     plain C++

`TD_CPU_ISA=amx|avx512|avx2|ref` forces a path (read at every call; an ISA the machine cannot run raises an error
that carries the probe's reason). `TD_CPU_SIMULATE_AMX=refused` (read once, at the probe) makes the probe act as
on a CPU with AMX whose kernel refuses the tile permission: the fallback path of tests/backends/cpu/test_cpu_isa.py.
`TILED_DIFFUSION_LOG=debug` logs the choice with every ISA's reason once.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from ... import _native as _native_lib

ISAS = ("amx", "avx512", "avx2", "ref")

log = logging.getLogger("tiled_diffusion")


def _native():
    return _native_lib.lib()


def cpu_isa() -> str:
    """The ISA the CPU int8 kernels take now ("none" without the native library)."""
    lib = _native()
    return "none" if lib is None else lib.cpu_isa()


def report() -> dict[str, str]:
    """{isa: "yes" or the reason it cannot run here}, best first; {} without the native library."""
    lib = _native()
    if lib is None:
        return {}
    out = {}
    for line in lib.cpu_isa_report().splitlines():
        name, _, verdict = line.partition(": ")
        if name in ISAS:
            out[name] = "yes" if verdict == "yes" else verdict.removeprefix("no (").removesuffix(")")
    return out


def usable(isa: str) -> tuple[bool, str]:
    """(whether `isa` can run here, the reason when not)."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    why = report().get(isa, "tiled_diffusion._C is not built")
    return why == "yes", "" if why == "yes" else why


def describe() -> str:
    """One line for reports (bench, inspect): the ISA in use and why the better ones are not."""
    isa = cpu_isa()
    if isa == "none":
        return "none (tiled_diffusion._C is not built)"
    skipped = [f"{name}: {why}" for name, why in report().items() if why != "yes" and ISAS.index(name) <
               ISAS.index(isa)]
    if os.environ.get("TD_CPU_ISA"):
        skipped.insert(0, f"forced by TD_CPU_ISA={os.environ['TD_CPU_ISA']}")
    return isa + (f" ({'; '.join(skipped)})" if skipped else "")


def log_choice() -> None:
    """Log the ISA in use with the probe's reasons, once per distinct description (debug level)."""
    if log.isEnabledFor(logging.DEBUG):
        _log_once(describe())


@functools.lru_cache(maxsize=None)
def _log_once(text: str) -> None:
    log.debug("CPU int8 kernels: %s", text)

