"""The quality lab: the procedural world (tiled_diffusion/lab/world.py)."""
import math

import pytest
import torch

from tiled_diffusion.lab import world


@pytest.mark.parametrize("family", list(world.FAMILIES))
def test_world_is_deterministic(family):
    a = world.render(family, 11, -70, 33, 53, 47)
    b = world.render(family, 11, -70, 33, 53, 47)
    assert a.shape == (3, 47, 53) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert -1 <= a.min() and a.max() <= 1 and a.std() > 0.01  # not blank
    assert not torch.equal(a, world.render(family, 12, -70, 33, 53, 47))  # the seed matters


@pytest.mark.parametrize("family", list(world.FAMILIES))
def test_crop_of_a_larger_canvas_equals_the_smaller_canvas(family):
    """Every pixel is a function of its world coordinate: an odd crop at a negative offset inside a bigger canvas is
    bitwise the canvas rendered at that offset (primitives crossing the crop border included)."""
    big = world.render(family, 5, -150, -90, 301, 203)
    small = world.render(family, 5, -150 + 77, -90 + 41, 131, 97)
    assert torch.equal(big[:, 41:41 + 97, 77:77 + 131], small)


def test_families_by_name_index_or_caption():
    assert world.family_of(1) == world.family_of("sunset") == world.family_of(world.FAMILIES["sunset"]) == "sunset"
    with pytest.raises(ValueError, match="unknown scene family"):
        world.render("desert", 0, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="positive int"):
        world.render("ocean", 0, 0, 0, 0, 8)


def test_captions_use_only_known_words():
    """The tiny tokenizer maps unknown words to <unk>: every caption word must be in its vocabulary."""
    from tiled_diffusion.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    for caption in world.CAPTIONS:
        assert tok.unk_token_id not in tok(caption).input_ids, caption


# ------------------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def lab_pipe():
    from tiled_diffusion.lab import models

    return models.load_lab_pipeline()


