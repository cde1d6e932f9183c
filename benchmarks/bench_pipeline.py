"""Pipeline benchmark: the tiled LCM sampler per mode, and the seam ratio per mode.

suite(quick=False):
- Speed/memory: PixArt-XL width (hidden 1152, 16 heads, D=72) with 2 blocks, synthetic weights, bf16, synthetic
  prompt embeddings (120 x 4096), 4 LCM steps, at 1024², 2048², 4096² px per mode: global (skipped at 4096²),
  multidiffusion (tile 1024 px, 50% overlap), cross_tile (radius 1) at tiles of 512 and 256 px.
  The 4 LCM steps cost the same (only the timestep scalar changes), so beyond 1024² ONE step is timed and the
  4-step time is that x4 (column `steps_timed`): the whole suite must stay within ~10 minutes on 2 CPU cores.
  Peak memory = the largest RSS increase seen while the loop runs (sampled every 2 ms), model already loaded.
- Seam ratio: the tiny model at 1024² (tiles of 256 px = 4x4 tiles), 2 steps, per mode; decoded image before
  clamping; seams at the tile boundaries (multiples of 256 px); mean |gradient| across seams / elsewhere
  (1.0 = seams invisible to the metric).
- Drop-in: the same XL-width model inside a PixArtAlphaPipeline, called as `pipe(...)` at 2048², un-accelerated
  vs accelerate(pipe) in cross_tile and multidiffusion (`dropin_rows`).
suite(quick=True): the tiny model at 256² (4 steps, all modes), `pipe(...)` at 512², the seam ratio at 512².
"""
from __future__ import annotations

import os
import threading
import time

import torch

import harness  # noqa: E402
from harness import measure

PROMPT_LEN, TEXT_DIM = 120, 4096


# ---------------------------------------------------------------------------------------------- helpers


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS increase over the baseline at entry, sampled every `period` s in a thread."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def xl_transformer(layers: int = 2, dtype=torch.bfloat16):
    """PixArt-XL-2-1024 width with `layers` blocks and random (seeded) weights."""
    from tiled_diffusion.tiny import tiny_transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = tiny_transformer(num_attention_heads=16, attention_head_dim=72, num_layers=layers,
                              cross_attention_dim=1152, caption_channels=TEXT_DIM, sample_size=128,
                              interpolation_scale=2, norm_num_groups=32).eval()
    return tr.to(dtype)


def _scheduler():
    from tiled_diffusion.tiny import tiny_scheduler

    return tiny_scheduler()


