"""The op registry: every op has a schema and a fake; the package works without its native library."""
import os
import subprocess
import sys

import pytest
import torch

from tiled_diffusion import ops


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("name", ops.OPS)
def test_every_op_has_schema_and_fake(name):
    op = getattr(torch.ops.tiled_diffusion, name).default
    assert op._schema.name == f"tiled_diffusion::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
        torch.library.get_kernel(op, "Meta") is not None


def test_imports_without_native_library_and_names_the_fix():
    code = (
        "import sys; sys.modules['tiled_diffusion._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, tiled_diffusion\n"
        "from tiled_diffusion import ops, reference\n"
        "assert ops.NATIVE_ERROR\n"
        "x = torch.randn(3, 5)\n"
        "try:\n"
        "    ops.quantize_per_token(x)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "ERR tiled_diffusion._C is not available" in r.stdout
    assert "pip install --no-build-isolation" in r.stdout


def test_debug_log_names_the_path():
    r = _run("import torch, tiled_diffusion.ops as o\n"
             "a = torch.randint(-127, 128, (4, 8), dtype=torch.int8)\n"
             "o.int8_gemm(a, torch.rand(4), a[:3].clone(), torch.rand(3))\n", TILED_DIFFUSION_LOG="debug")
    assert r.returncode == 0, r.stderr
    assert "int8_gemm on cpu: C++" in r.stderr


def test_meta_tensors_use_the_fakes():
    a = torch.empty(7, 16, dtype=torch.int8, device="meta")
    out = ops.int8_gemm(a, torch.empty(7, device="meta"), torch.empty(5, 16, dtype=torch.int8, device="meta"),
                        torch.empty(5, device="meta"), None, torch.bfloat16)
    assert out.shape == (7, 5) and out.dtype == torch.bfloat16 and out.device.type == "meta"
