"""Every op of the package: its schema, its fake (meta) implementation and its dispatch.

Namespace `tiled_diffusion`; call them as `torch.ops.tiled_diffusion.<name>` or through the wrappers below.
Dispatch: CPU -> C++ (`_C`) or the package's CPU path, CUDA -> C++/CUDA or Triton, any other device ->
the pure-PyTorch reference (reference.py). `TILED_DIFFUSION_LOG=debug` logs which path ran and why (once
per op, device and reason).

A/B against the reference: `TD_IMPL=reference` routes every op to its pure-PyTorch twin in reference.py (on
every device), `TD_IMPL=window_attention=reference,seam_blend=reference` only the ops named (read at every call;
the choice is logged like the others, `TILED_DIFFUSION_LOG=debug`). Ops: IMPL_OPS.

Tensor layouts are given in each schema's docstring in reference.py. Every op returns contiguous tensors,
whatever its inputs' strides (the attention processor passes strided views on the CPU), and every fake says so:
a fake whose strides differ from the real op's breaks torch.compile ("expected ... stride").

Why one file of ~750 lines: it is the package's one op table (ARCHITECTURE: "one schema file"). Each of the nine
ops (and the opaque twins of the three Triton ones) has its schema, fake, input checks, dispatch and public
wrapper here (40-90 lines per op), next to the shared check helpers and the TD_IMPL switch, so every op's contract
is read, and tested (tests/ops), in one place; the implementations live in backends/ and _native, the twins in
reference.py.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from . import reference
from .backends import int8 as _int8
from .backends.cpu import isa
from .backends.cpu.neighborhood_attention import amx_unavailable, neighborhood_attention_cpu
from .backends.cpu.seam_blend import blend_lcm_step_cpu, seam_blend_cpu
from .backends.cpu.window_attention import window_attention_cpu

log = logging.getLogger("tiled_diffusion")

from ._native import FIX as _FIX, NATIVE_ERROR, _C, native_for as _native_for, native_has, native_op  # noqa: F401
from .backends.choice import choose  # noqa: F401

LIB = torch.library.Library("tiled_diffusion", "DEF")
LIB.define("quantize_per_token(Tensor x) -> (Tensor, Tensor)")
LIB.define(
    "int8_gemm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor"
)
LIB.define("pack_int8_weight(Tensor w) -> Tensor")
LIB.define(
    "int8_gemm_packed(Tensor a, Tensor a_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
    "ScalarType out_dtype) -> Tensor"
)
# The ops with Triton kernels are torch.library.triton_op (CONVENTIONS.md item 4, defined further down): on CUDA
# their body launches the kernel through wrap_triton, so torch.compile (inductor) sees the kernel itself. On every
# other device the body calls `<name>_opaque`, an ordinary op holding the paths compile must not trace into (the
# CPU fast paths read tensor data on the host): one node in a compiled graph, with a fake.
_SCHEMAS = {
    "window_attention": "(Tensor q, Tensor k, Tensor v, Tensor neighbours, Tensor? bias=None, float? scale=None)"
                        " -> (Tensor, Tensor)",
    "seam_blend": "(Tensor tiles, Tensor origins_y, Tensor origins_x, Tensor weights, SymInt batch, SymInt height, "
                  "SymInt width) -> Tensor",
    "blend_lcm_step": "(Tensor tiles, Tensor origins_y, Tensor origins_x, Tensor weights, Tensor sample, "
                      "Tensor? noise, float sqrt_alpha_t, float sqrt_beta_t, float c_skip, float c_out, "
                      "float sqrt_alpha_prev, float sqrt_beta_prev) -> (Tensor, Tensor)",
}
for _name, _schema in _SCHEMAS.items():
    LIB.define(f"{_name}_opaque{_schema}")

# The fused CPU W8A8 linear: public here, dispatching to the native `tiled_diffusion_C::w8a8_linear` (CPU, the
# CPU packed weight layout) so profiler traces and compiled graphs show tiled_diffusion::w8a8_linear.
LIB.define("w8a8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias) -> Tensor")

TRITON_OPS = tuple(_SCHEMAS)
# Token-centred windows on the canvas: query (y, x) attends the keys in a window centred on it (or on its stride
# group), shifted inward at the border (or cut, with clip). The tile-blocked `window_attention` is its special case
# stride = tile, window = (2r+1)·tile, clip (tests/ops/test_neighborhood_attention.py); window_attention stays as the op
# over an explicit tile graph (the tile-blocked mode's fast path). band = (canvas_h, q_top, k_top) runs one
# horizontal band of a taller canvas (a rank's rows and its K/V halo, parallel/halo.py); [0, 0, 0]: the whole canvas.
LIB.define("neighborhood_attention(Tensor q, Tensor k, Tensor v, int[2] window, int[2] stride=[1, 1], "
           "bool clip=False, int[2] offset=[0, 0], float? scale=None, int[3] band=[0, 0, 0]) -> (Tensor, Tensor)")
OPS = ("quantize_per_token", "int8_gemm", "pack_int8_weight", "int8_gemm_packed", "w8a8_linear", *TRITON_OPS,
       *(f"{n}_opaque" for n in TRITON_OPS), "neighborhood_attention")
# The ops TD_IMPL can route to their reference twin (pack_int8_weight is a layout, not a computation).
IMPL_OPS = ("quantize_per_token", "int8_gemm", "int8_gemm_packed", "w8a8_linear", *TRITON_OPS, "neighborhood_attention")


# ------------------------------------------------------------------------------------------ plumbing


_PENDING_TRITON_OPS: list = []  # (name, kwargs, fn) of the ops with Triton kernels, until register_triton_ops()


def _triton_op(name: str, **kwargs) -> Callable:
    """`torch.library.triton_op`, deferred to `register_triton_ops` (see there why)."""
    def record(fn):
        _PENDING_TRITON_OPS.append((name, kwargs, fn))
        return fn
    return record


def register_triton_ops() -> None:
    """Register the ops with Triton kernels (window_attention, seam_blend, blend_lcm_step) as
    `torch.library.triton_op`s. Deferred from import: triton_op reads each body's source for the Triton kernels it
    launches, which imports torch._inductor (1.3 s) — a cost `import tiled_diffusion` should not carry for users of
    the other ops. Every wrapper below calls this, and so do the modules that swap the ops into a model (they load
    diffusers, which imports inductor anyway); a direct `torch.ops.tiled_diffusion.window_attention` needs it first.
    Idempotent."""
    while _PENDING_TRITON_OPS:
        name, kwargs, fn = _PENDING_TRITON_OPS.pop(0)
        torch.library.triton_op(name, **kwargs)(fn)
        short = name.split("::")[1]
        getattr(torch.ops.tiled_diffusion, short).__doc__ = globals()[short].__doc__ + "\n\n" + _PATHS


@functools.lru_cache(maxsize=16)
def _parse_impl(spec: str) -> frozenset:
    """The ops TD_IMPL routes to the reference: 'reference' (all) or 'op=reference,op=reference'."""
    spec = spec.strip()
    if spec in ("", "default", "fast"):
        return frozenset()
    if spec == "reference":
        return frozenset(IMPL_OPS)
    out = set()
    for part in spec.split(","):
        name, _, impl = part.strip().partition("=")
        if name not in IMPL_OPS or impl not in ("reference", "default"):
            raise ValueError(f"TD_IMPL={spec!r}: expected 'reference' or 'op=reference,...' with op one of "
                             f"{', '.join(IMPL_OPS)}; got {part.strip()!r}")
        if impl == "reference":
            out.add(name)
    return frozenset(out)


def use_reference(op: str) -> bool:
    """Whether TD_IMPL routes `op` to its reference twin (read at every call: an env lookup, cheap)."""
    spec = os.environ.get("TD_IMPL")
    return bool(spec) and op in _parse_impl(spec)



def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _has_data(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (torch.compile tracing, opcheck): value checks are skipped for them."""

    return t.device.type != "meta" and not is_fake(t)


