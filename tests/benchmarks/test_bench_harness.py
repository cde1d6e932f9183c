"""The benchmark harness: the JSON schema (benchmarks/SCHEMA.md), `bench compare`'s verdicts, the noise marks, and
every suite's own flags reaching its benchmark (tiny cases, one timed run each)."""
import json
import math
import os
import sys

import pytest
import torch

from tiled_diffusion.cli import commands as cli

sys.path.insert(0, cli._benchmarks_dir())
import harness  # noqa: E402


def _strict_load(path):
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as f:
        return json.load(f, parse_constant=no_constant)


def _row(case, median, p20=None, p80=None, n=5):
    return {"case": case, "n": n, "min": (p20 or median) * 0.98, "median": median, "p20": p20 or median,
            "p80": p80 or median}


def _doc(rows):
    return {"schema": harness.SCHEMA, "environment": harness.environment(), "suites": {"synthetic": rows}}


def test_json_is_strict_and_holds_the_schema(tmp_path):
    rows = [{"impl": "ours", "%peak": float("nan"), "GOP/s": 1.5, "canvas": "512²", "x bf16": float("inf"),
             "median": 2.0, "n": 3}]
    path = str(tmp_path / "a.json")
    harness.write_json(path, {"gemm": rows})
    doc = _strict_load(path)  # NaN / Infinity would raise here, as in JavaScript's JSON.parse
    assert doc["schema"] == harness.SCHEMA
    env = doc["environment"]
    for key in ("commit", "dirty", "versions", "cpu_model", "cpu_isa", "cpu_flags", "threads", "load_before",
                "load_after"):
        assert key in env, key
    assert env["versions"]["torch"] == torch.__version__
    (row,) = doc["suites"]["gemm"]
    assert row["pct_of_peak"] is None and row["x_bf16"] is None and row["gop_per_s"] == 1.5
    assert row["canvas"] == 512 and row["case"].startswith("gemm: ")
    assert all(k == harness.snake(k) and " " not in k for k in row)


@pytest.mark.parametrize("b, expected", [
    ((10.2, 9.8, 10.6), "same"),     # the same code, a little jitter
    ((14.0, 13.8, 14.3), "slower"),  # 40% slower, spreads far apart
    ((7.0, 6.9, 7.2), "faster"),
])
def test_compare_verdicts(b, expected):
    a = _row("gemm: m=64", 10.0, 9.7, 10.4)
    v = harness.verdict(a, _row("gemm: m=64", *b))
    assert v["verdict"] == expected
    assert v["lo"] <= v["ratio"] <= v["hi"]


def test_compare_wide_spread_is_same():
    """A 30% shift inside runs whose p20..p80 spans ±50% is not evidence of a change."""
    v = harness.verdict(_row("c", 10.0, 5.0, 15.0), _row("c", 13.0, 6.5, 19.5))
    assert v["verdict"] == "same"


def test_bench_compare_exit_codes(tmp_path, capsys):
    a = [_row("gemm: m=1", 10.0, 9.8, 10.2), _row("gemm: m=2", 5.0, 4.9, 5.1), _row("only in a", 1.0)]
    b = [_row("gemm: m=1", 10.1, 9.9, 10.3), _row("gemm: m=2", 7.5, 7.4, 7.6)]
    pa, pb = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    for p, rows in ((pa, a), (pb, b)):
        with open(p, "w") as f:
            json.dump(_doc(rows), f)
    assert cli.main(["bench", "compare", pa, pb]) == 0
    out = capsys.readouterr().out
    assert "2 rows: 1 same, 1 slower, 0 faster" in out
    assert cli.main(["bench", "compare", pa, pb, "--fail-above", "20"]) == 1  # m=2 is 50% slower
    assert cli.main(["bench", "compare", pa, pb, "--fail-above", "60"]) == 0
    assert cli.main(["bench", "compare", pa, pb, "--fail-above", "20", "--noise-floor", "60"]) == 0
    assert cli.main(["bench", "compare", pa]) == 2
    with open(pb, "w") as f:
        json.dump({"environment": {}, "suites": {}}, f)  # a file of the old format
    assert cli.main(["bench", "compare", pa, pb]) == 2
    assert "schema" in capsys.readouterr().err


