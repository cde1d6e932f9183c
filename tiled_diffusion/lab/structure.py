"""Per family, one structure the world draws and a sample must show, as a number per image.

- ocean   `wave_coherence`: the waves run one way per world (world.py: one direction per seed). Coherence of the
          luminance structure tensor, (λ1 − λ2) / (λ1 + λ2) of the gradient outer products summed over the image
          after a 2-px blur (1: one orientation everywhere, 0: isotropic or flat).
- sunset  `sun_share`: share of pixels in a sun disc's colour (world.py paints suns (1.0, 0.92, 0.45) over a ramp
          whose brightest stop is (1.0, 0.80, 0.35)): R > 0.9, G > 0.86, B < 0.7.
- forest  `trunk_share`: share of pixels in a trunk's or branch's colour (world.py: (1.4s, s, 0.6s), s ≤ 0.27 over
          green leaves): R ≥ G, luminance < 0.45 — the long dark lines, in pixels.
- city    `window_share`: share of pixels in a lit window's colour (world.py: (1.0, 0.85, 0.35) squares in the
          buildings): R > 0.6, G > 0.45, B < 0.45, R ≥ G (a night sky is blue-black, buildings grey).

`feature(images, family)` gives the family's figure per image; `compare(samples, families, truth, truth_families)`
the ratio of the samples' mean to the ground truth's, per family (1: as much of it as the world has).

Layouts: images [B, 3, H, W] in [-1, 1], rows = y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import world


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) / 2)


def wave_coherence(images: torch.Tensor) -> torch.Tensor:
    lum = _unit(images).mean(1, keepdim=True)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    lum = F.conv2d(F.pad(lum, (2, 2, 2, 2), mode="replicate"), (k[:, None] * k[None, :])[None, None])
    gy = lum[..., 1:, :-1] - lum[..., :-1, :-1]
    gx = lum[..., :-1, 1:] - lum[..., :-1, :-1]
    jxx, jyy, jxy = (gx * gx).sum((1, 2, 3)), (gy * gy).sum((1, 2, 3)), (gx * gy).sum((1, 2, 3))
    root = ((jxx - jyy) ** 2 + 4 * jxy ** 2).sqrt()
    return root / (jxx + jyy).clamp_min(1e-12)


def sun_share(images: torch.Tensor) -> torch.Tensor:
    r, g, b = _unit(images).unbind(1)
    return ((r > 0.9) & (g > 0.86) & (b < 0.7)).float().mean((1, 2))


def trunk_share(images: torch.Tensor) -> torch.Tensor:
    r, g, b = _unit(images).unbind(1)
    return ((r >= g) & ((r + g + b) / 3 < 0.45)).float().mean((1, 2))


def window_share(images: torch.Tensor) -> torch.Tensor:
    r, g, b = _unit(images).unbind(1)
    return ((r > 0.6) & (g > 0.45) & (b < 0.45) & (r >= g)).float().mean((1, 2))


FEATURES = {"ocean": ("wave coherence", wave_coherence), "sunset": ("sun share", sun_share),
            "forest": ("trunk share", trunk_share), "city": ("window share", window_share)}


def feature(images: torch.Tensor, family) -> torch.Tensor:
    """[B] the family's structure figure of each image."""
    return FEATURES[world.family_of(family)][1](images)


def compare(samples: torch.Tensor, families, truth: torch.Tensor, truth_families) -> dict:
    """{family: {"feature", "samples", "truth", "ratio"}} for every family present in both sets: the means of the
    family's feature over its samples and over its ground truth, and their ratio (samples / truth)."""
    s_names = [world.family_of(f) for f in families]
    t_names = [world.family_of(f) for f in truth_families]
    out = {}
    for name, (label, fn) in FEATURES.items():
        s = [i for i, n in enumerate(s_names) if n == name]
        t = [i for i, n in enumerate(t_names) if n == name]
        if not s or not t:
            continue
        ms, mt = float(fn(samples[s]).mean()), float(fn(truth[t]).mean())
        out[name] = {"feature": label, "samples": ms, "truth": mt, "ratio": ms / mt if mt > 0 else float("nan")}
    return out
