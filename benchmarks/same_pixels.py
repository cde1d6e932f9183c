"""How far `accelerate` moves diffusers' own image on a single tile (issue 22): what "the same pixels" holds for.

One 256² canvas is one tile in every mode, so the tiled attention is the plain one and only the int8 layers and
the tiled VAE decode can move the image. Prints, per setting and dtype, the largest difference from
`pipe(...)` before `accelerate` (image in [0, 1]) and in 8-bit levels of the PNG, with the share of values that
differ. Run: `PYTHONPATH=. python benchmarks/same_pixels.py` (the tiny lab model, CPU, seconds).
"""
import numpy as np
import torch

from tiled_diffusion import pipeline as P
from tiled_diffusion.tiny import tiny_pipeline

# one 256-px tile of tile-blocked windows: the canvas is that tile whatever the model's token size (the default
# token-centred window, 1x the training field, covers 256 px only for a 256-px-trained model)
ONE_TILE = dict(tile=256, window=None)
SETTINGS = {
    "float (int8 off)": dict(int8=None, text_encoder_int8=False),
    "T5 int8 only": dict(int8=None, text_encoder_int8=True),
    "W8A8 transformer only": dict(int8="w8a8", text_encoder_int8=False),
    "defaults (W8A8 + T5 int8)": dict(int8="w8a8", text_encoder_int8=True),
}


def image(pipe, output_type):
    return pipe("a red house by the lake", width=256, height=256, num_inference_steps=4, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(0), output_type=output_type, clean_caption=False,
                use_resolution_binning=False).images


def main():
    for dtype in (torch.float32, torch.bfloat16):
        pipe = tiny_pipeline(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        ref_pt, ref_png = image(pipe, "pt").float(), np.asarray(image(pipe, "pil")[0]).astype(np.int16)
        for name, kw in SETTINGS.items():
            P.accelerate(pipe, **ONE_TILE, **kw)
            pt, png = image(pipe, "pt").float(), np.asarray(image(pipe, "pil")[0]).astype(np.int16)
            P.restore(pipe)
            d = np.abs(png - ref_png)
            print(f"{str(dtype):15s} {name:26s} max|Δ| {(pt - ref_pt).abs().max().item():.2e}  "
                  f"8-bit: max {d.max():3d} levels, {(d > 0).mean() * 100:5.2f}% of values differ")


if __name__ == "__main__":
    main()
