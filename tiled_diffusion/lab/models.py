"""The lab model's architecture: one place for the configs the trainer builds and `tiny.py` loads.

Sizes were chosen for speed on a 2-core CPU (every test that uses `--model tiny` runs this model): a 128-px
training image (16² latent, 8² tokens), a 4-layer PixArt transformer of width 48 (3 heads × 16), a VAE with 16/32
channels and no mid-block attention (a global attention would not tile and costs O(canvas²)), and the frozen,
seeded tiny T5 of `tiny.py` (width 32) whose caption embeddings the transformer's caption projection learns to
read. The noise schedule is PixArt-δ's (LCMScheduler, linear betas 1e-4..0.02, ε-prediction).
"""
from __future__ import annotations

TRAIN_SIZE = 128  # pixels: the image size the lab model is trained at
VAE_SCALE = 8

TRANSFORMER_CONFIG = dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
                          cross_attention_dim=48, sample_size=TRAIN_SIZE // VAE_SCALE, patch_size=2,
                          caption_channels=32, norm_num_groups=4, interpolation_scale=1)

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                  block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  mid_block_add_attention=False, sample_size=TRAIN_SIZE)

SCHEDULER_CONFIG = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="leading")


def build_transformer(**overrides):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def build_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(**SCHEDULER_CONFIG)
