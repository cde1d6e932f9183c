import pytest
import torch

from tiled_diffusion.tools.metrics import seam_ratio
from tiled_diffusion.tools.metrics import tile_seams


def _smooth(B=1, C=3, H=67, W=91):
    yy, xx = torch.meshgrid(torch.linspace(0, 6, H), torch.linspace(0, 8, W), indexing="ij")
    img = torch.stack([torch.sin(xx + c) * torch.cos(0.7 * yy - c) for c in range(C)])
    return (img[None].expand(B, -1, -1, -1) + 0.01 * torch.randn(B, C, H, W)).contiguous()


def test_smooth_image_ratio_near_one():
    r = seam_ratio(_smooth(), seams_y=[20, 41], seams_x=[30, 61])
    assert 0.8 < r < 1.2, r


def test_step_at_seam_much_larger():
    img = _smooth(B=2)
    img[..., 41:, :] += 0.5  # a brightness step exactly at the horizontal seam at row 41
    img[..., :, 30:] -= 0.3
    r = seam_ratio(img, seams_y=[41], seams_x=[30])
    assert r > 5, r


def test_step_elsewhere_not_counted():
    img = _smooth()
    img[..., 10:, :] += 0.5  # a step away from the scored seam: raises the baseline, not the seam score
    assert seam_ratio(img, seams_y=[41]) < 1.2


def test_three_dim_and_width():
    img = _smooth()[0]
    img[:, 41:, :] += 0.5
    assert seam_ratio(img, seams_y=[41], width=1) > seam_ratio(img, seams_y=[41], width=3) > 1.5


def test_tile_seams():
    assert tile_seams([0, 48, 96, 100], 64) == [56, 104, 130]
    assert tile_seams([0, 48], 64, overlap_mid=False) == [48]


def test_bad_input():
    with pytest.raises(ValueError, match="at least one seam"):
        seam_ratio(_smooth())
    with pytest.raises(ValueError, match="must be"):
        seam_ratio(torch.randn(5, 5), seams_y=[2])


# ------------------------------------------------------------------ period baseline, distances, PSNR


def _latent_grid_pattern(H=96, W=112):
    """A smooth image plus an 8-px periodic ridge on every 8th line: what a VAE decoder's own grid leaves."""
    img = _smooth(C=3, H=H, W=W)
    img[..., 7::8, :] += 0.2
    img[..., :, 7::8] += 0.2
    return img


def test_period_baseline_cancels_an_8px_pattern():
    img = _latent_grid_pattern()
    seams = [32, 64]  # on the 8-px grid: the plain ratio sees the decoder pattern as a seam
    assert seam_ratio(img, seams_y=seams, seams_x=seams) > 1.5
    assert 0.8 < seam_ratio(img, seams_y=seams, seams_x=seams, period=8) < 1.2


def test_period_baseline_still_sees_a_real_seam():
    img = _latent_grid_pattern()
    img[..., 64:, :] += 1.0  # one seam of two jumps: (0.2 + 0.8) / 2 on the seams vs 0.2 at the other phase lines
    assert seam_ratio(img, seams_y=[32, 64], period=8) > 2


def test_token_period_cancels_a_model_drawn_token_pattern():
    """A DiT with patch 2 over an 8-px VAE draws its own texture per 16-px token (what the lab model does): tile
    seams lie on token boundaries, so only a 16-px period baseline (other token boundaries) reads no seam; the 8-px
    baseline (all latent lines) reads the model's token texture as a seam."""
    img = _smooth(C=3, H=96, W=112)
    img[..., 15::16, :] += 0.3
    img[..., :, 15::16] += 0.3
    img[..., 7::8, :] += 0.1  # and the VAE's 8-px pattern under it
    seams = [32, 64]
    assert seam_ratio(img, seams_y=seams, seams_x=seams, period=8) > 1.5
    assert 0.8 < seam_ratio(img, seams_y=seams, seams_x=seams, period=16) < 1.2
    img[..., 64:, :] += 1.0  # a real seam still reads as one
    assert seam_ratio(img, seams_y=seams, period=16) > 1.3  # (0.4 + 1.4) / 2 on the seams vs 0.4 + the smooth part


def test_period_needs_one_phase_and_width_one():
    with pytest.raises(ValueError, match="same phase"):
        seam_ratio(_smooth(), seams_y=[16, 20], period=8)
    with pytest.raises(ValueError, match="width=1"):
        seam_ratio(_smooth(), seams_y=[16], period=8, width=2)


