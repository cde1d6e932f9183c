"""A procedural world with ground truth at any size and crop.

Every pixel is a function of (family, seed, absolute world coordinate) only, so the image of a canvas is a crop of
one infinite picture: a 4096² ground-truth canvas is just a bigger crop, and a crop of a larger render equals the
smaller render at that offset. Nothing is drawn from a stateful RNG: random parameters come from an integer hash
of (seed, salt, lattice or cell index), so any window can be rendered without rendering its surroundings.

Structure is larger than a tile on purpose (a 64-px cross_tile tile at the lab's 128-px training size): smooth
colour fields on 128–256 px lattices, line segments 150–450 px long, circles and rectangles up to ~110 px, and
oriented wave textures whose direction is fixed per seed across the whole canvas.

Scene families (the caption is what the model is conditioned on; every word is in tiny.py's vocabulary):

- ``ocean``  "a blue ocean": blue fields under oriented waves (a curved crest pattern, one direction per seed).
- ``sunset`` "a red sunset sky": large warm colour fields with soft yellow suns.
- ``forest`` "a green forest": green fields crossed by long dark straight lines (trunks and branches).
- ``city``   "a city at night": a dark sky with grey / yellow rectangles carrying a window grid.

Layout: `render` returns float32 [3, height, width] in [-1, 1] (the VAE's input range), rows = y, columns = x.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

FAMILIES: dict[str, str] = {
    "ocean": "a blue ocean",
    "sunset": "a red sunset sky",
    "forest": "a green forest",
    "city": "a city at night",
}
CAPTIONS: tuple[str, ...] = tuple(FAMILIES.values())
_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One round of a 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32).

    int64 products wrap modulo 2^64, so the low 32 bits are those of the 32-bit hash exactly."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def hash_uniform(*keys) -> torch.Tensor:
    """Uniform [0, 1) float64 from integer keys (ints or int64 tensors, broadcast together); same keys, same value."""
    h = torch.tensor(0x9E3779B9, dtype=torch.int64)
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64)
        h = _mix(h ^ (k & _M32))
    return h.double() / 2.0**32


def _smooth(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)  # quintic fade: C2 across lattice lines


def value_noise(seed: int, salt: int, ys: torch.Tensor, xs: torch.Tensor, spacing: float) -> torch.Tensor:
    """Smooth lattice noise in [0, 1] at pixel centres ys [H, 1] × xs [1, W] (float64), lattice `spacing` px."""
    fy, fx = ys / spacing, xs / spacing
    iy, ix = torch.floor(fy), torch.floor(fx)
    ty, tx = _smooth(fy - iy), _smooth(fx - ix)
    iy, ix = iy.long(), ix.long()
    c = [[hash_uniform(seed, salt, iy + dy, ix + dx) for dx in (0, 1)] for dy in (0, 1)]
    top = c[0][0] + (c[0][1] - c[0][0]) * tx
    bot = c[1][0] + (c[1][1] - c[1][0]) * tx
    return top + (bot - top) * ty


def fbm(seed: int, salt: int, ys, xs, spacing: float, octaves: int = 3) -> torch.Tensor:
    """Sum of value-noise octaves (halving spacing and amplitude), renormalised to [0, 1]."""
    out, amp, total = 0.0, 1.0, 0.0
    for o in range(octaves):
        out = out + amp * value_noise(seed, salt + 101 * o, ys, xs, spacing / 2**o)
        total += amp
        amp *= 0.5
    return out / total


def _palette(t: torch.Tensor, colours: Sequence[Sequence[float]]) -> torch.Tensor:
    """Piecewise-linear colour ramp: t [H, W] in [0, 1] → [3, H, W] through the given RGB stops."""
    stops = torch.tensor(colours, dtype=torch.float64)  # [K, 3]
    k = stops.shape[0] - 1
    pos = (t.clamp(0, 1) * k).clamp(max=k - 1e-9)
    i = pos.floor().long()
    f = (pos - i)[None]
    return stops[i].permute(2, 0, 1) * (1 - f) + stops[i + 1].permute(2, 0, 1) * f


def _over(img: torch.Tensor, colour, alpha: torch.Tensor, ys: slice, xs: slice) -> None:
    """Alpha-composite a flat colour with coverage `alpha` [h, w] over img[:, ys, xs] in place."""
    c = torch.as_tensor(colour, dtype=torch.float64)[:, None, None]
    region = img[:, ys, xs]
    region.mul_(1 - alpha).add_(c * alpha)


class _Canvas:
    """Pixel-centre coordinates of a crop and helpers to visit the cells whose primitives may touch it."""

    def __init__(self, x0: int, y0: int, width: int, height: int):
        self.x0, self.y0, self.w, self.h = x0, y0, width, height
        self.ys = (torch.arange(height, dtype=torch.float64) + y0 + 0.5)[:, None]
        self.xs = (torch.arange(width, dtype=torch.float64) + x0 + 0.5)[None, :]

    def cells(self, size: int, reach: int):
        """(cy, cx) of every `size`-px cell whose primitives (reaching `reach` px beyond the cell) may touch the
        crop, in raster order (the compositing order, the same for every crop)."""
        cy0 = math.floor((self.y0 - reach) / size)
        cy1 = math.floor((self.y0 + self.h + reach) / size)
        cx0 = math.floor((self.x0 - reach) / size)
        cx1 = math.floor((self.x0 + self.w + reach) / size)
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                yield cy, cx

    def window(self, y_lo: float, y_hi: float, x_lo: float, x_hi: float):
        """Slices of the crop covering world box [y_lo, y_hi) × [x_lo, x_hi), or None if they do not meet."""
        a = max(0, math.floor(y_lo) - self.y0)
        b = min(self.h, math.ceil(y_hi) - self.y0)
        c = max(0, math.floor(x_lo) - self.x0)
        d = min(self.w, math.ceil(x_hi) - self.x0)
        if a >= b or c >= d:
            return None
        return slice(a, b), slice(c, d)


def _coverage(dist: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of a shape from a signed distance in px (negative inside): a 1.5-px soft edge."""
    return (0.5 - dist / 1.5).clamp(0, 1)


