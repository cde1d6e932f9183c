"""8-bit linear layers and the table-driven swap that puts them into a model.

Two modes:
- ``w8a8``: weights int8 per output channel, activations quantized per token on the fly, int8×int8 GEMM with the
  dequantization (scales, bias, cast) fused into its epilogue. For the PixArt transformer.
- ``w8a16``: weight-only int8 (dequantized to the activation dtype per call). For the T5 text encoder, whose
  activation outlier channels make per-token W8A8 too lossy.

State dict of an Int8Linear: ``weight`` (int8 [N, K]), ``weight_scale`` (fp32 [N]) and ``bias`` — the nn.Linear keys
plus one. Loading a float ``weight`` (an unquantized checkpoint) into an Int8Linear quantizes it on the fly.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

import torch
from torch import nn

from . import ops

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
        self._packed: Optional[torch.Tensor] = None  # CPU VNNI layout, made once per weight version
        self._packed_key: Optional[tuple] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8") -> "Int8Linear":
        # Built on the meta device and given the quantized tensors directly: no zero-filled copies to free again
        # (for a 4.7 B-parameter text encoder, those holes fragment the heap by gigabytes).
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, device="meta",
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        q.weight, q.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        q.packed_weight()  # pack now, not in the first forward
        return q

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A float nn.Linear with the dequantized weights (what this layer computes, up to activation rounding)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                        dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def packed_weight(self) -> Optional[torch.Tensor]:
        """The kernel's weight layout for w8a8 on the CPU (None elsewhere), re-made when the weight changes."""
        if self.mode != "w8a8" or self.weight.device.type != "cpu":
            return None
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed_key != key:
            self._packed = ops.pack_int8_weight(self.weight)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.mode == "w8a16":
            # int8 values are exact in bf16/fp16/fp32, so the weight is only widened (one 2-byte pass, no fp32
            # copy) and the per-channel scale goes on the [M, N] output, which is small for a text encoder.
            out = nn.functional.linear(x, self.weight.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
            return out if self.bias is None else out.add_(self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_i8, x_scale = ops.quantize_per_token(x2)
        packed = self.packed_weight()
        if packed is not None:
            out = ops.int8_gemm_packed(x_i8, x_scale, packed, self.weight_scale, self.bias, x.dtype)
        else:
            out = ops.int8_gemm(x_i8, x_scale, self.weight, self.weight_scale, self.bias, x.dtype)
        return out.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():  # an unquantized checkpoint: quantize it as it loads
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(w.float())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode}"


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
    include = tuple(include) if include is not None else ("*",)
    exclude = tuple(exclude) if exclude is not None else tuple(defaults["exclude"])
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and _matches(name, include) and not _matches(name, exclude)]
    for name, lin in targets:
        _set_submodule(module, name, Int8Linear.from_linear(lin, mode))
    return [name for name, _ in targets]


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
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)


def load_quantized(module: nn.Module, path: str, strict: bool = True) -> None:
    """Load a state dict written by `save_quantized` into a module already swapped by `quantize_model`."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(path, device=str(next(module.buffers()).device)), strict=strict)
