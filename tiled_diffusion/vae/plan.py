"""The VAE memory rule, one for the plan and the estimate: the peak of the plain call, the banded store and band,
and `plan_method`, which picks plain, banded (and its band height and store) or overlap for a budget."""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from .steps import decoder_steps, encoder_steps, vae_scale_factor


def _shapes(steps, C: int, H: int, W: int) -> Iterator[tuple[str, nn.Module, int, int, int, int, int, int]]:
    """(kind, module, C_in, H_in, W_in, C_out, H_out, W_out) of every step for an input [C, H, W]."""
    for kind, m in steps:
        Ho, Wo = H, W
        if kind == "conv":
            Co = m.out_channels
        elif kind == "res":
            Co = m.conv2.out_channels
        elif kind == "attn":
            Co = C
        elif kind == "up":
            Co, Ho, Wo = m.conv.out_channels, 2 * H, 2 * W
        elif kind == "down":
            Co, Ho, Wo = m.conv.out_channels, (H - 1) // 2 + 1, (W - 1) // 2 + 1
        else:
            Co = m.conv_out.out_channels
        yield kind, m, C, H, W, Co, Ho, Wo
        C, H, W = Co, Ho, Wo


def _plain_elems(kind, m, C, H, W, Co, Ho, Wo) -> int:
    """Live activation elements at the peak of one step of the plain forward (per image). Counted from diffusers'
    code: a resnet keeps its input while norm, activation and conv outputs of the residual branch come and go."""
    i, o = C * H * W, Co * Ho * Wo
    if kind == "res":
        mid = m.conv1.out_channels * H * W
        return max(3 * i, 2 * i + mid, i + 2 * mid, i + mid + o, i + 2 * o)
    if kind == "attn":
        return 6 * i  # input, normed, q, k, v, attention output (CPU and GPU SDPA kernels stream over keys)
    if kind == "up":
        return i + C * Ho * Wo + o  # input, nearest-upsampled copy, conv output
    if kind == "out":
        return 3 * i + o
    return 2 * i + o  # conv_in; down (its padded copy)