def _ground(seed: int, tag: int, cv: "_Canvas", scale: float, colours) -> torch.Tensor:
    """A family's background: fbm noise of hash stream `tag` at `scale` px mapped through its palette."""
    return _palette(fbm(seed, tag, cv.ys, cv.xs, scale), colours)


def _cell_point(seed: int, tag: int, cy: int, cx: int, cell: int, *k: int) -> tuple[float, float]:
    """A random point in grid cell (cy, cx): its y from hash stream `tag`, its x from stream `tag` + 1."""
    return ((cy + float(hash_uniform(seed, tag, cy, cx, *k))) * cell,
            (cx + float(hash_uniform(seed, tag + 1, cy, cx, *k))) * cell)


def _ocean(seed: int, cv: _Canvas) -> torch.Tensor:
    img = _ground(seed, 1, cv, 256.0, [(0.02, 0.10, 0.30), (0.05, 0.30, 0.60), (0.25, 0.60, 0.80)])
    theta = 2 * math.pi * float(hash_uniform(seed, 2))
    wl = 24.0 + 24.0 * float(hash_uniform(seed, 3))
    u = cv.xs * math.cos(theta) + cv.ys * math.sin(theta)
    bend = 40.0 * (fbm(seed, 4, cv.ys, cv.xs, 192.0, octaves=2) - 0.5)  # curved crests
    crest = 0.5 + 0.5 * torch.sin(2 * math.pi * (u + bend) / wl)
    strength = 0.2 + 0.8 * fbm(seed, 5, cv.ys, cv.xs, 128.0, octaves=2)
    foam = (crest ** 6 * strength)[None]
    return img * (1 - 0.7 * foam) + torch.tensor([0.85, 0.95, 1.0], dtype=torch.float64)[:, None, None] * 0.7 * foam


def _sunset(seed: int, cv: _Canvas) -> torch.Tensor:
    img = _ground(seed, 11, cv, 256.0, [(0.30, 0.05, 0.25), (0.75, 0.15, 0.10), (0.95, 0.45, 0.10), (1.0, 0.80, 0.35)])
    cell = 128
    for cy, cx in cv.cells(cell, 60):
        if float(hash_uniform(seed, 12, cy, cx)) > 0.35:
            continue
        r = 12.0 + 40.0 * float(hash_uniform(seed, 13, cy, cx))
        py, px = _cell_point(seed, 14, cy, cx, cell)
        win = cv.window(py - r - 2, py + r + 2, px - r - 2, px + r + 2)
        if win is None:
            continue
        d = torch.sqrt((cv.ys[win[0]] - py) ** 2 + (cv.xs[:, win[1]] - px) ** 2) - r
        _over(img, (1.0, 0.92, 0.45), 0.95 * _coverage(d), *win)
    return img


