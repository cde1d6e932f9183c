"""`tiled-diffusion generate | upscale | bench | inspect`."""
from __future__ import annotations

import argparse
import os
import sys

SUITES = {  # suite name -> benchmarks/bench_<file>.py
    "gemm": "bench_int8_gemm",
    "attention": "bench_window_attention",
    "blend": "bench_seam_blend",
    "pipeline": "bench_pipeline",
    "memory": "bench_memory",
    "vae": "bench_vae",
    "quality": "bench_quality",
    "guidance": "bench_guidance",
    "distributed": "bench_distributed",
}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT (e.g. 4096x2304), got {text!r}") from None
    return w, h


def _benchmarks_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "benchmarks")
    if not os.path.isdir(path):
        raise SystemExit("tiled-diffusion bench needs a source checkout (the benchmarks/ folder beside the package)")
    return path


def bench(args: argparse.Namespace) -> int:
    import importlib

    sys.path.insert(0, _benchmarks_dir())
    import harness

    names = list(SUITES) if args.suite == "all" else [args.suite]
    env = harness.environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    results = {}
    for name in names:
        module = importlib.import_module(SUITES[name])
        rows = module.suite(quick=args.quick)
        harness.print_table(f"{name} ({'quick' if args.quick else 'full'})", rows)
        results[name] = rows
    if args.json:
        harness.write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    from ..tools import inspect

    argv = (["--check"] if args.check else []) + (["--json"] if args.json else [])
    return inspect.main(argv)


def generate(args: argparse.Namespace) -> int:
    if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:  # the same command on N local ranks
        from ..parallel.comm import launch_local

        return launch_local(args.argv, args.nproc)
    from .generate import RequestError, run

    try:
        return run(args)
    except RequestError as e:  # a bad request: one clear line, no traceback
        print(f"tiled-diffusion generate: error: {e}", file=sys.stderr)
        return 2


def upscale(args: argparse.Namespace) -> int:
    from .upscale import main

    return main(args)


def add_guidance_arguments(p: argparse.ArgumentParser, regions: bool = True) -> None:
    p.add_argument("--controlnet", default=None,
                   help="a PixArt ControlNet checkpoint: diffusers folder / .safetensors with config.json, or an "
                        "upstream PixArt-alpha .pth")
    p.add_argument("--control-image", default=None,
                   help="control image for --controlnet (e.g. a HED edge map; `edges:PATH` = soft edges of PATH "
                        "computed here)" + ("" if regions else "; default: soft edges of the resized input"))
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    if regions:
        p.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:PROMPT",
                       help="a prompt for a rectangle of the canvas in pixels (repeatable; --prompt is the "
                            "background)")


def add_upscale_arguments(u: argparse.ArgumentParser) -> None:
    u.add_argument("--image", required=True, help="input image (PNG/JPEG/...; RGBA, greyscale and 16-bit handled)")
    u.add_argument("--scale", type=float, default=4.0, help="output size = scale × input size")
    u.add_argument("--strength", type=float, default=0.4,
                   help="where the schedule starts (near 0: keep the input, 1: from pure noise)")
    u.add_argument("--prompt", default="", help="what the image shows (helps the model add matching detail)")
    u.add_argument("--steps", type=int, default=4, help="LCM steps (original_inference_steps × strength ≥ steps)")
    u.add_argument("--model", default="tiny", help="a local diffusers PixArt folder, or 'tiny'")
    u.add_argument("--mode", choices=["cross_tile", "multidiffusion", "global"], default="cross_tile")
    u.add_argument("--tile", type=int, default=None, help="tile size in pixels (default per mode)")
    u.add_argument("--radius", type=int, default=1)
    u.add_argument("--overlap", type=float, default=0.5)
    u.add_argument("--profile", choices=["uniform", "linear", "cosine", "gaussian"], default="cosine")
    u.add_argument("--int8", choices=["auto", "w8a8", "none"], default="auto")
    u.add_argument("--guidance-scale", type=float, default=0.0)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    u.add_argument("--device", default=None)
    add_guidance_arguments(u, regions=False)
    u.add_argument("--out", default="upscaled.png")
    u.add_argument("--json", default=None, help="write per-stage timings and peak memory here")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiled-diffusion", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate one image on a tiled canvas")
    g.add_argument("--prompt", required=True)
    g.add_argument("--size", type=_size, default=(2048, 2048), help="WIDTHxHEIGHT in pixels (multiples of 16)")
    g.add_argument("--steps", type=int, default=4, help="LCM steps (2-4 for PixArt-δ)")
    g.add_argument("--model", default="tiny",
                   help="a local diffusers PixArt folder, or 'tiny' (the built-in lab model, trained on lab/world.py)")
    g.add_argument("--mode", choices=["cross_tile", "multidiffusion", "global"], default="cross_tile")
    g.add_argument("--tile", type=int, default=None,
                   help="tile size in pixels (default: 512 for cross_tile, 1024 for multidiffusion)")
    g.add_argument("--radius", type=int, default=1, help="cross_tile: neighbour radius in tiles")
    g.add_argument("--overlap", type=float, default=0.5, help="multidiffusion: overlap as a fraction of the tile")
    g.add_argument("--profile", choices=["uniform", "linear", "cosine", "gaussian"], default="cosine")
    g.add_argument("--shift", action="store_true", help="cross_tile: move the tile grid by half a tile every other step")
    g.add_argument("--positional", choices=["canvas_stretched", "canvas_native", "tile_local"],
                   default="canvas_stretched", help="positions the tiles' tokens carry (see positional.py)")
    g.add_argument("--tile-batch-size", type=int, default=None,
                   help="multidiffusion: tiles per forward (default: all; lower it to bound memory)")
    g.add_argument("--head-chunk", type=int, default=None,
                   help="cross_tile: attention heads per window_attention call (default: all; lower bounds memory)")
    g.add_argument("--int8", choices=["auto", "w8a8", "none"], default="auto",
                   help="transformer linear layers: auto = W8A8 where it was measured faster than bf16 on this "
                        "device (the reason is in --json and TILED_DIFFUSION_LOG=info); none also keeps T5 in float")
    g.add_argument("--guidance-scale", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 (fp16 on GPU)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--max-memory-gb", type=float, default=None, help="refuse requests whose estimate exceeds this")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N local processes (torchrun; one device each); under torchrun, leave it out")
    g.add_argument("--out", default="image.png")
    g.add_argument("--json", default=None, help="write per-stage timings here")
    add_guidance_arguments(g)  # --controlnet, --control-image, --control-scale, --region
    g.set_defaults(func=generate)

    u = sub.add_parser("upscale", help="upscale an image: resize, tiled encode, noise to a strength, tiled "
                                       "denoise, tiled decode")
    add_upscale_arguments(u)
    u.set_defaults(func=upscale)

    b = sub.add_parser("bench", help="run a benchmark suite and print a table")
    b.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    b.add_argument("--quick", action="store_true", help="tiny sizes (what CI runs)")
    b.add_argument("--json", default=None, help="also write the rows and environment to this file")
    b.set_defaults(func=bench)

    i = sub.add_parser("inspect", help="static GPU report: compile every kernel for sm_80/sm_90, list resources")
    i.add_argument("--check", action="store_true", help="exit non-zero on spills or missing tensor-core code")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=inspect_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc re-runs the same command under torchrun
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
