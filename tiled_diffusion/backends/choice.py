"""`choose`: the one record of which implementation an op takes and why (`TILED_DIFFUSION_LOG=debug` shows it)."""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("tiled_diffusion")


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, device: str, path: str, why: str) -> None:
    log.debug("%s on %s: %s (%s)", op, device, path, why)


def choose(op: str, device: torch.device, path: str, why: str) -> None:
    """Record which implementation an op takes; logged once per (op, device, path, reason). Silent while
    torch.compile traces (a logging call there is a graph break; the choice is fixed in the compiled graph)."""
    if torch.compiler.is_compiling():
        return
    if log.isEnabledFor(logging.DEBUG):
        _log_choice(op, device.type, path, why)
