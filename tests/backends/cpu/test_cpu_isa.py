"""CPU ISA dispatch of the int8 kernels (csrc/cpu/isa.cpp, tiled_diffusion/backends/cpu/isa.py), int8.resolve_mode and
the int8 route (tiled_diffusion/backends/int8.py)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tiled_diffusion.model import int8
from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.backends import int8 as int8_backend
from tiled_diffusion.backends.cpu import isa
from tests.helpers import ROOT, run_python

pytestmark = pytest.mark.skipif(ops._C is None, reason="tiled_diffusion._C not built")



@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("TD_CPU_ISA", raising=False)


def test_report_lists_every_isa_and_picks_the_best_usable():
    rep = isa.report()
    assert list(rep) == list(isa.ISAS)
    assert rep["ref"] == "yes"
    best = next(name for name in isa.ISAS if rep[name] == "yes")
    assert isa.cpu_isa() == best
    for name, why in rep.items():
        assert why == "yes" or len(why) > 10, (name, why)  # every refusal says why


def test_no_amx_takes_the_vnni_path_and_logs_why(caplog):
    ok, why = isa.usable("amx")
    if ok or not isa.usable("avx512")[0]:
        pytest.skip("needs a machine with AVX-512 VNNI and without usable AMX")
    assert isa.cpu_isa() == "avx512"
    isa._log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="tiled_diffusion"):
        isa.log_choice()
    assert "avx512" in caplog.text and why in caplog.text


def test_forced_avx512_takes_the_vnni_path(monkeypatch):
    if not isa.usable("avx512")[0]:
        pytest.skip(f"avx512: {isa.usable('avx512')[1]}")
    monkeypatch.setenv("TD_CPU_ISA", "avx512")
    assert isa.cpu_isa() == "avx512"
    assert "forced by TD_CPU_ISA=avx512" in isa.describe() or isa.report()["amx"] == "yes"


@pytest.mark.parametrize("name", ["amx", "avx512", "avx2", "ref"])
def test_forcing_an_isa(monkeypatch, name):
    """Usable: the kernels take it (and compute the right thing); not usable: a RuntimeError with the reason."""
    ok, why = isa.usable(name)
    monkeypatch.setenv("TD_CPU_ISA", name)
    a, w = torch.randint(-127, 128, (5, 7), dtype=torch.int8), torch.randint(-127, 128, (9, 7), dtype=torch.int8)
    if not ok:
        with pytest.raises(RuntimeError, match=f"TD_CPU_ISA={name} cannot run on this machine"):
            ops.int8_gemm(a, torch.ones(5), w, torch.ones(9), None, torch.float32)
        return
    assert isa.cpu_isa() == name
    out = ops.int8_gemm(a, torch.ones(5), w, torch.ones(9), None, torch.float32)
    assert torch.equal(out, reference.int8_gemm(a, torch.ones(5), w, torch.ones(9), None, torch.float32))


def test_unknown_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="TD_CPU_ISA must be amx, avx512, avx2 or ref"):
        isa.cpu_isa()


_REFUSED = """
import torch
from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.backends import int8 as int8_backend
from tiled_diffusion.backends.cpu import isa
rep = isa.report()
assert "refused" in rep["amx"] and "simulated" in rep["amx"], rep
assert isa.cpu_isa() != "amx", isa.cpu_isa()
a, w = torch.randint(-127, 128, (37, 130), dtype=torch.int8), torch.randint(-127, 128, (33, 130), dtype=torch.int8)
out = ops.int8_gemm(a, torch.ones(37), w, torch.ones(33), None, torch.float32)
assert torch.equal(out, reference.int8_gemm(a, torch.ones(37), w, torch.ones(33), None, torch.float32))
import os
os.environ["TD_CPU_ISA"] = "amx"
try:
    isa.cpu_isa()
except RuntimeError as e:
    assert "refused the tile-data permission" in str(e), e
else:
    raise AssertionError("TD_CPU_ISA=amx ran although the permission was refused")
del os.environ["TD_CPU_ISA"]
print("OK", isa.describe())
"""


def test_refused_tile_permission_falls_back():
    """TD_CPU_SIMULATE_AMX=refused: the probe acts as on an AMX CPU whose kernel refuses arch_prctl(
    ARCH_REQ_XCOMP_PERM): the next ISA runs, the reason is reported, forcing amx is an error. A fresh process,
    because the probe runs once per process."""
    env = dict(os.environ, TD_CPU_SIMULATE_AMX="refused")
    env.pop("TD_CPU_ISA", None)
    r = run_python("-c", _REFUSED, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- resolve_mode


@pytest.mark.parametrize("requested", ["w8a8", "w8a16", None], ids=str)
def test_resolve_mode_explicit(requested):
    assert int8.resolve_mode(requested, "cpu")[0] == requested


def test_resolve_mode_auto_cpu_follows_the_isa_table(caplog):
    with caplog.at_level(logging.INFO, logger="tiled_diffusion"):
        mode, reason = int8.resolve_mode("auto", "cpu")
    pays, why = int8.AUTO_W8A8_CPU[isa.cpu_isa()]
    assert mode == ("w8a8" if pays else None)
    assert why in reason and reason in caplog.text


def test_resolve_mode_auto_with_refused_amx_or_forced_path(monkeypatch):
    monkeypatch.setenv("TD_CPU_ISA", "ref")
    assert int8.resolve_mode("auto", torch.device("cpu"))[0] is None  # the reference int8 path never pays


def test_resolve_mode_other_devices_and_errors():
    assert int8.resolve_mode("auto", "meta")[0] is None
    mode, reason = int8.resolve_mode("auto", "cuda")  # issue 21: no GPU measurement yet -> bf16, and it says so
    assert mode is None and "measured" in reason and "w8a8" in reason
    with pytest.raises(ValueError, match="auto"):
        int8.resolve_mode("w4a4", "cpu")


# ------------------------------------------------------------------------------------------- route (the one decision)


@pytest.mark.parametrize("op", ["quantize_per_token", "int8_gemm", "int8_gemm_packed", "w8a8_linear"])
def test_route_td_impl_takes_the_reference(op):
    assert int8_backend.route(op, torch.device("cpu"), reference=True) == "reference"


def test_route_on_the_cpu_and_off_it():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert int8_backend.route("int8_gemm", cpu) == "native"
    assert int8_backend.route("w8a8_linear", cpu) == "native"  # this module needs _C (pytestmark)
    assert int8_backend.route("pack_int8_weight", cpu, reference=True) == "native"  # a layout: TD_IMPL does not apply
    assert int8_backend.route("int8_gemm", meta) == "reference"
    assert int8_backend.route("int8_gemm_packed", meta) == "plain"
    assert int8_backend.route("pack_int8_weight", meta) == "identity"
    assert int8_backend.route("w8a8_linear", meta) == "composite"
    assert int8_backend.packs_weight("w8a8", cpu) and not int8_backend.packs_weight("w8a16", cpu)
    assert not int8_backend.packs_weight("w8a8", meta)
    with pytest.raises(ValueError, match="not an int8 op"):
        int8_backend.route("window_attention", cpu)
