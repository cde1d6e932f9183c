"""PixArt-δ ControlNet-Transformer (tiled_diffusion.model.controlnet) on a tiny PixArt transformer (CPU, fp32).

The reference below is the upstream forward written out by hand (PixArt-alpha `ControlPixArtMSHalf.forward` /
diffusers' research `PixArtControlNetTransformerModel.forward`): embed, base block 0, then for i = 1..N the copy
i-1 and its skip added before base block i, then the rest. It calls the same submodules in the same order as the
hooked transformer, so fp32 results are compared bitwise.
"""
import os

import pytest
import torch

from tiled_diffusion.model import controlnet as C
from tiled_diffusion.pipeline.images import control_latent
from tiled_diffusion.tiny import tiny_transformer
from tests.helpers import accelerated_tiny_pipeline

N_COPIES = 3


def make_transformer(num_layers=5, seed=0):
    torch.manual_seed(seed)
    return tiny_transformer(num_layers=num_layers).eval()


def randomize(module, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def inputs(tr, batch=1, h=12, w=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, tr.config.in_channels, h, w, generator=g)
    text = torch.randn(batch, 7, tr.config.caption_channels, generator=g)
    mask = torch.ones(batch, 7)
    mask[:, 5:] = 0
    t = torch.tensor([500.0] * batch)
    return lat, text, mask, t


def run(tr, lat, text, mask, t):
    added = {"resolution": None, "aspect_ratio": None}
    return tr(lat, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added,
              return_dict=False)[0]


def upstream_reference(tr, net, lat, text, mask, t, control, scale=1.0):
    """The upstream ControlNet-Transformer forward, independent of the hooks."""
    added = {"resolution": None, "aspect_ratio": None}
    bias = ((1 - mask.to(lat.dtype)) * -10000.0).unsqueeze(1)
    B = lat.shape[0]
    h, w = lat.shape[-2] // tr.config.patch_size, lat.shape[-1] // tr.config.patch_size
    x = tr.pos_embed(lat)
    temb, embedded = tr.adaln_single(t, added, batch_size=B, hidden_dtype=x.dtype)
    y = tr.caption_projection(text).view(B, -1, x.shape[-1])
    kw = dict(attention_mask=None, encoder_hidden_states=y, encoder_attention_mask=bias, timestep=temb,
              cross_attention_kwargs=None, class_labels=None)
    c = tr.pos_embed(control.repeat(B // control.shape[0], 1, 1, 1))  # x_embedder + pos_embed of the control
    for i, block in enumerate(tr.transformer_blocks):
        if 1 <= i <= net.num_layers:
            cb = net.controlnet_blocks[i - 1]
            if i == 1:
                c = x + cb.before_proj(c)
            c = cb.transformer_block(c, **kw)
            skip = cb.after_proj(c)
            x = x + skip if scale == 1.0 else x + scale * skip
        x = block(x, **kw)
    shift, sc = (tr.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    x = tr.norm_out(x) * (1 + sc) + shift
    x = tr.proj_out(x).reshape(-1, h, w, tr.config.patch_size, tr.config.patch_size, tr.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, tr.out_channels, h * tr.config.patch_size, w * tr.config.patch_size)


@pytest.fixture
def tr():
    return make_transformer()


def control_for(lat, seed=9):
    return torch.randn(lat.shape[0] if lat.shape[0] == 1 else 1, *lat.shape[1:],
                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_zero_after_proj_leaves_output_bitwise(tr):
    lat, text, mask, t = inputs(tr)
    ref = run(tr, lat, text, mask, t)
    net = C.PixArtControlNet.from_transformer(tr, N_COPIES)
    randomize(net)
    for blk in net.controlnet_blocks:  # the copies and before_proj are live; only the skips are zero
        blk.after_proj.weight.zero_()
        blk.after_proj.bias.zero_()
    with net.applied(tr, control_for(lat)):
        out = run(tr, lat, text, mask, t)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_fresh_adapter_is_a_no_op(tr):
    lat, text, mask, t = inputs(tr)
    ref = run(tr, lat, text, mask, t)
    net = C.PixArtControlNet.from_transformer(tr, N_COPIES)
    with net.applied(tr, control_for(lat)):
        out = run(tr, lat, text, mask, t)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_nonzero_after_proj_changes_output(tr):
    lat, text, mask, t = inputs(tr)
    ref = run(tr, lat, text, mask, t)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    with net.applied(tr, control_for(lat)):
        out = run(tr, lat, text, mask, t)
    assert (out - ref).abs().max() > 1e-2 * ref.abs().max()
    # detached: the base model again, bitwise
    assert torch.equal(run(tr, lat, text, mask, t), ref)


@pytest.mark.parametrize("batch,scale", [(1, 1.0), (2, 0.5)], ids=["b1-scale1", "cfg2-scale0.5"])
@torch.no_grad()
def test_matches_upstream_forward(tr, batch, scale):
    lat, text, mask, t = inputs(tr, batch=batch)
    control = control_for(lat)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    ref = upstream_reference(tr, net, lat, text, mask, t, control, scale)
    with net.applied(tr, control, conditioning_scale=scale):
        out = run(tr, lat, text, mask, t)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_control_none_is_off(tr):
    lat, text, mask, t = inputs(tr)
    ref = run(tr, lat, text, mask, t)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES)).attach(tr)
    try:
        net.set_control(None)
        assert torch.equal(run(tr, lat, text, mask, t), ref)
    finally:
        net.detach()


def test_too_many_copies_is_refused(tr):
    with pytest.raises(C.ControlNetError, match="need at least 6 base blocks"):
        C.PixArtControlNet.from_transformer(tr, 5)


@torch.no_grad()
def test_wrong_control_size_is_one_line(tr):
    lat, text, mask, t = inputs(tr)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    with net.applied(tr, torch.randn(1, 4, 8, 8)):
        with pytest.raises(C.ControlNetError, match="canvas's latent size"):
            run(tr, lat, text, mask, t)


# ------------------------------------------------------------------------------------------- checkpoints


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_diffusers_layout_round_trip(tr, tmp_path):
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    C.save_diffusers(net, str(tmp_path / "cn"))
    back = C.PixArtControlNet.load(str(tmp_path / "cn"), tr)
    assert back.num_layers == N_COPIES
    assert_same_state(back, net)
    # the safetensors file itself (config.json beside it) loads too
    back2 = C.PixArtControlNet.load(str(tmp_path / "cn" / C.WEIGHTS_NAMES[0]), tr)
    assert_same_state(back2, net)


def test_upstream_layout_round_trip(tr, tmp_path):
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    up = C.to_upstream(net.state_dict())
    assert "controlnet.0.copied_block.attn.qkv.weight" in up
    assert up["controlnet.1.copied_block.cross_attn.kv_linear.weight"].shape[0] == 2 * tr.inner_dim
    up["base_model.x_embedder.proj.weight"] = torch.randn(3, 3)  # a base model inside: ignored
    path = tmp_path / "PixArt-XL-2-1024-ControlNet.pth"
    torch.save({"state_dict": up}, path)
    back = C.PixArtControlNet.load(str(path), tr)
    assert back.num_layers == N_COPIES
    assert_same_state(back, net)
    # both layouts give the same module
    C.save_diffusers(net, str(tmp_path / "cn"))
    assert_same_state(C.PixArtControlNet.load(str(tmp_path / "cn"), tr), back)


def test_missing_and_unexpected_keys_are_named(tr, tmp_path):
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    up = C.to_upstream(net.state_dict())
    del up["controlnet.2.after_proj.bias"]
    up["controlnet.1.copied_block.attn.rel_pos.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(up, path)
    with pytest.raises(C.ControlNetError) as e:
        C.PixArtControlNet.load(str(path), tr)
    msg = str(e.value)
    assert "\n" not in msg and "controlnet.1.copied_block.attn.rel_pos.weight" in msg


def test_missing_key_in_diffusers_layout_is_named(tr, tmp_path):
    from safetensors.torch import save_file

    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    C.save_diffusers(net, str(tmp_path / "cn"))
    sd = net.state_dict()
    del sd["controlnet_blocks.2.after_proj.bias"]
    sd["controlnet_blocks.0.after_proj.weight"] = torch.zeros(5, 5)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "cn" / C.WEIGHTS_NAMES[0]))
    with pytest.raises(C.ControlNetError) as e:
        C.PixArtControlNet.load(str(tmp_path / "cn"), tr)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys controlnet_blocks.2.after_proj.bias" in msg
    assert "wrong shapes controlnet_blocks.0.after_proj.weight (5, 5)" in msg


@pytest.mark.parametrize("name", ["nothing.pth", "garbage.pth"], ids=["missing", "unreadable"])
def test_unreadable_checkpoint_is_one_line(tr, tmp_path, name):
    path = tmp_path / name
    if name == "garbage.pth":
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(C.ControlNetError) as e:
        C.PixArtControlNet.load(str(path), tr)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- int8


@torch.no_grad()
def test_int8_copies_close_to_float(tr):
    from tiled_diffusion.model.int8 import Int8Linear

    lat, text, mask, t = inputs(tr, h=16, w=16)
    control = control_for(lat)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES), std=0.05)
    with net.applied(tr, control):
        ref = run(tr, lat, text, mask, t)
    net.quantize("w8a8")
    assert all(isinstance(m, Int8Linear) for blk in net.controlnet_blocks
               for n, m in blk.transformer_block.named_modules() if n.endswith(("to_q", "ff.net.2")))
    assert type(net.controlnet_blocks[0].after_proj) is torch.nn.Linear
    with net.applied(tr, control):
        out = run(tr, lat, text, mask, t)
    base = run(tr, lat, text, mask, t)
    # SQNR of the ControlNet's contribution (int8 errors vs the control signal itself), in dB
    signal, noise = (ref - base).pow(2).mean(), (out - ref).pow(2).mean()
    assert 10 * torch.log10(signal / noise) > 20


