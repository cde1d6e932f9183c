"""tiled_diffusion/tools/inspect.py: the static GPU report (runs without a GPU).

inspect compiles Triton kernels, which cannot happen under TRITON_INTERPRET=1 (conftest sets it on machines
without a GPU), so everything that compiles runs in a subprocess with that variable removed.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from tiled_diffusion.tools import inspect as td_inspect
from tests.helpers import ROOT, compiled_env, run_python


def _run(args, timeout=600):
    return run_python(*args, env=compiled_env(), cwd=ROOT, timeout=timeout)


RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z3fooPf:
  REG:38 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_80
		Function : _Z3fooPf
        /*0100*/                   IMMA.16832.S8.S8 R4, R8.ROW, R12.COL, R4 ;
        /*0110*/                   LDSM.16.M88.4 R8, [R2] ;
		Function : _Z3barPf
        /*0100*/                   FFMA R4, R8, R12, R4 ;
"""


def test_parse_res_usage():
    u = td_inspect.parse_res_usage(RES_USAGE)
    assert u["sm_80"]["_Z3fooPf"]["REG"] == 40 and u["sm_80"]["_Z3fooPf"]["LOCAL"] == 16
    assert u["sm_90"]["_Z3fooPf"]["REG"] == 38 and u["sm_90"]["_Z3fooPf"]["STACK"] == 0


def test_parse_sass_tensor_core():
    tc = td_inspect.parse_sass_tc("arch = sm_80\n" + SASS)
    assert tc["sm_80"]["_Z3fooPf"] == ["IMMA.16832.S8.S8"]
    assert tc["sm_80"]["_Z3barPf"] == []


def test_check_flags_problems():
    r = td_inspect.Record("cuda", "k", "sm_80", registers=255, shared=200 * 1024, local=8,
                          expects_tensor_core=True).check()
    assert len(r.problems) == 3, r.problems
    ok = td_inspect.Record("cuda", "k", "sm_90", registers=128, shared=200 * 1024, local=0,
                           tensor_core=["IMMA.16832.S8.S8"], expects_tensor_core=True).check()
    assert ok.problems == []
    spill = td_inspect.Record("triton", "k", "sm_90", registers=255, shared=0, stack=8, local=0).check()
    assert any("spills" in p for p in spill.problems), spill.problems


ELF_INFO = """
.nv.info._Z3fooPf
	<0x1>
	Attribute:	EIATTR_CUDA_API_VERSION
	Format:	EIFMT_SVAL
	Value:	0x80
	<0x2>
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x100 0x1 0x1
.nv.info._Z3barPf
	<0x1>
	Attribute:	EIATTR_CUDA_API_VERSION
	Value:	0x80
"""


def test_parse_max_threads():
    assert td_inspect.parse_max_threads(ELF_INFO) == {"_Z3fooPf": 256}  # bar has no __launch_bounds__


