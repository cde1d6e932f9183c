"""8-bit linear layers and the table-driven swap that puts them into a model.

Two modes:
- ``w8a8``: weights int8 per output channel, activations quantized per token on the fly, int8×int8 GEMM with the
  dequantization (scales, bias, cast) fused into its epilogue. For the PixArt transformer.
- ``w8a16``: weight-only int8 (dequantized to the activation dtype per call). For the T5 text encoder, whose
  activation outlier channels make per-token W8A8 too lossy.

State dict (issue 22): by default an Int8Linear / Int8Embedding saves what the float layer it replaced would
save — ``weight`` in the float dtype under the float name, no extra key — so `save_pretrained` after `accelerate`
writes a checkpoint plain diffusers / transformers reload as the right model: the original float weight when the
layer keeps it (`attach_original`, accelerate's default keep_original_weights=True), else the dequantized int8
weight (≤ half a quantization step, absmax/254, off per weight; a warning says so). Loading a float ``weight``
quantizes it on the fly (and updates the kept original). The int8 format — ``weight`` int8 [N, K] plus
``weight_scale`` fp32 [N] — is what `save_quantized` / `load_quantized` and `int8_state_dict()` use.

The scales stay fp32 through `.to(dtype)` / `.half()` (the kernels require fp32 scales); the float dtype a layer
saves and computes in (`float_dtype`) follows the cast.

Memory on the CPU: the w8a8 kernel reads its own blocked copy of the weight, so a layer normally holds the weight
twice. `Int8Linear.pack_only_()` (what `accelerate(..., keep_original_weights=False)` uses) drops the plain copy;
it is rebuilt exactly from the packed one whenever something needs it (state_dict, `.to(device)`, dequantizing).

`Int8Embedding` is the weight-only int8 counterpart of nn.Embedding (per-row scales), for T5's 32128×4096 table.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import ops
from ..backends.int8 import AUTO_W8A8_CPU, auto_mode, packs_weight  # noqa: F401  (AUTO_W8A8_CPU: re-exported)

MODES = ("w8a8", "w8a16")


# Layers of the PixArt transformer kept in high precision: tiny (<1% of the FLOPs) and sensitive — the timestep
# and conditioning paths modulate every block, proj_out writes the ε prediction itself.
PIXART_KEEP_HIGH_PRECISION = (
    "adaln_single*",
    "caption_projection*",
    "proj_out*",
    "*timestep_embedder*",
    "pos_embed*",
)

# Default quantization per model class (looked up by class name so diffusers/transformers stay optional here).
DEFAULTS = {
    "PixArtTransformer2DModel": {"mode": "w8a8", "exclude": PIXART_KEEP_HIGH_PRECISION},
    "T5EncoderModel": {"mode": "w8a16", "exclude": ()},
}


def resolve_mode(requested: Optional[str], device) -> tuple[Optional[str], str]:
    """The int8 mode to use for the transformer on `device`, and why. `requested`: "w8a8" / "w8a16" / None are
    taken as given; "auto" is `backends.int8.auto_mode` (w8a8 only where measured faster than bf16)."""
    if requested is None or requested in MODES:
        return requested, "requested explicitly"
    if requested != "auto":
        raise ValueError(f"int8 must be 'auto', 'w8a8', 'w8a16' or None, got {requested!r}")
    return auto_mode(device)


_INT8_FORMAT = [False]  # True inside int8_state_dict(): state_dict() gives int8 weights and their scales


@contextlib.contextmanager
def int8_state_dict():
    """Within it, Int8Linear / Int8Embedding save and expect the int8 format (``weight`` int8 + ``weight_scale``):
    for checkpoints of the quantized model itself and for exact int8 copies between modules."""
    old, _INT8_FORMAT[0] = _INT8_FORMAT[0], True
    try:
        yield
    finally:
        _INT8_FORMAT[0] = old


def _dequantized_warning(kind: str) -> None:
    warnings.warn(f"tiled_diffusion: saving {kind} layers as dequantized float weights (their float originals were "
                  f"not kept: keep_original_weights=False or an int8-streamed load); each weight is off by at most "
                  f"half an int8 step (absmax/254 of its row)", stacklevel=4)


def _cast_dtype(fn, dtype: torch.dtype, device) -> torch.dtype:
    """The dtype a float tensor of `dtype` has after a Module._apply function (`.to(dtype)`, `.half()`, ...)."""
    probe = fn(torch.empty(0, dtype=dtype, device=device))
    return probe.dtype if probe.is_floating_point() else dtype


def _after_cast(module: nn.Module, scale: torch.Tensor, dtype_attr: str, new_dtype: torch.dtype) -> None:
    """Both layers' `_apply` after the buffers were mapped: the scales back in fp32 (the kernels' contract; `scale`
    is the tensor before the cast), the float dtype (attribute `dtype_attr`) and a kept original follow the cast."""
    if module.weight_scale.dtype != torch.float32:
        module._buffers["weight_scale"] = scale.to(module.weight_scale.device, torch.float32)
    if new_dtype != getattr(module, dtype_attr):
        setattr(module, dtype_attr, new_dtype)
        if module._original is not None:
            module._original.to(new_dtype)


def _float_state(module: nn.Module, original: Optional[nn.Module], weight_fn, prefix: str, destination: dict,
                 keep_vars: bool) -> None:
    """The float layer's state dict entries: the kept original's weight, else the dequantized one."""
    if original is not None:
        w = original.weight
    else:
        _dequantized_warning(type(module).__name__)
        w = weight_fn()
    destination[prefix + "weight"] = w if keep_vars else w.detach()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [N, K] float -> (w_i8 [N, K], scale [N] fp32)."""
    return ops.quantize_per_token(w.detach())


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights. Input [..., K] float -> output [..., N] in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_buffer("bias", None)
        # w8a16 only: an empty tensor of the float dtype this layer computes in when that is fp32 while its input is
        # not — a layer whose float weight was fp32 in a half-precision model (transformers' `_keep_in_fp32_modules`,
        # T5's `wo`: its activations overflow fp16, and T5's own cast to `wo.weight.dtype` skips int8 weights).
        # A buffer so that `.to(dtype)` / `.half()` move it as they would move the float weight. None: input dtype.
        self.register_buffer("float_dtype_probe", None, persistent=False)
        self._packed: Optional[torch.Tensor] = None  # CPU VNNI layout, made once per weight version
        self._packed_key: Optional[tuple] = None
        self._pack_only = False  # True: self.weight is None and _packed is the only copy (CPU, w8a8)
        self.float_dtype = bias_dtype  # what the float layer held: state_dict's dtype, follows .to(dtype)
        self.__dict__["_original"] = None  # the replaced nn.Linear (not a submodule: no keys, no .to() device moves)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8") -> "Int8Linear":
        # Built on the meta device and given the quantized tensors directly: no zero-filled copies to free again
        # (for a 4.7 B-parameter text encoder, those holes fragment the heap by gigabytes).
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, device="meta",
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        q.weight, q.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        if mode == "w8a16" and linear.weight.dtype == torch.float32:
            q.float_dtype_probe = torch.empty(0, dtype=torch.float32, device=linear.weight.device)
        q.float_dtype = linear.weight.dtype
        q.packed_weight()  # pack now, not in the first forward
        return q

    def attach_original(self, linear: Optional[nn.Linear]) -> "Int8Linear":
        """Keep `linear` (the layer this one replaced) as what state_dict saves: the exact float weights."""
        self.__dict__["_original"] = linear
        return self

    @classmethod
    def concat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing `layers` side by side (outputs concatenated): fused QKV. Exact — the scales are per
        output channel, so the rows and their scales are only stacked."""
        modes = {q.mode for q in layers}
        if len(modes) != 1 or len({q.in_features for q in layers}) != 1:
            raise ValueError("Int8Linear.concat: layers must share mode and in_features")
        bias = all(q.bias is not None for q in layers)
        if not bias and any(q.bias is not None for q in layers):
            raise ValueError("Int8Linear.concat: either every layer has a bias or none")
        q = cls(layers[0].in_features, sum(l.out_features for l in layers), bias, modes.pop(), device="meta",
                bias_dtype=layers[0].bias.dtype if bias else torch.float32)
        q.weight = torch.cat([l.int8_weight() for l in layers])
        q.weight_scale = torch.cat([l.weight_scale for l in layers])
        if bias:
            q.bias = torch.cat([l.bias for l in layers])
        q.float_dtype = layers[0].float_dtype
        q.packed_weight()
        return q

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A float nn.Linear with the dequantized weights (what this layer computes, up to activation rounding)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight_scale.device,
                        dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def int8_weight(self) -> torch.Tensor:
        """The int8 [N, K] weight (rebuilt from the packed copy in pack-only mode)."""
        if self._pack_only:
            return ops.unpack_int8_weight_cpu(self._packed, self.out_features, self.in_features)
        return self.weight

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.int8_weight().float() * self.weight_scale[:, None]).to(dtype)

    def pack_only_(self) -> "Int8Linear":
        """Keep only the CPU kernel's packed weight (w8a8 on the CPU; a no-op elsewhere): half the layer's bytes.
        `weight` reads as None until something needs the plain layout back (state_dict, `.to()`, loading)."""
        if self._pack_only or self.packed_weight() is None:
            return self
        self._buffers["weight"] = None
        self._pack_only = True
        return self

    def _unpack_only(self) -> bool:
        """Leave pack-only mode (plain weight back, packed copy kept); returns whether it was on."""
        if not self._pack_only:
            return False
        w = self.int8_weight()
        self._buffers["weight"] = w
        self._packed_key = (w.data_ptr(), w._version)
        self._pack_only = False
        return True

    def packed_weight(self) -> Optional[torch.Tensor]:
        """The kernel's weight layout for w8a8 on the CPU (None elsewhere), re-made when the weight changes."""
        if self._pack_only:
            return self._packed
        if not packs_weight(self.mode, self.weight.device):
            return None
        if self._packed is not None and torch.compiler.is_compiling():
            # data_ptr() is a graph break ("Data pointer comparison"): a compiled graph uses the packed copy made by
            # the last eager call (a weight changed in place after compiling needs an eager call or a recompile)
            return self._packed
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed_key != key:
            self._packed = ops.pack_int8_weight(self.weight)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.mode == "w8a16":
            probe = self.float_dtype_probe
            if probe is not None and probe.dtype == torch.float32:  # a kept-fp32 layer: fp32 in, fp32 out
                x = x.float()
            if x.dtype == torch.float16:
                # fp16 tops out at 65504: a product with the raw int8 weights (±127) is 1/scale (~10^2..10^3) times
                # the true output and overflows where the output itself fits, so the scale goes on the weight
                # first (in fp32, then one rounding to fp16: no subnormal fp16 scales).
                w = torch.mul(self.weight, self.weight_scale[:, None]).to(x.dtype)
                return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
            # bf16/fp32 have fp32's range, and int8 values are exact in them: the weight is only widened (one
            # 2-byte pass, no fp32 copy) and the per-channel scale goes on the [M, N] output, small for a text
            # encoder.
            out = nn.functional.linear(x, self.weight.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
            return out if self.bias is None else out.add_(self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        packed = self.packed_weight()  # None where the kernels read the plain layout (backends.int8.packs_weight)
        out = ops.w8a8_linear(x2, self.weight if packed is None else packed, self.weight_scale, self.bias)
        return out.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():  # an unquantized checkpoint: quantize it as it loads
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(w.float())
            orig = self._original
            if orig is not None and tuple(w.shape) == tuple(orig.weight.shape):  # it stays what state_dict saves
                with torch.no_grad():
                    orig.weight.copy_(w)
                    b = state_dict.get(prefix + "bias")
                    if orig.bias is not None and b is not None and b.shape == orig.bias.shape:
                        orig.bias.copy_(b)
        was = self._unpack_only()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if was:
            self.pack_only_()  # packed_weight() re-packs: the loaded weight has a new version

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not _INT8_FORMAT[0]:  # the float layer's keys and dtype (module docstring)
            _float_state(self, self._original, lambda: self.dequantized_weight(self.float_dtype), prefix,
                         destination, keep_vars)
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            return
        if not self._pack_only:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._buffers["weight"] = self.int8_weight()  # same key order as a plain layer; dropped again below
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers["weight"] = None

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() map buffers; the packed copy is a CPU-only plain attribute, so move the plain
        # weight and re-pack if it is still on the CPU. The scales stay fp32 whatever the cast (the kernels'
        # contract); the float dtype follows it, and a kept original is cast too but stays where it is (on the
        # CPU: moving it with the layer would hold the float model on the accelerator beside the int8 one).
        scale = self.weight_scale
        new_dtype = _cast_dtype(fn, self.float_dtype, scale.device)
        was = self._unpack_only()
        out = super()._apply(fn, recurse)
        _after_cast(self, scale, "float_dtype", new_dtype)
        if self.packed_weight() is None:  # moved off the CPU: the packed copy is dead weight
            self._packed = self._packed_key = None
        if was:
            self.pack_only_()
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode}"


class Int8Embedding(nn.Module):
    """Weight-only int8 drop-in for nn.Embedding lookups: int8 rows with one fp32 scale per row (symmetric).

    Output dtype is the original table's (`dtype`). State dict: ``weight`` (int8 [V, D]) and ``weight_scale``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx, self.dtype = (num_embeddings, embedding_dim,
                                                                                  padding_idx, dtype)
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))
        self.__dict__["_original"] = None  # the replaced nn.Embedding, what state_dict saves (see Int8Linear)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("Int8Embedding: max_norm / sparse embeddings are not supported")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.weight.dtype, device="meta")
        q.weight, q.weight_scale = quantize_weight(emb.weight)
        return q

    def attach_original(self, emb: Optional[nn.Embedding]) -> "Int8Embedding":
        self.__dict__["_original"] = emb
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():  # a float table: quantize it as it loads (see Int8Linear)
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(w.float())
            if self._original is not None and tuple(w.shape) == tuple(self._original.weight.shape):
                with torch.no_grad():
                    self._original.weight.copy_(w)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if _INT8_FORMAT[0]:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        _float_state(self, self._original, self.dequantized_weight, prefix, destination, keep_vars)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale  # fp32 through casts, as Int8Linear's; the output dtype follows the cast
        new_dtype = _cast_dtype(fn, self.dtype, scale.device)
        out = super()._apply(fn, recurse)
        _after_cast(self, scale, "dtype", new_dtype)
        return out

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype or self.dtype)

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=self.weight.device,
                           dtype=self.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.dequantized_weight())
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight)  # only the looked-up rows are widened
        return (rows.float() * self.weight_scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


def module_bytes(module: Optional[nn.Module]) -> int:
    """Bytes of a module's tensors: parameters, buffers and the CPU-packed W8A8 weights (plain attributes), each
    storage counted once (tied weights)."""
    if module is None:
        return 0
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())}
    for m in module.modules():
        if isinstance(m, Int8Linear) and m._packed is not None:
            seen[m._packed.data_ptr()] = m._packed.numel()
    return sum(seen.values())


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put `new` wherever `old` is a child in `root` (tied modules, e.g. T5's shared/embed_tokens, stay tied)."""
    names = []
    for pname, parent in root.named_modules(remove_duplicate=True):
        for cname, child in list(parent._modules.items()):
            if child is old:
                parent._modules[cname] = new
                names.append(f"{pname}.{cname}" if pname else cname)
    return names


def quantize_embeddings(module: nn.Module) -> list[tuple[nn.Embedding, Int8Embedding, list[str]]]:
    """Swap every nn.Embedding of `module` for an Int8Embedding, in place. Tables that share one weight (T5's
    `shared` and `encoder.embed_tokens`) get one shared Int8Embedding. Returns (original, replacement, names)
    per original module: what `restore_embeddings` needs."""
    tied: dict[object, list[nn.Embedding]] = {}
    for m in module.modules():
        if type(m) is nn.Embedding:  # tied = same storage (transformers shares the Parameter; others may view it)
            w = m.weight
            tied.setdefault((w.data_ptr(), tuple(w.shape), w.stride()) if not w.is_meta else id(w), []).append(m)
    swaps = []
    for group in tied.values():
        q = Int8Embedding.from_embedding(group[0])
        swaps += [(emb, q, replace_module(module, emb, q)) for emb in group]
    return swaps


def restore_embeddings(module: nn.Module, swaps, keep_original: bool = True) -> None:
    """Undo `quantize_embeddings`: the original tables back, or float tables rebuilt from the int8 rows (tied
    tables stay tied)."""
    rebuilt: dict[int, nn.Embedding] = {}
    for emb, q, names in swaps:
        new = emb if keep_original else rebuilt.setdefault(id(q), q.to_embedding())
        for name in names:
            _set_submodule(module, name, new)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(module: nn.Module, mode: Optional[str] = None, include: Optional[Iterable[str]] = None,
                   exclude: Optional[Iterable[str]] = None) -> list[str]:
    """Swap every nn.Linear of `module` whose qualified name matches `include` (fnmatch patterns, default all) and
    not `exclude` for an Int8Linear, in place. `mode`/`exclude` default from DEFAULTS by the module's class.
    Returns the swapped names. Revert with `restore_linears`.
    """
    defaults = DEFAULTS.get(type(module).__name__, {"mode": "w8a8", "exclude": ()})
    mode = mode or defaults["mode"]
    if mode not in MODES:
        raise ValueError(f"quantize_model: mode must be one of {MODES}, got {mode!r}")
    targets = linear_targets(module, include, exclude if exclude is not None else defaults["exclude"])
    for name, lin in targets:
        _set_submodule(module, name, Int8Linear.from_linear(lin, mode))
    return [name for name, _ in targets]


def linear_targets(module: nn.Module, include: Optional[Iterable[str]] = None,
                   exclude: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """The layers int8 swaps: every plain nn.Linear (qualified names from named_modules()) matching `include`
    (fnmatch patterns, default all) and not `exclude`. The one selection rule, shared by quantize_model and the
    streaming loader (loading.py), which picks the same layers before their weights exist."""
    include = tuple(include) if include is not None else ("*",)
    exclude = tuple(exclude)
    return [(name, m) for name, m in module.named_modules()
            if type(m) is nn.Linear and _matches(name, include) and not _matches(name, exclude)]


def restore_linears(module: nn.Module, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Swap every Int8Linear back to a float nn.Linear holding the dequantized weights (in `dtype`, default the
    bias dtype or fp32). The weights are the quantized ones: reload the checkpoint for the exact originals."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, Int8Linear)]
    for name, q in targets:
        d = dtype or (q.bias.dtype if q.bias is not None else torch.float32)
        _set_submodule(module, name, q.to_linear(d))
    return [name for name, _ in targets]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def save_quantized(module: nn.Module, path: str) -> None:
    """Write the module's state dict (int8 weights and scales included) as safetensors."""
    with int8_state_dict():
        state = module.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def load_quantized(module: nn.Module, path: str, strict: bool = True) -> None:
    """Load a state dict written by `save_quantized` into a module already swapped by `quantize_model`."""
    with int8_state_dict():
        module.load_state_dict(load_file(path, device=str(next(module.buffers()).device)), strict=strict)
