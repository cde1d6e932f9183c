"""tiled_diffusion: fast, seamless ultra-high-resolution PixArt-α/δ generation.

Importing the package registers the ops (`torch.ops.tiled_diffusion.*`); it works without the native
library, whose kernels then raise a clear error naming the fix.
"""
import logging as _logging
import os as _os

__version__ = "0.1.0"

_level = _os.environ.get("TILED_DIFFUSION_LOG", "").upper()
if _level:
    _logger = _logging.getLogger("tiled_diffusion")
    _logger.setLevel(getattr(_logging, _level, _logging.INFO))
    if not _logger.handlers:
        _h = _logging.StreamHandler()
        _h.setFormatter(_logging.Formatter("[tiled_diffusion %(levelname)s] %(message)s"))
        _logger.addHandler(_h)

from . import ops  # noqa: E402,F401  (registers the ops)
