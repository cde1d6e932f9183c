"""accelerate(pipe) / restore(pipe): table-driven module swaps into a diffusers PixArt pipeline, and the stages
of one tiled generation (encode, denoise, decode).

Every swap is one row of SWAPS: (name, component, when, apply, revert). `apply(target, state)` returns a record of
what it replaced; the records are kept on the transformer (`transformer._tiled_diffusion`) and `restore` reverts
them in reverse order, so the pipeline is returned to its exact original modules (the original nn.Linear objects
are kept unless `keep_original_weights=False`, in which case restore rebuilds float layers from the int8 weights).

After `accelerate(pipe)`, diffusers' own `pipe(prompt, height=4096, width=4096, ...)` is tiled: the transformer's
forward is the canvas forward (canvas.py), `pipe.vae.decode` is the tiled decode for canvases larger than one VAE
tile, and resolution binning never shrinks a canvas (see `_TiledCall`).

Works for PixArtAlphaPipeline, PixArtSigmaPipeline (anything with .transformer/.text_encoder) and a bare
PixArtTransformer2DModel.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as pa
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as ps  # the 2048 bins live there
from torch import nn

from .. import vae as vae_mod
from ..core.config import DEFAULT_STRIDE, DEFAULT_WINDOW, TiledConfig
from ..core.profiling import phase
from ..model import int8
from ..model.attention import CrossTileAttnProcessor, TileContext
from ..model.canvas import canvas_class
from ..model.int8 import resolve_mode
from ..model.positional import CanvasPatchEmbed
from ..parallel import vae as parallel_vae

log = logging.getLogger("tiled_diffusion")


@dataclasses.dataclass
class AccelerateState:
    config: TiledConfig
    context: TileContext
    int8: Optional[str]
    text_encoder_int8: bool
    keep_original_weights: bool
    vae_scale_factor: int = 8
    owner: Any = None  # weakref to the object accelerate was called on (a pipeline or the bare transformer)
    records: list = dataclasses.field(default_factory=list)  # [(swap name, target, record)]


# ------------------------------------------------------------------------------------- the swaps


def _apply_processors(tr, st: AccelerateState):
    original = dict(tr.attn_processors)
    proc = CrossTileAttnProcessor(st.context)
    new = {k: (proc if k.endswith("attn1.processor") else v) for k, v in original.items()}
    if not any(k.endswith("attn1.processor") for k in original):
        raise ValueError("accelerate: the transformer has no self-attention (attn1) processors; is it PixArt?")
    tr.set_attn_processor(new)
    return original


def _revert_processors(tr, original):
    tr.set_attn_processor(original)


def _apply_pos_embed(tr, st: AccelerateState):
    pe = tr.pos_embed
    if type(pe).__name__ != "PatchEmbed" and not isinstance(pe, CanvasPatchEmbed):
        raise ValueError(f"accelerate: unsupported pos_embed {type(pe).__name__} (expected diffusers PatchEmbed)")
    old_cls = type(pe)
    pe.__class__ = CanvasPatchEmbed  # same object, parameters and state-dict keys; only forward changes
    pe._td_state = st.context
    return old_cls


def _revert_pos_embed(tr, old_cls):
    pe = tr.pos_embed
    pe.__class__ = old_cls
    pe.__dict__.pop("_td_state", None)


def _apply_token_order(tr, st: AccelerateState):
    """Tokens leave the blocks tile-major; norm_out is token-wise, so put them back to raster before it (the
    unpatchify after proj_out needs raster order)."""
    ctx = st.context

    def to_raster(module, args):
        if ctx.grid is None:
            return None
        return (ctx.from_tile_major(args[0]),) + tuple(args[1:])

    return tr.norm_out.register_forward_pre_hook(to_raster)


def _revert_token_order(tr, handle):
    handle.remove()


def _apply_int8(module, mode: str, exclude, keep: bool, embeddings: bool = False):
    originals = {n: m for n, m in module.named_modules() if type(m) is nn.Linear} if keep else None
    swapped = int8.quantize_model(module, mode=mode, exclude=exclude)
    if not keep:  # inference only: on the CPU, w8a8 layers keep just the kernel's packed weight (half the bytes)
        for m in module.modules():
            if isinstance(m, int8.Int8Linear):
                m.pack_only_()
    tables = int8.quantize_embeddings(module) if embeddings else []
    if keep:  # state_dict / save_pretrained then write these exact float weights (int8.py's docstring)
        for name in swapped:
            module.get_submodule(name).attach_original(originals[name])
        for emb, q, _ in tables:
            if q._original is None:
                q.attach_original(emb)
    return {"swapped": swapped, "originals": {n: originals[n] for n in swapped} if keep else None,
            "embeddings": tables}


def _revert_int8(module, rec):
    int8.restore_embeddings(module, rec["embeddings"], keep_original=rec["originals"] is not None)
    if rec["originals"] is None:
        int8.restore_linears(module)
        return
    for name, lin in rec["originals"].items():
        q = module.get_submodule(name)
        if isinstance(q, int8.Int8Linear):  # the original followed its dtype casts; it joins it on its device too
            q.attach_original(None)
            lin.to(q.weight_scale.device)
        int8._set_submodule(module, name, lin)


def _apply_transformer_int8(tr, st: AccelerateState):
    return _apply_int8(tr, st.int8, int8.PIXART_KEEP_HIGH_PRECISION, st.keep_original_weights)


def quantize_text_encoder(te, keep_original_weights: bool = False) -> dict:
    """T5 weight-only int8: its linear layers (w8a16) and its token table (32128×4096, 0.25 GB in bf16; only
    ~120 rows are read per prompt). Layers already int8 (loading.load_pipeline) are left as they are. Returns the
    record `_revert_int8` undoes."""
    return _apply_int8(te, "w8a16", (), keep_original_weights, embeddings=True)


def _apply_text_encoder_int8(te, st: AccelerateState):
    return quantize_text_encoder(te, st.keep_original_weights)


def _apply_canvas_forward(tr, st: AccelerateState):
    """The transformer's forward becomes the canvas forward (canvas.py): class swap, same object and weights."""
    old_cls = type(tr)
    tr.__class__ = canvas_class(old_cls)
    return old_cls