@torch.no_grad()
def test_attach_follows_accelerate_int8():
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.model.int8 import Int8Linear

    tr = make_transformer()
    P.accelerate(tr, int8="w8a8")
    try:
        net = C.PixArtControlNet.from_transformer(tr, N_COPIES).attach(tr)
        assert net.int8 == "w8a8"
        assert isinstance(net.controlnet_blocks[1].transformer_block.attn1.to_q, Int8Linear)
        net.detach()
    finally:
        P.restore(tr)


@torch.no_grad()
def test_attach_follows_least_memory_setting():
    """keep_original_weights=False: the copies' W8A8 layers are pack-only exactly when the base blocks' are, and
    the forward still runs through them."""
    from tiled_diffusion import pipeline as P

    tr = make_transformer()
    lat, text, mask, t = inputs(tr, h=16, w=16)
    control = control_for(lat)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES), std=0.05).quantize("w8a8")
    P.accelerate(tr, int8="w8a8", keep_original_weights=False)
    try:
        base_q = tr.transformer_blocks[0].attn1.to_q
        with net.applied(tr, control):
            q = net.controlnet_blocks[0].transformer_block.attn1.to_q
            assert q._pack_only == base_q._pack_only
            out = run(tr, lat, text, mask, t)
    finally:
        P.restore(tr)
    assert torch.isfinite(out).all() and out.shape == lat.shape[:1] + (tr.config.out_channels,) + lat.shape[2:]


