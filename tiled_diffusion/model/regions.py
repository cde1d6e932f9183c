"""Regional prompts: a different prompt per rectangle of the canvas, the main prompt as the background.

A region is `x0,y0,x1,y1:prompt` in image pixels. Regions are layered over the background in the order given
(later ones on top), each with a soft edge (`feather` pixels wide, centred on the rectangle's edge; edges on the
canvas border are not feathered), so every latent pixel gets weights over the distinct prompts that sum to 1:
w_background = Π(1 - m_r), w_r = m_r · Π_{later r'}(1 - m_r'). Each distinct prompt is encoded once.

How the weights act, per mode:
- ``cross_tile`` / ``global``: per-token choice of text in cross-attention. The transformer receives the distinct
  prompts concatenated along the sequence ([B, P·S, C]; caption_projection is token-wise, so the projection of the
  concatenation is the concatenation of the projections). `RegionAttnProcessor` (attn2) attends each token to each
  prompt's S keys separately and mixes the P results with the token's weights, so inside a region a token sees
  only its prompt, and at soft edges a blend; the window self-attention then carries the regions into each other
  instead of pasting them. Token weights are the latent weights averaged over each patch, in the patch
  embedding's token order (tile-major when the context has a grid).
- ``multidiffusion``: MultiDiffusion's region blending (Bar-Tal et al. 2023, eq. 5): the canvas forward runs once
  per distinct prompt and the ε predictions are mixed with the latent-pixel weights (P forwards per step).

Layouts: weights fp32 [P, H/f, W/f] (latent pixels of a VAE of factor f, 8 for PixArt); text [B, P·S, C] with prompt p at [p·S, (p+1)·S).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput

VAE_SCALE = 8  # PixArt's VAE; a pipeline with another factor asks `at_scale(pipe.vae_scale_factor)`


class RegionError(ValueError):
    """A region that cannot be used (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int
    y1: int
    prompt: str


def parse_region(text: str) -> Region:
    """`"x0,y0,x1,y1:prompt"` (pixels, x1/y1 exclusive) -> Region."""
    box, sep, prompt = text.partition(":")
    try:
        if not sep:
            raise ValueError
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise RegionError(f"region must be 'x0,y0,x1,y1:prompt' in pixels, got {text!r}") from None
    if not prompt.strip():
        raise RegionError(f"region {text!r} has an empty prompt")
    return Region(x0, y0, x1, y1, prompt.strip())


def _ramp(coords: torch.Tensor, lo: float, hi: float, size: int, feather: float) -> torch.Tensor:
    """1 inside [lo, hi), linear ramps of width `feather` centred on each edge that is inside the canvas."""
    if feather <= 0:
        return ((coords >= lo) & (coords < hi)).float()
    m = torch.ones_like(coords)
    if lo > 0:
        m = m * ((coords - lo) / feather + 0.5).clamp(0, 1)
    if hi < size:
        m = m * ((hi - coords) / feather + 0.5).clamp(0, 1)
    return m


class RegionalPrompts:
    """The background prompt and regions of one canvas; `prompts` are the distinct texts (background first)."""

    def __init__(self, prompt: str, regions: Sequence, width: int, height: int, feather: float = 64.0,
                 vae_scale: int = VAE_SCALE):
        self.width, self.height, self.feather, self.vae_scale = width, height, float(feather), int(vae_scale)
        self.regions = [parse_region(r) if isinstance(r, str) else r for r in regions]
        for r in self.regions:
            if not (0 <= r.x0 < r.x1 <= width and 0 <= r.y0 < r.y1 <= height):
                raise RegionError(f"region {r.x0},{r.y0},{r.x1},{r.y1} is empty or outside the {width}x{height} "
                                  f"canvas")
        self.prompts: list[str] = []
        self.index: list[int] = []  # layer (background, regions...) -> prompt index
        for text in [prompt] + [r.prompt for r in self.regions]:
            if text not in self.prompts:
                self.prompts.append(text)
            self.index.append(self.prompts.index(text))
        self._weights: Optional[torch.Tensor] = None
        self._tokens: dict = {}

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def at_scale(self, vae_scale: int) -> "RegionalPrompts":
        """These regions for a VAE of factor `vae_scale` (self when it is already theirs, else a copy)."""
        if int(vae_scale) == self.vae_scale:
            return self
        out = copy.copy(self)
        out.vae_scale, out._weights, out._tokens = int(vae_scale), None, {}
        return out

    def weights(self) -> torch.Tensor:
        """fp32 [P, H/f, W/f] (f = vae_scale): per latent pixel, the weight of each distinct prompt (sums to 1)."""
        if self._weights is None:
            s = self.vae_scale
            lh, lw = self.height // s, self.width // s
            ys = (torch.arange(lh, dtype=torch.float32) + 0.5) * s
            xs = (torch.arange(lw, dtype=torch.float32) + 0.5) * s
            layers = [torch.ones(lh, lw)]
            for r in self.regions:
                f = min(self.feather, (r.x1 - r.x0) / 2, (r.y1 - r.y0) / 2)
                m = (_ramp(ys, r.y0, r.y1, self.height, f)[:, None]
                     * _ramp(xs, r.x0, r.x1, self.width, f)[None, :])
                layers = [w * (1 - m) for w in layers] + [m]
            out = torch.zeros(self.num_prompts, lh, lw)
            for layer, p in zip(layers, self.index):
                out[p] += layer
            self._weights = out
        return self._weights

    def token_weights(self, patch: int, device, grid=None) -> torch.Tensor:
        """fp32 [N, P]: the weights averaged over each patch, raster order, or tile-major for `grid`."""
        key = (patch, str(device), id(grid))
        w = self._tokens.get(key)
        if w is None:
            pooled = F.avg_pool2d(self.weights()[None], patch)[0]  # [P, Ht, Wt]
            w = pooled.flatten(1).t().contiguous().to(device)
            if grid is not None:
                w = w.index_select(0, grid.permutation(device))
            self._tokens = {key: w}  # one grid at a time (shifted steps alternate two)
        return w

    def encode(self, encode_fn: Callable, guidance_scale: float = 0.0):
        """Text for the transformer: (embeds [B, P·S, C], mask [B, P·S]) with B = 2 (uncond, cond) under CFG, else 1.

        encode_fn(list_of_prompts) -> (embeds, mask) as `pipeline.encode` returns them for that list ([P, S, C],
        or [2P, S, C] with the uncond rows first under CFG); every distinct prompt is encoded once, in one call."""
        embeds, mask = encode_fn(list(self.prompts))
        P = self.num_prompts
        halves = 2 if guidance_scale > 1.0 else 1
        if embeds.shape[0] != P * halves:
            raise RegionError(f"regions: the encoder returned {embeds.shape[0]} rows for {P} prompts")
        S, C = embeds.shape[1:]
        return embeds.reshape(halves, P * S, C), mask.reshape(halves, P * S)

    @contextlib.contextmanager
    def applied(self, transformer, mode: str) -> Iterator["RegionalPrompts"]:
        """Install the regional conditioning on `transformer` for the duration of a `with` block: the attn2
        processor (cross_tile, global) or the per-prompt blend of the forward (multidiffusion)."""
        if mode == "multidiffusion":
            with _blended_forward(transformer, self):
                yield self
            return
        original = dict(transformer.attn_processors)
        proc = RegionAttnProcessor(self, transformer)
        transformer.set_attn_processor({k: (proc if k.endswith("attn2.processor") else v)
                                        for k, v in original.items()})
        try:
            yield self
        finally:
            transformer.set_attn_processor(original)


def _context(transformer):
    st = getattr(transformer, "_tiled_diffusion", None)
    return None if st is None else st.context


class RegionAttnProcessor:
    """Cross-attention (attn2) with a per-token choice among P prompts concatenated in the text sequence.

    hidden_states [B, N, C] in the patch embedding's token order; encoder_hidden_states [B, P·S, C];
    attention_mask: the transformer's additive bias [B, 1, P·S] (or None)."""

    def __init__(self, regional: RegionalPrompts, transformer):
        self.regional = regional
        self.patch = transformer.config.patch_size
        self._transformer = transformer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise RegionError("RegionAttnProcessor is a cross-attention processor (attn2) on [B, N, C] tokens")
        B, N, _ = hidden_states.shape
        P = self.regional.num_prompts
        S = encoder_hidden_states.shape[1] // P
        if S * P != encoder_hidden_states.shape[1]:
            raise RegionError(f"regions: text length {encoder_hidden_states.shape[1]} is not {P} prompts of "
                              f"equal length")
        ctx = _context(self._transformer)
        w = self.regional.token_weights(self.patch, hidden_states.device, getattr(ctx, "grid", None))
        if w.shape[0] != N:
            raise RegionError(f"regions: {N} tokens in this forward but {w.shape[0]} on the canvas (multidiffusion "
                              f"uses the blended forward, not this processor)")
        residual = hidden_states
        query = attn.to_q(hidden_states)
        H = attn.heads
        D = query.shape[-1] // H
        q = query.view(B, N, H, D).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        mixed = None
        for p in range(P):
            wp = w[:, p]
            if not bool((wp > 0).any()):
                continue
            seg = encoder_hidden_states[:, p * S:(p + 1) * S]
            k = attn.to_k(seg).view(B, S, H, D).transpose(1, 2)
            v = attn.to_v(seg).view(B, S, H, D).transpose(1, 2)
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask[..., p * S:(p + 1) * S], S, B)
                mask = mask.view(B, H, -1, mask.shape[-1])
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(B, N, H * D).to(query.dtype)
            if bool((wp == 1).all()):
                mixed = out  # the only prompt of these tokens: exactly its attention
                break
            term = out * wp.to(out.dtype)[None, :, None]
            mixed = term if mixed is None else mixed + term
        out = attn.to_out[0](mixed)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _segments(regional: RegionalPrompts, embeds: torch.Tensor, mask: Optional[torch.Tensor]):
    """(p, text [B, S, C], mask) per distinct prompt of the concatenated text."""
    P = regional.num_prompts
    S = embeds.shape[1] // P
    if S * P != embeds.shape[1]:
        raise RegionError(f"regions: text length {embeds.shape[1]} is not {P} prompts of equal length")
    for p in range(P):
        yield p, embeds[:, p * S:(p + 1) * S], None if mask is None else mask[..., p * S:(p + 1) * S]