def run_denoise(tr, sched, embeds, mask, size: int, mode: str, tile: int, steps: int, **kw):
    from tiled_diffusion.core.config import TiledConfig
    from tiled_diffusion.pipeline.sampler import denoise

    cfg = TiledConfig(mode=mode, tile=tile, radius=1, overlap=0.5, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return denoise(tr, sched, embeds, mask, height=size, width=size, steps=steps, cfg=cfg, generator=gen,
                       progress=False)


def _one_step_timer(tr, sched, embeds, mask, size, mode, tile, **kw):
    """Time of one denoising step (the first of 4): a callback stops the loop after step 0."""
    class Stop(Exception):
        pass

    def cb(i, t, lat):
        raise Stop

    from tiled_diffusion.core.config import TiledConfig
    from tiled_diffusion.pipeline.sampler import denoise

    cfg = TiledConfig(mode=mode, tile=tile, radius=1, overlap=0.5, **kw)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            denoise(tr, sched, embeds, mask, height=size, width=size, steps=4, cfg=cfg, generator=gen,
                    progress=False, callback=cb)
    except Stop:
        pass
    return time.perf_counter() - t0


def _configs(size: int):
    # At 4096² only cross_tile runs: global (~40 TFLOP/step of attention) and multidiffusion (49 overlapping tiles,
    # ~3x the tokens) each take minutes per step on 2 shared cores, beyond the suite's ~10 minute budget.
    rows = []
    if size <= 2048:
        rows += [("global", size, {}), ("multidiffusion", 1024, {})]
    rows += [("cross_tile", 512, {"window": None}), ("cross_tile", 256, {"window": None}), ("cross_tile", 512, {})]
    return rows


def speed_rows(sizes=(1024, 2048, 4096), layers: int = 2, dtype=torch.bfloat16, verbose: bool = True) -> list[dict]:
    from tiled_diffusion import pipeline as P

    tr = xl_transformer(layers, dtype)
    P.accelerate(tr, int8=None)
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, PROMPT_LEN, TEXT_DIM, generator=g).to(dtype)
    mask = torch.ones(1, PROMPT_LEN, dtype=torch.long)
    rows = []
    for size in sizes:
        for mode, tile, kw in _configs(size):
            full = size <= 1024
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if full:
                    run_denoise(tr, sched, embeds, mask, size, mode, tile, 4, **kw)
                    step = (time.perf_counter() - t0) / 4
                else:
                    step = _one_step_timer(tr, sched, embeds, mask, size, mode, tile, **kw)
            tokens = (size // 16) ** 2
            rows.append({"size": f"{size}²", "mode": mode, "tile_px": tile, "steps_timed": 4 if full else 1,
                         "time_4steps_s": 4 * step, "ms_per_ktoken_step": 1e3 * step / (tokens / 1e3),
                         "peak_rss_gb": mem.delta / 2**30, "peak_mb_per_ktoken": mem.delta / 2**20 / (tokens / 1e3),
                         "load_avg": round(os.getloadavg()[0], 2)})
            if verbose:  # the full suite takes minutes: show each row as it lands
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    P.restore(tr)
    by = {(r["size"], r["mode"], r["tile_px"]): r["time_4steps_s"] for r in rows}
    for r in rows:
        md = by.get((r["size"], "multidiffusion", 1024))
        r["x_multidiffusion"] = r["time_4steps_s"] / md if md else None
    return rows


# ------------------------------------------------------------------------------ through diffusers' pipe(...)


def xl_pipeline(layers: int = 2, dtype=torch.bfloat16):
    """A PixArtAlphaPipeline around the XL-width transformer (the tiny text encoder / VAE are never run: the rows
    pass synthetic prompt embeddings and ask for latents, so only the denoise is timed)."""
    from diffusers import PixArtAlphaPipeline

    from tiled_diffusion.tiny import tiny_pipeline

    small = tiny_pipeline()
    # the pipeline casts prompt embeddings to the text encoder's dtype: keep it in the transformer's
    pipe = PixArtAlphaPipeline(tokenizer=small.tokenizer, text_encoder=small.text_encoder.to(dtype), vae=small.vae,
                               transformer=xl_transformer(layers, dtype), scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_call_step(pipe, embeds, mask, size: int, full: bool) -> float:
    """Seconds per step of `pipe(...)` (4 LCM steps; beyond `full`, only the first step is run and timed)."""
    class Stop(Exception):
        pass

    def cb(i, t, lat):
        raise Stop

    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            # binning off: the un-accelerated pipeline would otherwise generate a ~1024² bin (the accelerated one
            # ignores binning above the bins anyway)
            pipe(prompt_embeds=embeds, prompt_attention_mask=mask, width=size, height=size, num_inference_steps=4,
                 guidance_scale=0.0, generator=gen, output_type="latent", callback=None if full else cb,
                 use_resolution_binning=False)
    except Stop:
        pass
    return (time.perf_counter() - t0) / (4 if full else 1)


def dropin_rows(size: int = 2048, layers: int = 2, dtype=torch.bfloat16, pipe=None, rounds: int = 2) -> list[dict]:
    """`pipe(...)` exactly as a diffusers user calls it: un-accelerated, then accelerate(pipe) in cross_tile
    (512 px, the default, and 256 px) and multidiffusion (1024 px, 50% overlap), runs alternated side by side;
    int8 off so the rows compare the tiling, not the GEMMs."""
    from tiled_diffusion import pipeline as P

    pipe = pipe or xl_pipeline(layers, dtype)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, PROMPT_LEN, pipe.transformer.config.caption_channels, generator=g)
    embeds = embeds.to(pipe.transformer.dtype)
    mask = torch.ones(1, PROMPT_LEN, dtype=torch.long)
    full = size <= 1024
    configs = [("un-accelerated", None), ("cross_tile (default)", dict(mode="cross_tile")),
               ("cross_tile GNA stride 1/8", dict(mode="cross_tile", stride=0.125)),
               ("cross_tile blocked 512px r1", dict(mode="cross_tile", tile=512, window=None)),
               ("cross_tile blocked 256px r1", dict(mode="cross_tile", tile=256, window=None)),
               ("multidiffusion", dict(mode="multidiffusion", tile=1024, overlap=0.5))]
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    for _ in range(rounds):
        for name, kw in configs:
            if kw is not None:
                P.accelerate(pipe, int8=None, text_encoder_int8=False, **kw)
            try:
                times[name].append(_pipe_call_step(pipe, embeds, mask, size, full))
            finally:
                P.restore(pipe)
    rows = []
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for name, _ in configs:
        rows.append({"size": f"{size}²", "path": "pipe(...)", "mode": name, "steps_timed": 4 if full else 1,
                     "rounds": rounds,
                     "time_4steps_s": 4 * med[name], "x_multidiffusion": med[name] / med["multidiffusion"],
                     "x_unaccelerated": med[name] / med["un-accelerated"],
                     "x_blocked_512": med[name] / med["cross_tile blocked 512px r1"],
                     "load_avg": round(os.getloadavg()[0], 2)})
    return rows


# ------------------------------------------------------------------------------------------ seam ratio


def seam_rows(size: int = 1024, tile: int = 256, steps: int = 2) -> list[dict]:
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tools.metrics import seam_ratio
    from tiled_diffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=tile)
    seams = list(range(tile, size, tile))
    rows = []
    for mode, kw in (("global", {}), ("multidiffusion", {"overlap": 0.5}), ("multidiffusion", {"overlap": 0.25}),
                     ("cross_tile", {"radius": 1, "window": None}), ("cross_tile", {"radius": 0, "window": None}),
                     ("cross_tile", {"radius": 0, "shift": True, "window": None}), ("cross_tile", {})):
        img = P.generate(pipe, "a photo of a mountain lake at sunset", width=size, height=size, steps=steps,
                         seed=0, output_type="pt_raw", progress=False, mode=mode, **kw)
        desc = ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append({"size": f"{size}²", "tiles": f"{size // tile}x{size // tile}", "mode": mode, "options": desc,
                     "seam_ratio": seam_ratio(img, seams, seams)})
    P.restore(pipe)
    return rows


