"""PixArt-δ's ControlNet-Transformer, attached to a diffusers PixArtTransformer2DModel through forward pre-hooks.

Design (PixArt-δ, arXiv 2401.05252 §4, as upstream PixArt-alpha's `pixart_controlnet.py` and diffusers' research
`PixArtControlNetAdapterModel` implement it): N trainable copies of the first N base blocks (N = 13 for
PixArt-XL). With x_i the hidden states entering base block i and c the control tokens:

    c_0   = copy_0(x_1 + before_proj(c))            (x_1 = base block 0's output; before_proj: block 0 only)
    c_i   = copy_i(c_{i-1})                          i = 1 .. N-1
    x_i  <- x_i + scale · after_proj_{i-1}(c_{i-1})  before base block i, i = 1 .. N

before_proj and every after_proj are zero-initialised Linear(hidden, hidden), so a fresh adapter changes
nothing. The copies share the base forward's timestep embedding, projected text and masks (the block kwargs).
The control image is VAE-encoded (× scaling factor) and patch-embedded by the BASE model's own `pos_embed`
(patch projection + positional embedding). `scale` is this module's `conditioning_scale` (upstream has none: 1).

How it attaches: `attach(transformer)` registers a forward pre-hook (with kwargs) on base blocks 1..N; the hook
of block i runs copy i-1 on the kwargs diffusers passes to that block and adds the skip to its hidden states.
The transformer's own forward is untouched, so the same hooks work inside the tiled canvas forward:
- the control latent is read from `context.current_extras["control"]` when the accelerated transformer's
  canvas forward provides it (multidiffusion: the tile batch's crop), else the whole latent set by
  `set_control`; a pre-hook on the transformer puts that latent into `context.extras["control"]` first;
- `transformer.pos_embed` gives the control tokens the same canvas positions and (cross_tile) tile-major order
  as the hidden states, since it runs inside the same forward;
- each copy's attention processors are the ones of the base block it was copied from, read at every call, so
  cross_tile's window attention (attn1) and regional prompts (attn2) apply to the copies as to the base blocks.

Checkpoints (`load`): the diffusers research layout (a safetensors file beside a config.json:
`controlnet_blocks.{i}.transformer_block.*`, `controlnet_blocks.0.before_proj.*`, `controlnet_blocks.{i}.after_proj.*`)
and upstream PixArt-alpha's `.pth` (`controlnet.{i}.copied_block.*` with fused `attn.qkv` and
`cross_attn.kv_linear`, `controlnet.{i}.before_proj/after_proj`; `base_model.*` ignored).

Layouts: control latent [B, C_latent, h, w] (the canvas, in latent pixels, already × scaling factor); tokens
[B, N, hidden] in whatever order the base model's patch embedding produces.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional

import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file, save_file
from torch import nn

from . import int8
from .int8 import Int8Linear, int8_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")

# upstream PixArt block parameter -> diffusers BasicTransformerBlock parameter(s); fused tensors split on dim 0
_UPSTREAM_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}


class ControlNetError(ValueError):
    """A ControlNet checkpoint or input that does not fit (one-line message)."""


def _zero_linear(dim: int) -> nn.Linear:
    lin = nn.Linear(dim, dim)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _new_block(config):
    """A BasicTransformerBlock built exactly as PixArtTransformer2DModel builds its blocks from `config`."""
    inner = config.num_attention_heads * config.attention_head_dim
    return BasicTransformerBlock(
        inner, config.num_attention_heads, config.attention_head_dim, dropout=config.dropout,
        cross_attention_dim=config.cross_attention_dim, activation_fn=config.activation_fn,
        num_embeds_ada_norm=config.num_embeds_ada_norm, attention_bias=config.attention_bias,
        upcast_attention=config.upcast_attention, norm_type=config.norm_type,
        norm_elementwise_affine=config.norm_elementwise_affine, norm_eps=config.norm_eps,
        attention_type=config.attention_type)


class ControlNetBlock(nn.Module):
    """One copy: [before_proj (index 0 only)] -> transformer_block -> after_proj. Parameter names are the
    diffusers research layout's (`PixArtControlNetAdapterBlock`), so its state dict loads as it is."""

    def __init__(self, block_index: int, transformer_block: nn.Module, inner_dim: int):
        super().__init__()
        self.block_index = block_index
        if block_index == 0:
            self.before_proj = _zero_linear(inner_dim)
        self.transformer_block = transformer_block
        self.after_proj = _zero_linear(inner_dim)

    def forward(self, control: torch.Tensor, hidden_states: torch.Tensor, **block_kwargs):
        """control, hidden_states [B, N, hidden] -> (skip for the base stream, control for the next copy)."""
        if self.block_index == 0:
            control = hidden_states + self.before_proj(control)
        control = self.transformer_block(control, **block_kwargs)
        return self.after_proj(control), control


