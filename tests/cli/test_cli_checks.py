"""Every user mistake refused in one line, exit 2, before any model loads (issue 22; cli/checks.py), and the
--nproc launcher's signals.

The in-process cases replace `cli_generate.load` by a function that fails the test: a refusal that came after
loading would show up as that failure, not as exit 2.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel  # noqa: F401  imported once here, not timed below
from PIL import Image

from tiled_diffusion.cli import commands as cli
from tiled_diffusion.cli import generate as G


@pytest.fixture(autouse=True)
def no_loading(monkeypatch, request):
    if request.node.name.startswith("test_run_"):  # the few tests that do generate
        return

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(G, "load", refuse)


def one_line(capsys, argv, command="generate"):
    t0 = time.perf_counter()
    rc = cli.main([command, *argv])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"tiled-diffusion {command}: error: "), err
    assert elapsed < 10, elapsed  # configs and headers only (generous for a loaded 2-core machine)
    return err


def gen(tmp_path, *argv, out=None):
    return ["--prompt", "x", "--size", "256x128", "--out", str(out or tmp_path / "o.png"), *argv]


# ------------------------------------------------------------------------------------------- outputs


def test_out_naming_a_folder(tmp_path, capsys):
    assert "is a folder" in one_line(capsys, gen(tmp_path, out=tmp_path))


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in one_line(capsys, gen(tmp_path, out=tmp_path / "f" / "o.png"))


def test_out_empty(tmp_path, capsys):
    assert "empty path" in one_line(capsys, ["--prompt", "x", "--out", ""])


def test_out_where_nothing_can_be_written(tmp_path, capsys):
    assert "cannot write" in one_line(capsys, gen(tmp_path, out="/proc/td-test.png"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (mode 555) folder")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert "cannot write" in one_line(capsys, gen(tmp_path, out=ro / "o.png"))


def test_json_unwritable(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = one_line(capsys, gen(tmp_path, "--json", str(tmp_path / "f" / "r.json")))
    assert err.startswith("tiled-diffusion generate: error: --json")


def test_json_same_as_out(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert "same file as --out" in one_line(capsys, gen(tmp_path, "--json", str(out), out=out))


def test_out_in_a_folder_to_create_is_fine(tmp_path):
    from tiled_diffusion.cli.checks import check_outputs

    check_outputs(str(tmp_path / "new" / "deeper" / "o.png"), None)
    assert not (tmp_path / "new").exists()  # checked, nothing created


# ------------------------------------------------------------------------------------------- memory


def test_huge_size_is_refused_by_the_machine_memory_default(tmp_path, capsys):
    err = one_line(capsys, gen(tmp_path, "--size", "100000x100000"))
    assert "this machine's memory" in err


def test_upscale_by_1000_is_refused_before_loading(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(src)
    err = one_line(capsys, ["--image", str(src), "--scale", "1000", "--out", str(tmp_path / "u.png")], "upscale")
    assert "this machine's memory" in err


# ------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "51"], "--steps must be in [1, 50]"),
    (["--steps", "1000"], "--steps must be in [1, 50]"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seed", "1" * 24], "--seed must be in [0, 2**64)"),
    (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    (["--device", "bogus"], "--device 'bogus': not a device"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "-1"], "--guidance-scale must be >= 0"),
    (["--max-memory-gb", "0"], "--max-memory-gb must be > 0"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "-2"], "--nproc must be >= 1"),
    (["--mode", "multidiffusion", "--radius", "2"], "--radius is a cross_tile setting"),
    (["--mode", "cross_tile", "--overlap", "0.25"], "--overlap is a multidiffusion setting"),
    (["--mode", "global", "--tile", "256"], "--tile has no effect with --mode global"),
    (["--mode", "multidiffusion", "--shift"], "--shift is a cross_tile setting"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_flag_ranges_and_conflicts(tmp_path, capsys, argv, msg):
    assert msg in one_line(capsys, gen(tmp_path, *argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    assert "CUDA is not available" in one_line(capsys, gen(tmp_path, "--device", "cuda"))


def test_prompt_that_is_not_utf8(tmp_path, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv byte
    assert "not valid UTF-8" in one_line(capsys, ["--prompt", bad, "--out", str(tmp_path / "o.png")])


@pytest.mark.parametrize("scale", ["inf", "nan", "0", "-2"])
def test_upscale_scale_out_of_range(tmp_path, capsys, scale):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(src)
    err = one_line(capsys, ["--image", str(src), "--scale", scale, "--out", str(tmp_path / "u.png")], "upscale")
    assert "--scale must be a finite number > 0" in err


def test_decompression_bomb_image(tmp_path, capsys, monkeypatch):
    src = tmp_path / "bomb.png"
    Image.new("RGB", (64, 48)).save(src)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 px > 2x the limit: PIL's bomb error
    err = one_line(capsys, ["--image", str(src), "--out", str(tmp_path / "u.png")], "upscale")
    assert "decompression bomb" in err.lower()


def test_nproc_bad_request_is_one_line_from_the_launcher(tmp_path, capsys, monkeypatch):
    from tiled_diffusion import parallel as distributed

    monkeypatch.setattr(distributed, "launch_local", lambda *a: pytest.fail("workers started"))
    assert "--steps must be in" in one_line(capsys, gen(tmp_path, "--nproc", "2", "--steps", "51"))


def test_nproc_more_ranks_than_row_bands_is_one_line_from_the_launcher(tmp_path, capsys, monkeypatch):
    """256x128 has 16 token rows (the tiny model's 8-px tokens): one 16-row block of the default token-centred
    windows, so 3 ranks are refused before any worker starts (each worker used to fail with its own traceback)."""
    from tiled_diffusion import parallel as distributed

    monkeypatch.setattr(distributed, "launch_local", lambda *a: pytest.fail("workers started"))
    err = one_line(capsys, gen(tmp_path, "--nproc", "3", "--size", "256x128"))
    assert "3 ranks but the canvas has only 1 row blocks of 16 tokens" in err


# ------------------------------------------------------------------------------------ broken folders


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tiled_diffusion.tiny import save_pretrained_offline
    from tiled_diffusion.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "ok"
    save_pretrained_offline(tiny_pipeline(), path)
    return path


def broken(saved, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    how(model)
    return model


def _four_byte_vae(m):
    (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"abcd")


def _bad_transformer_config(m):
    cfg = json.loads((m / "transformer" / "config.json").read_text())
    cfg["num_attention_heads"] = "sixteen"
    (m / "transformer" / "config.json").write_text(json.dumps(cfg))


BROKEN = {
    "four_byte_vae_weights": (_four_byte_vae, "vae: "),
    "no_tokenizer": (lambda m: shutil.rmtree(m / "tokenizer"), "the tokenizer/ folder is missing"),
    "no_scheduler": (lambda m: shutil.rmtree(m / "scheduler"), "the scheduler/ folder is missing"),
    "bad_transformer_config": (_bad_transformer_config, "transformer/config.json does not describe"),
    "no_transformer_weights": (lambda m: (m / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
                               "no safetensors weights in transformer/"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_model_folder(saved, tmp_path, capsys, case):
    how, msg = BROKEN[case]
    model = broken(saved, tmp_path, how)
    err = one_line(capsys, gen(tmp_path, "--model", str(model)))
    assert msg in err and "sentencepiece" not in err


def test_intact_folder_passes_the_checks(saved):
    from tiled_diffusion.cli.checks import check_model_folder

    check_model_folder(str(saved))


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: image.png)" in out and "(default: 2048x2048)" in out


# ---------------------------------------------------------------------------------------- launcher


def children(pid: int) -> list[int]:
    """Every live descendant of pid (Linux /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # ~20-40 s on a loaded 2-core machine (two ranks import torch and load the model)
def test_sigterm_to_the_nproc_launcher_stops_every_worker(tmp_path):
    out = tmp_path / "o.png"
    cmd = [sys.executable, "-m", "tiled_diffusion", "generate", "--prompt", "x", "--size", "1024x1024", "--tile",
           "128", "--steps", "4", "--int8", "none", "--nproc", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(children(proc.pid)) < 3 and time.monotonic() < deadline:  # torchrun and its two workers
        time.sleep(0.5)
    family = children(proc.pid)
    assert len(family) >= 3, "workers did not start"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not [p for p in family if alive(p)]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# --------------------------------------------------------------------------------- interrupted runs, report


def test_run_sigterm_during_the_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    """SIGTERM arrives as cli.Terminated (the handler main installs): the atomic write's temp file is removed."""
    from PIL import PngImagePlugin

    real = PngImagePlugin._save

    def interrupted(im, fp, filename, *a, **k):
        real(im, fp, filename, *a, **k)
        assert any(".tmp-" in f for f in os.listdir(tmp_path))  # half-way: the temp file exists
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PngImagePlugin, "_save", interrupted)
    monkeypatch.setitem(Image.SAVE, "PNG", interrupted)
    rc = cli.main(["generate", *gen(tmp_path, "--steps", "1", "--size", "128x128")])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "tiled-diffusion generate: stopped by SIGTERM; no partial output left"
    assert os.listdir(tmp_path) == []


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run", interrupted)
    assert cli.main(["generate", *gen(tmp_path)]) == 130
    assert capsys.readouterr().err == "tiled-diffusion generate: interrupted (Ctrl-C); no partial output left\n"


def test_run_json_records_prompt_seed_and_tiling(tmp_path):
    report = tmp_path / "r.json"
    rc = cli.main(["generate", "--prompt", "a red house", "--size", "256x128", "--steps", "1", "--seed", "7",
                   "--tile", "128", "--radius", "2", "--out", str(tmp_path / "o.png"), "--json", str(report)])
    assert rc == 0
    r = json.loads(report.read_text())
    assert r["prompt"] == "a red house" and r["seed"] == 7 and r["steps"] == 1 and r["size"] == [256, 128]
    assert r["tiling"]["mode"] == "cross_tile" and r["tiling"]["tile"] == 128 and r["tiling"]["radius"] == 2


def test_accelerate_notice_is_silenced(caplog):
    import logging

    from tiled_diffusion.cli.checks import silence_accelerate_notice

    silence_accelerate_notice()
    log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
        log.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found in the "
                    "environment.")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_run_disk_failure_during_the_write_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def full(path):
        with open(path, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    real = G.atomic_write
    monkeypatch.setattr(G, "atomic_write", lambda path, write: real(path, full))  # the disk fills mid-write
    rc = cli.main(["generate", *gen(tmp_path, "--steps", "1", "--size", "128x128")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "writing the image failed (No space left on device)" in err[-1]
    assert os.listdir(tmp_path) == []