# ---------------------------------------------------------------------------------------------- edges


def test_soft_edges_finds_a_step():
    from tiled_diffusion.pipeline.edges import soft_edges

    img = torch.zeros(1, 3, 20, 33)
    img[..., 17:] = 1.0  # a vertical step between columns 16 and 17
    e = soft_edges(img)
    assert e.shape == (1, 3, 20, 33) and e.min() >= -1 and e.max() <= 1
    col = e[0, 0].mean(0)
    assert col.argmax().item() in (16, 17)
    assert col[16] > 0.9 and col[:10].max() < -0.99 and col[25:].max() < -0.99


def test_soft_edges_flat_image_is_black():
    from tiled_diffusion.pipeline.edges import soft_edges

    assert torch.equal(soft_edges(torch.full((1, 1, 9, 11), 0.3)), -torch.ones(1, 3, 9, 11))


@torch.no_grad()
def test_control_latent_shape():
    from PIL import Image

    from tiled_diffusion.tiny import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    lat = control_latent(vae, img, height=64, width=96)
    assert lat.shape == (1, 4, 8, 12)
    assert torch.isfinite(lat).all()


# ---------------------------------------------------------------------------------- inside the canvas forward


def accelerated(tr, **kw):
    from tiled_diffusion import pipeline as P

    P.accelerate(tr, int8=None, **kw)
    return P


