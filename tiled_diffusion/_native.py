"""The only importer of the native library `tiled_diffusion._C` (C++ CPU kernels, CUDA kernels when built with nvcc).

The library is optional at import time (NATTEN's stubs.py idea): a missing `_C` only fails the ops that need it,
with the fix in the message; everything else keeps working.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

try:
    from . import _C  # noqa: F401  (registers the private ops in namespace tiled_diffusion_C)

    NATIVE_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    NATIVE_ERROR = str(e)

FIX = 'build it with: pip install --no-build-isolation -e ".[dev]"  (see README.md)'


def lib():
    """`torch.ops.tiled_diffusion_C`, or None without the native library."""
    return None if _C is None else torch.ops.tiled_diffusion_C


def native_op(name: str) -> Callable:
    """The C++ kernel `tiled_diffusion_C::<name>`, or a clear error when the library is missing."""
    if _C is None:
        raise RuntimeError(f"tiled_diffusion._C is not available ({NATIVE_ERROR}); {FIX}")
    try:
        return getattr(torch.ops.tiled_diffusion_C, name)
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(f"tiled_diffusion._C has no kernel {name!r} ({e}); {FIX}") from None


def native_has(name: str, device_type: str) -> bool:
    """Whether `_C` was built with a `device_type` kernel for `name` (e.g. CUDA kernels need nvcc at build)."""
    if _C is None:
        return False
    try:
        op = getattr(torch.ops.tiled_diffusion_C, name)
    except (AttributeError, RuntimeError):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key)


# Fixed for the process, so torch.compile may bake the answer in instead of breaking the graph on the dispatcher
# query: the mark torch.compiler.assume_constant_result sets, without importing torch._dynamo here (seconds).
native_has._dynamo_marked_constant = True


def native_for(name: str, device: torch.device) -> Callable:
    """The C++ kernel for `device`, or a clear error (e.g. `_C` built without CUDA because nvcc was missing)."""
    op = native_op(name)
    if not native_has(name, device.type):
        raise RuntimeError(f"tiled_diffusion._C was built without a {device.type.upper()} kernel for {name!r} "
                           f"(CUDA kernels need a CUDA build of torch and nvcc at build time); {FIX}")
    return op
