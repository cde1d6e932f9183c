"""The quality lab: the procedural world (tiled_diffusion/lab/world.py)."""
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

    return models.load_pipeline()


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


def _lab_samples(pipe, n: int, steps: int) -> torch.Tensor:
    size = 128
    prompts = [world.CAPTIONS[i % len(world.CAPTIONS)] for i in range(n)]
    out = pipe(prompts, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(0), output_type="pt", use_resolution_binning=False,
               clean_caption=False)
    return out.images * 2 - 1


@torch.no_grad()
def test_samples_at_training_size_are_closer_to_the_data_than_noise(lab_pipe):
    """KID (lab VAE encoder features) to 32 ground-truth crops of 16 4-step samples at the training size (4 per
    family) vs of 16 uniform pixel-noise images. Margin: the model must halve the noise's distance; two independent
    ground-truth sets read |KID| < 0.1 at these sample counts (NOTES), so a halving is far outside estimator
    noise."""
    from tiled_diffusion.lab import quality

    n = 16
    samples = _lab_samples(lab_pipe, n, steps=4)
    noise = torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = quality.vae_features(lab_pipe.vae, quality.ground_truth(128, 32))
    k_model = quality.kid_to(quality.vae_features(lab_pipe.vae, samples), ref)
    k_noise = quality.kid_to(quality.vae_features(lab_pipe.vae, noise), ref)
    assert k_model < 0.5 * k_noise, (k_model, k_noise)


def test_quality_suite_quick(tmp_path, monkeypatch):
    """`tiled-diffusion bench --suite quality --quick`: every row scored, the JSON and the contact sheet written to
    the folder asked for (never into the repository)."""
    import importlib.util
    import json
    import math
    import os

    from tiled_diffusion import cli

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
        assert math.isfinite(r["kid"]) and math.isfinite(r["spectrum"]) and math.isfinite(r["seam_ratio"]), r
    assert json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert (tmp_path / "contact_256.png").stat().st_size > 0


def test_lcm_distillation_trains_what_the_scheduler_samples():
    """The distillation's consistency function (lab/train.py) is LCMScheduler.step's `denoised` at every
    timestep the shipped scheduler visits, and the boundary condition holds (f(x, 0) = x)."""
    from tiled_diffusion.lab import models, train

    sched = models.build_scheduler()
    sched.set_timesteps(4)
    ab = sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 6, 5, generator=g), torch.randn(1, 4, 6, 5, generator=g)
    for t in sched.timesteps:
        want = sched.step(e, t, x, generator=torch.Generator().manual_seed(1)).denoised
        got = train.consistency(e, x, t.view(1), ab, sched.config.timestep_scaling)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    zero = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(train.consistency(e, x, zero, ab, sched.config.timestep_scaling), x)
