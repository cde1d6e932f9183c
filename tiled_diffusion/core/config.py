"""The package's configuration vocabulary, in one place: the tiling modes and their knobs (`TiledConfig`), the
positional modes, and the geometry every canvas obeys (the VAE factor 8 × PixArt's patch 2 = 16-px tokens)."""
from __future__ import annotations

import dataclasses
import math
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

# cross_tile's token-centred window and stride, as multiples of the model's training field (sample_size latent px,
# so 1024-px PixArt and the lab model get the same geometry); chosen from the lab's numbers (benchmarks/NOTES.md,
# token-centred windows).
DEFAULT_WINDOW = 1.0
DEFAULT_STRIDE = 0.0


@dataclasses.dataclass
class TiledConfig:
    """Knobs of the canvas forward. `tile` is in image pixels (the latent tile is tile / vae_scale_factor)."""

    mode: str = "cross_tile"
    tile: Optional[int] = None  # None: DEFAULT_TILE_PX[mode]
    radius: int = 1
    shift: bool = False
    # cross_tile: side of each token's attention window, in multiples of the training field (None: tile-blocked
    # windows of (2·radius+1) tiles), and the side of the query groups sharing one window (GNA; 0: one token)
    window: Optional[float] = DEFAULT_WINDOW
    stride: float = DEFAULT_STRIDE
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
        if self.window is not None and not (isinstance(self.window, (int, float)) and self.window > 0):
            raise ValueError(f"window must be a number > 0 (multiples of the training field) or None, "
                             f"got {self.window!r}")
        if not isinstance(self.stride, (int, float)) or not 0 <= self.stride <= (self.window or math.inf):
            raise ValueError(f"stride must be a number in [0, window] (multiples of the training field), "
                             f"got {self.stride!r}")
        if self.mode == "cross_tile" and self.window is not None and self.shift:
            raise ValueError("shift moves the tile grid of tile-blocked windows (window=None); token-centred "
                             "windows have no grid to move")
        if self.positional == "tile_local" and self.mode == "cross_tile" and (self.window is not None or self.shift):
            raise ValueError("positional='tile_local' in cross_tile needs tile-blocked windows without shift "
                             "(window=None, shift=False): it lays a tile's embedding over a fixed tile grid")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if self.tile_batch_size is not None and self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1 or None, got {self.tile_batch_size!r}")
        if self.head_chunk is not None and self.head_chunk < 1:
            raise ValueError(f"head_chunk must be >= 1 or None, got {self.head_chunk!r}")
        return self
