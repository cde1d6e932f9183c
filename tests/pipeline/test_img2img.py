"""Tiled img2img / upscale (tiled_diffusion.pipeline.images): image loading, strength schedule, noising, end to end on
the built-in tiny model (CPU, fp32)."""
import numpy as np
import pytest
import torch
from PIL import Image

from tiled_diffusion import pipeline as P
from tiled_diffusion.pipeline import images as I
from tests.helpers import accelerated_tiny_pipeline


# ------------------------------------------------------------------------------------------ image files


def _save(tmp_path, name, arr, mode=None):
    path = tmp_path / name
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return str(path)


def test_load_rgb(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    img = I.load_image(_save(tmp_path, "a.png", a))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), a)


def test_load_greyscale(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (9, 7), dtype=np.uint8)
    img = I.load_image(_save(tmp_path, "g.png", a))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], a)


def test_load_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 5, 4), dtype=np.uint8)
    a[..., 0] = 200
    a[:, :2, 3] = 255  # opaque red on the left, fully transparent on the right
    img = np.asarray(I.load_image(_save(tmp_path, "rgba.png", a)))
    assert (img[:, :2] == [200, 0, 0]).all() and (img[:, 2:] == 255).all()


def test_load_16bit_greyscale_scaled(tmp_path):
    a = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    img = np.asarray(I.load_image(str(path)))[..., 0]
    assert img.tolist() == [[0, 255], [128, 4]]


def test_float_image_refused():
    with pytest.raises(I.ImageError, match="floating-point"):
        I.to_rgb(Image.fromarray(np.zeros((3, 3), dtype=np.float32), mode="F"))


