"""Image-quality metrics for tiled generation.

`seam_ratio` follows the idea of the seam score of Tiled Diffusion (CVPR'25): a visible seam is a line where the
image gradient is systematically larger than elsewhere. We compare the mean absolute finite difference *across*
the given seam lines with the mean absolute finite difference everywhere else, or (``period=p``) only at the other
lines of the same phase modulo p: a pattern the generator draws on its own grid (the VAE's 8 px, a DiT's token of
patch × 8 px) then cancels, so ≈ 1.0 means no seam for any image, `global` and ground truth included.

Distribution distances (DistriFusion / xDiT report FID against the untiled model): `kid` (kernel inception
distance: unbiased MMD² with the cubic polynomial kernel, on features of any fixed network) and
`spectrum_distance` (mean |Δ log power| over radial frequency bins, sensitive to tile-periodic artifacts and to
the wrong scale of detail). `psnr` measures agreement with a reference (e.g. `global` at the same seed).

Layouts: images [B, C, H, W] (or [C, H, W]) in [-1, 1]; features [N, D].
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def _band(seams: Sequence[int], n_diffs: int, width: int) -> torch.Tensor:
    """Mask over the n_diffs finite differences d[i] = I[i+1] − I[i]: True within `width` of a seam.

    A seam at s is the boundary between rows s−1 and s, i.e. difference index s−1; width w marks indices
    s−w … s+w−2 (w=1: only s−1).
    """
    m = torch.zeros(n_diffs, dtype=torch.bool)
    for s in seams:
        lo, hi = max(s - width, 0), min(s + width - 1, n_diffs)
        if 0 < s <= n_diffs:
            m[lo:hi] = True
    return m


def _phase(seams: Sequence[int], n_diffs: int, period: int) -> torch.Tensor:
    """Mask over n_diffs differences: True at indices ≡ s−1 (mod period), the seams' phase (all seams share it)."""
    phases = {(s - 1) % period for s in seams}
    if len(phases) > 1:
        raise ValueError(f"seam_ratio: with period={period} every seam must have the same phase, got {list(seams)}")
    m = torch.zeros(n_diffs, dtype=torch.bool)
    if phases:
        m[phases.pop()::period] = True
    return m


