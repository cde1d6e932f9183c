"""Tiled img2img and upscale: an existing image, encoded, noised to a strength and denoised on the tiled canvas.

Image I/O and the VAE encode used by img2img, upscale and the ControlNet's control image live here (one place).
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class ImageError(ValueError):
    """An input image that cannot be used (one-line message)."""


def load_image(path: str):
    """A PIL RGB image from `path`. Greyscale and palette images are converted; RGBA/LA are composited on white
    (transparent pixels become white, as most viewers show them); 16-bit greyscale is scaled to 8 bits (the VAE
    input is 8-bit precision anyway). Missing or unreadable files, and float images, -> ImageError."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise ImageError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return to_rgb(img, source=path)


def to_rgb(img, source: str = "image"):
    """Any PIL mode -> RGB (see load_image)."""
    import numpy as np
    from PIL import Image

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
    import numpy as np

    a = torch.from_numpy(np.asarray(to_rgb(img), dtype=np.float32).copy())
    return (a.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_image(vae, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8] × scaling factor (the latent distribution's
    mean). The one place that calls the VAE encoder: the tiled encode when `tiled_diffusion.vae` has one."""
    from . import vae as tvae

    x = images.to(device=vae.device, dtype=vae.dtype)
    tiled = getattr(tvae, "encode", None)
    if tiled is not None:
        lat = tiled(vae, x)
    else:
        lat = vae.encode(x).latent_dist.mean
    return lat * vae.config.scaling_factor
