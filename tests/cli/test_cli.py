"""Command-line parsing and the bench/inspect entry points."""
import pytest

from tiled_diffusion.cli import commands as cli


def test_size_parses_width_by_height():
    args = cli.build_parser().parse_args(["generate", "--prompt", "p", "--size", "4096x2304"])
    assert args.size == (4096, 2304) and args.mode == "cross_tile" and args.steps == 4


@pytest.mark.parametrize("bad", ["4096", "4096x", "ax2", "4096*2304"])
def test_bad_size_is_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompt", "p", "--size", bad])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_unknown_suite_and_mode_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--suite", "nope"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompt", "p", "--mode", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_every_suite_has_a_benchmark_file():
    import os

    root = cli._benchmarks_dir()
    for name, module in cli.SUITES.items():
        assert os.path.exists(os.path.join(root, module + ".py")), name
