"""The op registry: every op has a schema and a fake; the package works without its native library."""
import math
import os
import subprocess

import pytest
import torch

from tiled_diffusion import ops
from tiled_diffusion import reference
from tests.helpers import run_python


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return run_python("-c", code, env={**os.environ, **env}, timeout=120)


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


# ------------------------------------------------------------------------ opcheck on strided inputs
# torch.compile checks the fake's output strides against the real op's: the attention processor feeds token-major
# views on the CPU, so every op is checked on strided (transposed / permuted) inputs as well as contiguous ones.
# Default test_utils: schema, autograd registration, fake tensor (metadata incl. strides), AOT dispatch dynamic.


def _strided(t: torch.Tensor, perm: tuple) -> torch.Tensor:
    """t's values in a non-contiguous layout: a contiguous tensor of permuted shape viewed back with `perm`."""
    inv = [perm.index(i) for i in range(t.dim())]
    return t.permute(*inv).contiguous().permute(*perm)


def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _window_args(strided: bool, with_bias: bool):
    T, H, L, D = 5, 2, 9, 24  # L and D not multiples of any block size
    q, k, v = (torch.randn(T, H, L, D) for _ in range(3))
    if strided:  # [T, L, H, D] storage viewed as [T, H, L, D], exactly what CrossTileAttnProcessor passes
        q, k, v = (_strided(t, (0, 2, 1, 3)) for t in (q, k, v))
    nb = torch.tensor([[0, 1, -1], [1, 0, 2], [2, 1, 3], [3, 2, 4], [4, 3, -1]], dtype=torch.int32)
    return q, k, v, nb, torch.randn(T, 3) if with_bias else None, None


def _blend_args(strided: bool):
    from tiled_diffusion.core.tiling import TileGrid

    g = TileGrid(21, 26, tile=10, overlap=3, batch=2, patch=1)
    tiles = torch.randn(g.num_tiles, 3, g.th, g.tw)
    if strided:  # channels-last tiles
        tiles = _strided(tiles, (0, 3, 1, 2))
    oy, ox = g.origins()
    return tiles, oy, ox, g.blend_weights("cosine"), 2, 21, 26


def _lcm_args(strided: bool, with_noise: bool):
    tiles, oy, ox, w, B, H, W = _blend_args(strided)
    sample = torch.randn(B, 3, H, W)
    noise = torch.randn(B, 3, H, W) if with_noise else None
    if strided:
        sample = sample.to(memory_format=torch.channels_last)
        noise = None if noise is None else _strided(noise, (0, 1, 3, 2))
    return tiles, oy, ox, w, sample, noise, 0.35, 0.937, 0.02, 0.98, 0.6, 0.8


def _opcheck_cases():
    cases = {}
    for layout in ("contiguous", "strided"):
        s = layout == "strided"
        x = torch.randn(7, 40)
        cases[f"quantize_per_token-{layout}"] = ("quantize_per_token", (_strided(x, (1, 0)) if s else x,))
        a, w = _int8(7, 40), _int8(5, 40)
        if s:
            a, w = _strided(a, (1, 0)), _strided(w, (1, 0))
        cases[f"int8_gemm-{layout}"] = ("int8_gemm", (a, torch.rand(7), w, torch.rand(5), torch.randn(5),
                                                      torch.bfloat16))
        cases[f"pack_int8_weight-{layout}"] = ("pack_int8_weight", (w,))
        cases[f"int8_gemm_packed-{layout}"] = ("int8_gemm_packed", (a, torch.rand(7), ops.pack_int8_weight(w),
                                                                    torch.rand(5), None, torch.float32))
        xf = torch.randn(7, 40, dtype=torch.bfloat16)
        cases[f"w8a8_linear-{layout}"] = ("w8a8_linear", (_strided(xf, (1, 0)) if s else xf,
                                                          ops.pack_int8_weight(w), torch.rand(5) + 0.01,
                                                          torch.randn(5, dtype=torch.bfloat16)))
        for op in ("window_attention", "window_attention_opaque"):
            cases[f"{op}-{layout}"] = (op, _window_args(s, with_bias=False))
            cases[f"{op}-{layout}-bias"] = (op, _window_args(s, with_bias=True))
        for op in ("seam_blend", "seam_blend_opaque"):
            cases[f"{op}-{layout}"] = (op, _blend_args(s))
        for op in ("blend_lcm_step", "blend_lcm_step_opaque"):
            cases[f"{op}-{layout}-noise"] = (op, _lcm_args(s, with_noise=True))
            cases[f"{op}-{layout}-last"] = (op, _lcm_args(s, with_noise=False))
        qkv = [torch.randn(2, 2, 7, 5, 8) for _ in range(3)]
        if s:
            qkv[0] = _strided(qkv[0], (0, 1, 3, 2, 4))
        cases[f"neighborhood_attention-{layout}"] = ("neighborhood_attention", (*qkv, [3, 4], [1, 2], False, [0, 0], None))
        cases[f"neighborhood_attention-{layout}-clip"] = ("neighborhood_attention", (*qkv, [4, 4], [2, 2], True,
                                                                                     [-1, 0], 0.3))
    return cases


