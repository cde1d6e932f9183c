"""Images for the pipeline: I/O (any PIL mode to RGB, one-line errors), resizing and padding to whole tokens, the
VAE encode of an image, the ControlNet's control latent and img2img's noised starting canvas: one place for what
img2img, upscale and the ControlNet's control image share (the entry points themselves are in api.py).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, UnidentifiedImageError

from ..core.config import TOKEN_MULTIPLE
from ..vae import banded as tvae
from .sampler import set_timesteps


class ImageError(ValueError):
    """An input image that cannot be used (one-line message)."""


def load_image(path: str):
    """A PIL RGB image from `path`. Greyscale and palette images are converted; RGBA/LA are composited on white
    (transparent pixels become white, as most viewers show them); 16-bit greyscale is scaled to 8 bits (the VAE
    input is 8-bit precision anyway). Missing or unreadable files, and float images, -> ImageError."""
    if not os.path.exists(path):
        raise ImageError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:  # bombs: > 179 MP
        raise ImageError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return to_rgb(img, source=path)


def to_rgb(img, source: str = "image"):
    """Any PIL mode -> RGB (see load_image)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a8 = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if mode in ("F",):
        raise ImageError(f"{source}: floating-point images (mode F) are not supported; save it as 8- or 16-bit PNG")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{source}: cannot convert mode {mode} to RGB ({e})") from None


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float32 [1, 3, H, W] in [-1, 1] (what the VAE encoder expects)."""
    a = torch.from_numpy(np.asarray(to_rgb(img), dtype=np.float32).copy())
    return (a.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_image(vae, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8] × scaling factor. The latent distribution's
    mean, not a sample (diffusers' img2img samples it with the seed): the same image always starts from the
    same latent, and the seed only draws the noise.
    The one place that calls the VAE encoder: `tiled_diffusion.vae.banded.encode` (tiled/banded) when it exists."""
    x = images.to(device=vae.device, dtype=vae.dtype)
    tiled = getattr(tvae, "encode", None)
    if tiled is not None:  # banded when the plain encode would not fit (vae.py)
        lat = tiled(vae, x, sample=False, progress=False)
    else:
        lat = vae.encode(x).latent_dist.mean
    return lat * vae.config.scaling_factor


@torch.no_grad()
def control_latent(vae, image, height: int, width: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The control latent of `image` (a PIL image, a path, or a float tensor [B, 3, H, W] in [-1, 1]) for a
    height × width canvas: resized to the canvas (Lanczos), VAE-encoded (mean of the latent distribution:
    deterministic; upstream samples it, which differs by the VAE's tiny posterior std) × scaling factor.
    Returns [B, C_latent, height / 8, width / 8]."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    if not torch.is_tensor(image):
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        image = to_tensor(image)
    elif tuple(image.shape[-2:]) != (height, width):
        image = torch.nn.functional.interpolate(image.float(), size=(height, width), mode="bicubic",
                                                align_corners=False).clamp(-1, 1)
    lat = encode_image(vae, image)
    return lat.to(dtype) if dtype is not None else lat


# ------------------------------------------------------------------------------------------ strength


def check_strength(strength: float, steps: int, scheduler=None) -> None:
    """An LCM schedule started at `strength` picks `steps` timesteps out of original_inference_steps × strength
    (diffusers' LCMScheduler.set_timesteps): refuse what it cannot do, saying why."""
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ImageError(f"strength must be in (0, 1], got {strength!r}")
    orig = getattr(getattr(scheduler, "config", None), "original_inference_steps", None) or 50
    if int(orig * strength) < steps:
        raise ImageError(f"strength {strength:g} with {steps} steps: an LCM schedule needs original_inference_steps "
                         f"× strength ≥ steps ({orig} × {strength:g} = {int(orig * strength)} < {steps}); use "
                         f"strength ≥ {steps / orig:g} or fewer steps")


# ----------------------------------------------------------------------------------- sizes and padding



def padded_size(width: int, height: int, multiple: int = TOKEN_MULTIPLE) -> tuple[int, int]:
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def prepare_image(image, width: int, height: int, multiple: int = TOKEN_MULTIPLE) -> torch.Tensor:
    """`image` (PIL, path, or [B, 3, H, W] in [-1, 1]) resized to width × height (Lanczos for PIL) and padded by
    reflection on the right and bottom to multiples of `multiple` -> [B, 3, H16, W16] in [-1, 1]. Crop the
    result back with `[..., :height, :width]` (in pixels)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    if not torch.is_tensor(image):
        image = to_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        x = to_tensor(image)
    else:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ImageError(f"image tensor must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
        x = image.float()
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
    pw, ph = padded_size(width, height, multiple)
    if (pw, ph) != (width, height):
        # reflect needs pad < size; tiny images fall back to replicating the edge
        mode = "reflect" if pw - width < width and ph - height < height else "replicate"
        x = F.pad(x, (0, pw - width, 0, ph - height), mode=mode)
    return x


# ------------------------------------------------------------------------------------------ the latents


@torch.no_grad()
def image_latents(pipe, image, *, width: int, height: int, strength: float, steps: int, generator,
                  timings: Optional[dict] = None) -> torch.Tensor:
    """The starting canvas of img2img: `image` (PIL / path / tensor) at width × height (multiples of 16),
    VAE-encoded (× scaling factor) and noised to the first timestep of the LCM schedule started at `strength`
    (diffusers' LCM img2img: `scheduler.add_noise(latents, noise, timesteps[:1])`; noise drawn from `generator`).
    Returns [B, C, height/8, width/8] in the transformer's dtype."""
    check_strength(strength, steps, pipe.scheduler)
    t0 = time.perf_counter()
    x = prepare_image(image, width, height)
    if tuple(x.shape[-2:]) != (height, width):
        raise ImageError(f"img2img canvas {width}x{height} must be multiples of {TOKEN_MULTIPLE} px "
                         f"(img2img.img2img pads any size)")
    lat = encode_image(pipe.vae, x)
    if timings is not None:
        timings["encode_s"] = time.perf_counter() - t0
    device = pipe.transformer.device
    lat = lat.to(device=device, dtype=pipe.transformer.dtype)
    t_first = set_timesteps(pipe.scheduler, steps, device, strength)[:1]
    noise = randn_tensor(tuple(lat.shape), generator=generator, device=device, dtype=lat.dtype)
    return pipe.scheduler.add_noise(lat, noise, t_first)