class PixArtControlNet(nn.Module):
    """The adapter: `controlnet_blocks` (N ControlNetBlock) and a `conditioning_scale` (default 1 = upstream)."""

    def __init__(self, transformer_config, num_layers: int = 13, conditioning_scale: float = 1.0):
        super().__init__()
        if num_layers < 1:
            raise ControlNetError(f"ControlNet: num_layers must be >= 1, got {num_layers}")
        inner = transformer_config.num_attention_heads * transformer_config.attention_head_dim
        self.num_layers = num_layers
        self.conditioning_scale = float(conditioning_scale)
        self.controlnet_blocks = nn.ModuleList(
            [ControlNetBlock(i, _new_block(transformer_config), inner) for i in range(num_layers)])
        # The attached transformer, and the back-reference on it, are plain attributes (object.__setattr__):
        # as nn.Module attributes they would become submodules of each other (state dicts, .to(), cycles).
        object.__setattr__(self, "_transformer", None)
        self._handles: list = []
        self._control: Optional[torch.Tensor] = None
        self._state: Optional[torch.Tensor] = None  # control tokens between the hooks of one forward
        self.int8: Optional[str] = None

    # ------------------------------------------------------------------ construction and loading

    @classmethod
    def from_transformer(cls, transformer, num_layers: int = 13, conditioning_scale: float = 1.0):
        """Copies of the first `num_layers` base blocks with zero projections: the initialisation of ControlNet
        training, and a no-op adapter until trained. An int8 base gives int8 copies (the same int8 weights)."""
        net = cls(transformer.config, num_layers, conditioning_scale)
        _check_depth(transformer, num_layers)
        modes = {m.mode for m in transformer.transformer_blocks[0].modules() if isinstance(m, Int8Linear)}
        if modes:  # an int8 base (accelerated): int8 copies of its int8 layers, exact
            net.quantize(modes.pop())
        with int8_state_dict():  # int8 copies of int8 layers in the int8 format: exact, no re-quantization
            for i, blk in enumerate(net.controlnet_blocks):
                src = transformer.transformer_blocks[i].state_dict()
                blk.transformer_block.load_state_dict(src)
        p = next(transformer.parameters())
        return net.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)

    @classmethod
    def load(cls, path: str, transformer, dtype: Optional[torch.dtype] = None, device=None,
             conditioning_scale: float = 1.0):
        """A ControlNet checkpoint for `transformer`'s architecture: a diffusers research-layout folder (or its
        safetensors file, with config.json beside it) or an upstream PixArt-alpha `.pth`/`.pt`."""
        state, num_layers = read_checkpoint(path)
        net = cls(transformer.config, num_layers, conditioning_scale)
        _check_depth(transformer, num_layers)
        net.load_converted(state, source=path)
        p = next(transformer.parameters())
        return net.to(device=device or p.device, dtype=dtype or (p.dtype if p.is_floating_point() else None))

    def load_converted(self, state: dict, source: str = "state dict") -> None:
        """Load a research-layout state dict; missing, unexpected or mis-shaped keys -> one ControlNetError."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        problems = [f"{what} {_names(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
        if problems:
            raise ControlNetError(f"ControlNet checkpoint {source} does not fit this transformer "
                                  f"({self.num_layers} copies): " + "; ".join(problems))
        self.load_state_dict(state, strict=True)

    def quantize(self, mode: str = "w8a8") -> "PixArtControlNet":
        """int8 for the copies' linear layers, as `accelerate` does for the base blocks. before_proj/after_proj
        stay float: they are the zero-initialised injection paths (like proj_out, small and sensitive)."""
        if self.int8 == mode:
            return self
        if self.int8 is not None:
            raise RuntimeError(f"ControlNet: already quantized ({self.int8})")
        for blk in self.controlnet_blocks:
            int8.quantize_model(blk.transformer_block, mode=mode, exclude=())
        self.int8 = mode
        return self

    # ------------------------------------------------------------------ attaching

    def attach(self, transformer, conditioning_scale: Optional[float] = None, int8: Optional[str] = "auto"):
        """Hook into `transformer` (a PixArtTransformer2DModel, accelerated or not). int8="auto" quantizes the
        copies like the base blocks when `accelerate(..., int8=...)` quantized them. Returns self."""
        if self._transformer is not None:
            if self._transformer is transformer:
                return self
            raise RuntimeError("ControlNet: already attached to another transformer; call detach() first")
        if getattr(transformer, "_td_controlnet", None) is not None:
            raise RuntimeError("ControlNet: the transformer already has a ControlNet attached")
        _check_depth(transformer, self.num_layers)
        if conditioning_scale is not None:
            self.conditioning_scale = float(conditioning_scale)
        if int8 == "auto":
            st = getattr(transformer, "_tiled_diffusion", None)
            int8 = st.int8 if st is not None else None
        if int8 is not None:
            self.quantize(int8)
        p = next(transformer.parameters())
        if p.is_floating_point():
            self.to(device=p.device, dtype=p.dtype)
        else:
            self.to(device=p.device)
        st = getattr(transformer, "_tiled_diffusion", None)
        if self.int8 is not None and st is not None and not st.keep_original_weights:
            for m in self.modules():  # the least-memory setting, as accelerate leaves the base blocks
                if isinstance(m, Int8Linear):
                    m.pack_only_()
        self._handles.append(transformer.register_forward_pre_hook(self._publish_control))
        for i in range(1, self.num_layers + 1):
            self._handles.append(transformer.transformer_blocks[i].register_forward_pre_hook(
                self._block_hook(i), with_kwargs=True))
        object.__setattr__(self, "_transformer", transformer)
        object.__setattr__(transformer, "_td_controlnet", self)
        self._publish()
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        extras = getattr(self._context(), "extras", None)
        if extras is not None:
            extras.pop("control", None)
        if self._transformer is not None:
            self._transformer.__dict__.pop("_td_controlnet", None)
        object.__setattr__(self, "_transformer", None)
        self._state = None

    def set_control(self, latent: Optional[torch.Tensor]) -> None:
        """The control latent [B, C, h, w] of the whole canvas (× scaling factor), or None to switch control off
        (the hooks then do nothing and the output is the base model's, bitwise)."""
        self._control = latent
        self._publish()

    @contextlib.contextmanager
    def applied(self, transformer, latent: torch.Tensor, conditioning_scale: Optional[float] = None) -> Iterator:
        """attach + set_control for the duration of a `with` block; afterwards the previous control and scale are
        back, and the ControlNet is detached again if it was not attached before."""
        was = self._transformer is transformer
        old_scale, old_control = self.conditioning_scale, self._control
        self.attach(transformer, conditioning_scale)
        self.set_control(latent)
        try:
            yield self
        finally:
            self.set_control(old_control)
            self.conditioning_scale = old_scale
            if not was:
                self.detach()

    # ------------------------------------------------------------------ the hooks

    def _context(self):
        st = getattr(self._transformer, "_tiled_diffusion", None)
        return None if st is None else st.context

    def _publish(self) -> None:
        """Put the whole control latent where the canvas forward crops extras (`context.extras`, which persists
        between forwards): at attach and set_control, and again before every forward through the transformer's
        __call__ (covers an `accelerate` after attach). Entry points that run tiles without __call__ (the
        sampler's fused multidiffusion step) find it there already."""
        extras = getattr(self._context(), "extras", None)
        if extras is not None:
            if self._control is None:
                extras.pop("control", None)
            else:
                extras["control"] = self._control

    def _publish_control(self, module, args):
        self._state = None
        self._publish()
        return None

    def _current_latent(self) -> Optional[torch.Tensor]:
        """The control latent of the running inner forward: the canvas forward's crop when it runs, else (plain
        transformer, or a canvas that is one tile) the whole latent."""
        ctx = self._context()
        current = getattr(ctx, "current_extras", None)
        if current and current.get("control") is not None:
            return current["control"]
        if ctx is not None and ctx.offsets is not None:  # a multidiffusion tile batch without its crop
            raise ControlNetError("ControlNet: the canvas forward ran tiles without the control latent in "
                                  "context.extras['control']")
        return self._control

    def _block_hook(self, i: int):
        def hook(module, args, kwargs):
            if self._control is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            tr = self._transformer
            if i == 1:
                latent = self._current_latent()
                p = tr.config.patch_size
                if (latent.shape[-2] // p) * (latent.shape[-1] // p) != hidden.shape[1]:
                    raise ControlNetError(f"ControlNet: control latent {tuple(latent.shape[-2:])} gives "
                                          f"{(latent.shape[-2] // p) * (latent.shape[-1] // p)} tokens, the hidden "
                                          f"states have {hidden.shape[1]}: the control latent must have the "
                                          f"canvas's latent size (did the pipeline resize the request? pass "
                                          f"use_resolution_binning=False)")
                self._state = tr.pos_embed(_rows_like(latent, hidden.shape[0]).to(tr.pos_embed.proj.weight.dtype))
            blk = self.controlnet_blocks[i - 1]
            _mirror_processors(blk.transformer_block, tr.transformer_blocks[i - 1])
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            skip, self._state = blk(self._state, hidden, **kw)
            if i == self.num_layers:
                self._state = None
            hidden = hidden + skip if self.conditioning_scale == 1.0 else hidden + self.conditioning_scale * skip
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook


def _rows_like(latent: torch.Tensor, n: int) -> torch.Tensor:
    """The control latent repeated to n forward rows (CFG halves and repeated images share one control)."""
    if latent.shape[0] == n:
        return latent
    if n % latent.shape[0]:
        raise ControlNetError(f"ControlNet: control latent batch {latent.shape[0]} does not divide the forward "
                              f"batch {n}")
    return latent.repeat(n // latent.shape[0], *([1] * (latent.dim() - 1)))


def _mirror_processors(copy_block: nn.Module, base_block: nn.Module) -> None:
    for name in ("attn1", "attn2"):
        src, dst = getattr(base_block, name, None), getattr(copy_block, name, None)
        if src is not None and dst is not None and dst.processor is not src.processor:
            dst.processor = src.processor


def _check_depth(transformer, num_layers: int) -> None:
    n = len(transformer.transformer_blocks)
    if num_layers + 1 > n:
        raise ControlNetError(f"ControlNet: {num_layers} copies need at least {num_layers + 1} base blocks "
                              f"(the last skip is added before base block {num_layers}); the transformer has {n}")


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


# ---------------------------------------------------------------------- checkpoint formats


def read_checkpoint(path: str) -> tuple[dict, int]:
    """(research-layout state dict, number of copies) from either checkpoint layout."""
    if not os.path.exists(path):
        raise ControlNetError(f"ControlNet checkpoint not found: {path}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return _read_diffusers(path)
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return _read_upstream(path)
    raise ControlNetError(f"ControlNet checkpoint {path}: expected a diffusers folder / .safetensors file or an "
                          f"upstream PixArt-alpha .pth")


def _read_diffusers(path: str) -> tuple[dict, int]:
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in WEIGHTS_NAMES if os.path.exists(os.path.join(path, n))]
        if not found:
            raise ControlNetError(f"ControlNet folder {path} has none of {', '.join(WEIGHTS_NAMES)}")
        file = found[0]
    else:
        file = path
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise ControlNetError(f"ControlNet checkpoint {file}: no {CONFIG_NAME} beside it (the diffusers layout "
                              f"stores num_layers there)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        state = load_file(file)
    except Exception as e:  # noqa: BLE001 - unreadable file: one line
        raise ControlNetError(f"ControlNet checkpoint {file}: unreadable ({type(e).__name__}: {e})") from None
    num_layers = int(cfg.get("num_layers", 13))
    return state, num_layers


def _read_upstream(path: str) -> tuple[dict, int]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ControlNetError(f"ControlNet checkpoint {path}: unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ControlNetError(f"ControlNet checkpoint {path}: expected a state dict, got {type(obj).__name__}")
    return convert_upstream(obj, source=path)


def _block_param(name: str) -> tuple[str, str]:
    """(module, leaf) of a transformer block's parameter name; the block's own scale_shift_table has module "" (it
    keeps its name in both layouts)."""
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def convert_upstream(state: dict, source: str = "state dict") -> tuple[dict, int]:
    """Upstream PixArt-alpha ControlNet keys -> research layout (qkv split in 3, kv_linear in 2 along dim 0).
    `base_model.*` is ignored; any other key that is not a ControlNet key is reported."""
    out: dict = {}
    unknown: list[str] = []
    indices: set[int] = set()
    for key, t in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("base_model."):
            continue
        parts = k.split(".")
        if len(parts) < 4 or parts[0] != "controlnet" or not parts[1].isdigit():
            unknown.append(key)
            continue
        i = int(parts[1])
        indices.add(i)
        rest = ".".join(parts[2:])
        if rest.startswith(("before_proj.", "after_proj.")):
            out[f"controlnet_blocks.{i}.{rest}"] = t
            continue
        if not rest.startswith("copied_block."):
            unknown.append(key)
            continue
        mod, leaf = _block_param(rest[len("copied_block."):])
        targets = _UPSTREAM_BLOCK.get(mod) if mod else ("",)
        if targets is None or (mod and leaf not in ("weight", "bias")):
            unknown.append(key)
            continue
        if t.shape[0] % len(targets):
            raise ControlNetError(f"ControlNet checkpoint {source}: {key} {tuple(t.shape)} does not split in "
                                  f"{len(targets)}")
        for name, piece in zip(targets, t.chunk(len(targets), dim=0) if mod else (t,)):
            out[f"controlnet_blocks.{i}.transformer_block.{name}{'.' if name else ''}{leaf}"] = piece.contiguous()
    if unknown:
        raise ControlNetError(f"ControlNet checkpoint {source}: unexpected keys {_names(sorted(unknown))}")
    if not indices:
        raise ControlNetError(f"ControlNet checkpoint {source}: no controlnet.* keys (is it a ControlNet?)")
    return out, max(indices) + 1


def to_upstream(state: dict) -> dict:
    """Research layout -> upstream keys (the inverse of `convert_upstream`: fused qkv and kv_linear)."""
    out: dict = {}
    fused: dict = {}
    inverse = {t: (src, j, len(ts)) for src, ts in _UPSTREAM_BLOCK.items() for j, t in enumerate(ts)}
    for key, t in state.items():
        parts = key.split(".")
        i, rest = parts[1], ".".join(parts[2:])
        if not rest.startswith("transformer_block."):
            out[f"controlnet.{i}.{rest}"] = t
            continue
        mod, leaf = _block_param(rest[len("transformer_block."):])
        src, j, n = inverse[mod] if mod else ("", 0, 1)
        fused.setdefault(f"controlnet.{i}.copied_block.{src}{'.' if src else ''}{leaf}", [None] * n)[j] = t
    out.update({k: torch.cat(v) for k, v in fused.items()})
    return out


def save_diffusers(net: PixArtControlNet, folder: str) -> None:
    """Write `net` in the diffusers research layout (config.json + diffusion_pytorch_model.safetensors)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump({"_class_name": "PixArtControlNetAdapterModel", "num_layers": net.num_layers}, f)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(folder, WEIGHTS_NAMES[0]))
