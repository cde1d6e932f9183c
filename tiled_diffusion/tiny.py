"""The built-in tiny PixArt model (`--model tiny`): the quality lab's model, trained here and shipped in the package.

A PixArtAlphaPipeline of the same architecture family as PixArt-α/δ (PixArtTransformer2DModel with
ada_norm_single, T5 encoder, AutoencoderKL with an 8x downsampling, LCMScheduler with PixArt-δ's schedule), small
enough for CPU tests, with weights trained on the lab's procedural world (`tiled_diffusion/lab`: world.py,
train.py; the configs live in lab/models.py): it draws the world's four scene families from their captions
(`lab.world.CAPTIONS`, e.g. "a blue ocean") at its 128-px training size and beyond. The trained folder is
`tiled_diffusion/lab/tiny_model` (safetensors), loaded offline; retrain with
`python -m tiled_diffusion.lab.train --out DIR` and copy DIR/model there.

The text side (the seeded tiny T5 and its tokenizer) is lab/text.py's; this module is the public door to all of it.
"""
from __future__ import annotations

import torch
from diffusers.utils import logging as dlogging

from .lab.models import build_scheduler, build_transformer, build_vae, load_lab_pipeline
from .lab.text import SEED, save_pretrained_offline, tiny_text_encoder, tiny_tokenizer  # noqa: F401 (public)

SAMPLE_SIZE = 16  # latent pixels: the model's base image is 128² px (lab.models.TRAIN_SIZE)


def tiny_transformer(**overrides):
    """The tiny model's PixArtTransformer2DModel built from its config (random init; `overrides` change it)."""
    return build_transformer(**overrides)


def tiny_vae():
    """The tiny model's AutoencoderKL built from its config (random init)."""
    return build_vae()


def tiny_scheduler():
    """PixArt-δ's LCMScheduler (linear betas 1e-4..0.02, ε-prediction): the schedule the tiny model was trained on."""
    return build_scheduler()


def tiny_pipeline(device="cpu", dtype=torch.float32):
    """The trained tiny PixArtAlphaPipeline (lab/tiny_model, offline) on `device` in `dtype`.

    Every call returns fresh modules (callers accelerate and quantize them in place). The global RNG state is
    left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        pipe = load_lab_pipeline()
    # Modules built from configs have no `_keep_in_fp32_modules` to honour; diffusers warns about that on every
    # cast, so the warning is muted for this one call.
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return pipe.to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


