"""Named profiler ranges: `tiled_diffusion.<phase>` in torch.profiler traces (README "Profiling").

    with phase("step"): ...

Phases: encode_prompt (T5), step (one denoising step), transformer (one canvas forward), vae_decode, and
halo_exchange (waiting for the neighbour ranks' K/V in a multi-process run). Free when no profiler runs: the
guard is one read of torch.autograd.profiler's `_is_profiler_enabled` flag (set by torch.profiler.profile and
torch.autograd.profiler.profile on enter, cleared on exit) and returns a shared no-op context; also a no-op while
torch.compile traces, so a compiled region keeps its graph whole.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler as _profiler

PREFIX = "tiled_diffusion."
_NOOP = contextlib.nullcontext()


def phase(name: str):
    """A context manager: a `tiled_diffusion.<name>` record_function range while a profiler runs, else a no-op."""
    if _profiler._is_profiler_enabled and not torch.compiler.is_compiling():
        return _profiler.record_function(PREFIX + name)
    return _NOOP