def _revert_class(obj, old_cls):
    obj.__class__ = old_cls


def _bin_area(pipe) -> int:
    """The largest area (px²) among the resolution bins the pipeline would snap a request to; 0 for a model
    without bins of its training size in pixels (sample_size × VAE factor other than 256/512/1024/2048, e.g. the
    lab model's 128: diffusers picks its table by sample_size alone, as if every VAE were f8, so an f4 model's
    requests would be snapped to bins of twice its size)."""
    bins = {2048: "ASPECT_RATIO_2048_BIN", 1024: "ASPECT_RATIO_1024_BIN", 512: "ASPECT_RATIO_512_BIN",
            256: "ASPECT_RATIO_256_BIN"}
    sample = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    table = getattr(pa, bins.get(sample, ""), None)
    if table is None:
        table = getattr(ps, bins.get(sample, ""), None)
    if table is None:
        return 0
    return int(max(float(h) * float(w) for h, w in table.values()))


class _TiledCall:
    """Mixin placed before an accelerated pipeline's class: its `__call__` generates the canvas asked for.

    diffusers' default `use_resolution_binning=True` snaps every request to the nearest ~1-megapixel aspect-ratio
    bin and resizes the result: a 4096² request would silently become a 1024² generation. Rule: a request no
    larger than the largest bin keeps diffusers' behaviour (binning as asked); a larger one is generated at the
    requested size with binning off — with a warning when `use_resolution_binning=True` was passed explicitly.
    """

    def __call__(self, *args, **kwargs):
        binning = kwargs.pop("use_resolution_binning", None)
        sample_px = self.transformer.config.sample_size * self.vae_scale_factor
        h, w = kwargs.get("height") or sample_px, kwargs.get("width") or sample_px
        above = h * w > _bin_area(self)
        if above:
            if binning:
                warnings.warn(f"tiled_diffusion: use_resolution_binning=True would generate a ~{sample_px}² bin "
                              f"and resize it to {w}x{h}; the accelerated pipeline generates the {w}x{h} canvas "
                              f"instead (binning is only applied up to the bins' size)", stacklevel=2)
            binning = False
        elif binning is None:
            binning = True
        return super().__call__(*args, use_resolution_binning=binning, **kwargs)


@functools.lru_cache(maxsize=None)
def _call_class(cls: type) -> type:
    """The accelerated pipeline class (keeps the base __name__: diffusers saves it as `_class_name`)."""
    return type(cls.__name__, (_TiledCall, cls), {"__module__": __name__, "__qualname__": f"Tiled{cls.__name__}"})


