"""`tiled-diffusion generate`, the CLI command (the Python entry point is `tiled_diffusion.generate`): validate,
load, accelerate, encode once, denoise the canvas, tiled VAE decode, write the PNG atomically, report per-stage
timings."""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import sys
import time
from types import SimpleNamespace
from typing import Optional

import diffusers
import torch

from .. import parallel as Dd
from .. import pipeline as P
from ..core.config import DEFAULT_STRIDE, DEFAULT_WINDOW, MODES, TiledConfig, check_size
from ..model.int8 import resolve_mode
from ..pipeline.api import encode
from ..pipeline.loading import LoadError, checkpoint_files, load_pipeline, read_header
from ..pipeline.sampler import check_memory, estimate_memory
from ..pipeline.swaps import quantize_text_encoder
from ..lab.models import MODEL_DIR as TINY_MODEL_DIR
from ..tiny import tiny_pipeline, tiny_text_encoder, tiny_tokenizer
from . import checks as C
from .checks import RequestError
from .guidance import check_guidance

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pipeline_class(path: str):
    """The pipeline class a local diffusers folder names in its model_index.json (PixArt-α or -Σ only)."""
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
    except OSError:
        raise RequestError(f"--model {path!r}: not a diffusers folder (no model_index.json); use a local "
                           f"PixArt-α/Σ pipeline folder or 'tiny'") from None
    except ValueError as e:
        raise RequestError(f"--model {path!r}: model_index.json is not valid JSON ({e})") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        raise RequestError(f"--model {path!r} holds a {name}, expected PixArtAlphaPipeline or PixArtSigmaPipeline")
    return getattr(diffusers, name)


