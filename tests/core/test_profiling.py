"""Profiler ranges (tiled_diffusion.<phase>), `generate --trace`, and the --profile -> --blend-profile rename."""
import json

import pytest
import torch

from tiled_diffusion.cli import commands as cli
from tiled_diffusion.core import profiling

PHASES = ("encode_prompt", "step", "transformer", "vae_decode")


def test_phase_is_a_noop_without_a_profiler():
    assert not torch.autograd.profiler._is_profiler_enabled
    assert profiling.phase("step") is profiling._NOOP  # the shared no-op: nothing recorded, nothing allocated


def test_phase_records_under_a_profiler():
    with torch.profiler.profile() as prof:
        with profiling.phase("step"):
            torch.ones(3).sum()
    assert "tiled_diffusion.step" in {e.name for e in prof.events()}


def test_generate_trace_has_every_phase(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rc = cli.main(["generate", "--prompt", "a cat", "--model", "tiny", "--size", "256x256", "--steps", "2",
                   "--tile", "128", "--int8", "none", "--out", str(tmp_path / "x.png"), "--trace", str(trace)])
    assert rc == 0
    with open(trace) as f:
        names = [e.get("name", "") for e in json.load(f)["traceEvents"]]
    for p in PHASES:
        assert f"tiled_diffusion.{p}" in names, p
    assert names.count("tiled_diffusion.step") == 2
    assert names.count("tiled_diffusion.transformer") >= 2
    out = capsys.readouterr().out
    assert "Self CPU" in out and str(trace) in out  # the top-ops table and where the trace went


def test_old_profile_flag_warns_and_still_works(capsys):
    args = cli.build_parser().parse_args(["generate", "--prompt", "p", "--profile", "linear"])
    assert args.profile == "linear"
    assert "--blend-profile" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["generate", "--prompt", "p", "--blend-profile", "gaussian"])
    assert args.profile == "gaussian"
    assert cli.build_parser().parse_args(["generate", "--prompt", "p"]).profile == "cosine"
    assert cli.build_parser().parse_args(["upscale", "--image", "x.png", "--blend-profile", "uniform"]).profile == \
        "uniform"


@pytest.mark.parametrize("argv", [["--profile", "nope"], ["--blend-profile", "nope"]])
def test_bad_blend_profile_rejected(argv):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompt", "p", *argv])