def _band_elems(kind, m, C, H, W, Co, Ho, Wo, rows: int, lat_h: int) -> tuple[int, int]:
    """(stored canvas elements, fp32 band working-set elements) of one banded step (per image). The band holds
    about 3 fp32 copies of its widest tensor (the input upcast for the normalisation, its output, the conv output
    upcast for the statistics)."""
    i, o = C * H * W, Co * Ho * Wo
    r = min(Ho, rows * Ho // lat_h + 4)  # band rows of the output + halo, at the output resolution
    r_in = min(H, rows * H // lat_h + 4)
    band = 3 * max(C * r_in * W, Co * r * Wo, (m.conv1.out_channels if kind == "res" else 0) * r * Wo)
    if kind == "res":
        mid = m.conv1.out_channels * H * W
        return i + mid + (o if Co > C else 0), band
    if kind == "attn":
        return i + 3 * m.to_q.out_features * H * W, band + 2 * m.to_q.out_features * H * W
    return i + o, band


def _meta_vae(config):
    """An AutoencoderKL with parameters on the meta device, from its config (a dict or a FrozenDict): shapes only."""
    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(config))


def _estimates(vae, H: int, W: int, *, encode: bool, rows: Optional[int], es: int, batch: int) -> dict:
    if not isinstance(vae, nn.Module):
        vae = _meta_vae(vae)
    f = vae_scale_factor(vae)
    if encode:
        steps, C0, h0, w0, lat_h = encoder_steps(vae.encoder), vae.config.in_channels, H, W, max(1, H // f)
    else:
        steps, C0, h0, w0, lat_h = decoder_steps(vae.decoder), vae.config.latent_channels, H // f, W // f, H // f
    plain, store, band = 0, 0, 0
    for sh in _shapes(steps, C0, h0, w0):
        plain = max(plain, _plain_elems(*sh))
        if rows is not None:
            s, b = _band_elems(*sh, rows=rows, lat_h=lat_h)
            store, band = max(store, s), max(band, b)
    io = batch * 3 * H * W * es  # the image (output of decode, input of encode)
    # + one copy of the conv weights (channels-last for the call; oneDNN's reorders). The plain count is scaled by
    # what was measured (allocator and oneDNN scratch): decode peak RSS / count 1.48 at 512² bf16, 1.26 at 1024²
    # and 1.23 at 2048² fp32 -> 1.25; encode 1.64 (plain) and 1.66 (channels-last) at 2048² fp32 -> 1.7.
    weights = sum(p.numel() for p in (vae.encoder if encode else vae.decoder).parameters()) * es
    scale = 1.7 if encode else 1.25
    return {"plain": int(scale * batch * plain * es) + io + weights, "store": batch * store * es + io + weights,
            "band": batch * band * 4}


def estimate_decode_bytes(vae, height: int, width: int, dtype=None, batch: int = 1) -> int:
    """Peak activation bytes of a plain `vae.decode` of a height×width image (weights not counted). `vae`: the
    AutoencoderKL or its config dict (then `dtype` is required).

    `decode` decodes plain exactly when this fits the budget; otherwise the banded decode needs about
    `estimate_banded_bytes` (the run's memory estimate should count min(this, that))."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    return _estimates(vae, height, width, encode=False, rows=None, es=es, batch=batch)["plain"]


def estimate_vae_bytes(vae, height: int, width: int, dtype=None, batch: int = 1, encode: bool = False) -> int:
    """What `decode` (or `encode`) needs at most under its own rule: the plain peak, or the banded store plus bands
    of 64 latent rows if that is smaller (the rule takes shorter bands when memory is short). For the run's estimate."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    e = _estimates(vae, height, width, encode=encode, rows=64, es=es, batch=batch)
    return min(e["plain"], e["store"] + e["band"])


def estimate_banded_bytes(vae, height: int, width: int, dtype=None, *, tile: int = 64, batch: int = 1,
                          encode: bool = False) -> tuple[int, int]:
    """(store, band) peak bytes of the banded decode (or encode) with `tile` latent rows per band: the canvas
    activations held in the store, and one band's working set on the compute device."""
    es = torch.finfo(dtype or vae.dtype).bits // 8
    e = _estimates(vae, height, width, encode=encode, rows=tile, es=es, batch=batch)
    return e["store"], e["band"]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        # the driver's free bytes miss what torch's caching allocator holds but no tensor uses (reserved -
        # allocated): after a denoise loop that is gigabytes this process can reuse without asking the driver
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# Banded decode on the CPU: short bands are faster than the tallest that fit (bf16, SD VAE, 1 thread: 16 vs 64 latent
# rows 0.91x the CPU time at 1024², 8 vs 64 rows 0.91x at 2048², with 30% less peak memory; benchmarks/NOTES.md).
CPU_BAND_ROWS = 16


def band_rows(rows: int, device: torch.device) -> int:
    return min(rows, CPU_BAND_ROWS) if device.type == "cpu" else rows


def plan_method(vae, x: torch.Tensor, *, encode: bool, max_memory_gb: Optional[float], tile: Optional[int]) -> dict:
    """Which method and band height: plain if it fits, else the tallest bands whose store + band fit (at most
    CPU_BAND_ROWS on the CPU)."""
    f = vae_scale_factor(vae)
    B = x.shape[0]
    H, W = (x.shape[-2], x.shape[-1]) if encode else (f * x.shape[-2], f * x.shape[-1])
    lat_h = max(1, H // f)
    es = torch.finfo(vae.dtype).bits // 8
    if tile is not None:
        if tile < 1:
            raise ValueError(f"vae: tile must be >= 1 latent rows, got {tile}")
        return {"method": "plain" if tile >= lat_h else "banded", "tile": tile, "store": x.device}
    budget = max_memory_gb * 2**30 if max_memory_gb is not None else _free_bytes(x.device)
    if _estimates(vae, H, W, encode=encode, rows=None, es=es, batch=B)["plain"] <= budget:
        return {"method": "plain", "tile": lat_h, "store": x.device}
    stores = [x.device] + ([torch.device("cpu")] if x.device.type != "cpu" else [])
    # the band's working set is linear in its rows: the tallest band that fits beside the store
    s1, b1 = estimate_banded_bytes(vae, H, W, vae.dtype, tile=1, batch=B, encode=encode)
    _, b2 = estimate_banded_bytes(vae, H, W, vae.dtype, tile=2, batch=B, encode=encode)
    for store in stores:
        # a store on the compute device shares the budget with the band; a CPU store behind a GPU gets host memory
        room = budget - b1 - (s1 if store == x.device else 0)
        if room >= 0 and (store == x.device or s1 <= _free_bytes(store)):
            rows = band_rows(int(min(lat_h - 1, 1 + room // max(1, b2 - b1))), x.device)
            return {"method": "banded", "tile": max(1, rows), "store": store}
    return {"method": "overlap", "tile": None, "store": x.device}