def _component_config(model: str, component: str) -> dict:
    path = os.path.join(model, component, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RequestError(f"--model {model!r}: cannot read {component}/config.json ({e})") from None


def transformer_config(model: str):
    """The transformer's config as stored (for 'tiny': the shipped lab model's, the one that runs)."""
    return SimpleNamespace(**_component_config(TINY_MODEL_DIR if model == "tiny" else model, "transformer"))


def _vae_config(model: str) -> dict:
    """The VAE's config (the memory estimate builds its shapes on the meta device; nothing is loaded)."""
    return _component_config(TINY_MODEL_DIR if model == "tiny" else model, "vae")


def vae_scale_factor(model: str, vae_config: Optional[dict] = None) -> int:
    """Image pixels per latent pixel of the model's VAE (diffusers' rule: 2^(down blocks - 1); 8 for PixArt's)."""
    return 2 ** (len((vae_config or _vae_config(model))["block_out_channels"]) - 1)


TEXT_PARTS = ("tokenizer", "text_encoder")
DENOISE_PARTS = ("transformer", "vae", "scheduler")


def load(model: str, dtype: torch.dtype, int8, components=TEXT_PARTS + DENOISE_PARTS):
    """The pipeline on the CPU with only `components` (the others None): 'tiny', or a local folder (int8 on:
    layers quantized as the weights stream in, so no float copy of T5-XXL is ever whole; see loading.py)."""
    if model == "tiny":
        pipe = tiny_pipeline(device="cpu", dtype=dtype)
        for name in set(TEXT_PARTS + DENOISE_PARTS) - set(components):
            setattr(pipe, name, None)
        return pipe
    pipeline_class(model)
    try:
        return load_pipeline(model, dtype, int8, components)
    except LoadError as e:
        raise RequestError(f"--model {model!r}: {e}") from None


def encode_prompt(args, device: torch.device, dtype: torch.dtype, int8, timings: dict, guidance=None):
    """Stage 1: load the text encoder alone (weight-only int8 when int8 is on), encode once, free it. T5-XXL
    (4.4 GB in int8) and the transformer are then never in memory together: the peak is the larger, not the sum."""
    t0 = time.perf_counter()
    text = load(args.model, dtype, int8, TEXT_PARTS)
    if int8 is not None:
        quantize_text_encoder(text.text_encoder)
    release_freed_memory()  # the float layers read and quantized while loading left holes in the heap
    if device.type != "cpu":
        text.to(device)
    timings["load_text_encoder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def enc(prompt):
        return encode(text, prompt, guidance_scale=args.guidance_scale)

    # guidance (issue 10): with --region, every distinct prompt is encoded once (cli_upscale.Guidance)
    embeds, mask = enc(args.prompt) if guidance is None else guidance.encode(enc, args.prompt, args.guidance_scale)
    del text
    release_freed_memory()
    timings["encode_s"] = time.perf_counter() - t0
    return embeds, mask


def _text_encoder_bytes(model: str, dtype: torch.dtype, int8) -> int:
    """Weights of the text encoder as it will be loaded (int8: one byte per weight), from the checkpoint headers
    (nothing is read but the headers) or the tiny model."""
    if model == "tiny":
        numel = sum(p.numel() for p in tiny_text_encoder(len(tiny_tokenizer())).parameters())
    else:
        try:
            files = checkpoint_files(os.path.join(model, "text_encoder"), "transformers") or {}
            numel = sum(math.prod(e["shape"]) for path in files for e in read_header(path)[0].values())
        except (OSError, LoadError, KeyError, ValueError) as e:
            raise RequestError(f"--model {model!r}: cannot read the text encoder's checkpoint ({e})") from None
    return numel * (1 if int8 else torch.finfo(dtype).bits // 8)


def atomic_write(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def release_freed_memory() -> None:
    """Hand the heap pages freed by the last stage back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    CPU tensors below glibc's mmap threshold (which grows to 32 MB as large blocks are freed) live in the heap, and
    glibc keeps freed heap pages. Loading is the worst case: every float layer read and quantized leaves a hole
    between the int8 layers kept (benchmarks/NOTES.md, memory). Called after loading and between stages, where
    its cost (one pass over the free lists) is nothing.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS of this process (imports included) and, on CUDA, the peak of allocated tensor memory."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def validate(args) -> TiledConfig:
    """Check the request before loading anything; returns the sampler config."""
    w, h = args.size
    try:
        check_size(w, h)
    except ValueError as e:
        raise RequestError(f"--size {w}x{h}: {e}") from None
    if args.mode not in MODES:
        raise RequestError(f"--mode {args.mode!r}: unknown mode; choose one of {', '.join(MODES)}")
    if args.steps < 1:
        raise RequestError(f"--steps must be >= 1, got {args.steps}")
    check_request(args)
    try:
        window = getattr(args, "window", None)
        stride = getattr(args, "stride", None)
        return TiledConfig(mode=args.mode, tile=args.tile, radius=args.radius, overlap=args.overlap,
                           profile=args.profile, shift=getattr(args, "shift", False),
                           window=DEFAULT_WINDOW if window is None else (None if window == 0 else window),
                           stride=DEFAULT_STRIDE if stride is None else stride,
                           positional=getattr(args, "positional", "canvas_stretched"),
                           tile_batch_size=getattr(args, "tile_batch_size", None),
                           head_chunk=getattr(args, "head_chunk", None)).validate()
    except ValueError as e:
        raise RequestError(str(e)) from None


def check_request(args) -> None:
    """Everything about a request that can be checked without loading a model (cli/checks.py): output paths,
    ranges, conflicting flags, the device, the model folder's parts, the steps its scheduler can take."""
    C.check_outputs(getattr(args, "out", None), getattr(args, "json", None))
    C.check_text("--prompt", getattr(args, "prompt", None))
    C.check_seed(args.seed)
    C.check_number("--guidance-scale", args.guidance_scale, 0.0)
    C.check_number("--control-scale", getattr(args, "control_scale", None))
    C.check_number("--max-memory-gb", getattr(args, "max_memory_gb", None), 0.0, lo_open=True)
    C.check_number("--overlap", getattr(args, "overlap", None), 0.0)
    C.check_nproc(getattr(args, "nproc", None))
    C.check_conflicts(args)
    C.check_device(args.device)
    if args.model != "tiny":
        if not os.path.isdir(args.model):
            raise RequestError(f"--model {args.model!r}: no such folder (give a local diffusers PixArt folder or "
                               f"'tiny')")
        pipeline_class(args.model)
        C.check_model_folder(args.model)
    C.check_steps(args.model, args.steps)


def memory_limit_gb(args, device: torch.device) -> float:
    """--max-memory-gb, or by default what the machine has (checks.machine_memory_gb)."""
    limit = getattr(args, "max_memory_gb", None)
    return limit if limit is not None else C.machine_memory_gb(device)


@dataclasses.dataclass
class Setup:
    """Where and how a CLI run computes: the device, the dtype, the transformer's int8 mode (with the reason
    `int8.resolve_mode` gave) and the text encoder's."""

    device: torch.device
    dtype: torch.dtype
    int8: Optional[str]
    int8_reason: str
    text_encoder_int8: Optional[str]


def setup(args, device: Optional[torch.device] = None) -> Setup:
    """Resolve --device/--dtype/--int8 and check --model (a folder of the right kind) before anything loads.

    T5 is int8 (weight-only) unless --int8 none: that is about memory and pays everywhere. The transformer's W8A8
    is about speed: "auto" takes it only where it was measured faster than bf16 (int8.resolve_mode)."""
    device = device or torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    requested = None if args.int8 in (None, "none") else args.int8
    int8, reason = resolve_mode(requested, device)
    if args.model != "tiny":
        if not os.path.isdir(args.model):
            raise RequestError(f"--model {args.model!r}: no such folder (give a local diffusers PixArt folder or "
                               f"'tiny')")
        pipeline_class(args.model)  # a folder of the right kind, before any estimate reads its configs
    return Setup(device, dtype, int8, reason, None if requested is None else "w8a8")


def prepare_pipeline(args, cfg: TiledConfig, su: Setup, timings: dict, guidance, d=None):
    """Stage 2: load the transformer, VAE and scheduler on the CPU (int8 as the weights stream in), accelerate
    them for `cfg` in the least-memory setting, load the guidance (ControlNet) for it, join the process group `d`
    (distributed runs), move to the device. Returns (pipe, keyword arguments for pipeline.generate)."""
    t0 = time.perf_counter()
    pipe = load(args.model, su.dtype, su.int8, DENOISE_PARTS)
    pipe.set_progress_bar_config(disable=True)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    P.accelerate(pipe, mode=cfg.mode, tile=cfg.tile, radius=cfg.radius, shift=cfg.shift, window=cfg.window,
                 stride=cfg.stride, overlap=cfg.overlap,
                 profile=cfg.profile, positional=cfg.positional, tile_batch_size=cfg.tile_batch_size,
                 head_chunk=cfg.head_chunk, int8=su.int8, text_encoder_int8=False, keep_original_weights=False)
    try:  # guidance (issue 10): the ControlNet loads for this transformer
        extra = guidance.generate_kwargs(pipe)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if d is not None:
        Dd.enable(pipe, d=d)
        try:  # (generate only: upscale runs on one process)
            Dd.check_world(pipe, d.world, width=args.size[0], height=args.size[1],
                           guidance_scale=args.guidance_scale)
        except ValueError as e:
            raise RequestError(str(e)) from None
    release_freed_memory()
    timings["accelerate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if su.device.type != "cpu":
        pipe.to(su.device)  # a ControlNet follows the transformer when generate attaches it
    timings["to_device_s"] = time.perf_counter() - t0
    return pipe, extra


def write_outputs(args, image, su: Setup, timings: dict, t_all: float, summary: str, report: dict) -> None:
    """Write the PNG atomically, print the summary and the per-stage timings with the peak memory, and write the
    --json report (`report` plus timings, memory, device, dtype and int8)."""
    t0 = time.perf_counter()
    try:  # checked writable before the work; what can still fail here is the disk (full, removed): one line
        atomic_write(args.out, lambda p: image.save(p, format="PNG"))
    except OSError as e:
        raise RequestError(f"--out {args.out!r}: writing the image failed ({e.strerror or e})") from None
    timings["write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    memory = peak_memory(su.device)
    print(f"wrote {args.out} ({summary})")
    print("  ".join(f"{k}={v:.2f}" for k, v in {**timings, **memory}.items()))
    if args.json:
        full = {"timings": timings, "memory": memory, **report, "model": args.model, "device": str(su.device),
                "dtype": str(su.dtype).replace("torch.", ""), "int8": su.int8, "int8_reason": su.int8_reason,
                "out": args.out}
        try:
            atomic_write(args.json, lambda p: _write_text(p, json.dumps(full, indent=2)))
        except OSError as e:
            raise RequestError(f"--json {args.json!r}: writing the report failed ({e.strerror or e}); the image "
                               f"is written") from None


def check_request_memory(args, cfg: TiledConfig, su: "Setup", w: int, h: int) -> dict:
    """The peak-memory estimate of a w × h request against --max-memory-gb or, by default, the machine's memory
    (nothing loaded: configs and checkpoint headers only); returns the estimate."""
    vae_config = _vae_config(args.model)
    est = estimate_memory(transformer_config(args.model), height=h, width=w, cfg=cfg, dtype=su.dtype,
                          guidance_scale=args.guidance_scale, int8=su.int8, vae=vae_config,
                          vae_scale_factor=vae_scale_factor(args.model, vae_config),
                          text_encoder_bytes=_text_encoder_bytes(args.model, su.dtype, su.text_encoder_int8),
                          text_encoder_alone=True)
    try:
        check_memory(est, memory_limit_gb(args, su.device), cfg)
    except MemoryError as e:
        msg = str(e) if getattr(args, "max_memory_gb", None) is not None else str(e).replace(
            "--max-memory-gb", "this machine's memory (--max-memory-gb sets another limit):", 1)
        raise RequestError(msg) from None
    print(f"estimated peak memory {est['total'] / 2**30:.2f} GB ({cfg.mode}, {w}x{h}, {su.dtype})", file=sys.stderr)
    return est


def run(args) -> int:
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    cfg = validate(args)
    w, h = args.size
    # --- guidance (issue 10): --region, --controlnet, --control-image checked before anything loads ---
    try:
        guidance = check_guidance(args, w, h)
    except ValueError as e:
        raise RequestError(str(e)) from None
    # --- end guidance ---
    # Under torchrun (or --nproc, which starts torchrun) every rank runs this: one device per rank, rank 0 alone
    # loads the text encoder and writes files (distributed.py).
    if Dd.launched_by_torchrun():
        Dd.die_with_parent()  # a killed launcher / torchrun leaves no rank computing
    d = Dd.setup(device=args.device) if Dd.launched_by_torchrun() else None
    if d is not None and (getattr(args, "region", None) or getattr(args, "controlnet", None)):
        raise RequestError("--region and --controlnet are not supported over several processes yet; run them on one")
    su = setup(args, d.device if d is not None else None)

    est = check_request_memory(args, cfg, su, w, h)

    # Every model is loaded and quantized on the CPU, then moved: the float T5-XXL (9.5 GB in bf16) never has to
    # fit on the GPU, only its int8 form does, and it has left before the transformer arrives.
    embeds, mask = Dd.on_main(lambda: encode_prompt(args, su.device, su.dtype, su.text_encoder_int8, timings,
                                                    guidance), d)
    pipe, extra = prepare_pipeline(args, cfg, su, timings, guidance, d)

    main = d is None or d.is_main
    images = P.generate(pipe, prompt_embeds=(embeds, mask), width=w, height=h, steps=args.steps, seed=args.seed,
                        guidance_scale=args.guidance_scale, output_type="pil", progress=main, timings=timings,
                        max_memory_gb=args.max_memory_gb, **extra)
    release_freed_memory()
    if not main:  # the other ranks took part in the denoise and the VAE decode; rank 0 alone writes
        return 0
    image = images[0]
    write_outputs(args, image, su, timings, t_all, f"{w}x{h}, {cfg.mode}, {args.steps} steps",
                  {"prompt": args.prompt, "seed": args.seed, "guidance_scale": args.guidance_scale,
                   "size": [w, h], "mode": cfg.mode, "steps": args.steps, "tiling": dataclasses.asdict(cfg),
                   "nproc": d.world if d is not None else 1, "estimated_memory_gb": est["total"] / 2**30})
    return 0