def test_shipped_model_loads_offline(lab_pipe, monkeypatch):
    """The folder inside the package is a complete diffusers folder: built from lab/models.py's configs, strict
    weights, and loadable by diffusers itself with the hub switched off."""
    import os

    from diffusers import PixArtAlphaPipeline

    from tiled_diffusion.lab import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [os.path.join(r, f) for r, _, fs in os.walk(models.MODEL_DIR) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 8 * 2**20  # the budget for the shipped folder
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]  # safetensors only
    assert lab_pipe.transformer.config.num_layers == models.TRANSFORMER_CONFIG["num_layers"]
    ref = PixArtAlphaPipeline.from_pretrained(models.MODEL_DIR, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(lab_pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert lab_pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor


# Thresholds of the shipped model's 1x tests, from its measured figures on these exact samples (seed 0, 8 per
# family, 4 LCM steps; lab model v1.7, issue 19; the same at 1 and 2 threads): KID -0.074 vs 3.77 for pixel noise
# (share -0.020, on the model's own VAE features; at 32 samples the estimator reads |KID| < 0.1 between two
# ground-truth sets, 256 samples on one fixed extractor say 0.041 vs v1.6's 0.055, NOTES). The plain statistic on
# purpose: pixel noise has no family to stratify by, and both sides of the comparison read the same way (the
# family-stratified KID of the yardstick reads v1.7 at 0.072 ± 0.046). Prompt fidelity 8/8 for
# ocean, sunset and city, 7/8 for forest (62 of 64 forest samples at 256). Each fidelity floor is the measured
# share less one sample (a sample near the classifier's boundary may flip with the thread count's float
# reassociation); the KID margin, a tenth of the noise's distance (0.38), sits above the estimator's spread at this
# count (0.1) and far below the earlier models' margin (half).
KID_MODEL_MAX_SHARE = 0.1
FIDELITY_MIN = {"ocean": 7 / 8, "sunset": 7 / 8, "forest": 6 / 8, "city": 7 / 8}
N_PER_FAMILY = 8  # 1x samples per family shared by the KID and fidelity tests (one batched pipe call, ~6 s)


@pytest.fixture(scope="module")
def lab_samples(lab_pipe):
    """(images [32, 3, 128, 128] in [-1, 1], family index per image): 4-step samples at the training size, the
    four captions in turn, seed 0, through diffusers' own call."""
    n = N_PER_FAMILY * len(world.CAPTIONS)
    fams = [i % len(world.CAPTIONS) for i in range(n)]
    with torch.no_grad():
        out = lab_pipe([world.CAPTIONS[f] for f in fams], width=128, height=128, num_inference_steps=4,
                       guidance_scale=0.0, generator=torch.Generator().manual_seed(0), output_type="pt",
                       use_resolution_binning=False, clean_caption=False)
    return out.images * 2 - 1, fams


@torch.no_grad()
def test_samples_at_training_size_are_closer_to_the_data_than_noise(lab_pipe, lab_samples):
    """KID (lab VAE encoder features) to 32 ground-truth crops of 32 4-step samples at the training size (8 per
    family) vs of 32 uniform pixel-noise images. Margin: KID_MODEL_MAX_SHARE of the noise's distance (see its
    comment); two independent ground-truth sets read |KID| < 0.1 at these counts (NOTES), far below the margin."""
    from tiled_diffusion.lab import quality

    samples, _ = lab_samples
    noise = torch.rand(samples.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = quality.vae_features(lab_pipe.vae, quality.ground_truth(128, 32))
    k_model = quality.kid_to(quality.vae_features(lab_pipe.vae, samples), ref)
    k_noise = quality.kid_to(quality.vae_features(lab_pipe.vae, noise), ref)
    assert k_model < KID_MODEL_MAX_SHARE * k_noise, (k_model, k_noise)


@pytest.mark.parametrize("family", list(world.FAMILIES))
def test_prompt_fidelity_at_training_size(lab_samples, family):
    """The family classifier (lab/fidelity.py) assigns the prompted family to at least FIDELITY_MIN[family] of
    that family's 1x samples (see its comment for the measured figures)."""
    from tiled_diffusion.lab import fidelity

    samples, fams = lab_samples
    k = list(world.FAMILIES).index(family)
    mine = samples[[i for i, f in enumerate(fams) if f == k]]
    assert fidelity.fidelity(mine, [family] * mine.shape[0]) >= FIDELITY_MIN[family]


@pytest.mark.parametrize("size", [32, 77, 128, 300])
def test_family_classifier_recognises_ground_truth(size):
    """The shipped classifier names the family of fresh ground-truth crops (world seeds it never saw), at sizes
    it was trained on and between them (77 px; 300 px: classified by the mean over its 128-px patches)."""
    from tiled_diffusion.lab import fidelity

    g = torch.Generator().manual_seed(size)
    x, y = fidelity.render_crops(8, size, 7_000_000 + size, g)
    assert fidelity.fidelity(x, y.tolist()) == 1.0


def test_structure_features_single_out_their_family():
    """The structure figures (lab/structure.py) on ground truth: wave coherence and sun share are highest on their
    own family; the trunk and window colour shares are present on theirs and absent from the ocean (and windows
    from the forest; they are only ever read on their own family's images). A set compared with itself: ratio 1."""
    from tiled_diffusion.lab import quality, structure

    gt = quality.ground_truth(128, 32)
    fams = list(world.FAMILIES)
    per = {name: [float(structure.feature(gt[k::4], name).mean()) for k in range(4)] for name in fams}
    assert max(range(4), key=lambda k: per["ocean"][k]) == 0, per
    assert max(range(4), key=lambda k: per["sunset"][k]) == 1, per
    assert per["forest"][2] > 0.02 and per["forest"][0] == 0, per
    assert per["city"][3] > 0.02 and per["city"][0] == 0 and per["city"][2] == 0, per
    same = structure.compare(gt, [k % 4 for k in range(32)], gt, [k % 4 for k in range(32)])
    assert all(abs(v["ratio"] - 1) < 1e-9 for v in same.values())


def test_bucket_batch_draws_one_shape_of_windows():
    """The trainer's multi-aspect batches: one bucket shape per batch, every row a window of a cached latent."""
    from tiled_diffusion.lab import train

    lat = torch.arange(3 * 4 * 10 * 12, dtype=torch.float32).view(3, 4, 10, 12)
    x0, fam = train.bucket_batch(lat, torch.tensor([5, 6, 7]), 6, [(4, 8), (6, 2)], torch.Generator().manual_seed(0))
    assert x0.shape[0] == 6 and x0.shape[2:] in {(4, 8), (6, 2)}
    for row, f in zip(x0, fam.tolist()):
        src = lat[f - 5]
        h, w = row.shape[-2:]
        assert any(torch.equal(row, src[:, a:a + h, b:b + w]) for a in range(11 - h) for b in range(13 - w))


def test_field_scale_batches_hold_larger_fields_with_fewer_rows():
    """--field-scale F: about half the batches are F× the bucket's side with 1/F² the rows (the same tokens), each
    row still a window of one cached latent; F = 1 draws nothing extra (old recipes keep their streams); a data size
    that cannot hold the larger fields is refused."""
    from types import SimpleNamespace

    from tiled_diffusion.lab import train

    lat = torch.randn(3, 4, 20, 24, generator=torch.Generator().manual_seed(1))
    fam = torch.tensor([0, 1, 2])
    shapes = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(16):
        x0, f = train.bucket_batch(lat, fam, 8, [(5, 6)], g, field_scale=2)
        shapes.add((x0.shape[0],) + tuple(x0.shape[2:]))
        row, src = x0[0], lat[int(f[0])]
        h, w = row.shape[-2:]
        assert any(torch.equal(row, src[:, a:a + h, b:b + w]) for a in range(21 - h) for b in range(25 - w))
    assert shapes == {(8, 5, 6), (2, 10, 12)}
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    train.bucket_batch(lat, fam, 8, [(5, 6)], g1, field_scale=1)
    train.bucket_batch(lat, fam, 8, [(5, 6)], g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(SystemExit, match="--field-scale 2 makes fields of up to 256 px"):
        train._buckets(SimpleNamespace(data_size=128, buckets=False, field_scale=2), torch.zeros(1, 4, 32, 32))


def test_windowed_fields_attend_as_the_canvas_forward():
    """lab/train.WindowedFields: on a field larger than the training field, every attn1 is the token-centred
    window attention of the canvas forward's default (reference.neighborhood_attention, window = training field,
    stride one token); on a field the window covers it is diffusers' own attention, bitwise; removed, the
    processors are the originals again."""
    from tiled_diffusion.lab import models, train
    from tiled_diffusion.reference import neighborhood_attention

    torch.manual_seed(0)
    tr = models.build_transformer(num_layers=2, sample_size=8, patch_size=2)  # a 4-token window
    attn = tr.transformer_blocks[0].attn1
    before = [b.attn1.processor for b in tr.transformer_blocks]
    fields = train.WindowedFields(tr)
    assert fields.window == 4
    H, D = attn.heads, attn.inner_dim // attn.heads
    h, w = 5, 7  # token field, odd and larger than the window along both axes
    x = torch.randn(2, h * w, attn.query_dim, dtype=torch.float64)
    attn.double()
    fields.set((2 * h, 2 * w), 2)
    got = attn(x)
    q, k, v = (f(x).view(2, h, w, H, D).permute(0, 3, 1, 2, 4) for f in (attn.to_q, attn.to_k, attn.to_v))
    ref, _ = neighborhood_attention(q, k, v, [4, 4])
    want = attn.to_out[0](ref.permute(0, 2, 3, 1, 4).reshape(2, h * w, H * D))
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    fields.set((8, 6), 2)  # 4x3 tokens: inside the window, diffusers' attention
    x = x[:, :12]
    assert fields.mask is None and torch.equal(attn(x), before[0](attn, x))
    fields.remove()
    assert [b.attn1.processor for b in tr.transformer_blocks] == before


def test_buckets_keep_their_pixel_size_for_an_f4_vae():
    """lab/train._buckets: models.BUCKETS are f8 latent px; on an f4 VAE's latents (twice the side for the same
    images) each bucket doubles, so the DiT trains on the same pixel crops whichever VAE made the latents."""
    from types import SimpleNamespace

    from tiled_diffusion.lab import models, train

    args = SimpleNamespace(data_size=160, buckets=True, arch="", field_scale=1)
    f8 = train._buckets(args, torch.zeros(1, 4, 20, 20))
    f4 = train._buckets(args, torch.zeros(1, 4, 40, 40))
    assert f8 == [b for b in models.BUCKETS if max(b) <= 20] and len(set(f8)) > 1
    assert f4 == [(2 * h, 2 * w) for h, w in f8]
    plain = SimpleNamespace(data_size=128, buckets=False, field_scale=1)
    assert train._buckets(plain, torch.zeros(1, 4, 32, 32)) == [(32, 32)]
    # the transformer's training field follows the VAE: 16 latent px at f8, 32 at f4 (the canvas forward sizes its
    # windows by it); --arch still overrides
    assert train.dit_arch(args, torch.zeros(1, 4, 20, 20))["sample_size"] == 16
    assert train.dit_arch(args, torch.zeros(1, 4, 40, 40))["sample_size"] == 32
    assert train.dit_arch(SimpleNamespace(data_size=160, arch='{"sample_size": 8}'), torch.zeros(1, 4, 40, 40)) == \
        {"sample_size": 8}
    default = train.parse_args(["--out", "unused"])  # the default data size fits every bucket (v1.3's 128 fit one)
    side = default.data_size // models.VAE_SCALE
    assert len(train._buckets(default, torch.zeros(1, 4, side, side))) == len(models.BUCKETS)


def test_mode_seams_follow_the_model_geometry():
    """lab/quality.mode_seams draws seams in pixels from the model's VAE factor and patch: an f4 VAE with patch 4
    has PixArt's 16-px token (f8, patch 2), so every mode's seams are the same pixel lines, all on the token grid."""
    from tiled_diffusion.lab import quality

    f8, f4 = quality.Geometry(8, 2), quality.Geometry(4, 4)
    assert f8.token == f4.token == 16
    for m in quality.MODES:
        for size in (256, 400):
            a, b = quality.mode_seams(m, size, size, f8), quality.mode_seams(m, size, size, f4)
            assert a == b, (m.name, size)
            assert all(0 < v < size and v % 16 == 0 for v in a[0] + a[1]), (m.name, size, a)
    md = next(m for m in quality.MODES if m.mode == "multidiffusion")
    assert quality.mode_seams(md, 256, 256, f4)[0]  # overlapping tiles: seams exist


def test_tiny_configs_are_the_shipped_models(lab_pipe):
    """The CLI's config-only checks (memory estimate, ranks) for --model tiny read the model that runs."""
    from tiled_diffusion.cli import generate as G

    assert G.vae_scale_factor("tiny") == lab_pipe.vae_scale_factor
    cfg = G.transformer_config("tiny")
    for k in ("patch_size", "num_attention_heads", "attention_head_dim", "num_layers", "sample_size"):
        assert getattr(cfg, k) == lab_pipe.transformer.config[k], k


def test_position_jitter_gives_crops_of_a_stretched_canvas():
    """lab/train.CanvasPositions: a jittered step's tokens carry the rows of diffusers' own sincos table of the
    larger canvas at each row's offset (what cross_tile's canvas_stretched gives a window there); without
    --pos-jitter nothing is hooked and the generator is not touched (old recipes keep their random streams)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from tiled_diffusion.lab import models, train

    torch.manual_seed(0)
    tr = models.build_transformer(num_layers=1)
    pe = tr.pos_embed
    g = torch.Generator().manual_seed(3)
    off = train.CanvasPositions(1.0, tr)
    off.draw((12, 16), 4, g)
    assert off.delta is None and not off.hooks
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())
    x = torch.randn(5, tr.config.in_channels, 12, 16)
    plain = pe(x)
    jit = train.CanvasPositions(4.0, tr)
    seen = 0
    for _ in range(12):
        state = g.get_state()
        jit.draw((12, 16), 5, g)
        if jit.delta is None:
            continue
        seen += 1
        g2 = torch.Generator()  # replay the draw: c, then each row's offset
        g2.set_state(state)
        torch.rand(1, generator=g2)
        c = math.exp(torch.rand(1, generator=g2).item() * math.log(4.0))
        h, w = 6, 8
        ch, cw = max(h, round(h * c)), max(w, round(w * c))
        oy, ox = torch.randint(0, ch - h + 1, (5,), generator=g2), torch.randint(0, cw - w + 1, (5,), generator=g2)
        table = get_2d_sincos_pos_embed(pe.pos_embed.shape[-1], (ch, cw), base_size=pe.base_size,
                                        interpolation_scale=pe.interpolation_scale, output_type="pt")
        table = table.float().reshape(ch, cw, -1)
        got = pe(x)
        own = get_2d_sincos_pos_embed(pe.pos_embed.shape[-1], (h, w), base_size=pe.base_size,
                                      interpolation_scale=pe.interpolation_scale, output_type="pt").float()
        for r in range(5):
            crop = table[oy[r]:oy[r] + h, ox[r]:ox[r] + w].reshape(h * w, -1)
            assert torch.allclose(got[r], plain[r] - own + crop, atol=1e-5), r
    assert 3 <= seen <= 10  # about half of the steps
    jit.remove()
    assert torch.equal(pe(x), plain)


def test_gallery_smoke(tmp_path):
    """`python -m tiled_diffusion.lab.gallery` at its smallest: the sheet, the plot and the figures written."""
    pytest.importorskip("matplotlib")
    from tiled_diffusion.lab import gallery

    figs = gallery.run(str(tmp_path), sizes=(128,), modes=("global",), per_family=1, steps=1, gt_count=4,
                       example=False, log=lambda m: None)
    assert set(figs["modes"]["global"]["128"]) >= {"kid", "fidelity", "seam_ratio", "structure"}
    for f in ("gallery.png", "quality.png", "gallery.json"):
        assert (tmp_path / f).stat().st_size > 0


def test_quality_suite_quick(tmp_path, monkeypatch):
    """`tiled-diffusion bench --suite quality --quick`: every row scored, the JSON and the contact sheet written to
    the folder asked for (never into the repository)."""
    import importlib.util
    import json
    import math
    import os

    from tiled_diffusion.cli import commands as cli

    monkeypatch.setenv("TD_QUALITY_OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_quality", os.path.join(cli._benchmarks_dir(),
                                                                                "bench_quality.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.suite(quick=True)
    scored = [r for r in rows if "mode" in r]
    assert {"global", "cross_tile r1", "cross_tile r0 (independent)", "multidiffusion 50%", "ground truth"} <= \
        {r["mode"] for r in scored}
    for r in scored:
        assert math.isfinite(r["spectrum"]) and math.isfinite(r["seam_ratio"]), r
        # one seed: one image of one family, no independent pair, no KID; the 12 truth canvases (3 per family) have both
        if r["mode"] == "ground truth":
            assert math.isfinite(r["kid"]) and r["kid_se"] > 0, r
        else:
            assert r["kid"] is None and r["kid_se"] is None, r
    assert json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert (tmp_path / "contact_256.png").stat().st_size > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_lcm_distillation_trains_what_the_scheduler_samples(prediction):
    """The distillation's consistency function (lab/train.py) of the transformer's output read as ε (as_eps) is
    LCMScheduler.step's `denoised` at every timestep the shipped scheduler visits, for either prediction type, and
    the boundary condition holds (f(x, 0) = x)."""
    from tiled_diffusion.lab import models
    from tiled_diffusion.lab import train

    sched = models.build_scheduler(prediction)
    sched.set_timesteps(4)
    ab = sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 6, 5, generator=g), torch.randn(1, 4, 6, 5, generator=g)
    for t in sched.timesteps:
        want = sched.step(e, t, x, generator=torch.Generator().manual_seed(1)).denoised
        got = train.consistency(train.as_eps(e, x, t.view(1), ab, prediction), x, t.view(1), ab,
                                sched.config.timestep_scaling)
        # v through ε in fp32: x − (1 − ᾱ)x cancels at t = 999 (ᾱ = 4e-5), an error ~ 6e-8·|x| / sqrt(ᾱ) ≈ 3e-5
        tol = 1e-5 if prediction == "epsilon" else 1e-4
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    zero = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(train.consistency(e, x, zero, ab, sched.config.timestep_scaling), x)


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_dit_loss_weights_are_the_other_parametrisations_losses(kind):
    """lab/train.loss_weights: below the cap, the weighted ε-MSE is the x0 (or v) MSE of the same prediction,
    computed directly from x0(ε̂) and v(ε̂), up to the one normalising constant; above it the weight is the cap.
    fp64 inputs; the weights are stored in fp32, hence rtol 1e-5."""
    from tiled_diffusion.lab import models, train

    ab = models.build_scheduler().alphas_cumprod.double()
    cap = 50.0
    w = train.loss_weights(ab, kind, cap).double()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 137, 420, 611, 999])
    x0, eps, eps_hat = (torch.randn(5, 4, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a = ab[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v = lambda e, x: a.sqrt() * e - (1 - a).sqrt() * x  # noqa: E731
    direct = {"x0": x0_hat - x0, "v": v(eps_hat, x0_hat) - v(eps, x0)}
    want = direct[kind].pow(2).mean((1, 2, 3))
    got = w[t] * (eps_hat - eps).pow(2).mean((1, 2, 3))
    raw = {"x0": (1 - ab) / ab, "v": 1 / ab}[kind]
    norm = float(w[0] / raw[0])  # the normalising constant (t = 0 is below the cap for both)
    below = raw[t] <= cap
    assert below[:3].all() and not below[-1]
    torch.testing.assert_close(got[below], norm * want[below], rtol=1e-5, atol=0)
    torch.testing.assert_close(w[t][~below], torch.full((int((~below).sum()),), norm * cap, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert abs(float(w.mean()) - 1) < 1e-5
    torch.testing.assert_close(train.loss_weights(ab, "eps", cap), torch.ones(ab.numel()))


def test_vae_of_another_width_round_trips_through_a_folder(tmp_path):
    """`lab.train --vae-arch` writes a VAE whose architecture differs from models.VAE_CONFIG; models.load_vae builds
    it from the folder's config (and upcasts fp16 storage), so --vae-from / load_lab_pipeline read it back."""
    from tiled_diffusion.lab import models

    torch.manual_seed(0)
    vae = models.build_vae(block_out_channels=(8, 16, 24, 24), layers_per_block=2)
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    back = models.load_vae(str(tmp_path))
    assert tuple(back.config.block_out_channels) == (8, 16, 24, 24)
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in vae.state_dict().items())
    vae.half().save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    half = models.load_vae(str(tmp_path))
    assert next(half.parameters()).dtype == torch.float32


def test_trainer_refuses_vae_arch_keys_it_cannot_change(capsys):
    from tiled_diffusion.lab import train

    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--vae-arch", '{"latent_channels": 8}'])
    assert "--vae-arch: only block_out_channels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--pos-jitter", "0.5"])
    assert "--pos-jitter: a canvas side ratio >= 1" in capsys.readouterr().err


def test_vae_with_three_widths_is_f4_and_round_trips_through_a_folder(tmp_path):
    """models.build_vae makes one down / up block per entry of block_out_channels, so `--vae-arch` with three widths
    trains an f4 VAE (the lab's f8 VAE erases the lit windows, NOTES issue 19) that load_vae reads back."""
    from tiled_diffusion.lab import models
    from tiled_diffusion.vae import vae_scale_factor

    torch.manual_seed(0)
    vae = models.build_vae(block_out_channels=(8, 16, 24), layers_per_block=1).eval()
    assert vae_scale_factor(vae) == 4
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 6, 10)
        assert vae.decode(z).sample.shape == x.shape
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    back = models.load_vae(str(tmp_path))
    assert len(back.config.down_block_types) == 3
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in vae.state_dict().items())


