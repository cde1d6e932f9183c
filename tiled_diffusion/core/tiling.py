"""TileGrid: everything about how a canvas is cut into tiles, computed once.

Two levels share one object:

* Pixel level (latent pixels; multidiffusion mode, tiled VAE): tiles of `th × tw` at a regular stride
  `tile - overlap`; the last row/column is clamped to end at the canvas edge (a ragged last tile becomes a
  shifted, more-overlapping tile, so every tile has the same size). `origins`, `blend_weights` and
  `extract_tiles` feed `seam_blend`.
* Token level (cross_tile mode; `patch × patch` latent pixels per token; needs overlap == 0 and tiles that
  divide the token grid, see `TileGrid.for_tokens`): every tile holds exactly L = tile_tokens_h *
  tile_tokens_w tokens, `permutation` reorders raster tokens into tile-major order, `neighbours` gives the
  tile table that `window_attention` consumes.

Tile order everywhere is (b, iy, ix), batch outermost: tile index = (b * ny + iy) * nx + ix.

Shift (Swin-style, token level only): the token grid is rolled cyclically by `shift = (sy, sx)` tokens before
tiling, i.e. tile (0, 0) starts at canvas token (sy, sx) and the seams move by +shift. The roll is folded into
the permutation, so it costs nothing. Caveat: the tiles on the last row/column then hold tokens from both
opposite canvas edges (the canvas becomes a torus), and attention inside such a tile joins tokens that are
far apart on the canvas. That is why the default is no shift: with radius ≥ 1 every query tile already
attends across all of its seams in every layer, so the seams need not move. Shift exists for radius 0
(independent tiles), where moving the seams between layers/steps is the only way for information to cross.
The pixel level ignores `shift`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

PROFILES = ("uniform", "linear", "cosine", "gaussian")


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {v!r}")
        a, b = v
    else:
        a = b = v
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(a), int(b)


def _origins(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Regular origins 0, stride, 2·stride, ...; the last one clamped so the tile ends at the canvas edge."""
    if tile >= size:
        return (0,)
    n = math.ceil((size - tile) / stride) + 1
    return tuple(min(i * stride, size - tile) for i in range(n))


