"""The guidance `generate` and `upscale` share (--controlnet, --control-image, --control-scale, --region; the flags
are defined in cli/commands.py): checked before anything heavy loads, then turned into `generate` arguments."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..model.controlnet import ControlNetError, PixArtControlNet
from ..model.regions import RegionalPrompts
from ..pipeline.edges import soft_edges
from ..pipeline.images import load_image


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
            kw.update(controlnet=PixArtControlNet.load(self.controlnet, pipe.transformer),
                      control_image=self.control_image, control_scale=self.control_scale)
        return kw


def check_guidance(args, width: int, height: int, control_required: bool = True) -> Guidance:
    """Parse and check --region / --controlnet / --control-image (one-line errors) for a width × height canvas."""
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
                g.control_image = soft_edges(g.control_image)
        elif control_required:
            raise ControlNetError("--controlnet needs --control-image (an edge map, or edges:PATH)")
        g.controlnet = net
    return g