def test_grid_seams():
    from tiled_diffusion.tools.metrics import grid_seams

    assert grid_seams(64, 200) == [64, 128, 192]
    assert grid_seams(64, 200, offset=32) == [32, 96, 160]
    assert grid_seams(64, 64) == []


def test_psnr():
    from tiled_diffusion.tools.metrics import psnr

    a = _smooth()
    b = a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    expected = 10 * torch.log10(torch.tensor(4.0) / (a.double() - b.double()).pow(2).mean()).item()
    assert psnr(b, a) == pytest.approx(expected, rel=1e-12)
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[..., :-1])


def _kid_reference(a, b):
    """Term by term: the unbiased MMD² with the cubic polynomial kernel, in loops (fp64)."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1) ** 3  # noqa: E731
    n, m = len(a), len(b)
    saa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return saa + sbb - 2 * sab


def test_kid_matches_the_loop_reference():
    from tiled_diffusion.tools.metrics import kid

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.3
    assert kid(a, b) == pytest.approx(_kid_reference(a, b), rel=1e-10)


def test_kid_separates_distributions():
    from tiled_diffusion.tools.metrics import kid

    g = torch.Generator().manual_seed(3)
    same = kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g))
    shifted = kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 1.0)
    assert abs(same) < 0.05 < shifted
    with pytest.raises(ValueError, match="at least 2"):
        kid(torch.randn(1, 8), torch.randn(5, 8))


def _kid_design_reference(a, b, sa, sb, ga, gb):
    """Term by term: each set's within term is Σ over stratum pairs (f, h) of share_f·share_h times the mean kernel
    over its pairs (i in f, j in h) of different groups; the cross term is the plain mean (fp64 loops)."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1) ** 3  # noqa: E731

    def within(x, s, g):
        total = 0.0
        for f in sorted(set(s)):
            for h in sorted(set(s)):
                pairs = [k(x[i], x[j]) for i in range(len(x)) for j in range(len(x))
                         if s[i] == f and s[j] == h and g[i] != g[j]]
                total += s.count(f) / len(s) * s.count(h) / len(s) * sum(pairs) / len(pairs)
        return total

    cross = sum(k(a[i], b[j]) for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))
    return within(a, sa, ga) + within(b, sb, gb) - 2 * cross


def test_kid_with_strata_and_groups_matches_the_loop_reference():
    from tiled_diffusion.tools.metrics import kid

    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(9, 4, generator=g), torch.randn(8, 4, generator=g) + 0.2
    sa, sb = [0, 1, 2, 0, 1, 2, 0, 1, 2], [1, 0, 1, 0, 1, 0, 1, 0]
    ga, gb = [0, 0, 0, 1, 1, 1, 2, 2, 3], [4, 4, 5, 5, 6, 6, 7, 7]
    assert kid(a, b, sa, sb, ga, gb) == pytest.approx(_kid_design_reference(a, b, sa, sb, ga, gb), rel=1e-10)
    # defaults: one stratum, every sample its own group — the plain statistic
    assert kid(a, b, [3] * 9, None, list(range(9)), None) == pytest.approx(kid(a, b), rel=1e-12)
    with pytest.raises(ValueError, match="a stratum holds a single group"):
        kid(a, b, [0] * 8 + [1], None)
    with pytest.raises(ValueError, match="2 strata labels for 9 samples"):
        kid(a, b, [0, 1], None)


def test_kid_with_strata_is_unbiased_on_a_designed_set_where_the_plain_statistic_reads_low():
    """Two sets drawn as the quality suite draws its ground truth — exactly half from each of two strata far apart
    — from one distribution. Over 300 pairs the plain statistic reads low by 11 of its standard errors (a set's
    off-diagonal pairs hold 7/15 same-stratum pairs, independent draws 1/2); with the strata it reads 0 (0.4 of
    its standard errors; seed fixed, bounds at 5 and 3)."""
    from tiled_diffusion.tools.metrics import kid

    g = torch.Generator().manual_seed(7)
    strata = torch.arange(16) % 2
    centre = torch.tensor([[0.0] * 3, [2.0] * 3], dtype=torch.float64)[strata]
    plain, designed = [], []
    for _ in range(300):
        a = centre + torch.randn(16, 3, generator=g, dtype=torch.float64)
        b = centre + torch.randn(16, 3, generator=g, dtype=torch.float64)
        plain.append(kid(a, b))
        designed.append(kid(a, b, strata, strata))
    plain, designed = torch.tensor(plain), torch.tensor(designed)
    assert plain.mean() < -5 * plain.std() / 300 ** 0.5
    assert designed.mean().abs() < 3 * designed.std() / 300 ** 0.5


