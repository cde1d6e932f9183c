"""Guidance benchmark: the ControlNet-Transformer's overhead, and tiled upscale time per stage and peak memory.

suite(quick=False):
- ControlNet overhead: PixArt-XL width (hidden 1152, 16 heads, D=72), 2 base blocks + 1 ControlNet copy (N + 1
  base blocks are needed for N copies), synthetic weights, bf16, no int8, 2048², cross_tile (512 px tiles,
  radius 1), one LCM step timed (all steps cost the same), with and without the ControlNet, interleaved after
  one warm-up round of each, median of 3 (`cpu_time=True`: process CPU time on 1 thread, for a shared machine).
  The overhead per copy relative to one base block is (t_cn - t_none) / t_none × blocks / copies; the PixArt-XL
  figure (13 copies on 28 blocks) is that × 13 / 28, an extrapolation (labelled as such): upstream predicts
  +46 % from the block count alone (plus the control patch embedding and after_proj GEMMs).
- Upscale 1024² -> 4096² (×4, strength 0.4, 4 LCM steps -> timesteps [399, 299, 199, 99]): Lanczos resize,
  VAE encode (`img2img.encode_image`: the tiled encode where vae.py provides one), noising, tiled denoise
  (PixArt-XL width, 2 blocks, cross_tile 512 px; one step timed, × 4), tiled VAE decode. The VAE is the SD/PixArt
  architecture scaled down (`VAE_SMALL`: channels 32, 1 layer per block) because the full SD VAE decodes 4096² in
  ≈ 45 min on 2 CPU cores (16 × the 166 s measured at 1024², benchmarks/NOTES.md "memory"); a full-size VAE row
  runs at 256² -> 1024² instead. Peak memory per stage = largest RSS increase during the stage.
suite(quick=True): the tiny model: ControlNet overhead at 256² and upscale 64² -> 256².
"""
from __future__ import annotations

import os
import time

import torch

from bench_pipeline import PROMPT_LEN, TEXT_DIM, PeakRSS, _one_step_timer, _scheduler, xl_transformer

