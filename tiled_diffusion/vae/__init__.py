"""The VAE at canvas scale: `decode` / `encode` pick the plain call when it fits the memory budget (`plan`), else the
exact banded pass (`banded`) with canvas-wide GroupNorm statistics (`moments`); `tiled_decode` (`overlap`) is the
approximate overlap-tiled peer. `steps` is the network as the list of steps they all walk.
"""
from .banded import banded_decode, banded_encode_moments, decode, encode
from .moments import merge_moments
from .overlap import tiled_decode
from .plan import CPU_BAND_ROWS, estimate_banded_bytes, estimate_decode_bytes, estimate_vae_bytes
from .steps import vae_scale_factor

__all__ = ["decode", "encode", "banded_decode", "banded_encode_moments", "tiled_decode", "estimate_decode_bytes",
           "estimate_vae_bytes", "estimate_banded_bytes", "merge_moments", "vae_scale_factor", "CPU_BAND_ROWS"]
