"""The lab model's architecture: one place for the configs the trainer builds and `tiny.py` loads.

Sizes were chosen for speed on a 2-core CPU (every test that uses `--model tiny` runs this model): a 128-px
training image (16² latent, 8² tokens), a 4-layer PixArt transformer of width 48 (3 heads × 16), a VAE with 16/32
channels and no mid-block attention (a global attention would not tile and costs O(canvas²)), and the frozen,
seeded tiny T5 of `tiny.py` (width 32) whose caption embeddings the transformer's caption projection learns to
read. The noise schedule is PixArt-δ's (LCMScheduler, linear betas 1e-4..0.02, ε-prediction; a folder's scheduler
config may say v_prediction instead, `lab.train --prediction`).
"""
from __future__ import annotations

import json
import os

import torch

from ..core.lcm import PREDICTIONS  # what the lab's transformer may output (`lab.train --prediction`)

TRAIN_SIZE = 128  # pixels: the image size the lab model is trained at
VAE_SCALE = 8

# out_channels=8: PixArt's learned-sigma layout (ε, then σ), which samplers and tests expect; the lab trains the ε half
# only (TRAIN_OUT_CHANNELS) and `with_sigma_channels` adds a zero σ half at export.
TRAIN_OUT_CHANNELS = 4
TRANSFORMER_CONFIG = dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
                          cross_attention_dim=48, sample_size=TRAIN_SIZE // VAE_SCALE, patch_size=2,
                          caption_channels=32, norm_num_groups=4, interpolation_scale=1)

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                  block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  mid_block_add_attention=False, sample_size=TRAIN_SIZE)

# PixArt-α-style aspect-ratio buckets around the training size, in latent pixels (h, w), even for the 2×2 patches:
# ~the training area at ratios 1:1 to 1:1.67 (square weighted ×3), plus one larger square (1.56× the area) so the
# model also sees more tokens than at 128² (what a tile of a larger canvas asks of it).
BUCKETS = ((16, 16),) * 3 + ((14, 18), (18, 14), (12, 20), (20, 12), (20, 20))
# what a folder's transformer config decides (and `lab.train --arch` may change); sample_size and interpolation_scale
# set the positional grid (base = sample_size / patch tokens), so they travel with the weights
ARCH_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "cross_attention_dim", "patch_size",
             "sample_size", "interpolation_scale")
VAE_ARCH_KEYS = ("block_out_channels", "layers_per_block", "norm_num_groups")  # what `lab.train --vae-arch` may change

SCHEDULER_CONFIG = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="leading")


def build_transformer(**overrides):
    from diffusers import PixArtTransformer2DModel  # diffusers loads only when a model is built: cli/checks imports this module before any request is checked

    return PixArtTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


@torch.no_grad()
def with_sigma_channels(tr):
    """The trained ε-only transformer (out_channels 4) as a PixArt learned-sigma model (out_channels 8): the same
    ε channels (proj_out rows copied; its outputs are ordered (p, q, channel), channel fastest) and a zero σ half.
    Every ε-prediction sampler keeps the first half, so samples are unchanged."""
    c_in, c_out = tr.config.out_channels, TRANSFORMER_CONFIG["out_channels"]
    if c_in == c_out:
        return tr
    new = build_transformer(**{k: tr.config[k] for k in ARCH_KEYS})
    sd = tr.state_dict()
    p = tr.config.patch_size
    for name in ("proj_out.weight", "proj_out.bias"):
        t = sd[name]
        padded = t.new_zeros((p * p, c_out) + t.shape[1:])
        padded[:, :c_in] = t.reshape((p * p, c_in) + t.shape[1:])
        sd[name] = padded.reshape((p * p * c_out,) + t.shape[1:])
    new.load_state_dict(sd)
    return new.eval()


def build_vae(**overrides):
    from diffusers import AutoencoderKL  # as above: not at import

    cfg = {**VAE_CONFIG, **overrides}
    n = len(cfg["block_out_channels"])  # one down / up block per width: 3 widths make an f4 VAE, 4 an f8 one
    cfg["down_block_types"], cfg["up_block_types"] = ("DownEncoderBlock2D",) * n, ("UpDecoderBlock2D",) * n
    return AutoencoderKL(**cfg)


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import LCMScheduler  # as above: not at import

    return LCMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})


MODEL_DIR = os.path.join(os.path.dirname(__file__), "tiny_model")


def _read(folder: str, component: str, file: str) -> dict:
    from safetensors.torch import load_file  # only when weights are read (cli/checks imports this module)

    return load_file(os.path.join(folder, component, file))


def _arch(folder: str, component: str, keys) -> dict:
    """The architecture keys of a folder's component config (a folder trained with --arch / --vae-arch)."""
    with open(os.path.join(folder, component, "config.json")) as f:
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in json.load(f).items() if k in keys}


def load_vae(folder: str, **overrides):
    """A folder's trained VAE (its architecture from the folder's config, fp16 weights upcast), in fp32."""
    vae = build_vae(**{**_arch(folder, "vae", VAE_ARCH_KEYS), **overrides})
    vae.load_state_dict({k: v.float() for k, v in _read(folder, "vae", "diffusion_pytorch_model.safetensors").items()})
    return vae


def load_lab_pipeline(folder: str = MODEL_DIR):
    """The lab's trained PixArtAlphaPipeline from a folder written by `lab.train` (the shipped one by default), on
    the CPU in fp32, offline.

    The modules are built from this file's configs and the folder's safetensors are loaded into them (strict):
    several times faster than `from_pretrained`, which matters because every test that uses `tiny` builds one.
    The VAE's scaling_factor comes from the folder's config (it is measured at training time).
    """
    from diffusers import PixArtAlphaPipeline  # as build_transformer: not at import

    from .text import tiny_text_encoder, tiny_tokenizer  # transformers: not at import either

    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"no lab model in {folder!r} (train one: python -m tiled_diffusion.lab.train --out DIR)")
    with open(os.path.join(folder, "vae", "config.json")) as f:
        scaling = json.load(f)["scaling_factor"]
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        prediction = json.load(f).get("prediction_type", "epsilon")
    arch = _arch(folder, "transformer", ARCH_KEYS)
    tok = tiny_tokenizer()
    te = tiny_text_encoder(len(tok))
    missing, unexpected = te.load_state_dict(_read(folder, "text_encoder", "model.safetensors"), strict=False)
    if unexpected or set(missing) - {"encoder.embed_tokens.weight"}:  # that one is tied to `shared`, not saved
        raise ValueError(f"{folder}: text encoder weights do not match tiny.tiny_text_encoder "
                         f"(missing {missing}, unexpected {unexpected})")
    tr = build_transformer(**arch)
    tr.load_state_dict({k: v.float() for k, v in _read(folder, "transformer", "diffusion_pytorch_model.safetensors").items()})
    vae = load_vae(folder, scaling_factor=scaling)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te.eval(), vae=vae.eval(), transformer=tr.eval(),
                               scheduler=build_scheduler(prediction))
    pipe.set_progress_bar_config(disable=True)
    return pipe
