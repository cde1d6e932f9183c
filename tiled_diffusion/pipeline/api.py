"""The user-facing stages of one tiled generation with an accelerated pipeline: `encode` (T5, once), `generate`
(denoise the canvas, optionally guided: ControlNet, img2img, regional prompts), `decode` (the VAE), and the image
entry points built on them (`img2img`, `upscale`). `generate(group=)` / `generate_parallel` run the canvas over the
ranks of a process group (parallel/ plugged into the accelerated transformer for the call, then unplugged).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Optional

import torch

from ..model.int8 import module_bytes
from ..model.regions import RegionalPrompts
from .. import parallel as comm
from ..core.profiling import phase
from .images import ImageError, control_latent, image_latents, load_image, prepare_image, to_rgb
from ..core.config import check_size
from .sampler import check_memory, denoise, estimate_memory
from .swaps import decode_latents, state


@torch.no_grad()
def encode(pipe, prompt, negative_prompt: str = "", guidance_scale: float = 0.0, max_sequence_length: int = 120):
    """T5-encode once: returns (embeds, mask), CFG-stacked (uncond first) when guidance_scale > 1."""
    cfg_on = guidance_scale > 1.0
    with phase("encode_prompt"):
        pe, pm, ne, nm = pipe.encode_prompt(prompt, cfg_on, negative_prompt=negative_prompt,
                                            device=pipe._execution_device, clean_caption=False,
                                            max_sequence_length=max_sequence_length)
    if cfg_on:
        return torch.cat([ne, pe]), torch.cat([nm, pm])
    return pe, pm


@torch.no_grad()
def decode(pipe, latents, output_type: str = "pil", max_memory_gb: Optional[float] = None):
    """VAE-decode the canvas (`decode_latents`) and post-process as diffusers' pipelines do ("pil", "pt", "np");
    "pt_raw": the decoder's output in [-1, 1], not post-processed. A pipeline whose canvas runs over several
    processes (distributed.enable) decodes over them too: every rank calls this, rank 0 gets the image, the
    others None."""
    image = decode_latents(pipe.vae, latents / pipe.vae.config.scaling_factor, max_memory_gb, comm.dist_of(pipe))
    if image is None:
        return None
    if output_type == "pt_raw":
        return image
    return pipe.image_processor.postprocess(image, output_type=output_type)


@torch.no_grad()
def generate(pipe, prompt=None, *, width: int, height: int, steps: int = 4, seed: int = 0,
             guidance_scale: float = 0.0, negative_prompt: str = "", output_type: str = "pil", progress: bool = True,
             max_memory_gb: Optional[float] = None, prompt_embeds: Optional[tuple] = None,
             timings: Optional[dict] = None, controlnet=None, control_image=None, control_scale: float = 1.0,
             image=None, strength: Optional[float] = None, regions=None, group=None, **overrides: Any):
    """One tiled generation with the accelerated pipeline; `overrides` replace TiledConfig fields for this call.

    The same image as `pipe(prompt, width=, height=, num_inference_steps=steps, guidance_scale=,
    generator=torch.Generator().manual_seed(seed))` after accelerate (tests/pipeline/test_dropin.py). prompt_embeds:
    (embeds, mask) from `encode` instead of a prompt (the CLI encodes in a stage of its own). timings: a dict
    that receives denoise_s and decode_s. Returns a list of PIL images (output_type "pil"), or the latents
    ("latent"), or what `decode` returns for the other output types.

    Guidance (issue 10): controlnet (a controlnet.PixArtControlNet) with control_image (PIL / path / [B, 3, H, W]
    in [-1, 1]) and control_scale; image (img2img: PIL / path / tensor, resized to width × height) with strength
    (default 0.5); regions ("x0,y0,x1,y1:prompt" strings, regions.Region, or an encoded regions.RegionalPrompts
    whose `encode` gave prompt_embeds). Any image size, and upscaling: img2img.img2img / img2img.upscale.

    group: an initialised torch.distributed process group to run the canvas over its ranks
    (`generate_parallel`: rank 0 gets the output, the others None; guidance is not supported there yet).
    """
    if group is not None:
        if controlnet is not None or image is not None or regions is not None:
            raise ValueError("generate: controlnet=, image= and regions= are not supported with group= yet")
        return generate_parallel(pipe, prompt, group=group, width=width, height=height, steps=steps, seed=seed,
                                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                    output_type=output_type, progress=progress, max_memory_gb=max_memory_gb,
                                    prompt_embeds=prompt_embeds, timings=timings, **overrides)

    st = state(pipe)
    cfg = dataclasses.replace(st.config, **overrides).validate()
    check_size(width, height)
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("generate: give either a prompt or prompt_embeds=(embeds, mask)")
    timings = {} if timings is None else timings
    if max_memory_gb is not None:
        est = estimate_memory(pipe.transformer.config, height=height, width=width, cfg=cfg,
                              dtype=pipe.transformer.dtype, guidance_scale=guidance_scale, int8=st.int8,
                              vae=pipe.vae,
                              text_encoder_bytes=module_bytes(getattr(pipe, "text_encoder", None)),
                              vae_scale_factor=st.vae_scale_factor)
        check_memory(est, max_memory_gb, cfg)
    # --- guidance (issue 10): regional prompts, img2img, ControlNet (regions.py, img2img.py, controlnet.py) ---
    if (controlnet is None) != (control_image is None):
        raise ValueError("generate: controlnet= and control_image= go together")
    if strength is not None and image is None:
        raise ValueError("generate: strength= needs image= (img2img)")
    regional = None
    if regions:
        regional = regions if isinstance(regions, RegionalPrompts) else RegionalPrompts(prompt, regions, width,
                                                                                         height)
        regional = regional.at_scale(st.vae_scale_factor)
        if prompt_embeds is None:  # every distinct prompt encoded once
            prompt_embeds = regional.encode(lambda ps: encode(pipe, ps, negative_prompt, guidance_scale),
                                            guidance_scale)
    # --- end guidance ---
    embeds, mask = prompt_embeds if prompt_embeds is not None else encode(pipe, prompt, negative_prompt,
                                                                         guidance_scale)
    # a list of prompts is a batch of images, as pipe([...]) (regional embeds are per region, not per image)
    batch = 1 if regional is not None else embeds.shape[0] // (2 if guidance_scale > 1.0 else 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # --- guidance (issue 10) ---
    latents, strength = None, (None if image is None else (0.5 if strength is None else strength))
    if image is not None:
        latents = image_latents(pipe, image, width=width, height=height, strength=strength, steps=steps,
                                generator=gen, timings=timings)
    if controlnet is not None:
        t0 = time.perf_counter()
        control = control_latent(pipe.vae, control_image, height, width, pipe.transformer.dtype)
        timings["control_encode_s"] = time.perf_counter() - t0
    # --- end guidance ---
    t0 = time.perf_counter()
    with contextlib.ExitStack() as guided:  # guidance (issue 10): installed for this call only
        if regional is not None:
            guided.enter_context(regional.applied(pipe.transformer, cfg.mode))
        if controlnet is not None:
            guided.enter_context(controlnet.applied(pipe.transformer, control, control_scale))
        lat = denoise(pipe.transformer, pipe.scheduler, embeds, mask, height=height, width=width, steps=steps,
                      cfg=cfg, guidance_scale=guidance_scale, generator=gen, progress=progress, latents=latents,
                      strength=strength, batch=batch)
    timings["denoise_s"] = time.perf_counter() - t0
    if output_type == "latent":
        return lat
    t0 = time.perf_counter()
    out = decode(pipe, lat, output_type=output_type, max_memory_gb=max_memory_gb)
    timings["decode_s"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def generate_parallel(pipe, prompt=None, *, group=None, prompt_embeds=None,
             negative_prompt: str = "", guidance_scale: float = 0.0, output_type: str = "pil",
             timings: Optional[dict] = None, cfg_parallel: bool = False, **kwargs):
    """`generate` over the ranks of `group` (or torchrun's). Rank 0 encodes the prompt (other ranks
    need no text encoder) and broadcasts the embeddings; the canvas forward runs distributed; every rank ends
    with the same final latents. Returns the decoded output on rank 0 and None elsewhere (output_type "latent":
    the latents on every rank). timings: a dict that receives pipeline.generate's timings and this rank's
    communication counters (`CommStats.as_dict`)."""
    timings = {} if timings is None else timings
    ds = comm.enable(pipe, group, cfg_parallel=cfg_parallel)
    d = ds.dist
    try:
        with comm.fail_fast(d):
            comm.check_world(pipe, d.world, guidance_scale=guidance_scale, cfg_parallel=cfg_parallel, **kwargs)
            if prompt_embeds is None:
                prompt_embeds = tuple(comm.on_main(lambda: encode(pipe, prompt, negative_prompt, guidance_scale), d))
            lat = generate(pipe, prompt_embeds=prompt_embeds, guidance_scale=guidance_scale,
                             output_type="latent", timings=timings, **kwargs)
            timings.update(ds.stats.as_dict())
            if output_type == "latent":
                return lat
            return decode(pipe, lat, output_type=output_type)  # every rank decodes its share; rank 0 gets it
    finally:
        comm.disable(pipe)


def img2img(pipe, prompt, image, *, strength: float = 0.5, steps: int = 4, seed: int = 0,
            width: Optional[int] = None, height: Optional[int] = None, timings: Optional[dict] = None,
            **generate_kwargs):
    """Tiled img2img of an image of any size: resized to width × height (default: the image's size), padded to
    multiples of 16, generated (`pipeline.generate(..., image=, strength=)`) and cropped back. Returns a list of
    PIL images of width × height (other `output_type`s: the padded canvas's output as generate returns it)."""
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
    out = generate(pipe, prompt, width=pw, height=ph, steps=steps, seed=seed, image=x, strength=strength,
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