def test_percentage_above_100_is_marked(capsys):
    m = harness.stats([1e-3] * 5)
    row = harness.mark_noisy({"op": "x", "pct_of_copy": 250.0, **harness.timing(m)}, m)
    assert row["noisy"] and "pct_of_copy" in row["noisy_why"]
    clean = harness.mark_noisy({"op": "y", "pct_of_copy": 40.0, **harness.timing(m)}, m)
    assert not clean["noisy"]
    harness.print_table("t", [row, clean], ["op", "pct_of_copy", "median", "noisy"])
    out = capsys.readouterr().out
    assert "250!" in out and "WARNING: 1 of 2 rows noisy" in out


def test_probe_flags_a_slow_reading():
    p = harness.Probe("copy")
    assert p.check(harness.stats([1.0, 1.0, 1.01, 1.0, 1.0])) == []
    assert any("its best" in w for w in p.check(harness.stats([2.0, 2.0, 2.01, 2.0, 2.0])))
    assert any("spread" in w for w in p.check(harness.stats([1.0, 1.0, 3.0, 3.0, 3.0])))


def test_interleaved_round_robin():
    order = []
    ms = harness.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, rounds=3)
    assert order == ["a", "b"] * 4
    assert ms["a"]["n"] == 3 and ms["a"]["min_s"] <= ms["a"]["median_s"] <= ms["a"]["p80_s"]