@pytest.mark.parametrize("case", ["missing", "not-an-image"])
def test_bad_file_is_one_line(tmp_path, case):
    path = tmp_path / "x.png"
    if case == "not-an-image":
        path.write_text("hello")
    with pytest.raises(I.ImageError) as e:
        I.load_image(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ sizes


def test_prepare_pads_to_16_and_keeps_the_image():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    x = I.prepare_image(img, 50, 37)
    assert x.shape == (1, 3, 48, 64)
    assert torch.equal(x[..., :37, :50], I.to_tensor(img))
    assert torch.equal(x[..., 37, :50], x[..., 35, :50])  # reflected, not black


def test_prepare_resizes_with_lanczos():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    x = I.prepare_image(img, 48, 40)
    assert x.shape == (1, 3, 48, 48)
    assert torch.equal(x[..., :40, :], I.to_tensor(img.resize((48, 40), Image.LANCZOS)))


# ------------------------------------------------------------------------------------------ strength


@pytest.mark.parametrize("strength,steps", [(0.0, 4), (1.5, 4), (0.05, 4)], ids=["zero", "above-one", "too-few"])
def test_bad_strength_is_refused(strength, steps):
    with pytest.raises(I.ImageError) as e:
        I.check_strength(strength, steps)
    assert "\n" not in str(e.value)
    if strength == 0.05:
        assert "original_inference_steps × strength ≥ steps" in str(e.value)


def lcm_scheduler():
    from diffusers import LCMScheduler

    # PixArt-LCM's scheduler (DIFFUSERS-FACTS): linear betas 1e-4..0.02, 1000 steps, original_inference_steps 50
    return LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")


@pytest.mark.parametrize("strength,expected", [(0.3, [299, 239, 159, 79]), (0.5, [499, 379, 259, 139]),
                                               (0.8, [799, 599, 399, 199]), (1.0, [999, 759, 499, 259])],
                         ids=["0.3", "0.5", "0.8", "1.0"])
def test_strength_schedule_matches_diffusers(strength, expected):
    from tiled_diffusion.pipeline.sampler import set_timesteps

    assert set_timesteps(lcm_scheduler(), 4, "cpu", strength).tolist() == expected
    ref = lcm_scheduler()
    ref.set_timesteps(4, device="cpu", strength=strength)
    assert ref.timesteps.tolist() == expected


# ------------------------------------------------------------------------------------------ the tiny model


@pytest.fixture(scope="module")
def pipe():
    yield from accelerated_tiny_pipeline(tile=128)


def test_image_latents_are_the_noised_encoding(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    lat = I.image_latents(pipe, img, width=96, height=64, strength=0.5, steps=2,
                          generator=torch.Generator().manual_seed(7))
    clean = I.encode_image(pipe.vae, I.to_tensor(img))
    noise = randn_tensor(tuple(clean.shape), generator=torch.Generator().manual_seed(7))
    sched = pipe.scheduler
    sched.set_timesteps(2, strength=0.5)
    assert sched.timesteps.tolist() == [499, 259]
    ref = sched.add_noise(clean, noise, sched.timesteps[:1])
    assert torch.equal(lat, ref)


def _rand_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@torch.no_grad()
def test_generate_img2img_equals_a_hand_written_lcm_img2img_loop():
    """One-tile canvas: `generate(image=, strength=)` is diffusers' LCM img2img: encode, add_noise at the first
    timestep of set_timesteps(steps, strength=), LCM steps from there (same generator for noise and steps);
    bitwise from the encoded latents on."""
    from diffusers.utils.torch_utils import randn_tensor

    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_pipeline

    p = tiny_pipeline()
    img = _rand_image(128, 96)
    tr, sched = p.transformer, p.scheduler
    embeds, mask = P.encode(p, "a red house")
    gen = torch.Generator().manual_seed(3)
    sched.set_timesteps(3, strength=0.6)
    assert sched.timesteps.tolist() == [599, 399, 199]
    clean = I.encode_image(p.vae, I.to_tensor(img))
    # the encode itself is diffusers' posterior mean up to fp32 reordering (vae.encode runs channels-last)
    ref = p.vae.encode(I.to_tensor(img)).latent_dist.mean * p.vae.config.scaling_factor
    assert ((clean - ref).abs().max() / ref.abs().max()).item() < 1e-5
    x = sched.add_noise(clean, randn_tensor(tuple(clean.shape), generator=gen), sched.timesteps[:1])
    for t in sched.timesteps:
        eps = tr(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t[None],
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        x = sched.step(eps.chunk(2, dim=1)[0], t, x, generator=gen, return_dict=False)[0]
    P.accelerate(p, int8=None, text_encoder_int8=False, tile=128)  # 128x96 px: one tile
    try:
        out = P.generate(p, "a red house", width=128, height=96, steps=3, seed=3, image=img, strength=0.6,
                         output_type="latent", progress=False)
    finally:
        P.restore(p)
    assert torch.equal(out, x)


def test_img2img_any_size_and_seeds(pipe):
    img = _rand_image(50, 37, seed=5)
    a = P.img2img(pipe, "a cat", img, strength=0.5, steps=2, seed=1, progress=False)[0]
    b = P.img2img(pipe, "a cat", img, strength=0.5, steps=2, seed=1, progress=False)[0]
    c = P.img2img(pipe, "a cat", img, strength=0.5, steps=2, seed=2, progress=False)[0]
    assert a.size == (50, 37)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_upscale_output_size(pipe):
    timings = {}
    out = P.upscale(pipe, _rand_image(24, 20, seed=6), scale=2.5, strength=0.5, steps=2, seed=0, progress=False,
                    timings=timings)[0]
    assert out.size == (60, 50)
    assert {"resize_s", "encode_s", "denoise_s", "decode_s"} <= set(timings)


def test_strength_without_image_is_refused(pipe):
    from tiled_diffusion import pipeline as P

    with pytest.raises(ValueError, match="strength= needs image="):
        P.generate(pipe, "a cat", width=64, height=64, steps=2, strength=0.5, progress=False)


def test_strength_too_low_for_the_steps_is_refused(pipe):
    with pytest.raises(I.ImageError, match="original_inference_steps × strength ≥ steps"):
        P.img2img(pipe, "a cat", _rand_image(32, 32), strength=0.05, steps=4, progress=False)


# ------------------------------------------------------------------------------------------ the CLI


def test_upscale_cli(tmp_path, capsys):
    import json

    from tiled_diffusion.cli.commands import main

    src = tmp_path / "in.png"
    _rand_image(40, 24, seed=8).save(src)
    out, js = tmp_path / "out.png", tmp_path / "t.json"
    rc = main(["upscale", "--model", "tiny", "--image", str(src), "--scale", "2", "--strength", "0.5", "--steps",
               "2", "--dtype", "fp32", "--int8", "none", "--tile", "64", "--out", str(out), "--json", str(js)])
    assert rc == 0
    assert Image.open(out).size == (80, 48)
    report = json.loads(js.read_text())
    assert {"resize_s", "encode_s", "denoise_s", "decode_s"} <= set(report["timings"])


@pytest.mark.parametrize("case", ["missing-image", "bad-strength", "bad-scale"])
def test_upscale_cli_errors_are_one_line(tmp_path, capsys, case):
    from tiled_diffusion.cli.commands import main

    src = tmp_path / "in.png"
    _rand_image(16, 16).save(src)
    argv = {"missing-image": ["--image", str(tmp_path / "nope.png")],
            "bad-strength": ["--image", str(src), "--strength", "0.02"],
            "bad-scale": ["--image", str(src), "--scale", "0"]}[case]
    rc = main(["upscale", "--model", "tiny", "--out", str(tmp_path / "o.png"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("tiled-diffusion upscale: error:") and "\n" not in err