OPCHECK_CASES = _opcheck_cases()


def test_opcheck_cases_cover_every_op():
    assert {op for op, _ in OPCHECK_CASES.values()} == set(ops.OPS)


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    name, args = OPCHECK_CASES[case]
    if "strided" in case:
        assert any(torch.is_tensor(a) and not a.is_contiguous() for a in args), case
    torch.manual_seed(0)
    torch.library.opcheck(getattr(torch.ops.tiled_diffusion, name).default, args)


@pytest.mark.parametrize("name", ops.TRITON_OPS)
def test_triton_ops_are_triton_ops(name):
    """Registered with torch.library.triton_op, so torch.compile traces into the CUDA body (the wrap_triton
    kernel launch) instead of keeping an opaque call."""
    from torch._library.custom_ops import CustomOpDef
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"tiled_diffusion::{name}")
    assert isinstance(opdef, CustomOpDef), f"{name} is not a torch.library custom/triton op"
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    assert FunctionalTensorMode in opdef._torch_dispatch_fns, f"{name}: no functional decomposition (not triton_op)"


# ------------------------------------------------------------------ quantize_per_token: edge rows, every device
# reference.quantize_per_token defines them (absmax < TINY_ABSMAX -> scale 0 and zeros; NaN -> scale NaN, zeros;
# ±inf -> scale inf, zeros; subnormal elements of a normal row are not flushed); every kernel must agree bit for bit.
# The CUDA kernel is built with --use_fast_math, which flushes subnormals and lets fmaxf drop NaN: these rows are
# where a fast-math kernel would differ.

_TINY = 127 * 2.0**-126
_SUB = 2.0**-127  # a subnormal fp32 (and bf16)


def _edge_row(kind: str, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind) * 1000 + k)
    row = torch.randn(k, generator=g, dtype=torch.float64)
    if kind == "normal":
        return row
    if kind == "zero":
        return torch.zeros(k, dtype=torch.float64)
    if kind == "subnormal":  # every element subnormal: absmax flushed by fast math, below TINY by definition
        return row.sign() * _SUB * (1 + torch.arange(k) % 3)
    if kind == "tiny_normal":  # normal values, absmax < TINY: scale would be subnormal
        return row / row.abs().max() * (_TINY / 2)
    if kind == "at_tiny_with_subnormals":  # absmax = TINY: scale 2^-126; a 0.75·2^-126 subnormal element -> q = 1
        out = row / row.abs().max() * (_TINY / 4)
        out[0], out[1], out[2] = _TINY, 0.75 * 2.0**-126, -0.25 * 2.0**-126
        return out
    if kind == "large":  # near the fp32 maximum: 1 / scale stays normal
        return row / row.abs().max() * 3.0e38
    if kind in ("nan", "inf", "neg_inf", "nan_and_inf"):
        out = row.clone()
        out[k // 2] = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf, "nan_and_inf": math.nan}[kind]
        if kind == "nan_and_inf":
            out[k // 3] = math.inf
        return out
    raise ValueError(kind)


EDGE_KINDS = ("normal", "zero", "subnormal", "tiny_normal", "at_tiny_with_subnormals", "large", "nan", "inf",
              "neg_inf", "nan_and_inf")


def _check_edge_semantics(kind, q, s):
    """What the definition says, independently of the reference's code."""
    if kind in ("zero", "subnormal", "tiny_normal"):
        assert s.item() == 0 and (q == 0).all()
    elif kind in ("nan", "nan_and_inf"):
        assert math.isnan(s.item()) and (q == 0).all()
    elif kind in ("inf", "neg_inf"):
        assert s.item() == math.inf and (q == 0).all()
    elif kind == "at_tiny_with_subnormals":
        assert s.item() == 2.0**-126 and q[0].item() == 127 and q[1].item() == 1 and q[2].item() == 0
    else:
        assert 0 < s.item() < math.inf and q.abs().max().item() == 127


EDGE_CASES = [pytest.param(kind, device, id=f"{kind}-{device}",
                           marks=[pytest.mark.cuda] if device == "cuda" else [])
              for kind in EDGE_KINDS for device in ("cpu", "cuda")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])  # (fp16 has no tiny rows)
@pytest.mark.parametrize("k", [40, 37], ids=["K40", "K37"])  # CUDA: 16-byte vector path / scalar path
@pytest.mark.parametrize("kind,device", EDGE_CASES)
def test_quantize_per_token_edge_rows(kind, device, k, dtype):
    x = torch.stack([_edge_row(kind, k), _edge_row("normal", k)]).to(dtype)  # + a normal row beside it
    if kind in ("subnormal", "at_tiny_with_subnormals") and dtype == torch.float32:
        assert x[0].abs().min().item() < 2.0**-126 and x[0].abs().max().item() > 0  # really subnormal
    q_ref, s_ref = reference.quantize_per_token(x)
    _check_edge_semantics(kind, q_ref[0], s_ref[0])
    q, s = ops.quantize_per_token(x.to(device))
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(q.cpu(), q_ref, rtol=0, atol=0)
