"""`tiled-diffusion upscale` (its guidance flags: cli/guidance.py, shared with `generate`).

upscale: an image resized (Lanczos), tiled-encoded, noised to a strength, denoised on the tiled canvas (optionally
under a ControlNet) and tiled-decoded; PNG written atomically, per-stage timings and peak memory reported. The
stages reuse `cli.generate`'s (two-stage text encoding, loading, accelerate, atomic write, peak memory); the
img2img steps themselves are `pipeline.upscale` -> `pipeline.generate(image=, strength=)`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from types import SimpleNamespace

from PIL import Image
from . import generate as G
from .guidance import check_guidance
from ..model.controlnet import ControlNetError
from ..model.regions import RegionError
from ..pipeline import api, images as I
from ..pipeline.edges import soft_edges
from ..pipeline.images import ImageError


# -------------------------------------------------------------------------------------------- upscale


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (G.RequestError, ImageError, ControlNetError, RegionError) as e:  # a bad request: one line, no traceback
        print(f"tiled-diffusion upscale: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    image = I.load_image(args.image)  # missing / unreadable: one line, before anything loads
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise I.ImageError(f"--scale must be a finite number > 0, got {args.scale}")
    w, h = (max(1, round(v * args.scale)) for v in image.size)
    I.check_strength(args.strength, args.steps)
    guidance = check_guidance(args, w, h, control_required=False)
    padded = I.padded_size(w, h)
    cfg = G.validate(SimpleNamespace(**{**vars(args), "size": padded}))
    su = G.setup(args)
    G.check_request_memory(args, cfg, su, *padded)  # against the machine's memory, before anything loads
    embeds, mask = G.encode_prompt(args, su.device, su.dtype, su.text_encoder_int8, timings)
    pipe, extra = G.prepare_pipeline(args, cfg, su, timings, guidance)
    if guidance.controlnet and guidance.control_image is None:  # the input's own soft edges, at the output size
        extra["control_image"] = soft_edges(image.resize((w, h), Image.LANCZOS))

    out = api.upscale(pipe, image, scale=args.scale, strength=args.strength, steps=args.steps, seed=args.seed,
                    timings=timings, prompt_embeds=(embeds, mask), guidance_scale=args.guidance_scale,
                    progress=True, **extra)[0]
    G.release_freed_memory()
    G.write_outputs(args, out, su, timings, t_all,
                    f"{image.size[0]}x{image.size[1]} -> {w}x{h}, strength {args.strength:g}, {cfg.mode}, "
                    f"{args.steps} steps",
                    {"input_size": list(image.size), "size": [w, h], "scale": args.scale, "strength": args.strength,
                     "mode": cfg.mode, "steps": args.steps, "controlnet": args.controlnet})
    return 0