VAE_SD = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
VAE_SMALL = dict(VAE_SD, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def _embeds(dtype, text_dim=TEXT_DIM, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, PROMPT_LEN, text_dim, generator=g).to(dtype), torch.ones(1, PROMPT_LEN, dtype=torch.long)


def _trained_like(net, seed=3, std=0.02):
    """Non-zero ControlNet projections (a fresh adapter's zero after_proj would be cheap to skip in principle;
    time what a trained one costs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in net.controlnet_blocks:
            for lin in [blk.after_proj] + ([blk.before_proj] if blk.block_index == 0 else []):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
    return net


# ------------------------------------------------------------------------------------------ ControlNet


class _NoRSS:
    delta = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def controlnet_rows(size: int = 2048, layers: int = 2, tile: int = 512, iters: int = 3, tr=None,
                    text_dim: int = TEXT_DIM, dtype=torch.bfloat16, model: str = "PixArt-XL width",
                    cpu_time: bool = False) -> list[dict]:
    """cpu_time=True: process CPU time with 1 thread instead of wall time (robust to other jobs on a shared
    machine; the ratio, not the absolute time, is the figure)."""
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.model.controlnet import PixArtControlNet

    tr = xl_transformer(layers, dtype) if tr is None else tr
    P.accelerate(tr, int8=None)
    copies = len(tr.transformer_blocks) - 1
    net = _trained_like(PixArtControlNet.from_transformer(tr, copies))
    sched = _scheduler()
    embeds, mask = _embeds(dtype, text_dim)
    lat = size // 8
    control = torch.randn(1, tr.config.in_channels, lat, lat, generator=torch.Generator().manual_seed(5)).to(dtype)
    times = {"none": [], "controlnet": []}
    peaks = {"none": 0, "controlnet": 0}
    threads = torch.get_num_threads()
    if cpu_time:
        torch.set_num_threads(1)
    for it in range(iters + 1):  # interleaved: both see the same machine load; round 0 warms up (not kept)
        for name in times:
            with (PeakRSS() if not cpu_time else _NoRSS()) as mem:  # the sampling thread would count as CPU
                c0 = time.process_time()
                if name == "none":
                    t = _one_step_timer(tr, sched, embeds, mask, size, "cross_tile", tile)
                else:
                    with net.applied(tr, control):
                        t = _one_step_timer(tr, sched, embeds, mask, size, "cross_tile", tile)
                if cpu_time:
                    t = time.process_time() - c0
            if it:
                times[name].append(t)
                peaks[name] = max(peaks[name], mem.delta)
    torch.set_num_threads(threads)
    P.restore(tr)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    overhead = med["controlnet"] / med["none"] - 1
    per_copy = overhead * len(tr.transformer_blocks) / copies
    rows = []
    for name in times:
        rows.append({"size": f"{size}²", "model": f"{model}, {len(tr.transformer_blocks)} blocks",
                     "clock": "cpu 1 thread" if cpu_time else f"wall {threads} threads",
                     "controlnet": f"{copies} cop{'y' if copies == 1 else 'ies'}" if name != "none" else "none",
                     "step_s": med[name], "step_s_min": min(times[name]), "step_s_max": max(times[name]),
                     "x_none": med[name] / med["none"], "peak_rss_gb": peaks[name] / 2**30 if not cpu_time else None,
                     "load_avg": round(os.getloadavg()[0], 2)})
    rows.append({"size": f"{size}²", "model": "PixArt-XL (28 blocks, 13 copies): extrapolated",
                 "controlnet": "13 copies", "per_copy_vs_block": per_copy, "x_none": 1 + per_copy * 13 / 28})
    return rows


# ------------------------------------------------------------------------------------------ upscale


def _source_image(side: int):
    """A smooth synthetic RGB image (gradients and discs) so resize and VAE see real structure, not noise."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    r = 0.5 + 0.5 * np.sin(6 * x + 2 * y)
    g = 0.5 + 0.5 * np.cos(5 * y - 3 * x)
    b = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    return Image.fromarray((np.stack([r, g, b], -1) * 255).astype(np.uint8))


def upscale_rows(src: int = 1024, scale: int = 4, vae_cfg=None, vae_name: str = "small", layers: int = 2,
                 tr=None, text_dim: int = TEXT_DIM, tile: int = 512, strength: float = 0.4, steps: int = 4,
                 dtype=torch.bfloat16, time_one_step: bool = True) -> list[dict]:
    from diffusers import AutoencoderKL

    from tiled_diffusion.pipeline import images as I
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.core.config import TiledConfig
    from tiled_diffusion.pipeline.sampler import denoise
    from tiled_diffusion.pipeline.sampler import set_timesteps

    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # a VAE built from a config has no fp32 modules to keep: mute that warning
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL(**(vae_cfg or VAE_SMALL)).eval().to(dtype)
    finally:
        dlogging.set_verbosity(level)
    tr = xl_transformer(layers, dtype) if tr is None else tr
    P.accelerate(tr, int8=None)
    sched = _scheduler()
    embeds, mask = _embeds(dtype, text_dim)
    out = src * scale
    image = _source_image(src)
    stages, peaks = {}, {}

    def stage(name, fn):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            r = fn()
            stages[name] = time.perf_counter() - t0
        peaks[name] = mem.delta
        return r

    with torch.no_grad():
        x = stage("resize", lambda: I.prepare_image(image, out, out))
        clean = stage("encode", lambda: I.encode_image(vae, x))
        gen = torch.Generator().manual_seed(0)

        def noised():
            t0 = set_timesteps(sched, steps, "cpu", strength)[:1]
            noise = torch.randn(clean.shape, generator=gen).to(dtype)
            return sched.add_noise(clean.to(dtype), noise, t0)

        lat = stage("noise", noised)
        cfg = TiledConfig(mode="cross_tile", tile=tile, radius=1)

        class Stop(Exception):
            pass

        def run_denoise():
            cb = None
            if time_one_step:
                def cb(i, t, _):
                    raise Stop
            try:
                return denoise(tr, sched, embeds, mask, height=out, width=out, steps=steps, cfg=cfg,
                               generator=gen, latents=lat, strength=strength, progress=False, callback=cb)
            except Stop:
                return lat

        z = stage("denoise", run_denoise)
        if time_one_step:
            stages["denoise"] *= steps
        stage("decode", lambda: P.decode_latents(vae, z / vae.config.scaling_factor))
    P.restore(tr)
    rows = [{"upscale": f"{src}² -> {out}²", "vae": vae_name, "stage": k, "time_s": v,
             "peak_rss_gb": peaks[k] / 2**30, "note": f"1 step × {steps}" if k == "denoise" and time_one_step else ""}
            for k, v in stages.items()]
    rows.append({"upscale": f"{src}² -> {out}²", "vae": vae_name, "stage": "total", "time_s": sum(stages.values()),
                 "peak_rss_gb": max(peaks.values()) / 2**30, "note": f"load_avg {os.getloadavg()[0]:.2f}"})
    return rows


def _tiny_transformer(layers=3):
    from tiled_diffusion.lab.text import TEXT_DIM as TINY_TEXT
    from tiled_diffusion.tiny import tiny_transformer

    torch.manual_seed(0)
    return tiny_transformer(num_layers=layers).eval(), TINY_TEXT


def suite(quick: bool) -> list[dict]:
    if quick:
        tr, td = _tiny_transformer()
        rows = controlnet_rows(size=256, tile=128, iters=1, tr=tr, text_dim=td, dtype=torch.float32, model="tiny")
        tr, td = _tiny_transformer(2)
        return rows + upscale_rows(src=64, scale=4, vae_cfg=VAE_SMALL, tr=tr, text_dim=td, tile=128,
                                   dtype=torch.float32, time_one_step=False)
    rows = controlnet_rows()
    rows += upscale_rows()
    rows += upscale_rows(src=256, vae_cfg=VAE_SD, vae_name="SD (full size)")
    return rows


def test_guidance_quick():
    rows = suite(quick=True)
    assert all(r.get("time_s", 1) > 0 for r in rows)
