"""Regional prompts (tiled_diffusion.model.regions) on a tiny PixArt transformer (CPU, fp32).

Tolerance: comparisons of the regional forward with a plain one differ only in GEMM batch shapes (the text
projection runs over P·S tokens instead of S), i.e. fp32 rounding: 1e-5 relative to max|reference|.
"""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tiled_diffusion.model import regions as R
from tiled_diffusion.tiny import tiny_transformer
from tests.helpers import accelerated_tiny_pipeline, rel_err

W, H = 160, 96  # pixels: latent 20 x 12, tokens 10 x 6


@pytest.fixture
def tr():
    torch.manual_seed(0)
    return tiny_transformer(num_layers=2).eval()


def texts(tr, P, seed=5, S=7):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(P, S, tr.config.caption_channels, generator=g)
    mask = torch.ones(P, S)
    mask[:, 5:] = 0
    return emb, mask


def run(tr, lat, emb, mask):
    return tr(lat, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([400.0]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def latent(seed=2):
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("text,box", [("0,0,64,32:a red cat", (0, 0, 64, 32)),
                                      ("16, 8, 40, 96 : sky", (16, 8, 40, 96))], ids=["plain", "spaces"])
def test_parse_region(text, box):
    r = R.parse_region(text)
    assert (r.x0, r.y0, r.x1, r.y1) == box and r.prompt in ("a red cat", "sky")


@pytest.mark.parametrize("text", ["0,0,64:cat", "a,b,c,d:cat", "0,0,64,64", "0,0,64,64:  "],
                         ids=["three-numbers", "not-numbers", "no-prompt", "empty-prompt"])
def test_bad_region_is_one_line(text):
    with pytest.raises(R.RegionError) as e:
        R.parse_region(text)
    assert "\n" not in str(e.value)


def test_region_outside_canvas_refused():
    with pytest.raises(R.RegionError, match="outside"):
        R.RegionalPrompts("bg", ["0,0,200,50:x"], W, H)


def test_weights_sum_to_one_and_prompts_are_distinct():
    rp = R.RegionalPrompts("bg", ["0,0,80,96:cat", "60,20,160,60:dog", "100,0,160,30:cat"], W, H, feather=24)
    assert rp.prompts == ["bg", "cat", "dog"]
    w = rp.weights()
    assert w.shape == (3, H // 8, W // 8)
    assert torch.allclose(w.sum(0), torch.ones(H // 8, W // 8), atol=1e-6)
    assert w[1, 2, 1] == 1 and w[0, 2, 1] == 0  # deep inside the first region
    assert w[2, 5, 15] == 1  # the dog region is on top of the cat region where they overlap
    assert 0 < w[1, 9, 10] < 1  # the cat region's soft right edge (x = 80 px), below the dog region


def test_full_canvas_region_has_no_soft_border():
    rp = R.RegionalPrompts("bg", [f"0,0,{W},{H}:cat"], W, H, feather=64)
    assert torch.equal(rp.weights()[1], torch.ones(H // 8, W // 8))
    assert torch.equal(rp.weights()[0], torch.zeros(H // 8, W // 8))


def test_weights_follow_the_vae_factor():
    """An f4 VAE's latent is twice as fine: at_scale(4) gives [P, H/4, W/4] weights whose 2x2 means are the f8
    weights (hard edges on 8-px lines, so both grids cut them the same); the original object is unchanged."""
    rp = R.RegionalPrompts("bg", ["0,0,80,48:cat", "40,16,160,96:dog"], W, H, feather=0)
    f4 = rp.at_scale(4)
    assert rp.at_scale(8) is rp and f4 is not rp and rp.vae_scale == 8
    w4, w8 = f4.weights(), rp.weights()
    assert w4.shape == (3, H // 4, W // 4) and w8.shape == (3, H // 8, W // 8)
    assert torch.allclose(w4.sum(0), torch.ones(H // 4, W // 4), atol=1e-6)
    assert torch.equal(torch.nn.functional.avg_pool2d(w4[None], 2)[0], w8)


def test_each_distinct_prompt_encoded_once():
    calls = []

    def encode_fn(prompts):
        calls.append(list(prompts))
        n = len(prompts)
        return torch.randn(2 * n, 7, 5), torch.ones(2 * n, 7)

    rp = R.RegionalPrompts("bg", ["0,0,80,96:cat", "80,0,160,96:cat", "0,0,16,16:bg"], W, H)
    emb, mask = rp.encode(encode_fn, guidance_scale=4.5)
    assert calls == [["bg", "cat"]]
    assert emb.shape == (2, 14, 5) and mask.shape == (2, 14)


@torch.no_grad()
def test_region_tokens_attend_to_their_prompt_only(tr):
    """At the attn2 processor: tokens inside a hard region depend on the region's prompt only; tokens outside
    do not see it at all (bitwise unchanged when it changes)."""
    rp = R.RegionalPrompts("bg", ["0,0,80,96:cat"], W, H, feather=0)  # left half
    attn = tr.transformer_blocks[0].attn2
    proc = R.RegionAttnProcessor(rp, tr)
    N = (H // 16) * (W // 16)
    x = torch.randn(1, N, tr.inner_dim)
    emb, mask = texts(tr, 2)
    text = tr.caption_projection(emb).reshape(1, -1, tr.inner_dim)
    bias = ((1 - mask.reshape(1, -1)) * -10000.0).unsqueeze(1)
    out = proc(attn, x, text, bias)
    text2 = text.clone()
    text2[:, 7:] += torch.randn_like(text2[:, 7:])  # change the region's prompt only
    out2 = proc(attn, x, text2, bias)
    inside = rp.token_weights(2, "cpu")[:, 1] == 1
    assert inside.sum() == N // 2
    assert torch.equal(out[:, ~inside], out2[:, ~inside])
    assert (out[:, inside] - out2[:, inside]).abs().min() > 0
    # and inside, it is plain cross-attention to the region's prompt
    plain = AttnProcessor2_0()(attn, x, text[:, 7:], bias[..., 7:])
    assert rel_err(out[:, inside], plain[:, inside]) < 1e-5
    plain_bg = AttnProcessor2_0()(attn, x, text[:, :7], bias[..., :7])
    assert rel_err(out[:, ~inside], plain_bg[:, ~inside]) < 1e-5


@pytest.mark.parametrize("mode", ["global", "multidiffusion"])
@torch.no_grad()
def test_region_covering_canvas_equals_plain_prompt(tr, mode):
    emb, mask = texts(tr, 2)
    rp = R.RegionalPrompts("bg", [f"0,0,{W},{H}:cat"], W, H)
    lat = latent()
    plain = run(tr, lat, emb[1:2], mask[1:2])
    with rp.applied(tr, mode):
        out = run(tr, lat, emb.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
    if mode == "multidiffusion":  # the region's forward alone, exactly
        assert torch.equal(out, plain)
    else:
        assert rel_err(out, plain) < 1e-5
    # uninstalled afterwards
    assert all(type(p).__name__ != "RegionAttnProcessor" for p in tr.attn_processors.values())
    assert "forward" not in tr.__dict__


@torch.no_grad()
def test_multidiffusion_blend_is_mask_weighted(tr):
    emb, mask = texts(tr, 2)
    rp = R.RegionalPrompts("bg", ["0,0,96,64:cat"], W, H, feather=32)
    lat = latent()
    outs = [run(tr, lat, emb[p:p + 1], mask[p:p + 1]) for p in range(2)]
    w = rp.weights()
    with rp.applied(tr, "multidiffusion"):
        out = run(tr, lat, emb.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
    assert rel_err(out, w[0] * outs[0] + w[1] * outs[1]) < 1e-6


@torch.no_grad()
def test_regions_change_the_output_locally(tr):
    """Global mode: a region changes the output most inside it (self-attention spreads it some)."""
    emb, mask = texts(tr, 2)
    rp = R.RegionalPrompts("bg", ["0,0,64,96:cat"], W, H, feather=0)
    lat = latent()
    plain = run(tr, lat, emb[0:1], mask[0:1])
    with rp.applied(tr, "global"):
        out = run(tr, lat, emb.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
    d = (out - plain).abs().mean(dim=(0, 1, 2))  # per latent column
    assert d[:8].mean() > 2 * d[12:].mean()


# ---------------------------------------------------------------------------------- inside the canvas forward


def _accelerated(tr, **kw):
    from tiled_diffusion import pipeline as P

    P.accelerate(tr, int8=None, **kw)
    return P


@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
@torch.no_grad()
def test_canvas_region_covering_canvas_equals_plain_prompt(tr, mode):
    emb, mask = texts(tr, 2)
    rp = R.RegionalPrompts("bg", [f"0,0,{W},{H}:cat"], W, H)
    lat = latent()
    P = _accelerated(tr, mode=mode, tile=64)  # several tiles in both modes
    try:
        plain = run(tr, lat, emb[1:2], mask[1:2])
        with rp.applied(tr, mode):
            out = run(tr, lat, emb.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
    finally:
        P.restore(tr)
    if mode == "multidiffusion":
        assert torch.equal(out, plain)
    else:
        assert rel_err(out, plain) < 1e-5


@torch.no_grad()
def test_cross_tile_region_tokens_follow_the_tile_order(tr):
    """radius 0 (tiles do not see each other): changing the region's prompt changes exactly the tiles the region
    covers. A region weight map left in raster order would change tokens of other tiles."""
    # tile=64 px on this 160x96 canvas: TileGrid.for_tokens picks tiles that divide it, 80x48 px (2x2 tiles)
    rp = R.RegionalPrompts("bg", ["0,0,80,48:cat"], W, H, feather=0)  # = the top-left tile
    emb, mask = texts(tr, 2)
    emb2 = emb.clone()
    emb2[1] += torch.randn_like(emb2[1])
    lat = latent()
    P = _accelerated(tr, mode="cross_tile", tile=64, radius=0, window=None)  # tile-blocked windows
    try:
        with rp.applied(tr, "cross_tile"):
            a = run(tr, lat, emb.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
            b = run(tr, lat, emb2.reshape(1, -1, emb.shape[-1]), mask.reshape(1, -1))
    finally:
        P.restore(tr)
    d = (a - b).abs().amax(dim=(0, 1))
    assert d[:6, :10].min() > 0
    assert d[6:].max() == 0 and d[:, 10:].max() == 0


# ------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def rpipe():
    yield from accelerated_tiny_pipeline(tile=128)


@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
@torch.no_grad()
def test_generate_region_covering_canvas_equals_its_prompt(rpipe, mode):
    from tiled_diffusion import pipeline as P

    kw = dict(width=256, height=192, steps=2, seed=0, output_type="latent", progress=False, mode=mode)
    plain = P.generate(rpipe, "a blue lake", **kw)
    out = P.generate(rpipe, "a red house", regions=["0,0,256,192:a blue lake"], **kw)
    if mode == "multidiffusion":
        assert torch.equal(out, plain)
    else:
        assert rel_err(out, plain) < 1e-5


@torch.no_grad()
def test_generate_with_regions_and_cfg(rpipe):
    from tiled_diffusion import pipeline as P

    kw = dict(width=256, height=192, steps=2, seed=0, output_type="latent", progress=False, guidance_scale=3.0)
    base = P.generate(rpipe, "a red house", **kw)
    out = P.generate(rpipe, "a red house", regions=["0,0,128,96:a blue lake", "128,96,256,192:snow"], **kw)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4
    # uninstalled afterwards: the plain generation is unchanged
    assert torch.equal(P.generate(rpipe, "a red house", **kw), base)


# ------------------------------------------------------------------------------------------------ the CLI


def test_generate_cli_with_regions(tmp_path):
    from tiled_diffusion.cli.commands import main

    rc = main(["generate", "--model", "tiny", "--prompt", "a red house", "--size", "128x96", "--steps", "2",
               "--dtype", "fp32", "--int8", "none", "--region", "0,0,64,96:a blue lake", "--region",
               "64,0,128,48:snow", "--out", str(tmp_path / "r.png")])
    assert rc == 0 and (tmp_path / "r.png").exists()


def test_generate_cli_bad_region_is_one_line(tmp_path, capsys):
    from tiled_diffusion.cli.commands import main

    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--size", "64x64", "--region", "0,0,100,10:cat",
               "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "outside the 64x64 canvas" in err and "\n" not in err
