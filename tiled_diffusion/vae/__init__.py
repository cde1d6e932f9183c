"""The VAE at canvas scale: `decode` / `encode` pick the plain call when it fits the memory budget, else the exact
banded pass with canvas-wide GroupNorm statistics (`banded`); `tiled_decode` is the approximate overlap-tiled peer.
"""
from .banded import (CPU_BAND_ROWS, banded_decode, banded_encode_moments, decode, encode, estimate_banded_bytes,
                     estimate_decode_bytes, estimate_vae_bytes, merge_moments, tiled_decode, vae_scale_factor)

__all__ = ["decode", "encode", "banded_decode", "banded_encode_moments", "tiled_decode", "estimate_decode_bytes",
           "estimate_vae_bytes", "estimate_banded_bytes", "merge_moments", "vae_scale_factor", "CPU_BAND_ROWS"]