def quick_rows(sizes=(256,), steps: int = 4, modes=("global", "multidiffusion", "cross_tile"), tile: int = 128,
               warmup: int = 1, iters: int = 3) -> list[dict]:
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=tile)
    rows = []
    for size in sizes:
        for mode in modes:
            r = measure(lambda: P.generate(pipe, "a cat", width=size, height=size, steps=steps, seed=0,
                                           output_type="latent", progress=False, mode=mode), warmup=warmup,
                        iters=iters)
            rows.append(harness.mark_noisy({"size": size, "model": "tiny", "mode": mode, "tile_px": tile,
                                            "steps": steps, **harness.timing(r)}, r))
    P.restore(pipe)
    return rows


def add_arguments(p) -> None:
    p.add_argument("--size", type=int, action="append", default=None, metavar="PX",
                   help="instead of the suite: the tiny model's generate at SIZE² px (repeatable), every mode")
    p.add_argument("--steps", type=int, default=4, help="with --size: LCM steps")
    p.add_argument("--mode", choices=["global", "multidiffusion", "cross_tile"], action="append", default=None,
                   help="with --size: only these modes (repeatable)")
    p.add_argument("--tile", type=int, default=128, help="with --size: tile in pixels")


def suite(quick: bool, args=None) -> list[dict]:
    if getattr(args, "size", None):
        for s in args.size:
            if s <= 0 or s % 16:
                raise SystemExit(f"bench pipeline: --size must be a positive multiple of 16, got {s}")
        return quick_rows(args.size, args.steps, args.mode or ("global", "multidiffusion", "cross_tile"), args.tile,
                          1 if args.warmup is None else args.warmup, 3 if args.iters is None else args.iters)
    if quick:
        from tiled_diffusion.tiny import tiny_pipeline

        tiny = tiny_pipeline()
        return (quick_rows() + dropin_rows(size=512, pipe=tiny, rounds=1)  # 512²: above the tiny model's bins
                + seam_rows(size=512, tile=128, steps=1))
    t0 = time.perf_counter()
    rows = dropin_rows(2048)
    rows += speed_rows()
    rows += seam_rows()
    rows.append({"note": f"suite wall time {time.perf_counter() - t0:.0f} s; global and multidiffusion skipped at "
                         f"4096² (minutes per step on 2 cores)"})
    return rows


def test_pipeline_cross_tile_tiny(benchmark):
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=128)
    out = benchmark(lambda: P.generate(pipe, "a cat", width=256, height=256, steps=2, seed=0, output_type="latent",
                                       progress=False))
    assert torch.isfinite(out).all()
