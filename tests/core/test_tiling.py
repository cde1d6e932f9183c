"""TileGrid: origins, weights, extract_tiles, token permutation, neighbour tables, for_tokens, errors."""
import pytest
import torch

from tiled_diffusion import reference
from tiled_diffusion.core.tiling import PROFILES
from tiled_diffusion.core.tiling import TileGrid


@pytest.mark.parametrize("hw,tile,overlap", [((64, 96), 32, 8), ((70, 50), (24, 16), 6), ((32, 32), 64, 0),
                                              ((96, 64), 32, 0), ((66, 34), 16, 2)])
def test_origins_cover_canvas(hw, tile, overlap):
    H, W = hw
    g = TileGrid(H, W, tile, overlap=overlap)
    for origins, t, size in ((g.origins_y, g.th, H), (g.origins_x, g.tw, W)):
        assert origins[0] == 0 and origins[-1] + t == size
        assert all(b > a for a, b in zip(origins, origins[1:]))
        stride = t - overlap
        assert all(b - a <= stride for a, b in zip(origins, origins[1:]))  # no gaps, regular but the last
        assert all(b - a == stride for a, b in zip(origins[:-1], origins[1:-1]))
        covered = torch.zeros(size, dtype=torch.bool)
        for o in origins:
            covered[o:o + t] = True
        assert covered.all()
    oy, ox = g.origins()
    assert oy.dtype == torch.int32 and oy.tolist() == list(g.origins_y) and ox.tolist() == list(g.origins_x)
    assert g.num_tiles == g.ny * g.nx


def test_ragged_last_tile_shifted():
    g = TileGrid(100, 64, 32, overlap=8)
    assert g.origins_y == (0, 24, 48, 68)


@pytest.mark.parametrize("profile", PROFILES)
def test_blend_weights_positive(profile):
    g = TileGrid(64, 64, (32, 24), overlap=8)
    w = g.blend_weights(profile)
    assert w.shape == (32, 24) and w.dtype == torch.float32
    assert (w > 0).all() and w.max() <= 1.0 + 1e-6
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))  # symmetric windows
    if profile in ("linear", "cosine"):
        assert (w[8:-8, 8:-8] == 1).all() and w[0, 0] < w[4, 4]


def test_blend_weights_unknown_profile():
    with pytest.raises(ValueError, match="profile"):
        TileGrid(64, 64, 32, overlap=8).blend_weights("hann")


@pytest.mark.parametrize("profile", PROFILES)
def test_extract_then_blend_is_identity(profile):
    g = TileGrid(50, 70, (16, 24), overlap=6, batch=2)
    canvas = torch.randn(2, 3, 50, 70, dtype=torch.float64)
    tiles = g.extract_tiles(canvas)
    assert tiles.shape == (2 * g.ny * g.nx, 3, 16, 24)
    t = tiles.reshape(2, g.ny, g.nx, 3, 16, 24)
    assert torch.equal(t[1, 1, 2], canvas[1, :, g.origins_y[1]:g.origins_y[1] + 16, g.origins_x[2]:g.origins_x[2] + 24])
    oy, ox = g.origins()
    back = reference.seam_blend(tiles, oy, ox, g.blend_weights(profile), 2, 50, 70)
    torch.testing.assert_close(back, canvas)


@pytest.mark.parametrize("shift", [(0, 0), (3, 5), (-2, 7)])
def test_permutation_round_trip(shift):
    g = TileGrid(24, 40, (8, 10), batch=2, shift=shift)
    assert (g.tokens_h, g.tokens_w, g.tile_tokens_h, g.tile_tokens_w) == (12, 20, 4, 5)
    perm, inv = g.permutation(), g.inverse_permutation()
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(240))
    assert torch.equal(perm[inv], torch.arange(240))
    x = torch.randn(2, 240, 7)
    xt = g.to_tile_major(x)
    assert xt.shape == (g.num_tiles, 20, 7)
    assert torch.equal(g.from_tile_major(xt), x)


def test_tile_major_content():
    g = TileGrid(24, 40, (8, 10), batch=2)
    x = torch.randn(2, 12, 20, 3)
    xt = g.to_tile_major(x.reshape(2, 240, 3))
    # tile (b=1, iy=2, ix=1) = rows 8..11, cols 5..9 in raster order
    expect = x[1, 8:12, 5:10].reshape(20, 3)
    assert torch.equal(xt[(1 * g.ny + 2) * g.nx + 1], expect)


def test_shift_rolls_grid():
    g = TileGrid(16, 16, 8, shift=(1, 2))
    grid = torch.arange(64).reshape(8, 8)
    xt = g.to_tile_major(grid.reshape(1, 64))
    rolled = torch.roll(grid, shifts=(-1, -2), dims=(0, 1))
    assert torch.equal(xt[0], rolled[:4, :4].reshape(-1))
    assert torch.equal(xt[3], rolled[4:, 4:].reshape(-1))  # holds tokens from both canvas edges (torus)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_neighbours(radius):
    g = TileGrid(32, 40, 8, batch=2)  # 4 x 5 tiles
    nb = g.neighbours(radius)
    n = 2 * radius + 1
    assert nb.dtype == torch.int32 and nb.shape == (2 * 20, n * n)
    assert torch.equal(nb[:, n * n // 2], torch.arange(40, dtype=torch.int32))  # self in the middle slot
    for t in range(40):
        b, iy, ix = t // 20, (t % 20) // 5, t % 5
        expect = set()
        for y in range(4):
            for x in range(5):
                if max(abs(y - iy), abs(x - ix)) <= radius:
                    expect.add((b * 4 + y) * 5 + x)
        row = nb[t].tolist()
        assert set(v for v in row if v >= 0) == expect  # never crosses batch items
        assert row.count(-1) == n * n - len(expect)


def test_for_tokens_divisors():
    g = TileGrid.for_tokens(200, 136, 64)  # tokens 100 x 68, want 32 -> divisors 25 and 34
    assert (g.tile_tokens_h, g.tile_tokens_w) == (25, 34)
    assert g.tokens_h % g.tile_tokens_h == 0 and g.tokens_w % g.tile_tokens_w == 0
    assert g.tokens_per_tile == 25 * 34 and g.overlap == 0
    g2 = TileGrid.for_tokens(256, 256, 64, batch=3)
    assert (g2.tile_tokens_h, g2.ny, g2.num_tiles) == (32, 4, 48)
    g2.neighbours(1)  # token level works


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=33, width=32, tile=16), "height"),
    (dict(height=32, width=32, tile=0), "tile must be > 0"),
    (dict(height=32, width=32, tile=15), "multiple of patch"),
    (dict(height=32, width=32, tile=16, overlap=16), "overlap"),
    (dict(height=32, width=32, tile=16, overlap=3), "overlap"),
    (dict(height=32, width=32, tile=16, batch=0), "batch"),
    (dict(height=32, width=32, tile=(16, 8, 4)), "pair"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileGrid(**kwargs)


def test_token_level_errors():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(32, 32, 16, overlap=4).neighbours(1)
    with pytest.raises(ValueError, match="for_tokens"):
        TileGrid(36, 32, 16).permutation()
    with pytest.raises(ValueError, match="radius"):
        TileGrid(32, 32, 16).neighbours(-1)
    with pytest.raises(ValueError, match="to_tile_major"):
        TileGrid(32, 32, 16).to_tile_major(torch.randn(1, 100, 3))