def _nearest_divisor(n: int, want: int) -> int:
    """The divisor of n closest to `want` (ties go to the larger: fewer tiles, less neighbour overhead)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(d - want), -d))


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Canvas tiling. Sizes are in latent pixels; token-level sizes are derived with `patch`.

    Attributes (computed): th, tw (tile size, ≤ canvas), origins_y, origins_x (tuples), ny, nx,
    num_tiles (= batch * ny * nx), tokens_h, tokens_w, tile_tokens_h, tile_tokens_w, tokens_per_tile.
    """

    height: int
    width: int
    tile: Union[int, tuple[int, int]]
    overlap: int = 0
    batch: int = 1
    patch: int = 2
    shift: tuple[int, int] = (0, 0)

    th: int = dataclasses.field(init=False)
    tw: int = dataclasses.field(init=False)
    origins_y: tuple[int, ...] = dataclasses.field(init=False)
    origins_x: tuple[int, ...] = dataclasses.field(init=False)
    _cache: dict = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        def setf(name, value):
            object.__setattr__(self, name, value)

        for name in ("height", "width", "overlap", "batch", "patch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"TileGrid: {name} must be an int, got {v!r}")
        if self.patch <= 0:
            raise ValueError(f"TileGrid: patch must be > 0, got {self.patch}")
        if self.batch <= 0:
            raise ValueError(f"TileGrid: batch must be > 0, got {self.batch}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % self.patch:
                raise ValueError(f"TileGrid: {name}={v} must be a positive multiple of patch={self.patch}")
        tile_h, tile_w = _pair(self.tile, "tile")
        for v in (tile_h, tile_w):
            if v <= 0:
                raise ValueError(f"TileGrid: tile must be > 0, got {self.tile!r}")
            if v % self.patch:
                raise ValueError(f"TileGrid: tile={self.tile!r} must be a multiple of patch={self.patch}")
        if self.overlap < 0 or self.overlap % self.patch:
            raise ValueError(f"TileGrid: overlap={self.overlap} must be a non-negative multiple of patch={self.patch}")
        if self.overlap >= min(tile_h, tile_w):
            raise ValueError(f"TileGrid: overlap={self.overlap} must be smaller than the tile {self.tile!r}")
        th, tw = min(tile_h, self.height), min(tile_w, self.width)
        sy, sx = _pair(self.shift, "shift")
        setf("shift", (sy, sx))
        setf("th", th)
        setf("tw", tw)
        setf("origins_y", _origins(self.height, th, th - self.overlap))
        setf("origins_x", _origins(self.width, tw, tw - self.overlap))
        setf("_cache", {})

    # ------------------------------------------------------------------ constructors

    @classmethod
    def for_tokens(cls, height: int, width: int, tile, batch: int = 1, patch: int = 2,
                   shift=(0, 0)) -> "TileGrid":
        """Cross-tile grid: per-axis tile sizes (in tokens) that divide the canvas token counts, nearest to
        the requested `tile` (latent pixels), so every tile holds the same L tokens (window_attention needs a
        uniform L). Tiles may come out rectangular."""
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % patch:
                raise ValueError(f"TileGrid.for_tokens: {name}={v!r} must be a positive multiple of patch={patch}")
        tile_h, tile_w = _pair(tile, "tile")
        if tile_h <= 0 or tile_w <= 0:
            raise ValueError(f"TileGrid.for_tokens: tile must be > 0, got {tile!r}")
        th = _nearest_divisor(height // patch, max(1, round(tile_h / patch))) * patch
        tw = _nearest_divisor(width // patch, max(1, round(tile_w / patch))) * patch
        return cls(height, width, (th, tw), overlap=0, batch=batch, patch=patch, shift=shift)

    # ------------------------------------------------------------------ pixel level

    @property
    def ny(self) -> int:
        return len(self.origins_y)

    @property
    def nx(self) -> int:
        return len(self.origins_x)

    @property
    def num_tiles(self) -> int:
        return self.batch * self.ny * self.nx

    def origins(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(origins_y int32 [ny], origins_x int32 [nx]): top-left corners in latent pixels."""
        return (torch.tensor(self.origins_y, dtype=torch.int32, device=device),
                torch.tensor(self.origins_x, dtype=torch.int32, device=device))

    def blend_weights(self, profile: str = "cosine", device=None) -> torch.Tensor:
        """Window profile fp32 [th, tw], strictly > 0 everywhere, max 1.

        uniform: 1 (MultiDiffusion's plain average). linear / cosine: 1 in the interior, ramping down over
        `overlap` pixels at each tile border (a ramp sample sits at pixel centres, so it never reaches 0).
        gaussian: Mixture of Diffusers' separable Gaussian, variance 0.01 of the tile size squared.
        """
        if profile not in PROFILES:
            raise ValueError(f"TileGrid.blend_weights: unknown profile {profile!r}; choose one of {PROFILES}")
        wy = self._profile_1d(profile, self.th)
        wx = self._profile_1d(profile, self.tw)
        w = (wy[:, None] * wx[None, :]).float()
        return w.to(device) if device is not None else w

    def _profile_1d(self, profile: str, n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64) + 0.5  # pixel centres
        if profile == "uniform" or (profile in ("linear", "cosine") and self.overlap == 0):
            return torch.ones(n, dtype=torch.float64)
        if profile == "gaussian":
            mid = n / 2
            w = torch.exp(-((i - mid) ** 2) / (n * n) / (2 * 0.01))
            return w / w.max()
        r = torch.minimum(i, n - i).div(self.overlap).clamp(max=1.0)  # 0 < r ≤ 1
        return r if profile == "linear" else 0.5 - 0.5 * torch.cos(math.pi * r)

    def extract_tiles(self, canvas: torch.Tensor) -> torch.Tensor:
        """canvas [B, C, H, W] -> tiles [B*ny*nx, C, th, tw] in (b, iy, ix) order (the gather seam_blend inverts)."""
        if canvas.dim() != 4 or canvas.shape[2:] != (self.height, self.width) or canvas.shape[0] != self.batch:
            raise ValueError(f"TileGrid.extract_tiles: canvas must be [B={self.batch}, C, {self.height}, "
                             f"{self.width}], got {tuple(canvas.shape)}")
        B, C = canvas.shape[:2]
        dev = canvas.device
        ry = (torch.tensor(self.origins_y, device=dev)[:, None] + torch.arange(self.th, device=dev))  # [ny, th]
        rx = (torch.tensor(self.origins_x, device=dev)[:, None] + torch.arange(self.tw, device=dev))  # [nx, tw]
        t = canvas[:, :, ry[:, :, None, None], rx[None, None, :, :]]  # [B, C, ny, th, nx, tw]
        return t.permute(0, 2, 4, 1, 3, 5).reshape(B * self.ny * self.nx, C, self.th, self.tw)

    # ------------------------------------------------------------------ token level

    # the canvas and a tile in tokens (patch × patch pixels each)
    tokens_h = property(lambda self: self.height // self.patch)
    tokens_w = property(lambda self: self.width // self.patch)
    tile_tokens_h = property(lambda self: self.th // self.patch)
    tile_tokens_w = property(lambda self: self.tw // self.patch)

    @property
    def tokens_per_tile(self) -> int:
        return self.tile_tokens_h * self.tile_tokens_w

    def _require_token_level(self, what: str) -> None:
        if self.overlap != 0:
            raise ValueError(f"TileGrid.{what}: token level needs overlap == 0, got overlap={self.overlap}")
        if self.tokens_h % self.tile_tokens_h or self.tokens_w % self.tile_tokens_w:
            raise ValueError(
                f"TileGrid.{what}: tiles of {self.tile_tokens_h}x{self.tile_tokens_w} tokens do not divide the "
                f"{self.tokens_h}x{self.tokens_w} token grid (every tile must hold the same L); "
                f"build the grid with TileGrid.for_tokens(...)")

    def _cached(self, key, device, make):
        dev = torch.device("cpu") if device is None else torch.device(device)
        k = (key, str(dev))
        if k not in self._cache:
            self._cache[k] = make().to(dev)
        return self._cache[k]

    def neighbours(self, radius: int, device=None) -> torch.Tensor:
        """int32 [num_tiles, (2r+1)^2]: for each tile, the tiles within Chebyshev distance `radius` (self
        included), slots in raster order of (dy, dx) so self sits in the middle slot; -1 past the grid border.
        Never crosses batch items. radius 0 -> self only."""
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"TileGrid.neighbours: radius must be an int >= 0, got {radius!r}")
        self._require_token_level("neighbours")

        def make():
            b = torch.arange(self.batch)[:, None, None]
            iy = torch.arange(self.ny)[None, :, None]
            ix = torch.arange(self.nx)[None, None, :]
            cols = []
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    y, x = iy + dy, ix + dx
                    ok = (y >= 0) & (y < self.ny) & (x >= 0) & (x < self.nx)
                    idx = (b * self.ny + y) * self.nx + x
                    cols.append(torch.where(ok, idx, torch.full_like(idx, -1)).reshape(-1))
            return torch.stack(cols, dim=1).to(torch.int32)

        return self._cached(("nb", radius), device, make)

    def permutation(self, device=None) -> torch.Tensor:
        """int64 [tokens_h*tokens_w]: tile-major position j holds raster token perm[j] (x_tm = x[:, perm]).
        Includes the cyclic shift."""
        self._require_token_level("permutation")

        def make():
            a = torch.arange(self.tile_tokens_h)
            c = torch.arange(self.tile_tokens_w)
            ty = torch.arange(self.ny)
            tx = torch.arange(self.nx)
            # token (iy, ix, a, c) -> canvas row/col, rolled by the shift
            row = (ty[:, None, None, None] * self.tile_tokens_h + a[None, None, :, None] + self.shift[0])
            col = (tx[None, :, None, None] * self.tile_tokens_w + c[None, None, None, :] + self.shift[1])
            row = row % self.tokens_h
            col = col % self.tokens_w
            return (row * self.tokens_w + col).reshape(-1).to(torch.int64)

        return self._cached("perm", device, make)

    def inverse_permutation(self, device=None) -> torch.Tensor:
        """int64 [tokens_h*tokens_w]: raster token i sits at tile-major position inv[i] (x = x_tm[:, inv])."""
        def make():
            perm = self.permutation()
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            return inv

        return self._cached("inv", device, make)

    def to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] (raster tokens, N = tokens_h*tokens_w) -> [B*ny*nx, L, ...]."""
        n = self.tokens_h * self.tokens_w
        if x.dim() < 2 or x.shape[0] != self.batch or x.shape[1] != n:
            raise ValueError(f"TileGrid.to_tile_major: x must be [B={self.batch}, N={n}, ...], got {tuple(x.shape)}")
        y = x.index_select(1, self.permutation(x.device))
        return y.reshape(self.num_tiles, self.tokens_per_tile, *x.shape[2:])

    def from_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """x [B*ny*nx, L, ...] -> [B, N, ...] raster tokens (inverse of to_tile_major)."""
        if x.dim() < 2 or x.shape[0] != self.num_tiles or x.shape[1] != self.tokens_per_tile:
            raise ValueError(f"TileGrid.from_tile_major: x must be [T={self.num_tiles}, L={self.tokens_per_tile}, "
                             f"...], got {tuple(x.shape)}")
        self._require_token_level("from_tile_major")
        y = x.reshape(self.batch, self.tokens_h * self.tokens_w, *x.shape[2:])
        return y.index_select(1, self.inverse_permutation(x.device))