@torch.no_grad()
def test_one_tile_canvas_equals_upstream_forward(tr):
    lat, text, mask, t = inputs(tr, h=16, w=16)
    control = control_for(lat)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES))
    ref = upstream_reference(tr, net, lat, text, mask, t, control)
    P = accelerated(tr, mode="cross_tile", tile=128)  # 128 px = 16 latent px: the canvas is one tile
    try:
        with net.applied(tr, control):
            out = run(tr, lat, text, mask, t)
    finally:
        P.restore(tr)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_cross_tile_covering_radius_equals_upstream_forward(tr):
    """4x4 tiles, radius 3: window attention sees the whole canvas, so only the token order differs from the
    plain forward — the control tokens must be permuted tile-major exactly like the hidden states.
    Tolerance: fp32 rounding of attention over a gathered key order (~1e-7 relative), 1e-5."""
    lat, text, mask, t = inputs(tr, h=32, w=32)
    control = control_for(lat)
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES), std=0.1)
    ref = upstream_reference(tr, net, lat, text, mask, t, control)
    P = accelerated(tr, mode="cross_tile", tile=64, radius=3, window=None)  # tile-blocked windows
    try:
        with net.applied(tr, control):
            out = run(tr, lat, text, mask, t)
    finally:
        P.restore(tr)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def _effect_of_corner_change(tr, **accel):
    """Output difference when the control changes only in the top-left 4x4 latent pixels."""
    lat, text, mask, t = inputs(tr, h=32, w=32)
    control = control_for(lat)
    changed = control.clone()
    changed[..., :4, :4] += 3.0
    net = randomize(C.PixArtControlNet.from_transformer(tr, N_COPIES), std=0.1)
    P = accelerated(tr, **accel)
    try:
        with net.applied(tr, control):
            a = run(tr, lat, text, mask, t)
        with net.applied(tr, changed):
            b = run(tr, lat, text, mask, t)
    finally:
        P.restore(tr)
    return (a - b).abs().amax(dim=(0, 1))  # [h, w]


@torch.no_grad()
def test_token_centred_control_reaches_only_the_window(tr):
    """Token-centred windows (the default), 4-token windows (0.5 x the 8-token training field), num_layers blocks
    of the transformer and the copies: a control change in the top-left 4x4 latent pixels (2x2 tokens) reaches at
    most 2 tokens (the window's half-width) further per attention layer on the way, and nothing beyond."""
    d = _effect_of_corner_change(tr, mode="cross_tile", window=0.5)
    reach = 2 + 2 * tr.config.num_layers  # tokens: the changed 2x2 block + 2 per layer
    assert d[:4, :4].max() > 1e-3
    assert d[2 * reach:].max() == 0 and d[:, 2 * reach:].max() == 0


@torch.no_grad()
def test_cross_tile_control_stays_in_its_tile(tr):
    """radius 0: tiles do not see each other, so a control change in tile (0, 0) (latent 16x16) changes that
    tile only. Raster-ordered control tokens would land in other tiles."""
    d = _effect_of_corner_change(tr, mode="cross_tile", tile=128, radius=0, window=None)
    assert d[:16, :16].max() > 1e-3
    assert d[16:].max() == 0 and d[:, 16:].max() == 0