def test_dit_init_grows_a_folder_transformer_without_changing_its_function(tmp_path, capsys):
    """`lab.train --dit-init FOLDER` (train.grown_from): a trained folder's transformer deepened k× by identity blocks
    computes what the folder's does (ε channels), source block i sits at i·k, and the folder's config rules."""
    from tiled_diffusion.lab import models, train

    torch.manual_seed(0)
    small = models.build_transformer(out_channels=models.TRAIN_OUT_CHANNELS, num_layers=3, sample_size=12,
                                     interpolation_scale=2)
    with torch.no_grad():  # diffusers zero-inits nothing we rely on, but make every projection clearly non-zero
        for p in small.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    models.with_sigma_channels(small).save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    grown, arch = train.grown_from(str(tmp_path), 6)
    assert arch["num_layers"] == 6 and arch["sample_size"] == 12 and arch["interpolation_scale"] == 2
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 10, 14, generator=g), torch.randn(2, 5, 32, generator=g)
    kw = dict(encoder_hidden_states=e, timestep=torch.tensor([999, 137]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        want = small(x, **kw).sample
        got = grown(x, **kw).sample
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(grown.transformer_blocks[4].attn1.to_q.weight, small.transformer_blocks[2].attn1.to_q.weight)
    assert not grown.transformer_blocks[3].ff.net[2].weight.any()
    with pytest.raises(SystemExit, match="not a multiple"):
        train.grown_from(str(tmp_path), 4)
    same, arch = train.grown_from(str(tmp_path))  # no depth asked: the folder's own
    assert arch["num_layers"] == 3 and all(torch.equal(v, small.state_dict()[k]) for k, v in same.state_dict().items())
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--dit-init", str(tmp_path / "nowhere")])
    assert "--dit-init: no trained lab model in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--dit-init", str(tmp_path),
                          "--arch", '{"num_layers": 6, "num_attention_heads": 2}'])
    assert "--arch differs in {'num_attention_heads': 2}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused at parse time, before the data and VAE stages run
        train.parse_args(["--out", "x", "--dit-init", str(tmp_path), "--arch", '{"num_layers": 4}'])
    assert "must be a positive multiple of" in capsys.readouterr().err
    assert train.parse_args(["--out", "x", "--dit-init", str(tmp_path), "--arch", '{"num_layers": 6}']).arch


