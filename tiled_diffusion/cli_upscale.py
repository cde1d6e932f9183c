"""`tiled-diffusion upscale`, and the guidance flags shared with `generate` (--controlnet, --control-image,
--control-scale, --region).

upscale: an image resized (Lanczos), tiled-encoded, noised to a strength, denoised on the tiled canvas (optionally
under a ControlNet) and tiled-decoded; PNG written atomically, per-stage timings and peak memory reported. The
stages reuse `cli_generate`'s (two-stage text encoding, loading, accelerate, atomic write, peak memory); the
img2img steps themselves are `img2img.upscale` -> `pipeline.generate(image=, strength=)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from types import SimpleNamespace
from typing import Optional


# ------------------------------------------------------------------------------ guidance flags (both commands)


def add_guidance_arguments(p: argparse.ArgumentParser, regions: bool = True) -> None:
    p.add_argument("--controlnet", default=None,
                   help="a PixArt ControlNet checkpoint: diffusers folder / .safetensors with config.json, or an "
                        "upstream PixArt-alpha .pth")
    p.add_argument("--control-image", default=None,
                   help="control image for --controlnet (e.g. a HED edge map; `edges:PATH` = soft edges of PATH "
                        "computed here)" + ("" if regions else "; default: soft edges of the resized input"))
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    if regions:
        p.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:PROMPT",
                       help="a prompt for a rectangle of the canvas in pixels (repeatable; --prompt is the "
                            "background)")


@dataclasses.dataclass
class Guidance:
    """What the guidance flags asked for, checked before anything heavy loads."""

    controlnet: Optional[str] = None
    control_image: object = None  # PIL image, or None (upscale: the input's edges)
    control_scale: float = 1.0
    regional: object = None  # regions.RegionalPrompts or None

    def encode(self, encode_fn, prompt: str, guidance_scale: float):
        """(embeds, mask): the prompt, or every distinct prompt of the regions (each once, concatenated)."""
        if self.regional is None:
            return encode_fn(prompt)
        return self.regional.encode(encode_fn, guidance_scale)

    def generate_kwargs(self, pipe) -> dict:
        """Keyword arguments for `pipeline.generate` (loads the ControlNet for pipe's transformer)."""
        kw: dict = {}
        if self.regional is not None:
            kw["regions"] = self.regional
        if self.controlnet:
            from .controlnet import PixArtControlNet

            kw.update(controlnet=PixArtControlNet.load(self.controlnet, pipe.transformer),
                      control_image=self.control_image, control_scale=self.control_scale)
        return kw


def check_guidance(args, width: int, height: int, control_required: bool = True) -> Guidance:
    """Parse and check --region / --controlnet / --control-image (one-line errors) for a width × height canvas."""
    from .controlnet import ControlNetError
    from .img2img import load_image
    from .regions import RegionalPrompts

    g = Guidance(control_scale=getattr(args, "control_scale", 1.0))
    if getattr(args, "region", None):
        g.regional = RegionalPrompts(args.prompt, args.region, width, height)
    net, image = getattr(args, "controlnet", None), getattr(args, "control_image", None)
    if image and not net:
        raise ControlNetError("--control-image needs --controlnet")
    if net:
        if not os.path.exists(net):
            raise ControlNetError(f"--controlnet {net!r}: not found")
        if image:
            edges = image.startswith("edges:")
            g.control_image = load_image(image[len("edges:"):] if edges else image)
            if edges:
                from .edges import soft_edges

                g.control_image = soft_edges(g.control_image)
        elif control_required:
            raise ControlNetError("--controlnet needs --control-image (an edge map, or edges:PATH)")
        g.controlnet = net
    return g


# -------------------------------------------------------------------------------------------- upscale


def add_arguments(u: argparse.ArgumentParser) -> None:
    u.add_argument("--image", required=True, help="input image (PNG/JPEG/...; RGBA, greyscale and 16-bit handled)")
    u.add_argument("--scale", type=float, default=4.0, help="output size = scale × input size")
    u.add_argument("--strength", type=float, default=0.4,
                   help="where the schedule starts (near 0: keep the input, 1: from pure noise)")
    u.add_argument("--prompt", default="", help="what the image shows (helps the model add matching detail)")
    u.add_argument("--steps", type=int, default=4, help="LCM steps (original_inference_steps × strength ≥ steps)")
    u.add_argument("--model", default="tiny", help="a local diffusers PixArt folder, or 'tiny'")
    u.add_argument("--mode", choices=["cross_tile", "multidiffusion", "global"], default="cross_tile")
    u.add_argument("--tile", type=int, default=None, help="tile size in pixels (default per mode)")
    u.add_argument("--radius", type=int, default=1)
    u.add_argument("--overlap", type=float, default=0.5)
    u.add_argument("--profile", choices=["uniform", "linear", "cosine", "gaussian"], default="cosine")
    u.add_argument("--int8", choices=["auto", "w8a8", "none"], default="auto")
    u.add_argument("--guidance-scale", type=float, default=0.0)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    u.add_argument("--device", default=None)
    add_guidance_arguments(u, regions=False)
    u.add_argument("--out", default="upscaled.png")
    u.add_argument("--json", default=None, help="write per-stage timings and peak memory here")


def main(args: argparse.Namespace) -> int:
    from .cli_generate import RequestError
    from .controlnet import ControlNetError
    from .img2img import ImageError
    from .regions import RegionError

    try:
        return run(args)
    except (RequestError, ImageError, ControlNetError, RegionError) as e:  # a bad request: one line, no traceback
        print(f"tiled-diffusion upscale: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from . import cli_generate as G
    from . import img2img as I

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    image = I.load_image(args.image)  # missing / unreadable: one line, before anything loads
    if not args.scale > 0:
        raise I.ImageError(f"--scale must be > 0, got {args.scale}")
    w, h = (max(1, round(v * args.scale)) for v in image.size)
    I.check_strength(args.strength, args.steps)
    guidance = check_guidance(args, w, h, control_required=False)
    cfg = G.validate(SimpleNamespace(**{**vars(args), "size": I.padded_size(w, h)}))
    su = G.setup(args)
    embeds, mask = G.encode_prompt(args, su.device, su.dtype, su.text_encoder_int8, timings)
    pipe, extra = G.prepare_pipeline(args, cfg, su, timings, guidance)
    if guidance.controlnet and guidance.control_image is None:  # the input's own soft edges, at the output size
        from PIL import Image

        from .edges import soft_edges

        extra["control_image"] = soft_edges(image.resize((w, h), Image.LANCZOS))

    out = I.upscale(pipe, image, scale=args.scale, strength=args.strength, steps=args.steps, seed=args.seed,
                    timings=timings, prompt_embeds=(embeds, mask), guidance_scale=args.guidance_scale,
                    progress=True, **extra)[0]
    G.release_freed_memory()
    G.write_outputs(args, out, su, timings, t_all,
                    f"{image.size[0]}x{image.size[1]} -> {w}x{h}, strength {args.strength:g}, {cfg.mode}, "
                    f"{args.steps} steps",
                    {"input_size": list(image.size), "size": [w, h], "scale": args.scale, "strength": args.strength,
                     "mode": cfg.mode, "steps": args.steps, "controlnet": args.controlnet})
    return 0
