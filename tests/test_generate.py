"""`tiled-diffusion generate` end to end on the tiny model, and its request validation."""
import json
import os

import pytest
from PIL import Image

from tiled_diffusion import cli
from tiled_diffusion.generate import RequestError, run


def test_generate_end_to_end(tmp_path):
    out, js = tmp_path / "img.png", tmp_path / "t.json"
    rc = cli.main(["generate", "--prompt", "a cat on a beach", "--model", "tiny", "--size", "256x256", "--steps", "2",
                   "--out", str(out), "--json", str(js)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (256, 256)
    report = json.loads(js.read_text())
    for stage in ("load_s", "accelerate_s", "encode_s", "denoise_s", "decode_s", "write_s", "total_s"):
        assert report["timings"][stage] >= 0
    assert sorted(os.listdir(tmp_path)) == ["img.png", "t.json"]  # no temporary files left


def test_generate_non_square_multidiffusion_fp32(tmp_path):
    out = tmp_path / "wide.png"
    rc = cli.main(["generate", "--prompt", "a city", "--size", "384x256", "--steps", "1", "--mode", "multidiffusion",
                   "--tile", "256", "--int8", "none", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (384, 256)


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