def test_dit_init_prefers_the_folders_teacher_stored_fp16(tmp_path):
    """A folder that keeps its distillation's teacher (export: DIR/model/teacher) is continued from the teacher, not
    from the consistency model in transformer/; store_fp16 halves the stored floats and grown_from upcasts them."""
    from tiled_diffusion.lab import models, train

    def saved(seed, sub):
        torch.manual_seed(seed)
        tr = models.build_transformer(out_channels=models.TRAIN_OUT_CHANNELS, num_layers=2, sample_size=8)
        models.with_sigma_channels(tr).save_pretrained(str(tmp_path / sub), safe_serialization=True)
        return tr

    student = saved(0, "transformer")
    assert train.dit_source(str(tmp_path)) == "transformer"
    teacher = saved(1, train.TEACHER)
    assert train.dit_source(str(tmp_path)) == train.TEACHER
    weights = tmp_path / train.TEACHER / "diffusion_pytorch_model.safetensors"
    fp32_bytes = weights.stat().st_size
    train.store_fp16(str(tmp_path))
    assert weights.stat().st_size < 0.6 * fp32_bytes
    got, _ = train.grown_from(str(tmp_path))
    name = "transformer_blocks.1.attn1.to_q.weight"
    want = teacher.state_dict()[name]
    assert got.state_dict()[name].dtype == torch.float32
    torch.testing.assert_close(got.state_dict()[name], want.half().float(), rtol=0, atol=0)
    assert not torch.allclose(want, student.state_dict()[name])


