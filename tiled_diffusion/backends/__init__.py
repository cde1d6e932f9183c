"""Kernel backends: `cpu/` (ISA dispatch and CPU fast paths) and `triton/` (GPU kernels)."""
