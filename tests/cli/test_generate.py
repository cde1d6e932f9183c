"""`tiled-diffusion generate` end to end on the tiny model, and its request validation."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tiled_diffusion.cli import commands as cli
from tiled_diffusion.cli.generate import RequestError
from tiled_diffusion.cli.generate import run
from tests.helpers import save_tiny_folder


def test_generate_end_to_end(tmp_path):
    out, js = tmp_path / "img.png", tmp_path / "t.json"
    rc = cli.main(["generate", "--prompt", "a cat on a beach", "--model", "tiny", "--size", "256x256", "--steps", "2",
                   "--out", str(out), "--json", str(js)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (256, 256)
    report = json.loads(js.read_text())
    for stage in ("load_text_encoder_s", "encode_s", "load_s", "accelerate_s", "denoise_s", "decode_s", "write_s",
                  "total_s"):
        assert report["timings"][stage] >= 0
    assert report["memory"]["peak_rss_gb"] > 0.1  # torch alone is more than that
    assert sorted(os.listdir(tmp_path)) == ["img.png", "t.json"]  # no temporary files left


def test_generate_non_square_multidiffusion_fp32(tmp_path):
    out = tmp_path / "wide.png"
    rc = cli.main(["generate", "--prompt", "a city", "--size", "384x256", "--steps", "1", "--mode", "multidiffusion",
                   "--tile", "256", "--int8", "none", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (384, 256)


def test_generate_multi_tile_canvas_equals_python_api_and_pipe_call(tmp_path):
    """A canvas of several cross_tile tiles (768x576 px with 256-px tiles: 3x2) whose latent (96x72) spans several
    VAE tiles, through the CLI, `tiled_diffusion.generate` and diffusers' own `pipe(...)`: the same pixels
    (fp32, int8 off: the three run the same float ops)."""
    import torch

    import tiled_diffusion
    from tiled_diffusion.tiny import tiny_pipeline

    out = tmp_path / "big.png"
    prompt = "a red house by the lake"
    rc = cli.main(["generate", "--prompt", prompt, "--size", "768x576", "--steps", "2", "--tile", "256", "--seed", "5",
                   "--int8", "none", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (768, 576)
        cli_px = np.asarray(im.convert("RGB"))
    pipe = tiled_diffusion.accelerate(tiny_pipeline(), tile=256, int8=None, text_encoder_int8=False)
    api = tiled_diffusion.generate(pipe, prompt, width=768, height=576, steps=2, seed=5, progress=False)[0]
    call = pipe(prompt, width=768, height=576, num_inference_steps=2, guidance_scale=0.0, clean_caption=False,
                generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(api), cli_px)
    assert np.array_equal(np.asarray(call), cli_px)
    assert cli_px.std() > 1  # an image, not a constant


@pytest.mark.parametrize("argv,msg", [
    (["--size", "250x256"], "multiple of 16"),
    (["--size", "4096x4096", "--mode", "global", "--max-memory-gb", "0.01"], "exceeds --max-memory-gb"),
    (["--model", "/nonexistent/folder"], "no such folder"),
    (["--tile", "100"], "tile"),
])
def test_bad_request_is_one_clear_line(tmp_path, capsys, argv, msg):
    out = tmp_path / "x.png"
    rc = cli.main(["generate", "--prompt", "x", "--out", str(out), *argv])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_unknown_mode_is_rejected():
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    args.mode = "tiles"
    with pytest.raises(RequestError, match="unknown mode"):
        run(args)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompt", "x", "--mode", "tiles"])


# ------------------------------------------------------------------------- local diffusers folders


def generate_png(out, model, *extra):
    rc = cli.main(["generate", "--prompt", "a red house by the lake", "--model", str(model), "--size", "256x128",
                   "--steps", "2", "--seed", "3", "--out", str(out), *extra])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (256, 128)
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    root = tmp_path_factory.mktemp("models")
    alpha = save_tiny_folder(root / "alpha", PixArtAlphaPipeline)
    sigma = save_tiny_folder(root / "sigma", PixArtSigmaPipeline)
    assert json.loads((sigma / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    return {"alpha": alpha, "sigma": sigma}


@pytest.fixture(scope="module")
def tiny_png(tmp_path_factory):
    return generate_png(tmp_path_factory.mktemp("tiny") / "tiny.png", "tiny")


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
def test_generate_from_a_saved_folder_equals_tiny(folders, tiny_png, tmp_path, kind):
    """Default path (bf16, int8 on: loading.load_pipeline quantizes as it reads): the same weights, tokenizer and
    scheduler as `--model tiny`, so the same image, pixel for pixel, whether the folder names PixArt-α or -Σ."""
    img = generate_png(tmp_path / f"{kind}.png", folders[kind])
    assert np.array_equal(img, tiny_png)


def test_generate_from_a_saved_folder_fp32_without_int8(folders, tmp_path):
    """The plain from_pretrained path. In fp32, from_pretrained keeps weights as views into the file buffer,
    whose alignment (not 64-byte) changes the CPU GEMM's last bits (~1e-6 on the latents), so the 8-bit image may
    differ from `--model tiny` by one level; any loading mistake moves it by far more."""
    extra = ("--dtype", "fp32", "--int8", "none")
    ref = generate_png(tmp_path / "tiny32.png", "tiny", *extra)
    img = generate_png(tmp_path / "alpha32.png", folders["alpha"], *extra)
    assert np.abs(img - ref).max() <= 1


def _one_line_error(capsys, argv, out):
    rc = cli.main(["generate", "--prompt", "x", "--size", "256x128", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1, err
    return err


def test_folder_of_another_pipeline_is_one_clear_line(tmp_path, capsys):
    model = tmp_path / "sd"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    err = _one_line_error(capsys, ["--model", str(model)], tmp_path / "x.png")
    assert "holds a StableDiffusionPipeline, expected PixArtAlphaPipeline or PixArtSigmaPipeline" in err


def test_folder_without_model_index_is_one_clear_line(tmp_path, capsys):
    model = tmp_path / "empty"
    (model / "transformer").mkdir(parents=True)
    err = _one_line_error(capsys, ["--model", str(model)], tmp_path / "x.png")
    assert "not a diffusers folder (no model_index.json)" in err


def test_generate_nproc_2_equals_one_process(tmp_path):
    """`--nproc 2` runs the same command under torchrun on 2 gloo ranks (bands of token rows, their K/V halo, then
    the VAE decode split over the ranks); rank 0 alone writes the PNG. The reference runs in a subprocess with one
    thread like each rank (torchrun sets OMP_NUM_THREADS=1), because fp32 GEMMs round differently with another
    thread count. The final latents are bitwise those of one process (test_distributed.py); the image is not:
    the parallel decode runs each rank's rows as bands (another floating-point order than the one-process plain
    decode, ~1e-6 relative), which moves a few pixels across a rounding boundary (measured: 1 level on 0.28% of
    the values with the trained tiny model)."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "tiled_diffusion", "generate", "--prompt", "a cat", "--size", "256x640", "--tile",
            "128", "--int8", "none", "--dtype", "fp32", "--steps", "2"]  # the default token-centred windows
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    subprocess.run(base + ["--out", str(one)], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(base + ["--out", str(two), "--nproc", "2"], check=True, env=env, capture_output=True, timeout=600)
    with Image.open(one) as a, Image.open(two) as b:
        diff = np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    assert sorted(os.listdir(tmp_path)) == ["one.png", "two.png"]