def _forest(seed: int, cv: _Canvas) -> torch.Tensor:
    img = _ground(seed, 21, cv, 192.0, [(0.05, 0.20, 0.05), (0.15, 0.45, 0.12), (0.50, 0.70, 0.25)])
    cell, reach = 128, 240
    for cy, cx in cv.cells(cell, reach):
        for k in range(2):
            if float(hash_uniform(seed, 22, cy, cx, k)) > 0.4:
                continue
            length = 150.0 + 300.0 * float(hash_uniform(seed, 23, cy, cx, k))
            # mostly upright (trunks), some leaning (branches)
            ang = math.pi / 2 + (float(hash_uniform(seed, 24, cy, cx, k)) - 0.5) * (2.2 if k else 0.5)
            half_w = 2.0 + 2.5 * float(hash_uniform(seed, 25, cy, cx, k))
            py, px = _cell_point(seed, 26, cy, cx, cell, k)
            dy, dx = math.sin(ang) * length / 2, math.cos(ang) * length / 2
            pad = half_w + 2
            win = cv.window(py - abs(dy) - pad, py + abs(dy) + pad, px - abs(dx) - pad, px + abs(dx) + pad)
            if win is None:
                continue
            # distance from the segment (py-dy, px-dx)–(py+dy, px+dx)
            ry, rx = cv.ys[win[0]] - (py - dy), cv.xs[:, win[1]] - (px - dx)
            t = ((ry * 2 * dy + rx * 2 * dx) / (4 * (dy * dy + dx * dx))).clamp(0, 1)
            d = torch.sqrt((ry - t * 2 * dy) ** 2 + (rx - t * 2 * dx) ** 2) - half_w
            shade = 0.12 + 0.15 * float(hash_uniform(seed, 28, cy, cx, k))
            _over(img, (shade * 1.4, shade, shade * 0.6), _coverage(d), *win)
    return img


def _city(seed: int, cv: _Canvas) -> torch.Tensor:
    img = _ground(seed, 31, cv, 256.0, [(0.01, 0.01, 0.06), (0.05, 0.05, 0.18), (0.12, 0.10, 0.30)])
    cell, reach = 64, 110
    for cy, cx in cv.cells(cell, reach):
        if float(hash_uniform(seed, 32, cy, cx)) > 0.6:
            continue
        hh = 10.0 + 45.0 * float(hash_uniform(seed, 33, cy, cx))
        hw = 10.0 + 30.0 * float(hash_uniform(seed, 34, cy, cx))
        py, px = _cell_point(seed, 35, cy, cx, cell)
        win = cv.window(py - hh - 2, py + hh + 2, px - hw - 2, px + hw + 2)
        if win is None:
            continue
        ly, lx = cv.ys[win[0]] - py, cv.xs[:, win[1]] - px
        d = torch.maximum(ly.abs() - hh, lx.abs() - hw)  # box distance (exact outside along the axes)
        grey = 0.25 + 0.3 * float(hash_uniform(seed, 37, cy, cx))
        _over(img, (grey, grey, grey * 1.1), _coverage(d), *win)
        # lit windows: a grid of small squares inside the building, a per-building pitch
        pitch = 10.0 + 4.0 * float(hash_uniform(seed, 38, cy, cx))
        wy = (ly / pitch - torch.floor(ly / pitch) - 0.5).abs() * pitch - pitch * 0.22
        wx = (lx / pitch - torch.floor(lx / pitch) - 0.5).abs() * pitch - pitch * 0.22
        inside = _coverage(d + 4.0)
        _over(img, (1.0, 0.85, 0.35), 0.9 * inside * _coverage(torch.maximum(wy, wx)), *win)
    return img


_RENDER: dict[str, Callable[[int, _Canvas], torch.Tensor]] = {
    "ocean": _ocean, "sunset": _sunset, "forest": _forest, "city": _city}


def family_of(family) -> str:
    """A family name from a name, an index into FAMILIES, or its caption."""
    names = list(FAMILIES)
    if isinstance(family, int) and 0 <= family < len(names):
        return names[family]
    if family in FAMILIES:
        return family
    for name, cap in FAMILIES.items():
        if family == cap:
            return name
    raise ValueError(f"unknown scene family {family!r}; choose one of {names} or their captions {list(CAPTIONS)}")


def render(family, seed: int, x0: int, y0: int, width: int, height: int) -> torch.Tensor:
    """The crop [y0, y0+height) × [x0, x0+width) of world (family, seed): float32 [3, height, width] in [-1, 1]."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"render: {name} must be a positive int, got {v!r}")
    cv = _Canvas(int(x0), int(y0), width, height)
    img = _RENDER[family_of(family)](int(seed), cv)
    return (img.clamp(0, 1) * 2 - 1).float()


def random_crop(family, seed: int, size: int, generator: torch.Generator, extent: int = 1 << 16) -> torch.Tensor:
    """A size×size crop of world (family, seed) at an offset drawn from `generator` in [-extent, extent)."""
    y0, x0 = (torch.randint(-extent, extent, (2,), generator=generator)).tolist()
    return render(family, seed, x0, y0, size, size)
