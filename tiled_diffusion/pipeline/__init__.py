"""The pipeline layer: `accelerate` / `restore` (the SWAPS table, `swaps`), the stages of a generation (`api`:
encode, generate, decode, img2img, upscale; `generate_parallel` over a process group), the sampler, image
helpers (`img2img`) and loading a PixArt folder with int8 layers built as the weights stream in (`loading`)."""
from .api import decode, encode, generate, generate_parallel, img2img, upscale
from .swaps import SWAPS, AccelerateState, accelerate, decode_latents, quantize_text_encoder, restore, state

__all__ = ["accelerate", "restore", "state", "generate", "generate_parallel", "encode", "decode", "img2img",
           "upscale", "decode_latents", "quantize_text_encoder", "SWAPS", "AccelerateState"]
