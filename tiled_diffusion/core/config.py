"""The package's configuration vocabulary, in one place: the tiling modes and their knobs (`TiledConfig`), the
positional modes, and the geometry every canvas obeys (the VAE factor 8 × PixArt's patch 2 = 16-px tokens)."""
from __future__ import annotations

import dataclasses
from typing import Optional

VAE_SCALE_FACTOR = 8  # image pixels per latent pixel (PixArt's and SD's VAE)
PATCH = 2  # latent pixels per token side (PixArt's patch embedding)
TOKEN_MULTIPLE = VAE_SCALE_FACTOR * PATCH  # image pixels per token side: every canvas is a whole number of tokens

POSITIONAL_MODES = ("canvas_stretched", "canvas_native", "tile_local")


def check_positional(positional: str) -> str:
    if positional not in POSITIONAL_MODES:
        raise ValueError(f"positional must be one of {POSITIONAL_MODES}, got {positional!r}")
    return positional


def check_size(width: int, height: int, multiple: int = TOKEN_MULTIPLE) -> None:
    """Canvas sizes must be multiples of TOKEN_MULTIPLE px so every token is whole."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name}={v!r} must be a positive multiple of {multiple} pixels (VAE factor "
                             f"{VAE_SCALE_FACTOR} x patch {PATCH}); e.g. {max(multiple, (int(v) // multiple) * multiple)}")


MODES = ("cross_tile", "multidiffusion", "global")

# Default tile size per mode, in image pixels. multidiffusion runs each tile as an independent image, so its tiles
# are the model's native 1024². cross_tile tiles only set the attention window ((2r+1)² tiles): 512 px with radius 1
# lets every token see a 1536² neighbourhood — more context than the 1024² the model was trained on — at 9·1024 keys
# per query, so cost stays linear in area (1024-px tiles would be 9·4096 keys, barely cheaper than global at 4096²).
DEFAULT_TILE_PX = {"cross_tile": 512, "multidiffusion": 1024, "global": 1024}


@dataclasses.dataclass
class TiledConfig:
    """Knobs of the canvas forward. `tile` is in image pixels (the latent tile is tile / vae_scale_factor)."""

    mode: str = "cross_tile"
    tile: Optional[int] = None  # None: DEFAULT_TILE_PX[mode]
    radius: int = 1
    shift: bool = False
    overlap: float = 0.5
    profile: str = "cosine"
    positional: str = "canvas_stretched"
    tile_batch_size: Optional[int] = None  # multidiffusion: tiles per forward (None: all at once)
    head_chunk: Optional[int] = None  # cross_tile: heads per window_attention call (bounds attention memory)
    fused_step: bool = True  # sampler, multidiffusion + LCMScheduler: blend + LCM step in one op

    @property
    def tile_px(self) -> int:
        return DEFAULT_TILE_PX[self.mode] if self.tile is None else self.tile

    def validate(self) -> "TiledConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_positional(self.positional)
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile <= 0 or self.tile % TOKEN_MULTIPLE):
            raise ValueError(f"tile must be a positive multiple of {TOKEN_MULTIPLE} pixels, got {self.tile!r}")
        if not isinstance(self.radius, int) or self.radius < 0:
            raise ValueError(f"radius must be an int >= 0, got {self.radius!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if self.tile_batch_size is not None and self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1 or None, got {self.tile_batch_size!r}")
        if self.head_chunk is not None and self.head_chunk < 1:
            raise ValueError(f"head_chunk must be >= 1 or None, got {self.head_chunk!r}")
        return self