@torch.no_grad()
def test_multidiffusion_control_is_cropped_per_tile(tr):
    """16-px latent tiles at 50% overlap (stride 8) on a 32² latent: the corner change reaches the tiles at
    origin (0, 0) only — their 16x16 footprint — and nowhere else."""
    d = _effect_of_corner_change(tr, mode="multidiffusion", tile=128, overlap=0.5)
    assert d[:16, :16].max() > 1e-3
    assert d[16:].max() == 0 and d[:, 16:].max() == 0


# ------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def cn_pipe():
    yield from accelerated_tiny_pipeline(tile=128)


def _edge_image():
    from PIL import Image

    a = torch.zeros(96, 128, 3, dtype=torch.uint8)
    a[20:70, 30:90] = 255
    return Image.fromarray(a.numpy())


@pytest.mark.parametrize("mode", ["cross_tile", "multidiffusion"])
@torch.no_grad()
def test_generate_with_controlnet(cn_pipe, mode):
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.pipeline.edges import soft_edges

    pipe = cn_pipe
    kw = dict(width=256, height=192, steps=2, seed=0, output_type="latent", progress=False, mode=mode)
    control = soft_edges(_edge_image())
    base = P.generate(pipe, "a red house", **kw)
    fresh = C.PixArtControlNet.from_transformer(pipe.transformer, 1)
    assert torch.equal(P.generate(pipe, "a red house", controlnet=fresh, control_image=control, **kw), base)
    net = randomize(C.PixArtControlNet.from_transformer(pipe.transformer, 1), std=0.05)
    out = P.generate(pipe, "a red house", controlnet=net, control_image=control, control_scale=0.7, **kw)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    assert net._transformer is None and getattr(pipe.transformer, "_td_controlnet", None) is None  # detached


@torch.no_grad()
def test_pipe_call_with_attached_controlnet_equals_generate(cn_pipe):
    """Diffusers' own pipe(...) on the accelerated pipeline, the ControlNet attached and its control set, gives
    generate(..., controlnet=...)'s latents (CFG on: the control serves both halves)."""
    from tiled_diffusion import pipeline as P

    pipe = cn_pipe
    net = randomize(C.PixArtControlNet.from_transformer(pipe.transformer, 1), std=0.05)
    img = _edge_image()
    ref = P.generate(pipe, "a red house", width=256, height=192, steps=2, seed=4, guidance_scale=3.0,
                     output_type="latent", progress=False, controlnet=net, control_image=img)
    net.attach(pipe.transformer)
    try:
        net.set_control(control_latent(pipe.vae, img, 192, 256))
        out = pipe("a red house", width=256, height=192, num_inference_steps=2, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(4), output_type="latent",
                   use_resolution_binning=False).images
    finally:
        net.detach()
    assert torch.equal(out, ref)


@torch.no_grad()
def test_controlnet_copies_use_the_region_processor(cn_pipe):
    """With regions installed, the copies' cross-attention is the regional one too (mirrored per call): a
    region covering the canvas with prompt X under a ControlNet equals plain prompt X under it (1e-5: the text
    projection runs over 2·S tokens instead of S)."""
    from tiled_diffusion import pipeline as P

    pipe = cn_pipe
    net = randomize(C.PixArtControlNet.from_transformer(pipe.transformer, 1), std=0.05)
    kw = dict(width=256, height=192, steps=2, seed=0, output_type="latent", progress=False, controlnet=net,
              control_image=_edge_image())
    plain = P.generate(pipe, "a blue lake", **kw)
    out = P.generate(pipe, "a red house", regions=["0,0,256,192:a blue lake"], **kw)
    assert ((out - plain).abs().max() / plain.abs().max()).item() < 1e-5


# ------------------------------------------------------------------------------------------------ the CLI


def test_generate_cli_with_controlnet(tmp_path):
    from PIL import Image

    from tiled_diffusion.cli.commands import main
    from tiled_diffusion.tiny import tiny_pipeline

    net = randomize(C.PixArtControlNet.from_transformer(tiny_pipeline().transformer, 1), std=0.05)
    C.save_diffusers(net, str(tmp_path / "cn"))
    _edge_image().save(tmp_path / "photo.png")
    common = ["generate", "--model", "tiny", "--prompt", "a red house", "--size", "128x96", "--steps", "2",
              "--dtype", "fp32", "--int8", "none"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--controlnet", str(tmp_path / "cn"), "--control-image",
                          f"edges:{tmp_path / 'photo.png'}", "--out", str(tmp_path / "cn.png")]) == 0
    import numpy as np

    a = torch.from_numpy(np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.float32))
    b = torch.from_numpy(np.asarray(Image.open(tmp_path / "cn.png"), dtype=np.float32))
    assert a.shape == b.shape and (a - b).abs().max() > 0