def _check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for n, d in devs.items():
        _check(d == first, f"{n} is on {d} but {next(iter(devs))} is on {first}: all tensors must share a device")


# ------------------------------------------------------------------------------------------ int8 GEMM

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_quantize_per_token(x: torch.Tensor) -> None:
    _check(x.dim() == 2, f"quantize_per_token: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(x.dtype in _FLOATS, f"quantize_per_token: x must be float32/bfloat16/float16, got {x.dtype}")


def check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype, *, packed: bool = False) -> None:
    op = "int8_gemm_packed" if packed else "int8_gemm"
    _check_same_device(a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    _check(a.dim() == 2, f"{op}: a must be 2-D [M, K], got shape {tuple(a.shape)}")
    _check(a.dtype == torch.int8, f"{op}: a must be int8, got {a.dtype}")
    _check(w.dtype == torch.int8, f"{op}: w must be int8, got {w.dtype}")
    _check(a_scale.dtype == torch.float32 and a_scale.shape == (a.shape[0],),
           f"{op}: a_scale must be float32 [M={a.shape[0]}], got {a_scale.dtype} {tuple(a_scale.shape)}")
    _check(w_scale.dtype == torch.float32 and w_scale.dim() == 1,
           f"{op}: w_scale must be float32 [N], got {w_scale.dtype} {tuple(w_scale.shape)}")
    n = w_scale.shape[0]
    if not packed:
        _check(w.dim() == 2 and w.shape[1] == a.shape[1],
               f"{op}: w must be [N, K={a.shape[1]}], got shape {tuple(w.shape)}")
        _check(w.shape[0] == n, f"{op}: w_scale must have N={w.shape[0]} entries, got {n}")
    if bias is not None:
        _check(bias.shape == (n,), f"{op}: bias must be [N={n}], got {tuple(bias.shape)}")
        _check(bias.dtype in _FLOATS, f"{op}: bias must be a float tensor, got {bias.dtype}")
    _check(out_dtype in _FLOATS, f"{op}: out_dtype must be float32/bfloat16/float16, got {out_dtype}")


@torch.library.register_fake("tiled_diffusion::quantize_per_token")
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.register_fake("tiled_diffusion::int8_gemm")
def _(a, a_scale, w, w_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.register_fake("tiled_diffusion::int8_gemm_packed")
def _(a, a_scale, w_packed, w_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w_scale.shape[0]), dtype=out_dtype)


@torch.library.register_fake("tiled_diffusion::pack_int8_weight")
def _(w):
    if _int8.packs_weight("w8a8", w.device):
        return w.new_empty((packed_numel_cpu(w.shape[0], w.shape[1]),), dtype=torch.int8)
    return w.new_empty(w.shape, dtype=torch.int8)


def packed_numel_cpu(n: int, k: int) -> int:
    """Bytes of the CPU packed-weight layout for w [N, K] (must match csrc/cpu/int8_gemm.cpp).

    Np = N rounded up to 16, Kp = K rounded up to 4: Np*Kp int8 weights in blocks [Np/16][Kp/4][16][4], then
    int32 comp[Np] = 128 * Σ_k w[n, k] (the u8×s8 vpdpbusd correction), then 16 int32 flags.
    """
    np_, kp = -(-n // 16) * 16, -(-k // 4) * 4
    return np_ * kp + 4 * np_ + 64


def unpack_int8_weight_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of the CPU `pack_int8_weight`: the int8 [N, K] weight back from its blocked layout (a pure
    permutation of bytes, so exact). Lets a layer keep only the packed copy (see Int8Linear.pack_only_)."""
    np_, kp = -(-n // 16) * 16, -(-k // 4) * 4
    _check(packed.dim() == 1 and packed.dtype == torch.int8 and packed.numel() == packed_numel_cpu(n, k),
           f"unpack_int8_weight_cpu: expected the 1-D int8 packed weight of N={n}, K={k} "
           f"({packed_numel_cpu(n, k)} bytes), got {packed.dtype} {tuple(packed.shape)}")
    blocks = packed[: np_ * kp].view(np_ // 16, kp // 4, 16, 4)  # [block][k/4][column][k%4]
    return blocks.permute(0, 2, 1, 3).reshape(np_, kp)[:n, :k].contiguous()


def cpu_isa() -> str:
    """ISA path the CPU int8 kernels take now: amx, avx512 (VNNI), avx2 or ref; TD_CPU_ISA=amx|avx512|avx2|ref
    (read at every call) forces one. Probe and reasons: tiled_diffusion/backends/cpu/isa.py."""
    return isa.cpu_isa()


def _quantize_per_token_impl(x):
    check_quantize_per_token(x)
    if _int8.route("quantize_per_token", x.device, reference=use_reference("quantize_per_token")) == "native":
        return _native_for("quantize_per_token", x.device)(x.contiguous())
    return reference.quantize_per_token(x)


def _int8_gemm_impl(a, a_scale, w, w_scale, bias, out_dtype):
    check_int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    if _int8.route("int8_gemm", a.device, reference=use_reference("int8_gemm")) == "native":
        return _native_for("int8_gemm", a.device)(a.contiguous(), a_scale.contiguous(), w.contiguous(),
                                                  w_scale.contiguous(), None if bias is None else bias.contiguous(),
                                                  out_dtype)
    return reference.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)


def _pack_int8_weight_impl(w):
    _check(w.dim() == 2 and w.dtype == torch.int8, f"pack_int8_weight: w must be int8 [N, K], got {w.dtype} "
           f"{tuple(w.shape)}")
    if _int8.route("pack_int8_weight", w.device) == "native":
        return _native_for("pack_int8_weight", w.device)(w.contiguous())
    return w.contiguous().clone()  # "identity"


def _int8_gemm_packed_impl(a, a_scale, w_packed, w_scale, bias, out_dtype):
    check_int8_gemm(a, a_scale, w_packed, w_scale, bias, out_dtype, packed=True)
    path = _int8.route("int8_gemm_packed", a.device, reference=use_reference("int8_gemm_packed"))
    if path == "reference":
        return reference.int8_gemm(a, a_scale, _plain_weight(w_packed, w_scale.shape[0], a.shape[1]), w_scale, bias,
                                   out_dtype)
    if path == "native":
        return _native_for("int8_gemm_packed", a.device)(a.contiguous(), a_scale.contiguous(), w_packed,
                                                         w_scale.contiguous(), None if bias is None else
                                                         bias.contiguous(), out_dtype)
    return _int8_gemm_impl(a, a_scale, w_packed, w_scale, bias, out_dtype)  # "plain": packed == plain off the CPU


def _plain_weight(w_packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 [N, K] weight of a packed one (the CPU layout unpacked; the same tensor elsewhere)."""
    return unpack_int8_weight_cpu(w_packed, n, k) if _int8.packs_weight("w8a8", w_packed.device) else w_packed


def check_w8a8_linear(x, w_packed, w_scale, bias) -> None:
    op = "w8a8_linear"
    _check_same_device(x=x, w_packed=w_packed, w_scale=w_scale, bias=bias)
    _check(x.dim() == 2, f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(x.dtype in _FLOATS, f"{op}: x must be float32/bfloat16/float16, got {x.dtype}")
    _check(w_packed.dtype == torch.int8, f"{op}: w_packed must be int8 (from pack_int8_weight), got {w_packed.dtype}")
    _check(w_scale.dtype == torch.float32 and w_scale.dim() == 1,
           f"{op}: w_scale must be float32 [N], got {w_scale.dtype} {tuple(w_scale.shape)}")
    n, k = w_scale.shape[0], x.shape[1]
    if _int8.packs_weight("w8a8", x.device):
        _check(w_packed.dim() == 1 and w_packed.numel() == packed_numel_cpu(n, k),
               f"{op}: w_packed must be the CPU packed weight of N={n}, K={k} ({packed_numel_cpu(n, k)} bytes, "
               f"from pack_int8_weight), got {tuple(w_packed.shape)}")
    else:
        _check(w_packed.shape == (n, k), f"{op}: w_packed must be [N={n}, K={k}], got {tuple(w_packed.shape)}")
    if bias is not None:
        _check(bias.shape == (n,), f"{op}: bias must be [N={n}], got {tuple(bias.shape)}")


def _w8a8_linear_impl(x, w_packed, w_scale, bias):
    check_w8a8_linear(x, w_packed, w_scale, bias)
    path = _int8.route("w8a8_linear", x.device, reference=use_reference("w8a8_linear"))
    if path == "reference":
        a, a_scale = reference.quantize_per_token(x)
        return reference.int8_gemm(a, a_scale, _plain_weight(w_packed, w_scale.shape[0], x.shape[1]), w_scale, bias,
                                   x.dtype)
    if path == "native":
        return native_op("w8a8_linear")(x.contiguous(), w_packed, w_scale.contiguous(),
                                        None if bias is None else bias.contiguous())
    # "composite": the two ops it fuses (bit-identical on the CPU; the plain GEMM off it)
    return torch.ops.tiled_diffusion.int8_gemm_packed(*torch.ops.tiled_diffusion.quantize_per_token(x), w_packed,
                                                      w_scale, bias, x.dtype)


@torch.library.register_fake("tiled_diffusion::w8a8_linear")
def _(x, w_packed, w_scale, bias):
    return x.new_empty((x.shape[0], w_scale.shape[0]))


for _name, _fn in (("quantize_per_token", _quantize_per_token_impl), ("int8_gemm", _int8_gemm_impl),
                   ("w8a8_linear", _w8a8_linear_impl),
                   ("pack_int8_weight", _pack_int8_weight_impl), ("int8_gemm_packed", _int8_gemm_packed_impl)):
    torch.library.impl(LIB, _name, "CompositeExplicitAutograd")(_fn)


# ----------------------------------------------------------------------------------- window attention


@torch.library.register_fake("tiled_diffusion::window_attention_opaque")
def _(q, k, v, neighbours, bias=None, scale=None):
    # contiguous whatever q's strides (the CPU processor passes token-major views): what every path returns
    T, H, L, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((T, H, L), dtype=torch.float32)


_CHECKED_NEIGHBOURS: dict = {}  # id -> (weakref, (version, key)) of tensors already checked (tables, origins)


def check_window_attention(q, k, v, neighbours, bias=None, scale=None, *, check_indices: bool = True) -> None:
    """Shapes, dtypes, devices; neighbour indices in [-1, T) (a device sync on CUDA; skip with check_indices)."""
    op = "window_attention"
    _check_same_device(q=q, k=k, v=v, neighbours=neighbours, bias=bias)
    _check(q.dim() == 4, f"{op}: q must be 4-D [T, H, L, D], got shape {tuple(q.shape)}")
    _check(q.dtype in _FLOATS, f"{op}: q must be float32/bfloat16/float16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        _check(t.shape == q.shape, f"{op}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        _check(t.dtype == q.dtype, f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    T = q.shape[0]
    _check(neighbours.dim() == 2 and neighbours.shape[0] == T,
           f"{op}: neighbours must be [T={T}, NB], got shape {tuple(neighbours.shape)}")
    _check(neighbours.dtype in (torch.int32, torch.int64),
           f"{op}: neighbours must be int32 (or int64), got {neighbours.dtype}")
    if bias is not None:
        _check(bias.shape == neighbours.shape,
               f"{op}: bias must be [T, NB]={tuple(neighbours.shape)} like neighbours, got {tuple(bias.shape)}")
        _check(bias.dtype == torch.float32, f"{op}: bias must be float32, got {bias.dtype}")
    _check(scale is None or 0 < scale < float("inf"), f"{op}: scale must be a finite number > 0, "
           f"got {scale}")
    if check_indices and neighbours.numel() and _has_data(neighbours):
        # The same neighbour table serves every layer and step: check each version once, not once per call (on
        # CUDA the check is a device sync).
        if not _checked_before(neighbours, T):
            _check_neighbour_values(op, neighbours, T)
            _remember_checked(neighbours, T)


def _checked_before(t: torch.Tensor, key) -> bool:
    seen = _CHECKED_NEIGHBOURS.get(id(t))
    return seen is not None and seen[0]() is t and seen[1] == (t._version, key)


def _remember_checked(t: torch.Tensor, key) -> None:
    if len(_CHECKED_NEIGHBOURS) > 64:
        _CHECKED_NEIGHBOURS.clear()
    _CHECKED_NEIGHBOURS[id(t)] = (weakref.ref(t), (t._version, key))


def _check_neighbour_values(op: str, neighbours: torch.Tensor, T: int) -> None:
    lo, hi = int(neighbours.min()), int(neighbours.max())
    _check(lo >= -1 and hi < T, f"{op}: neighbours must hold tile indices in [0, T={T}) or -1 for an "
           f"empty slot, got values in [{lo}, {hi}]")


def neighbours_to(table: torch.Tensor, T: int, device) -> torch.Tensor:
    """A neighbour table built on the host -> int32 contiguous on `device`, its values checked on the host (free)
    and the device copy remembered as checked: window_attention then reads no value of it (on CUDA the min/max
    check is a device sync, and a new table comes every step under `shift`)."""
    _check(table.device.type == "cpu", f"neighbours_to: the table must be built on the CPU, got {table.device}")
    table = table.to(torch.int32).contiguous()
    if table.numel():
        _check_neighbour_values("neighbours_to", table, T)
    out = table.to(device)
    _remember_checked(out, T)
    return out


@_triton_op("tiled_diffusion::window_attention", mutates_args=(),
                         schema=_SCHEMAS["window_attention"])
def _window_attention_op(q, k, v, neighbours, bias=None, scale=None):
    check_window_attention(q, k, v, neighbours, bias, scale)
    dev = q.device
    if use_reference("window_attention"):
        choose("window_attention", dev, "reference", "TD_IMPL")
        out, lse = reference.window_attention(q, k, v, neighbours, bias, scale)
        return out.contiguous(), lse.contiguous()
    if dev.type == "cuda":
        why = _triton_window_attention_unavailable(q.shape[-1])
        if why is None:
            # triton is optional and costs import time: loaded on the first call that runs a Triton kernel
            from .backends.triton.window_attention import window_attention_triton

            choose("window_attention", dev, "Triton", "triton importable and head dim supported")
            return window_attention_triton(q, k, v, neighbours, bias, scale)
        choose("window_attention", dev, "reference", why)
    elif dev.type == "cpu":
        choose("window_attention", dev, "CPU path", "fused CPU flash attention over gathered neighbours")
    else:
        choose("window_attention", dev, "reference", f"no kernel for device type {dev.type}")
    return torch.ops.tiled_diffusion.window_attention_opaque(q, k, v, neighbours, bias, scale)


def _window_attention_opaque_impl(q, k, v, neighbours, bias=None, scale=None):
    """Inputs checked by window_attention. The CPU path on the CPU, the reference elsewhere; contiguous outputs."""
    if q.device.type == "cpu":

        out, lse = window_attention_cpu(q, k, v, neighbours, bias, scale)
    else:
        out, lse = reference.window_attention(q, k, v, neighbours, bias, scale)
    return out.contiguous(), lse.contiguous()


def _triton_window_attention_unavailable(head_dim: int) -> Optional[str]:
    """None when the Triton kernel can run, else the reason it cannot."""
    try:
        # triton is optional and costs import time: loaded on the first call that runs a Triton kernel
        from .backends.triton.window_attention import supports_head_dim
    except ImportError as e:
        return f"triton not importable ({e})"
    if not supports_head_dim(head_dim):
        return f"head dim {head_dim} unsupported by the Triton kernel (needs 16..256 with <= 12.5% tail waste)"
    return None


torch.library.impl(LIB, "window_attention_opaque", "CompositeExplicitAutograd")(_window_attention_opaque_impl)


# ----------------------------------------------------------------------------------- neighborhood attention


@torch.library.register_fake("tiled_diffusion::neighborhood_attention")
def _(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None, band=(0, 0, 0)):
    B, H, Ht, Wt, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Ht, Wt), dtype=torch.float32)


def check_neighborhood_attention(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None,
                                 band=(0, 0, 0)) -> None:
    """Shapes, dtypes, devices, 1 <= stride <= window per axis (GNA: a group must lie inside its window),
    -stride < offset <= 0, and for a band: q's and k's rows inside the canvas and every query's window inside k's
    rows (a window that reached past the halo would silently lose keys)."""
    op = "neighborhood_attention"
    _check_same_device(q=q, k=k, v=v)
    _check(q.dim() == 5, f"{op}: q must be 5-D [B, H, Ht, Wt, D], got shape {tuple(q.shape)}")
    _check(q.dtype in _FLOATS, f"{op}: q must be float32/bfloat16/float16, got {q.dtype}")
    _check(len(band) == 3, f"{op}: band must be (canvas_h, q_top, k_top), got {tuple(band)}")
    want = q.shape if not band[0] else (*q.shape[:2], k.shape[2], *q.shape[3:])
    for name, t in (("k", k), ("v", v)):
        _check(t.dim() == 5 and t.shape == want, f"{op}: {name} must have shape {tuple(want)}"
               + (" (q's)" if not band[0] else " (q's but for its rows)") + f", got {tuple(t.shape)}")
        _check(t.dtype == q.dtype, f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    _check(len(window) == 2 and len(stride) == 2 and len(offset) == 2, f"{op}: window, stride and offset must "
           f"be pairs (h, w), got {tuple(window)}, {tuple(stride)}, {tuple(offset)}")
    for a in range(2):
        _check(1 <= stride[a] <= window[a], f"{op}: need 1 <= stride <= window per axis, got window "
               f"{tuple(window)}, stride {tuple(stride)}")
        _check(-stride[a] < offset[a] <= 0, f"{op}: need -stride < offset <= 0 per axis, got offset "
               f"{tuple(offset)}, stride {tuple(stride)}")
    _check(scale is None or 0 < scale < float("inf"), f"{op}: scale must be a finite number > 0, got {scale}")
    if band[0]:
        canvas_h, q_top, k_top = (int(x) for x in band)
        hq, hk = q.shape[2], k.shape[2]
        _check(0 <= q_top and q_top + hq <= canvas_h and 0 <= k_top and k_top + hk <= canvas_h,
               f"{op}: band {tuple(band)}: q rows [{q_top}, {q_top + hq}) and k rows [{k_top}, {k_top + hk}) must "
               f"lie in the {canvas_h}-row canvas")
        if hq:
            lo, hi = reference.neighborhood_bounds(canvas_h, window[0], stride[0], clip, offset[0])
            lo, hi = lo[q_top:q_top + hq], hi[q_top:q_top + hq]
            need = hi > lo  # clip can leave a window empty
            a = int(lo[need].min()) if bool(need.any()) else k_top
            b = int(hi[need].max()) if bool(need.any()) else k_top
            _check(k_top <= a and b <= k_top + hk, f"{op}: band {tuple(band)}: the windows of q's rows need the "
                   f"canvas rows [{a}, {b}), k holds [{k_top}, {k_top + hk})")


def _neighborhood_attention_impl(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None,
                                 band=(0, 0, 0)):
    check_neighborhood_attention(q, k, v, window, stride, clip, offset, scale, band)

    dev = q.device
    if use_reference("neighborhood_attention"):
        choose("neighborhood_attention", dev, "reference", "TD_IMPL")
        out, lse = reference.neighborhood_attention(q, k, v, window, stride, clip, offset, scale, band)
        return out.contiguous(), lse.contiguous()
    if dev.type == "cuda":
        why = _triton_window_attention_unavailable(q.shape[-1])
        if why is None:
            # triton is optional and costs import time: loaded on the first call that runs a Triton kernel
            from .backends.triton.neighborhood_attention import neighborhood_attention_triton

            choose("neighborhood_attention", dev, "Triton", "triton importable and head dim supported")
            return neighborhood_attention_triton(q, k, v, window, stride, clip, offset, scale, band)
        choose("neighborhood_attention", dev, "blocked SDPA", why)
    elif dev.type == "cpu":
        why = amx_unavailable(q)
        if why is None:
            choose("neighborhood_attention", dev, "AMX kernel", "bf16 on an AMX-BF16 CPU")
        else:
            choose("neighborhood_attention", dev, "CPU path", f"query blocks grouped by mask, fused CPU flash ({why})")
    else:
        choose("neighborhood_attention", dev, "blocked SDPA", f"no kernel for device type {dev.type}")
    return neighborhood_attention_cpu(q, k, v, window, stride, clip, offset, scale, band)


torch.library.impl(LIB, "neighborhood_attention", "CompositeExplicitAutograd")(_neighborhood_attention_impl)


# ---------------------------------------------------------------------------------------- seam blend


@torch.library.register_fake("tiled_diffusion::seam_blend_opaque")
def _(tiles, origins_y, origins_x, weights, batch, height, width):
    return tiles.new_empty((batch, tiles.shape[1], height, width))


@torch.library.register_fake("tiled_diffusion::blend_lcm_step_opaque")
def _(tiles, origins_y, origins_x, weights, sample, noise, sqrt_alpha_t, sqrt_beta_t, c_skip, c_out,
      sqrt_alpha_prev, sqrt_beta_prev):
    # contiguous whatever sample's strides, like every path (empty_like would keep e.g. channels_last)
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape)


def check_seam_blend(op, tiles, origins_y, origins_x, weights, batch, height, width) -> None:
    """Shapes, dtypes, devices and tile placement (origins are read on the host: H + W ints, cheap)."""
    _check_same_device(tiles=tiles, origins_y=origins_y, origins_x=origins_x, weights=weights)
    _check(tiles.dim() == 4, f"{op}: tiles must be 4-D [N, C, th, tw], got shape {tuple(tiles.shape)}")
    _check(tiles.dtype in _FLOATS, f"{op}: tiles must be float32/bfloat16/float16, got {tiles.dtype}")
    N, C, th, tw = tiles.shape
    for name, o in (("origins_y", origins_y), ("origins_x", origins_x)):
        _check(o.dtype == torch.int32 and o.dim() == 1 and o.numel() > 0,
               f"{op}: {name} must be a non-empty 1-D int32 tensor, got {o.dtype} {tuple(o.shape)}")
    ny, nx = origins_y.numel(), origins_x.numel()
    _check(batch >= 1 and N == batch * ny * nx,
           f"{op}: tiles has N={N} tiles but batch*ny*nx = {batch}*{ny}*{nx} = {batch * ny * nx}")
    _check(weights.shape == (th, tw) and weights.dtype == torch.float32,
           f"{op}: weights must be float32 [th={th}, tw={tw}], got {weights.dtype} {tuple(weights.shape)}")
    for name, o, t, size, dim in (("origins_y", origins_y, th, height, "height"),
                                  ("origins_x", origins_x, tw, width, "width")):
        # read once per origins tensor (and version): a grid's cached origins on CUDA cost one sync, not one
        # per forward
        if not _has_data(o) or _checked_before(o, ("origins", t, size)):
            continue
        v = o.tolist()
        _check(all(a <= b for a, b in zip(v, v[1:])), f"{op}: {name} must be sorted, got {v}")
        _check(v[0] >= 0 and v[-1] + t <= size,
               f"{op}: {name} {v} places tiles of size {t} outside the canvas {dim} {size}")
        _remember_checked(o, ("origins", t, size))


@_triton_op("tiled_diffusion::seam_blend", mutates_args=(), schema=_SCHEMAS["seam_blend"])
def _seam_blend_op(tiles, origins_y, origins_x, weights, batch, height, width):
    check_seam_blend("seam_blend", tiles, origins_y, origins_x, weights, batch, height, width)
    dev = tiles.device
    if use_reference("seam_blend"):
        choose("seam_blend", dev, "reference", "TD_IMPL")
        return reference.seam_blend(tiles, origins_y, origins_x, weights, batch, height, width).contiguous()
    if dev.type == "cuda":
        # triton is optional and costs import time: loaded on the first call that runs a Triton kernel
        from .backends.triton.seam_blend import seam_blend_triton

        choose("seam_blend", dev, "Triton", "CUDA tensors")
        return seam_blend_triton(tiles, origins_y, origins_x, weights, batch, height, width)
    if dev.type == "cpu":
        choose("seam_blend", dev, "CPU", "fp32 slicing adds with pre-normalised weights")
    else:
        choose("seam_blend", dev, "reference", f"no kernel for {dev.type}")
    return torch.ops.tiled_diffusion.seam_blend_opaque(tiles, origins_y, origins_x, weights, batch, height, width)


def _seam_blend_opaque_impl(tiles, origins_y, origins_x, weights, batch, height, width):
    """Inputs checked by seam_blend. The CPU path on the CPU, the reference elsewhere; a contiguous canvas."""
    if tiles.device.type == "cpu":

        return seam_blend_cpu(tiles, origins_y, origins_x, weights, batch, height, width).contiguous()
    return reference.seam_blend(tiles, origins_y, origins_x, weights, batch, height, width).contiguous()


@_triton_op("tiled_diffusion::blend_lcm_step", mutates_args=(), schema=_SCHEMAS["blend_lcm_step"])
def _blend_lcm_step_op(tiles, origins_y, origins_x, weights, sample, noise, sqrt_alpha_t, sqrt_beta_t, c_skip,
                       c_out, sqrt_alpha_prev, sqrt_beta_prev):
    op = "blend_lcm_step"
    _check(sample.dim() == 4, f"{op}: sample must be 4-D [B, C, H, W], got shape {tuple(sample.shape)}")
    B, C, H, W = sample.shape
    check_seam_blend(op, tiles, origins_y, origins_x, weights, B, H, W)
    _check_same_device(tiles=tiles, sample=sample, noise=noise)
    _check(tiles.shape[1] == C, f"{op}: tiles have C={tiles.shape[1]} channels but sample has {C}")
    _check(sample.dtype in _FLOATS, f"{op}: sample must be float32/bfloat16/float16, got {sample.dtype}")
    if noise is not None:
        _check(noise.shape == sample.shape,
               f"{op}: noise must have sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
    _check(sqrt_alpha_t != 0.0, f"{op}: sqrt_alpha_t must be non-zero")
    args = (tiles, origins_y, origins_x, weights, sample, noise, sqrt_alpha_t, sqrt_beta_t, c_skip, c_out,
            sqrt_alpha_prev, sqrt_beta_prev)
    dev = tiles.device
    if use_reference(op):
        choose(op, dev, "reference", "TD_IMPL")
        prev, den = reference.blend_lcm_step(*args)
        return prev.contiguous(), den.contiguous()
    if dev.type == "cuda":
        # triton is optional and costs import time: loaded on the first call that runs a Triton kernel
        from .backends.triton.seam_blend import blend_lcm_step_triton

        choose(op, dev, "Triton", "CUDA tensors")
        return blend_lcm_step_triton(*args)
    if dev.type == "cpu":
        choose(op, dev, "CPU", "fp32 slicing adds with the step folded into the weights")
    else:
        choose(op, dev, "reference", f"no kernel for {dev.type}")
    return torch.ops.tiled_diffusion.blend_lcm_step_opaque(*args)


def _blend_lcm_step_opaque_impl(*args):
    """Inputs checked by blend_lcm_step. The CPU path on the CPU, the reference elsewhere; contiguous outputs."""
    if args[0].device.type == "cpu":

        prev, den = blend_lcm_step_cpu(*args)
    else:
        prev, den = reference.blend_lcm_step(*args)
    return prev.contiguous(), den.contiguous()


torch.library.impl(LIB, "seam_blend_opaque", "CompositeExplicitAutograd")(_seam_blend_opaque_impl)
torch.library.impl(LIB, "blend_lcm_step_opaque", "CompositeExplicitAutograd")(_blend_lcm_step_opaque_impl)


# ------------------------------------------------------------------------------------ Python wrappers


_PATHS = ("Paths: CPU -> C++ kernels (amx / avx512 VNNI / avx2 / ref, `TD_CPU_ISA` forces one), CUDA -> C++/CUDA, "
          "other devices and `TD_IMPL=reference` -> reference.py.")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: x [M, K] fp32/bf16/fp16 -> (x_i8 [M, K] int8, scale [M] fp32) with
    x ≈ x_i8 · scale[:, None], scale = absmax / 127, round half to even, clamped to ±127. All-zero/tiny rows get
    scale 0; a NaN row scale NaN, an inf row scale inf (zeros in x_i8), identically on every path. Any strides."""
    return torch.ops.tiled_diffusion.quantize_per_token(x)


def int8_gemm(a, a_scale, w, w_scale, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """out [M, N] = (a @ wᵀ, exact int32 accumulation) · a_scale[:, None] · w_scale[None, :] + bias, cast to
    out_dtype (fp32/bf16/fp16). a int8 [M, K], a_scale fp32 [M], w int8 [N, K] (row-major Linear weight), w_scale
    fp32 [N], bias float [N] or None. Exact in integers; the epilogue in fp32. On the CPU the weight is packed per
    call: for a weight used many times, pack it once (pack_int8_weight) and call int8_gemm_packed."""
    return torch.ops.tiled_diffusion.int8_gemm(a, a_scale, w, w_scale, bias, out_dtype)


def pack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """The int8 weight [N, K] in the layout the GEMM kernels read: on the CPU a 1-D int8 tensor of
    packed_numel_cpu(N, K) bytes (VNNI blocks + column sums; unpack_int8_weight_cpu inverts it exactly), elsewhere a
    contiguous copy. Pack once per weight; pass the result to int8_gemm_packed / w8a8_linear."""
    return torch.ops.tiled_diffusion.pack_int8_weight(w)


def int8_gemm_packed(a, a_scale, w_packed, w_scale, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """int8_gemm against a weight from pack_int8_weight: a int8 [M, K], a_scale fp32 [M], w_packed (the packed
    [N, K] weight; N = w_scale's length, K = a's columns), w_scale fp32 [N], bias [N] or None -> out [M, N]
    out_dtype, the same result bit for bit without re-packing. Fast path: CPU, the packed layout made on the CPU."""
    return torch.ops.tiled_diffusion.int8_gemm_packed(a, a_scale, w_packed, w_scale, bias, out_dtype)


def w8a8_linear(x, w_packed, w_scale, bias=None) -> torch.Tensor:
    """W8A8 Linear in one call: x [M, K] fp32/bf16/fp16 -> [M, N] in x's dtype, equal bit for bit to
    int8_gemm_packed(*quantize_per_token(x), w_packed, w_scale, bias, x.dtype). w_packed from pack_int8_weight,
    w_scale fp32 [N], bias [N] or None. Fast path: CPU with the native kernel (quantization fused into the A
    packing on avx512/amx: no int8 copy of x); elsewhere the two ops. What Int8Linear(mode="w8a8") runs."""
    return torch.ops.tiled_diffusion.w8a8_linear(x, w_packed, w_scale, bias)


def window_attention(q, k, v, neighbours, bias=None, scale=None):
    """Cross-tile attention: each query tile attends to the keys of the tiles in its neighbour row.

    q, k, v [T, H, L, D] fp32/bf16/fp16, one dtype (T tiles with the batch folded in, L tokens per tile; any
    strides); neighbours int32/int64 [T, NB], key-tile indices in [0, T) or -1 for an empty slot (e.g.
    TileGrid.neighbours(radius)); bias fp32 [T, NB] additive log-weight per neighbour or None; scale default
    1/sqrt(D). Returns (out [T, H, L, D] in q's dtype, lse [T, H, L] fp32: log of the softmax denominator), both
    contiguous; a query with no valid key gets out 0 and lse -inf. Fast paths: CUDA Triton kernel for
    16 <= D <= 256 (tail waste <= D/8); CPU fused flash attention over gathered neighbours; else the reference."""
    register_triton_ops()
    return torch.ops.tiled_diffusion.window_attention(q, k, v, neighbours, bias, scale)


def neighborhood_attention(q, k, v, window, stride=(1, 1), clip=False, offset=(0, 0), scale=None, band=None):
    """Token-centred (neighbourhood) attention on a token canvas: q, k, v [B, H, Ht, Wt, D] fp32/bf16/fp16 (any
    strides). Query (y, x) attends the keys in a window (wh, ww) centred on it — or, with stride (sh, sw), on its
    stride group's centre — shifted inward so it stays inside the canvas (clip=True: cut at the border instead;
    offset: the stride groups' origin, for the half-tile-shifted blocked grid). Tile-blocked windows are the case
    stride = tile, window = (2r+1)·tile, clip. Returns (out [B, H, Ht, Wt, D] in q's dtype, lse [B, H, Ht, Wt]
    fp32), contiguous. band (canvas_h, q_top, k_top): q is the canvas rows [q_top, q_top + Hq) and k, v the rows
    [k_top, k_top + Hk) of a canvas_h-row canvas (one rank's band and its halo; every query's window must lie in
    k's rows); the result equals those rows of the whole canvas's, bitwise on the CPU path when q_top is a multiple
    of its query block. Fast paths: CUDA Triton (key bands per query block, masks from coordinates); CPU query
    blocks grouped by their translation-invariant mask through the fused flash kernel."""
    return torch.ops.tiled_diffusion.neighborhood_attention(q, k, v, list(window), list(stride), clip, list(offset),
                                                            scale, list(band) if band is not None else [0, 0, 0])


merge_attention = reference.merge_attention  # a few elementwise ops: torch is already optimal here


# The native kernel behind tiled_diffusion::w8a8_linear (quantize + GEMM + dequantize in one call) is a private op
# of the native library, CPU-only (its weight is the CPU packed layout); its fake lives here with the others.
# Reference: int8_gemm_packed(*quantize_per_token(x), w_packed, w_scale, bias, x.dtype), bit-identical
# (tests/ops/test_int8_gemm.py).
if native_has("w8a8_linear", "cpu"):
    @torch.library.register_fake("tiled_diffusion_C::w8a8_linear")
    def _(x, w_packed, w_scale, bias):
        return x.new_empty((x.shape[0], w_scale.shape[0]))


def seam_blend(tiles, origins_y, origins_x, weights, batch, height, width):
    """Weighted average of overlapping tiles on a canvas: tiles [N, C, th, tw] fp32/bf16/fp16 with
    N = batch·ny·nx ordered (b, iy, ix); origins_y int32 [ny] / origins_x int32 [nx] sorted top-left corners on the
    canvas; weights fp32 [th, tw] (TileGrid.blend_weights). canvas [batch, C, height, width] (tiles' dtype) =
    Σ w·tile / Σ w over the tiles covering a pixel, 0 where none does. Accumulates in fp32. Fast paths: CUDA
    Triton, CPU slicing adds with pre-normalised weights."""
    register_triton_ops()
    return torch.ops.tiled_diffusion.seam_blend(tiles, origins_y, origins_x, weights, batch, height, width)


def blend_lcm_step(tiles, origins_y, origins_x, weights, sample, noise, sqrt_alpha_t, sqrt_beta_t, c_skip, c_out,
                   sqrt_alpha_prev, sqrt_beta_prev):
    """seam_blend of tile ε-predictions onto sample's canvas [B, C, H, W], then one LCM scheduler step there, in
    one pass: returns (prev_sample, denoised), contiguous, in sample's dtype. denoised = c_skip·sample +
    c_out·(sample − sqrt_beta_t·ε)/sqrt_alpha_t; prev_sample = sqrt_alpha_prev·denoised + sqrt_beta_prev·noise
    (noise None: prev_sample = denoised). tiles/origins/weights as in seam_blend; noise like sample or None;
    sqrt_alpha_t != 0 (a v-prediction model's step is this formula with core/lcm.lcm_coefficients' rewritten pair).
    Fast paths: CUDA Triton, CPU with the step folded into the blend weights."""
    register_triton_ops()
    return torch.ops.tiled_diffusion.blend_lcm_step(tiles, origins_y, origins_x, weights, sample, noise,
                                                    sqrt_alpha_t, sqrt_beta_t, c_skip, c_out, sqrt_alpha_prev,
                                                    sqrt_beta_prev)


# The same documentation on torch.ops.tiled_diffusion.<name> (help() on the op packet; the Triton-backed ops get
# theirs when they register).
for _name in ("quantize_per_token", "int8_gemm", "pack_int8_weight", "int8_gemm_packed", "w8a8_linear"):
    try:
        getattr(torch.ops.tiled_diffusion, _name).__doc__ = globals()[_name].__doc__ + "\n\n" + _PATHS
    except (AttributeError, TypeError):  # pragma: no cover - an OpOverloadPacket without a settable __doc__
        pass
