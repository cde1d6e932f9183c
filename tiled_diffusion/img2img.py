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
    """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8] × scaling factor. The latent distribution's
    mean, not a sample (diffusers' img2img samples it with the seed): the same image always starts from the
    same latent, and the seed only draws the noise.
    The one place that calls the VAE encoder: `tiled_diffusion.vae.encode` (tiled/banded) when it exists."""
    from . import vae as tvae

    x = images.to(device=vae.device, dtype=vae.dtype)
    tiled = getattr(tvae, "encode", None)
    if tiled is not None:  # banded when the plain encode would not fit (vae.py)
        lat = tiled(vae, x, sample=False, progress=False)
    else:
        lat = vae.encode(x).latent_dist.mean
    return lat * vae.config.scaling_factor


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

MULTIPLE = 16  # VAE factor 8 × patch 2: every canvas is a whole number of tokens


def padded_size(width: int, height: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def prepare_image(image, width: int, height: int, multiple: int = MULTIPLE) -> torch.Tensor:
    """`image` (PIL, path, or [B, 3, H, W] in [-1, 1]) resized to width × height (Lanczos for PIL) and padded by
    reflection on the right and bottom to multiples of `multiple` -> [B, 3, H16, W16] in [-1, 1]. Crop the
    result back with `[..., :height, :width]` (in pixels)."""
    import torch.nn.functional as F

    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    if not torch.is_tensor(image):
        from PIL import Image

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
    import time

    from diffusers.utils.torch_utils import randn_tensor

    from .sampler import set_timesteps

    check_strength(strength, steps, pipe.scheduler)
    t0 = time.perf_counter()
    x = prepare_image(image, width, height)
    if tuple(x.shape[-2:]) != (height, width):
        raise ImageError(f"img2img canvas {width}x{height} must be multiples of {MULTIPLE} px "
                         f"(img2img.img2img pads any size)")
    lat = encode_image(pipe.vae, x)
    if timings is not None:
        timings["encode_s"] = time.perf_counter() - t0
    device = pipe.transformer.device
    lat = lat.to(device=device, dtype=pipe.transformer.dtype)
    t_first = set_timesteps(pipe.scheduler, steps, device, strength)[:1]
    noise = randn_tensor(tuple(lat.shape), generator=generator, device=device, dtype=lat.dtype)
    return pipe.scheduler.add_noise(lat, noise, t_first)


def img2img(pipe, prompt, image, *, strength: float = 0.5, steps: int = 4, seed: int = 0,
            width: Optional[int] = None, height: Optional[int] = None, timings: Optional[dict] = None,
            **generate_kwargs):
    """Tiled img2img of an image of any size: resized to width × height (default: the image's size), padded to
    multiples of 16, generated (`pipeline.generate(..., image=, strength=)`) and cropped back. Returns a list of
    PIL images of width × height (other `output_type`s: the padded canvas's output as generate returns it)."""
    import time

    from . import pipeline as P

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    if torch.is_tensor(image):
        h0, w0 = image.shape[-2:]
    else:
        image = to_rgb(image)
        w0, h0 = image.size
    width, height = width or w0, height or h0
    x = prepare_image(image, width, height)
    timings["resize_s"] = time.perf_counter() - t0
    ph, pw = x.shape[-2:]
    if prompt is None and "prompt_embeds" not in generate_kwargs:
        prompt = ""
    out = P.generate(pipe, prompt, width=pw, height=ph, steps=steps, seed=seed, image=x, strength=strength,
                     timings=timings, **generate_kwargs)
    if isinstance(out, list):  # PIL images: the padding cropped off
        return [im.crop((0, 0, width, height)) for im in out]
    return out  # other output types are of the padded canvas


def upscale(pipe, image, *, scale: float = 4.0, strength: float = 0.4, prompt: Optional[str] = None, steps: int = 4,
            seed: int = 0, timings: Optional[dict] = None, **generate_kwargs):
    """Upscale by `scale`: Lanczos resize, tiled encode, noise to `strength`, tiled denoise, tiled decode.
    Returns a list with one PIL image of round(scale × size). prompt None: the empty prompt, unless
    `prompt_embeds=` is among the generate keyword arguments."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    image = to_rgb(image)
    if not scale > 0:
        raise ImageError(f"scale must be > 0, got {scale!r}")
    w, h = (max(1, round(v * scale)) for v in image.size)
    return img2img(pipe, prompt, image, strength=strength, steps=steps, seed=seed, width=w, height=h,
                   timings=timings, **generate_kwargs)