def _apply_pipeline_call(pipe, st: AccelerateState):
    old_cls = type(pipe)
    pipe.__class__ = _call_class(old_cls)
    return old_cls


def decode_latents(vae, z: torch.Tensor, max_memory_gb: Optional[float] = None, dist=None) -> Optional[torch.Tensor]:
    """VAE-decode latents z [B, 4, h, w] (already divided by the scaling factor) to images [B, 3, H, W] in
    [-1, 1]: `vae.decode` (vae.py) — the plain decode when it fits the free memory, else banded with exact
    canvas-wide GroupNorm statistics; over the ranks of `dist` (a parallel.comm.Dist) in parallel, the image on rank
    0 and None elsewhere. The one decode every path of the package uses."""
    with phase("vae_decode"):
        if dist is not None:
            return parallel_vae.decode(vae, z.to(vae.dtype), dist, max_memory_gb=max_memory_gb)
        return vae_mod.decode(vae, z.to(vae.dtype), max_memory_gb=max_memory_gb)


def _apply_vae_decode(vae, st: AccelerateState):
    """`vae.decode` (what diffusers' pipelines call) becomes `decode_latents`; an instance attribute over the
    class method, so revert is deleting it."""
    if "decode" in vae.__dict__:
        raise RuntimeError("accelerate: pipe.vae.decode is already replaced by someone else; undo that first")

    def decode(z, return_dict: bool = True, generator=None):
        image = decode_latents(vae, z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    vae.decode = decode
    return None


def _revert_vae_decode(vae, _):
    vae.__dict__.pop("decode", None)


# (name, which component, when, apply, revert). int8 runs first so that the hooks attach to the final modules.
SWAPS: list[tuple[str, str, Callable[[AccelerateState], bool], Callable, Callable]] = [
    ("int8_linears", "transformer", lambda s: s.int8 is not None, _apply_transformer_int8, _revert_int8),
    ("text_encoder_int8", "text_encoder", lambda s: s.text_encoder_int8, _apply_text_encoder_int8, _revert_int8),
    ("attn1_processors", "transformer", lambda s: True, _apply_processors, _revert_processors),
    ("canvas_pos_embed", "transformer", lambda s: True, _apply_pos_embed, _revert_pos_embed),
    ("token_order_hook", "transformer", lambda s: True, _apply_token_order, _revert_token_order),
    ("canvas_forward", "transformer", lambda s: True, _apply_canvas_forward, _revert_class),
    ("tiled_vae_decode", "vae", lambda s: True, _apply_vae_decode, _revert_vae_decode),
    ("pipeline_call", "pipeline", lambda s: True, _apply_pipeline_call, _revert_class),
]


def _components(obj) -> dict:
    if hasattr(obj, "transformer"):
        return {"transformer": obj.transformer, "text_encoder": getattr(obj, "text_encoder", None),
                "vae": getattr(obj, "vae", None), "pipeline": obj}
    if hasattr(obj, "transformer_blocks") and hasattr(obj, "pos_embed"):
        return {"transformer": obj, "text_encoder": None, "vae": None, "pipeline": None}
    raise TypeError(f"accelerate: expected a PixArt pipeline or PixArtTransformer2DModel, got {type(obj).__name__}")


def accelerate(pipe, mode: str = "cross_tile", tile: Optional[int] = None, radius: int = 1, shift: bool = False,
               overlap: float = 0.5, profile: str = "cosine", int8: Optional[str] = "auto",
               text_encoder_int8: bool = True, positional: str = "canvas_stretched",
               tile_batch_size: Optional[int] = None, head_chunk: Optional[int] = None,
               keep_original_weights: bool = True, window: Optional[float] = DEFAULT_WINDOW,
               stride: float = DEFAULT_STRIDE):
    """Swap the tiled-generation modules into `pipe` (in place) and return it.

    Calling it again with the same settings is a no-op; with different settings it raises (restore first).
    int8: "auto" | "w8a8" | "w8a16" | None for the transformer's linear layers (PIXART_KEEP_HIGH_PRECISION stay
    float); "auto" (default) takes W8A8 only where it was measured faster than bf16 on the device the transformer
    is on now (`int8.resolve_mode`; the reason is logged at INFO);
    text_encoder_int8: T5 weight-only int8 (pipelines only). tile: pixels, default per mode
    (core.config.DEFAULT_TILE_PX: 512 for cross_tile, 1024 for multidiffusion). window / stride: cross_tile's
    token-centred windows in multiples of the model's training size (window=None: tile-blocked windows of
    (2·radius+1) tiles). Other knobs: see core.config.TiledConfig.
    Afterwards `pipe(...)` itself is tiled (canvas.py). One acceleration state per transformer: any pipeline built
    on it (`PixArtSigmaPipeline(**pipe.components)`) runs it tiled; `accelerate(other)` with the same settings
    gives `other` the swaps that belong to it (its `__call__`, a text encoder or VAE it does not share) and
    `restore` through any of them reverts them all. Other settings raise (restore first).
    keep_original_weights=False is the inference-only, least-memory setting: the float layers are not kept (restore
    rebuilds them from the int8 weights) and, on the CPU, W8A8 layers keep only the kernel's packed weight.
    """
    comps = _components(pipe)
    tr = comps["transformer"]
    if int8 not in (None, "auto", "w8a8", "w8a16"):
        raise ValueError(f"int8 must be 'auto', 'w8a8', 'w8a16' or None, got {int8!r}")
    int8 = resolve_mode(int8, next(tr.parameters()).device)[0]
    cfg = TiledConfig(mode=mode, tile=tile, radius=radius, shift=shift, overlap=overlap, profile=profile,
                      positional=positional, tile_batch_size=tile_batch_size, head_chunk=head_chunk,
                      window=window, stride=stride).validate()
    te_int8 = bool(text_encoder_int8 and comps["text_encoder"] is not None)
    existing: Optional[AccelerateState] = getattr(tr, "_tiled_diffusion", None)
    if existing is not None:
        same = (existing.config == cfg and existing.int8 == int8 and existing.text_encoder_int8 == te_int8
                and existing.keep_original_weights == keep_original_weights)
        if not same:
            raise RuntimeError("accelerate: this transformer is already accelerated with other settings (mode "
                               f"{existing.config.mode}, int8={existing.int8}, text_encoder_int8="
                               f"{existing.text_encoder_int8}); call tiled_diffusion.restore(pipe) first")
        _attach(existing, comps)
        return pipe
    vsf = getattr(comps["pipeline"], "vae_scale_factor", None) or 8
    st = AccelerateState(cfg, TileContext(cfg), int8, te_int8, keep_original_weights, vae_scale_factor=vsf,
                         owner=weakref.ref(pipe))
    try:
        for name, comp, when, apply, _ in SWAPS:
            target = comps[comp]
            if target is not None and when(st):
                st.records.append((name, target, apply(target, st)))
    except Exception:
        _revert_records(st)
        raise
    tr._tiled_diffusion = st
    return pipe


def _attach(st: AccelerateState, comps: dict) -> None:
    """Apply to another pipeline on the same transformer the swaps whose component it does not share with the
    pipelines already accelerated (at least its own class; a text encoder or VAE of its own too)."""
    done = {(name, id(target)) for name, target, _ in st.records}
    mark = len(st.records)
    try:
        for name, comp, when, apply, _ in SWAPS:
            target = comps[comp]
            if comp != "transformer" and target is not None and when(st) and (name, id(target)) not in done:
                if comp == "pipeline" and isinstance(target, _TiledCall):
                    continue  # accelerated through a transformer it shares with another pipeline before
                st.records.append((name, target, apply(target, st)))
    except Exception:
        while len(st.records) > mark:
            name, target, rec = st.records.pop()
            {n: r for n, _, _, _, r in SWAPS}[name](target, rec)
        raise


def _revert_records(st: AccelerateState) -> None:
    reverts = {name: revert for name, _, _, _, revert in SWAPS}
    while st.records:
        name, target, rec = st.records.pop()
        reverts[name](target, rec)


def restore(pipe):
    """Undo accelerate(pipe) exactly (modules, processors, classes, hooks) — for every pipeline sharing its
    transformer; returns pipe. No-op if not accelerated."""
    tr = _components(pipe)["transformer"]
    st: Optional[AccelerateState] = getattr(tr, "_tiled_diffusion", None)
    if st is None:
        return pipe
    _revert_records(st)  # every pipeline accelerated on this transformer (see accelerate)
    del tr._tiled_diffusion
    return pipe


def state(pipe) -> AccelerateState:
    st = getattr(_components(pipe)["transformer"], "_tiled_diffusion", None)
    if st is None:
        raise RuntimeError("the pipeline is not accelerated: call tiled_diffusion.accelerate(pipe) first")
    return st