def seam_ratio(image: torch.Tensor, seams_y: Sequence[int] = (), seams_x: Sequence[int] = (), width: int = 1,
               period: Optional[int] = None) -> float:
    """mean |∇| across the seam lines / mean |∇| elsewhere, for image [B, C, H, W] or [C, H, W].

    seams_y: canvas rows where a horizontal seam starts (boundaries between row s−1 and s); seams_x likewise for
    columns. Vertical differences are scored at horizontal seams and horizontal differences at vertical seams;
    all other differences (both directions) form the baseline. ≈ 1.0 = seamless; ≫ 1 = visible seams.
    period: if given (width must be 1), the baseline is only the other lines of the seams' phase modulo `period`
    (vertical differences on rows, horizontal differences on columns): use the VAE factor 8 so that a decoder's
    periodic 8-px pattern is in both numerator and denominator.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"seam_ratio: image must be [B, C, H, W] or [C, H, W], got shape {tuple(image.shape)}")
    if width < 1:
        raise ValueError(f"seam_ratio: width must be >= 1, got {width}")
    if not seams_y and not seams_x:
        raise ValueError("seam_ratio: give at least one seam in seams_y or seams_x")
    x = image.double()
    H, W = x.shape[-2:]
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1))  # [H-1, W]
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1))  # [H, W-1]
    my = _band(seams_y, H - 1, width)
    mx = _band(seams_x, W - 1, width)
    on = torch.cat([dy[my].flatten(), dx[:, mx].flatten()])
    if period is None:
        off = torch.cat([dy[~my].flatten(), dx[:, ~mx].flatten()])
    else:
        if width != 1:
            raise ValueError(f"seam_ratio: period needs width=1, got width={width}")
        py = _phase(seams_y or seams_x, H - 1, period) & ~my
        px = _phase(seams_x or seams_y, W - 1, period) & ~mx
        off = torch.cat([dy[py].flatten(), dx[:, px].flatten()])
    if on.numel() == 0 or off.numel() == 0:
        raise ValueError(f"seam_ratio: seams {list(seams_y)}, {list(seams_x)} leave no seam or no baseline pixels "
                         f"in a {H}x{W} image")
    base = off.mean().item()
    return float("inf") if base == 0 else on.mean().item() / base


def tile_seams(origins: Sequence[int], tile: int, overlap_mid: bool = True) -> list[int]:
    """Seam lines of a tiling along one axis: the middle of each overlap (or each tile start if overlap_mid=False)."""
    o = list(origins)
    if overlap_mid:
        return [(o[i] + o[i - 1] + tile) // 2 for i in range(1, len(o))]
    return o[1:]


def grid_seams(tile: int, size: int, offset: int = 0) -> list[int]:
    """Lines (pixels) where tiles of `tile` px laid from `offset` (mod tile) meet inside [0, size)."""
    if tile <= 0:
        raise ValueError(f"grid_seams: tile must be positive, got {tile}")
    return [s for s in range(offset % tile, size, tile) if 0 < s < size]


def psnr(image: torch.Tensor, reference: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of image vs reference (same shape; values in [-1, 1] → peak-to-peak 2); inf when equal."""
    if image.shape != reference.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(image.shape)} vs {tuple(reference.shape)}")
    mse = (image.double() - reference.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def _kid_kernels(features_a: torch.Tensor, features_b: torch.Tensor):
    """The checked fp64 kernel matrices (k_aa, k_bb, k_ab) of kid's polynomial kernel."""
    a, b = features_a.double(), features_b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: features must be [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"kid: need at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    return (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3


def _labels(labels, n: int, what: str) -> torch.Tensor:
    """Checked [n] labels; default: one stratum, or every sample its own group."""
    if labels is None:
        return torch.arange(n) if what == "group" else torch.zeros(n, dtype=torch.long)
    t = torch.as_tensor(labels).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"kid: {t.numel()} {what} labels for {n} samples")
    return t


def _within(k: torch.Tensor, strata: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """E k(x, x') over two independent draws of one set's population: per stratum pair (f, h), the mean over the
    pairs of different groups, weighted by the strata's shares π_f·π_h. One stratum and every sample its own group
    is the plain U-statistic's off-diagonal mean."""
    n = k.shape[0]
    if bool((strata == strata[0]).all()) and groups.unique().numel() == n:  # that case, without the n² masks
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    _, idx = strata.unique(return_inverse=True)
    onehot = torch.nn.functional.one_hot(idx).double()
    valid = (groups[:, None] != groups[None, :]).double()
    counts = onehot.T @ valid @ onehot
    if (counts == 0).any():
        raise ValueError("kid: a stratum holds a single group (no pair of independent samples in it)")
    share = onehot.mean(0)
    return ((onehot.T @ (k * valid) @ onehot) / counts * share[:, None] * share[None, :]).sum()


def _mmd2(k_aa, k_bb, k_ab, sa, sb, ga, gb) -> float:
    # the cross term's plain mean already weights stratum pair (f, h) by π_f(a)·π_h(b)
    return float(_within(k_aa, sa, ga) + _within(k_bb, sb, gb) - 2 * k_ab.mean())


def kid(features_a: torch.Tensor, features_b: torch.Tensor, strata_a=None, strata_b=None, groups_a=None,
        groups_b=None) -> float:
    """Kernel inception distance: unbiased MMD² between feature sets [N, D] and [M, D] (N, M ≥ 2) with the
    polynomial kernel k(x, y) = (x·y / D + 1)³ (Bińkowski et al. 2018). 0 in expectation for one distribution;
    the unbiased estimate can be slightly negative.

    For sets that are not i.i.d. draws, two kinds of labels keep it unbiased:
    - strata_a / strata_b: a designed set (e.g. exactly 64 images of each of 4 families) is no i.i.d. draw from
      the mixture: its off-diagonal pairs hold fewer same-stratum pairs than independent draws would (63/255, not
      1/4), and since same-family pairs have the larger kernel, the plain statistic reads low — two ground-truth
      sets of the lab world, -0.04 at 256 vs 256 (benchmarks/NOTES.md). With strata, each stratum pair is
      weighted by its shares.
    - groups_a / groups_b: samples that are not independent (the patches of one image) are never paired within a
      set, as the plain statistic never pairs a sample with itself.
    Default: one stratum, every sample its own group (the plain statistic)."""
    k_aa, k_bb, k_ab = _kid_kernels(features_a, features_b)
    n, m = k_aa.shape[0], k_bb.shape[0]
    return _mmd2(k_aa, k_bb, k_ab, _labels(strata_a, n, "strata"), _labels(strata_b, m, "strata"),
                 _labels(groups_a, n, "group"), _labels(groups_b, m, "group"))


def kid_se(features_a: torch.Tensor, features_b: torch.Tensor, strata_a=None, strata_b=None, groups_a=None,
           groups_b=None) -> float:
    """Standard error of `kid` (same arguments): the delete-a-group jackknife over both sets, whose variances add
    (each set is a random draw). Deleting one whole group at a time matters: deleting one patch of an image would
    read the patches' correlation as extra samples and understate the error. Each set needs at least 2 groups."""
    k_aa, k_bb, k_ab = _kid_kernels(features_a, features_b)
    n, m = k_aa.shape[0], k_bb.shape[0]
    sa, sb = _labels(strata_a, n, "strata"), _labels(strata_b, m, "strata")
    ga, gb = _labels(groups_a, n, "group"), _labels(groups_b, m, "group")
    var = 0.0
    for side, groups in ((0, ga), (1, gb)):
        ids = groups.unique()
        if ids.numel() < 2:
            raise ValueError(f"kid_se: need at least 2 groups per set, got {ids.numel()}")
        thetas = []
        for g in ids:
            keep = (groups != g).nonzero().flatten()
            if keep.numel() < 2:
                raise ValueError(f"kid_se: deleting group {g.item()} leaves {keep.numel()} sample(s); need 2")
            if side == 0:
                thetas.append(_mmd2(k_aa[keep][:, keep], k_bb, k_ab[keep], sa[keep], sb, ga[keep], gb))
            else:
                thetas.append(_mmd2(k_aa, k_bb[keep][:, keep], k_ab[:, keep], sa, sb[keep], ga, gb[keep]))
        t = torch.tensor(thetas, dtype=torch.float64)
        var += float((t - t.mean()).pow(2).sum()) * (len(t) - 1) / len(t)
    return var ** 0.5


# Power floor added before the log: the noise of 8-bit quantization of [-1, 1] images ((2/255)² / 12 per pixel, a
# white spectrum of that density). Below it the log of near-zero power of smooth images would dominate the distance
# with differences no PNG can show.
POWER_FLOOR = (2 / 255) ** 2 / 12


def radial_power_spectrum(images: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Mean log10 power density per radial frequency bin [bins] of the luminance of images [B, C, H, W]
    (Hann-windowed, mean removed, normalised so that white noise of variance σ² reads σ² at any size; bin k covers
    radii [k, k+1)·f_nyquist/bins, so the same bins for any size), floored at POWER_FLOOR."""
    if images.dim() == 3:
        images = images[None]
    x = images.double().mean(dim=1)  # luminance proxy [B, H, W]
    B, H, W = x.shape
    win = torch.hann_window(H, periodic=False, dtype=torch.float64)[:, None] * \
        torch.hann_window(W, periodic=False, dtype=torch.float64)[None, :]
    x = (x - x.mean(dim=(1, 2), keepdim=True)) * win
    p = torch.fft.fft2(x).abs().pow(2).mean(dim=0) / win.pow(2).sum()  # [H, W]; a density: independent of size
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    r = torch.sqrt(fy**2 + fx**2) / 0.5  # 1.0 = Nyquist
    idx = (r * bins).long()
    keep = (idx >= 1) & (idx < bins)  # drop DC and the corners beyond Nyquist
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx[keep], p[keep])
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx[keep], torch.ones_like(p[keep]))
    out = torch.log10(total / count.clamp(min=1) + POWER_FLOOR)
    out[count == 0] = float("nan")
    return out


def spectrum_distance(images: torch.Tensor, reference: torch.Tensor, bins: int = 32) -> float:
    """Mean |log10 P(images) − log10 P(reference)| over radial bins (both [B, C, H, W], sizes may differ): 0 for the
    same spectrum, 1 = a factor 10 of power per frequency on average."""
    a, b = radial_power_spectrum(images, bins), radial_power_spectrum(reference, bins)
    ok = ~(a.isnan() | b.isnan())
    return float((a[ok] - b[ok]).abs().mean())