def _mix(regional: RegionalPrompts, run: Callable, weights: torch.Tensor) -> torch.Tensor:
    """Σ_p weights[:, p] · run(p): outputs [n, C, h, w], weights [n or 1, P, h, w] (prompts nowhere present are
    not run; a prompt that holds everything is returned as it is)."""
    total = None
    for p in range(regional.num_prompts):
        wp = weights[:, p:p + 1]
        if not bool((wp > 0).any()):
            continue
        out = run(p)
        if bool((wp == 1).all()):
            return out
        term = out * wp.to(out.dtype)
        total = term if total is None else total + term
    return total


@contextlib.contextmanager
def _blended_forward(transformer, regional: RegionalPrompts):
    """multidiffusion: the transformer runs once per prompt with that prompt's text and the outputs are mixed
    with the latent-pixel weights. Both entry points are wrapped: the canvas forward (input = the whole canvas)
    and `multidiffusion_tiles` (the sampler's fused blend + LCM step), whose tile outputs are mixed with the
    weights cropped like the tiles (the seam blend that follows is linear, so both orders agree)."""
    forward = type(transformer).forward
    tiles_fn = getattr(type(transformer), "multidiffusion_tiles", None)
    inside = []  # non-empty while `blended` runs a prompt: the canvas forward's own tile calls pass through

    def blended(hidden_states, encoder_hidden_states=None, *args, encoder_attention_mask=None,
                return_dict: bool = True, **kwargs):
        w = regional.weights().to(hidden_states.device)
        if tuple(w.shape[-2:]) != tuple(hidden_states.shape[-2:]):
            raise RegionError(f"regions: forward input {tuple(hidden_states.shape[-2:])} is not the canvas "
                              f"{tuple(w.shape[-2:])} latent")
        seg = list(_segments(regional, encoder_hidden_states, encoder_attention_mask))

        def run(p):
            inside.append(p)
            try:
                return forward(transformer, hidden_states, seg[p][1], *args, encoder_attention_mask=seg[p][2],
                               return_dict=False, **kwargs)[0]
            finally:
                inside.pop()

        total = _mix(regional, run, w[None])
        return (total,) if not return_dict else _output(total)

    def blended_tiles(x, pgrid, kw, st):
        if inside:
            return tiles_fn(transformer, x, pgrid, kw, st)
        w = regional.weights().to(x.device)[None].expand(x.shape[0], -1, -1, -1)
        seg = list(_segments(regional, kw["encoder_hidden_states"], kw.get("encoder_attention_mask")))

        def run(p):
            return tiles_fn(transformer, x, pgrid, {**kw, "encoder_hidden_states": seg[p][1],
                                                     "encoder_attention_mask": seg[p][2]}, st)

        return _mix(regional, run, pgrid.extract_tiles(w.contiguous()))

    transformer.forward = blended
    if tiles_fn is not None:
        transformer.multidiffusion_tiles = blended_tiles
    try:
        yield
    finally:
        transformer.__dict__.pop("forward", None)
        transformer.__dict__.pop("multidiffusion_tiles", None)


def _output(sample):
    return Transformer2DModelOutput(sample=sample)