def test_dit_init_refines_the_patch_keeping_positions_and_piecewise_constant_embeddings(tmp_path, capsys):
    """`--dit-init FOLDER --arch '{"patch_size": q}'` (grown_from/_refined): the blocks are the folder's; a q-token's
    position is that of the spot it covers (interpolation_scale × p/q, so the q-grid's every (p/q)-th token carries
    the p-token's position); on a latent constant over each p-token the q-tokens embed as their p-token did; the
    output rows are the p-block means; a q not dividing p is refused."""
    from tiled_diffusion.lab import models, train

    torch.manual_seed(0)
    src = models.build_transformer(out_channels=models.TRAIN_OUT_CHANNELS, num_layers=2, sample_size=16, patch_size=4,
                                   interpolation_scale=2)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    models.with_sigma_channels(src).save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    fine, arch = train.grown_from(str(tmp_path), None, 2)
    assert arch["patch_size"] == 2 and arch["interpolation_scale"] == 4 and arch["num_layers"] == 2
    assert fine.pos_embed.height == 8 and fine.pos_embed.base_size == 8
    assert torch.equal(fine.transformer_blocks[1].ff.net[2].weight, src.transformer_blocks[1].ff.net[2].weight)
    pos_p = src.pos_embed.pos_embed.reshape(4, 4, -1)
    pos_q = fine.pos_embed.pos_embed.reshape(8, 8, -1)
    torch.testing.assert_close(pos_q[::2, ::2], pos_p, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 5, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)  # constant per p-token
    with torch.no_grad():
        e_p, e_q = src.pos_embed.proj(x), fine.pos_embed.proj(x)
    assert e_p.abs().mean() > 0.1
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(e_q[..., i::2, j::2], e_p, rtol=1e-5, atol=1e-5)
    w_p = src.proj_out.weight.reshape(4, 4, 4, -1)  # (pixel row, pixel col, channel, D)
    w_q = fine.proj_out.weight.reshape(2, 2, 4, -1)
    torch.testing.assert_close(w_q[1, 0], w_p[2:4, 0:2].mean(dim=(0, 1)), rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit, match="does not divide"):
        train.grown_from(str(tmp_path), None, 3)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--dit-init", str(tmp_path), "--arch", '{"patch_size": 3}'])
    assert "must be a positive divisor of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a traceback from `% 0`
        train.parse_args(["--out", "x", "--dit-init", str(tmp_path), "--arch", '{"patch_size": 0}'])
    assert "must be a positive divisor of" in capsys.readouterr().err
    assert train.parse_args(["--out", "x", "--dit-init", str(tmp_path), "--arch", '{"patch_size": 2}']).arch


def test_v_prediction_output_is_the_epsilon_it_means():
    """train.as_eps: a v-model's output for (x0, ε) at t is v = sqrt(ᾱ)ε − sqrt(1 − ᾱ)x0; read as ε it gives ε back
    at every t (in float64 here: the identity is exact), and an ε-model's output passes through unchanged."""
    from tiled_diffusion.lab import models, train

    ab = models.build_scheduler().alphas_cumprod.double()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 250, 500, 999])
    x0, eps = torch.randn(5, 4, 3, 7, generator=g).double(), torch.randn(5, 4, 3, 7, generator=g).double()
    a = ab[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(train.as_eps(v, xt, t, ab, "v_prediction"), eps, rtol=1e-12, atol=1e-12)
    assert train.as_eps(eps, xt, t, ab, "epsilon") is eps