@pytest.mark.parametrize("suite", ["gemm", "attention", "blend", "pipeline"])
def test_suite_help_lists_its_flags(suite, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suite", suite, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flag = {"gemm": "--shape", "attention": "--head-dim", "blend": "--overlap", "pipeline": "--size"}[suite]
    assert flag in out and "--threads" in out and "--iters" in out


def _bench(tmp_path, argv):
    path = str(tmp_path / "out.json")
    threads = torch.get_num_threads()
    try:
        assert cli.main(["bench", *argv, "--threads", "1", "--warmup", "0", "--iters", "2", "--json", path]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = _strict_load(path)
    assert doc["environment"]["threads"] == 1
    return doc["suites"]


def test_gemm_flags_reach_the_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", "avx2")  # a path every x86 CPU here runs; the flags are under test, not the ISA
    rows = _bench(tmp_path, ["--suite", "gemm", "--shape", "3,20,17", "--shape", "5,36,9", "--impl", "ours gemm"])
    timed = [r for r in rows["gemm"] if r.get("median") is not None]
    assert {(r["m"], r["k"], r["n_out"]) for r in timed} == {(3, 20, 17), (5, 36, 9)}
    assert {r["impl"] for r in timed} >= {"ours gemm_packed", "torch _int_mm", "torch bf16 Linear"}
    assert all(r["n"] == 2 and r["p20"] <= r["median"] <= r["p80"] for r in timed)


def test_attention_flags_reach_the_benchmark(tmp_path):
    rows = _bench(tmp_path, ["--suite", "attention", "--canvas", "64x96", "--tile", "32", "--radius", "1",
                             "--heads", "2", "--head-dim", "24", "--dtype", "fp32"])
    ours = [r for r in rows["attention"] if r["method"] == "ours (CPU path)"]
    assert len(ours) == 1
    r = ours[0]
    assert (r["height"], r["width"], r["heads"], r["head_dim"], r["dtype"]) == (64, 96, 2, 24, "fp32")
    assert r["tiles"] == 6 and r["n"] == 2


def test_quick_attention_spans_several_tiles():
    import bench_window_attention as bwa

    assert bwa._grid(384, 384, 128).num_tiles == 9  # --quick: 3x3 tiles, the centre one with all 8 neighbours


def test_blend_flags_reach_the_benchmark(tmp_path):
    rows = _bench(tmp_path, ["--suite", "blend", "--canvas", "20x27", "--tile", "8", "--overlap", "2",
                             "--channels", "3", "--batch", "2", "--dtype", "fp32"])
    assert {r["op"] for r in rows["blend"]} == {"seam_blend", "blend_lcm_step"}
    for r in rows["blend"]:
        assert (r["height"], r["width"], r["tile"], r["channels"], r["batch"], r["dtype"]) == (20, 27, 8, 3, 2,
                                                                                             "float32")
        assert r["pct_of_copy"] is None or math.isfinite(r["pct_of_copy"])
        assert isinstance(r["noisy"], bool)


def test_pipeline_flags_reach_the_benchmark(tmp_path):
    rows = _bench(tmp_path, ["--suite", "pipeline", "--size", "64", "--steps", "1", "--mode", "global"])
    (r,) = rows["pipeline"]
    assert (r["size"], r["steps"], r["mode"], r["n"]) == (64, 1, "global", 2)


def test_bad_shape_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suite", "gemm", "--shape", "3,4"])
    assert "M,K,N" in str(e.value)


def test_skip_leaves_suites_out_and_refuses_bad_names_in_one_line(tmp_path, capsys):
    others = [n for n in cli.SUITES if n != "blend"]
    rows = _bench(tmp_path, ["--suite", "all", "--quick", "--skip", ",".join(others)])
    assert set(rows) == {"blend"} and rows["blend"]
    assert cli.main(["bench", "--suite", "pipeline", "--skip", "pipeline"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tiled-diffusion bench: error: --skip leaves no suite to run (--suite pipeline)"]
    for bad in ("memroy", ",", "memory,nope"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--skip", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--skip: not a suite" in err and "suites: gemm" in err


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"method": "ours", "height": h, "width": h, "n": 3, "min": t, "median": t, "p20": t, "p80": t * 1.1,
             "gflop_per_s": 1e3 / t, "noisy": h == 512} for h, t in ((256, 1.0), (512, 4.2), (1024, 17.0))]
    path = tmp_path / "p.png"
    harness.plot_rows({"attention": rows}, str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lab_yardstick_refuses_bad_input_in_one_line(capsys, tmp_path):
    import lab_yardstick

    with pytest.raises(SystemExit):
        lab_yardstick.main(["--modes", "window 1x stride 1", "no such mode"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--modes: not in lab.quality.MODES: no such mode"), err
    assert set(lab_yardstick.MODES_16X) <= {m.name for m in lab_yardstick.quality.MODES}
    for argv, says in ((["--x16", "1"], "at least 2 (got 64, 1)"), ([str(tmp_path)], "no lab model in")):
        with pytest.raises(SystemExit):
            lab_yardstick.main(argv)
        assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_lab_yardstick_ratio_carries_both_errors_and_refuses_a_1x_kid_within_its_own():
    import lab_yardstick

    # 0.09 / 0.041 = 2.195; relative error √((0.03/0.09)² + (0.01/0.041)²) = 0.413 → ± 0.906
    assert lab_yardstick.ratio({"kid": 0.09, "kid_se": 0.03}, {"kid": 0.041, "kid_se": 0.01}) == "2.20 ± 0.91"
    assert lab_yardstick.ratio({"kid": -0.01, "kid_se": 0.03}, {"kid": 0.041, "kid_se": 0.01}) == "-0.24"
    assert lab_yardstick.ratio({"kid": 0.09, "kid_se": None}, {"kid": 0.041, "kid_se": 0.01}) == "2.20"
    for one_x in ({"kid": 0.02, "kid_se": 0.03}, {"kid": -0.01, "kid_se": 0.01}):
        assert lab_yardstick.ratio({"kid": 0.09, "kid_se": 0.03}, one_x).startswith("— (1x KID ")
    assert lab_yardstick.kid_cell({"kid": 0.0414, "kid_se": 0.0123}) == "0.041±0.012"
    assert lab_yardstick.kid_cell({"kid": 0.0414, "kid_se": None}) == "0.041"
