import pytest
import torch

from tiled_diffusion.metrics import seam_ratio, tile_seams


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
