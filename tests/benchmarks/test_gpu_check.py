"""benchmarks/gpu_check.py's CPU-side parts (issue 21): the dry run at tiny sizes writes its JSON and markdown table
with every section's rows and no error, and the version gate answers in one line."""
import json
import os
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_writes_one_table(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    impls = {r["impl"] for r in rows}
    for want in ("window_attention (ours)", "SDPA same scores", "int8 gemm (ours)", "cuBLAS bf16 (F.linear)",
                 "torch._int_mm", "seam_blend (ours)", "device copy, same bytes"):
        assert want in impls
    e2e = [r for r in rows if r["section"] == "end_to_end"]
    assert len(e2e) == 6 and all(r["finite"] and r["s"] > 0 for r in e2e)  # 3 modes x (bf16, W8A8)
    table = gpu_check.markdown(rows)  # one header, one separator, one line per row: printed and written
    assert table.startswith("| section | what | impl |") and table.count("\n") == len(rows) + 1
    assert table in capsys.readouterr().out and table in (tmp_path / "gpu_check.md").read_text()


def test_version_gate_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch, "__version__", "2.4.0")
    assert gpu_check.main(["--require"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs torch >= 2.6" in err and "2.4.0" in err


@pytest.mark.skipif(gpu_check.torch.cuda.is_available(), reason="a GPU is there: the check can run")
def test_without_a_gpu_the_real_run_says_so(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