@pytest.mark.parametrize("case", ["missing-checkpoint", "no-control-image", "control-image-alone"])
def test_generate_cli_controlnet_errors_are_one_line(tmp_path, capsys, case):
    from tiled_diffusion.cli.commands import main

    _edge_image().save(tmp_path / "e.png")
    argv = {"missing-checkpoint": ["--controlnet", str(tmp_path / "nope"), "--control-image", str(tmp_path / "e.png")],
            "no-control-image": ["--controlnet", str(tmp_path / "e.png")],
            "control-image-alone": ["--control-image", str(tmp_path / "e.png")]}[case]
    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--size", "64x64", "--out", str(tmp_path / "o.png"),
               *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("tiled-diffusion generate: error:") and "\n" not in err


# ------------------------------------------------------- the ControlNet through the CLI with int8 (issue 21)


@pytest.fixture(scope="module")
def cli_controlnet(tmp_path_factory):
    """A one-copy ControlNet for the tiny model in the diffusers research layout (live after_proj, so it acts) and
    a checkerboard edge map."""
    import numpy as np
    from PIL import Image

    from tiled_diffusion.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("cli_controlnet")
    torch.manual_seed(0)
    net = C.PixArtControlNet.from_transformer(tiny_pipeline().transformer, num_layers=1)
    with torch.no_grad():
        for blk in net.controlnet_blocks:
            blk.after_proj.weight.normal_(0, 0.02)
    C.save_diffusers(net, str(root / "net"))
    y, x = np.mgrid[:256, :256]
    Image.fromarray(((x // 32 + y // 32) % 2 * 255).astype(np.uint8)).convert("RGB").save(root / "edges.png")
    return root


def test_controlnet_through_the_cli_with_int8_on_every_isa(cli_controlnet):
    """`generate --controlnet DIR --control-image edges.png` with W8A8 layers (the ControlNet's copies converted
    like the transformer's) on every CPU ISA this machine has, each a subprocess with TD_CPU_ISA set (all at once:
    they are mostly imports). Every run writes its PNG; the int8 kernels compute the same integers on every ISA,
    so the images agree to a rounding level. In fp32: in bf16 the attention itself differs by ISA (the AMX-BF16
    neighbourhood kernel vs torch's flash path: measured 6/255 apart, each 10-11/255 from fp32), which is not
    what this test is about."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tiled_diffusion.backends.cpu import isa

    isas = [name for name in isa.ISAS if isa.usable(name)[0]]
    procs = {}
    for name in isas:
        argv = [sys.executable, "-m", "tiled_diffusion", "generate", "--model", "tiny", "--prompt", "a cat",
                "--size", "256x256", "--steps", "1", "--int8", "w8a8", "--dtype", "fp32",
                "--controlnet", str(cli_controlnet / "net"),
                "--control-image", str(cli_controlnet / "edges.png"), "--out", str(cli_controlnet / f"{name}.png")]
        env = {**os.environ, "TD_CPU_ISA": name, "OMP_NUM_THREADS": "1"}
        procs[name] = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    failed = {n: (p.returncode, outs[n].strip().splitlines()[-1:]) for n, p in procs.items() if p.returncode != 0}
    assert not failed, failed  # a crash (e.g. -SIGILL from an ISA path) fails here too
    images = {n: np.asarray(Image.open(cli_controlnet / f"{n}.png")).astype(np.int16) for n in isas}
    for n, im in images.items():
        assert im.shape == (256, 256, 3) and im.std() > 1, n
        assert np.abs(im - images[isas[0]]).max() <= 2, (n, isas[0])