@pytest.mark.parametrize("cc, regs, smem, threads, blocks, limiter", [
    (80, 128, 65536, 256, 2, "registers"),    # int8_gemm_kernel: __launch_bounds__(256, 2) -> 25%
    (80, 24, 1024, 256, 8, "threads"),        # 64 warps / 8 (registers would allow 10)
    (80, 40, 100 * 1024, 128, 1, "shared memory"),
    (90, 40, 100 * 1024, 128, 2, "shared memory"),  # sm_90's 228 KiB fits two
    (80, 255, 0, 128, 2, "registers"),        # 255 -> 8192 regs/warp: 2 warps per sub-partition -> 8 warps
    (90, 16, 0, 32, 32, "blocks"),
])
def test_occupancy(cc, regs, smem, threads, blocks, limiter):
    occ = td_inspect.occupancy(cc, regs, smem, threads)
    assert (occ["blocks_per_sm"], occ["limiter"]) == (blocks, limiter)
    assert occ["occupancy"] == pytest.approx(blocks * (threads // 32) / 64)


def test_register_cap_warns_without_failing():
    r = td_inspect.Record("triton", "window_attention", "sm_80", registers=255, shared=0, stack=0, local=0,
                          threads=128).check()
    assert r.problems == [] and any("255-register cap" in w for w in r.warnings)
    assert r.warps == 4 and r.occupancy is not None


def test_demangle_short_names():
    names = td_inspect._demangle(["_ZN12_GLOBAL__N_116int8_gemm_kernelILb1EfEEvPKaPKfS2_S4_S4_PT0_iii"])
    assert list(names.values())[0] == "int8_gemm_kernel<true, float>"


_SELFTEST = textwrap.dedent('''
    import json, sys
    import triton
    import triton.language as tl
    from tiled_diffusion.tools import inspect as td_inspect

    @triton.jit
    def tiny_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
        b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))

    @triton.jit
    def tiny_add(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)

    configs = [
        {"name": "tiny_dot", "kernel": tiny_dot, "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
         "constexprs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 1, "expects_mma": True},
        {"name": "tiny_add_claims_mma", "kernel": tiny_add,
         "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
         "constexprs": {"BLOCK": 256}, "num_warps": 4, "num_stages": 1, "expects_mma": True},
    ]
    recs = td_inspect.triton_records(configs)
    print(json.dumps([r.__dict__ for r in recs]))
''')


def test_triton_aot_records(tmp_path):
    """AOT path on two tiny kernels: a tl.dot must show tensor cores on both archs; an elementwise kernel
    that claims expects_mma must be flagged."""
    pytest.importorskip("triton")
    script = tmp_path / "selftest.py"
    script.write_text(_SELFTEST)
    r = _run([str(script)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {(x["name"], x["arch"]): x for x in json.loads(r.stdout.strip().splitlines()[-1])}
    for arch in ("sm_80", "sm_90"):
        dot = recs[("tiny_dot", arch)]
        assert dot["problems"] == [], dot
        assert dot["tensor_core"], dot
        assert dot["shared"] is not None and dot["registers"] and dot["local"] == 0, dot
        add = recs[("tiny_add_claims_mma", arch)]
        assert any("tensor-core" in p for p in add["problems"]), add
    # Hopper's warpgroup MMA for a 64x64 fp16 dot with 4 warps (one warpgroup); sm_80 has only mma.sync (HMMA)
    sm90 = recs[("tiny_dot", "sm_90")]["tensor_core"]
    assert any(t.startswith(("HGMMA", "ptx:wgmma")) for t in sm90), sm90
    assert not any("GMMA" in t or "wgmma" in t for t in recs[("tiny_dot", "sm_80")]["tensor_core"])


def test_cuda_int8_gemm_records():
    """The built _C: every int8_gemm kernel uses IMMA with zero spills on sm_80 and sm_90."""
    r = _run(["-m", "tiled_diffusion.tools.inspect", "--json", "--no-triton", "--check"], timeout=300)
    out = json.loads(r.stdout)
    recs = out["records"]
    if not recs and td_inspect.cuda_build_expected() is None:  # no nvcc here: a CPU-only build is legitimate
        pytest.skip("; ".join(out["notes"]) or "tiled_diffusion._C was built without CUDA kernels")
    assert r.returncode == 0, out
    gemm = [x for x in recs if x["name"].startswith("int8_gemm_kernel")]
    assert {x["arch"] for x in gemm} == {"sm_80", "sm_90"}, [x["name"] for x in recs]
    for x in gemm:
        assert any(t.startswith("IMMA") for t in x["tensor_core"]), x
        assert x["local"] == 0 and x["stack"] == 0, x
        assert x["shared"] >= 64 * 1024, x  # 4 stages x 16 KiB dynamic shared memory
    quant = [x for x in recs if x["name"].startswith("quantize_per_token_kernel")]
    assert quant and all(x["local"] == 0 for x in quant), quant


def _cpu_only_library() -> str:
    """A shared library with no device code (torch's libc10.so): what `_C` looks like when built without CUDA."""
    import torch

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.exists(lib):
        pytest.skip("torch/lib/libc10.so not found")
    return lib


@pytest.fixture
def cuda_less_build(monkeypatch):
    if td_inspect.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main() would re-run itself in a child otherwise
    monkeypatch.delenv("TD_SKIP_CUDA", raising=False)
    monkeypatch.setattr(td_inspect, "native_library", _cpu_only_library)


@pytest.mark.parametrize("cuda_torch", [True, False], ids=["cuda_torch", "cpu_torch"])
def test_check_fails_on_cuda_less_build_where_nvcc_exists(cuda_less_build, monkeypatch, capsys, cuda_torch):
    """nvcc found + a CUDA build of torch: setup.py would have compiled the CUDA kernels, so `_C` without them must
    fail --check (on CI, which has nvcc). A CPU-only torch cannot build them: a note, exit 0."""
    import torch

    monkeypatch.setattr(td_inspect, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(torch.version, "cuda", "13.0" if cuda_torch else None)
    rc = td_inspect.main(["--check", "--no-triton", "--json"])
    out = json.loads(capsys.readouterr().out)
    if cuda_torch:
        assert rc == 1
        (rec,) = out["records"]
        assert "no CUDA kernels" in rec["problems"][0] and "/opt/cuda/bin/nvcc" in rec["problems"][0]
    else:
        assert rc == 0 and out["records"] == [] and any("no CUDA kernels" in n for n in out["notes"])


def test_check_passes_on_cuda_less_build_without_nvcc(cuda_less_build, monkeypatch, capsys):
    monkeypatch.setattr(td_inspect, "find_nvcc", lambda: None)
    assert td_inspect.main(["--check", "--no-triton"]) == 0
    assert "note: tiled_diffusion._C has no CUDA kernels" in capsys.readouterr().out


def test_check_accepts_td_skip_cuda(cuda_less_build, monkeypatch, capsys):
    monkeypatch.setattr(td_inspect, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setenv("TD_SKIP_CUDA", "1")
    assert td_inspect.main(["--check", "--no-triton"]) == 0