def test_kid_se_is_the_delete_a_group_jackknife_of_kid():
    from tiled_diffusion.tools.metrics import kid, kid_se

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.3
    sa, sb = [0, 1, 0, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1, 0, 1, 0]  # ≥ 3 groups per stratum: 2 left after a deletion
    ga, gb = [0, 0, 1, 2, 2, 3, 4], [5, 5, 6, 7, 8, 8, 9, 10, 11]

    def jackknife_var(labels, without):  # the definition: the statistic with each group deleted in turn
        t = torch.tensor([without(k) for k in sorted(set(labels))], dtype=torch.float64)
        return float(((t - t.mean()) ** 2).sum()) * (len(t) - 1) / len(t)

    def expected(sa, sb, ga, gb):  # through kid itself on the reduced sets (its loop references are above)
        def on_a(k):
            keep = [i for i, x in enumerate(ga) if x != k]
            return kid(a[keep], b, [sa[i] for i in keep], sb, [ga[i] for i in keep], gb)

        def on_b(k):
            keep = [i for i, x in enumerate(gb) if x != k]
            return kid(a, b[keep], sa, [sb[i] for i in keep], ga, [gb[i] for i in keep])
        return (jackknife_var(ga, on_a) + jackknife_var(gb, on_b)) ** 0.5

    assert kid_se(a, b, sa, sb, ga, gb) == pytest.approx(expected(sa, sb, ga, gb), rel=1e-10)
    assert kid_se(a, b) == pytest.approx(expected([0] * 7, [0] * 9, list(range(7)), list(range(9))), rel=1e-10)
    with pytest.raises(ValueError, match="2 group labels for 7 samples"):
        kid_se(a, b, None, None, [0, 1], None)
    with pytest.raises(ValueError, match="at least 2 groups"):
        kid_se(a, b, None, None, [0] * 7, None)


def test_kid_se_tracks_the_spread_of_independent_draws_when_patches_are_grouped():
    """120 independent draws of two sets of 16 'images' × 4 strongly correlated 'patches': the jackknife error of
    the grouped KID (RMS over draws) matches that KID's spread across draws. The jackknife variance is conservative
    in expectation (Efron–Stein), so ≥ 1× less the 120-draw noise of a heavy-tailed spread (seeds 1–3 read
    0.99–1.26). The plain statistic, deleting one patch at a time, reads the correlated patches as independent and
    understates its own spread (0.56–0.68)."""
    from tiled_diffusion.tools.metrics import kid, kid_se

    g = torch.Generator().manual_seed(1)

    def draw(shift):
        image = torch.randn(16, 1, 4, generator=g, dtype=torch.float64).expand(16, 4, 4)
        return (image + 0.3 * torch.randn(16, 4, 4, generator=g, dtype=torch.float64) + shift).reshape(64, 4)

    images = torch.arange(16).repeat_interleave(4)
    grouped, grouped_se, plain, plain_se = [], [], [], []
    for _ in range(120):
        a, b = draw(0.4), draw(0.0)
        grouped.append(kid(a, b, groups_a=images, groups_b=images))
        grouped_se.append(kid_se(a, b, groups_a=images, groups_b=images))
        plain.append(kid(a, b))
        plain_se.append(kid_se(a, b))
    rms = lambda v: torch.tensor(v).pow(2).mean().sqrt()  # noqa: E731
    spread = lambda v: torch.tensor(v).std(correction=0)  # noqa: E731
    assert 0.85 < rms(grouped_se) / spread(grouped) < 1.5
    assert rms(plain_se) / spread(plain) < 0.8


def test_spectrum_distance():
    from tiled_diffusion.tools.metrics import radial_power_spectrum
    from tiled_diffusion.tools.metrics import spectrum_distance

    g = torch.Generator().manual_seed(4)
    smooth = torch.stack([_smooth(H=64, W=80)[0] for _ in range(3)])
    noisy = smooth + 0.3 * torch.randn(smooth.shape, generator=g)
    assert spectrum_distance(smooth, smooth) == 0.0
    assert spectrum_distance(noisy, smooth) > 0.5  # white noise adds decades of power at high frequencies
    # the same bins for any size: a bigger crop of white noise has the same (flat) spectrum
    w1 = torch.randn(4, 3, 64, 64, generator=g)
    w2 = torch.randn(2, 3, 96, 128, generator=g)
    assert spectrum_distance(w1, w2) < 0.1
    assert radial_power_spectrum(w1, bins=16).shape == (16,)
