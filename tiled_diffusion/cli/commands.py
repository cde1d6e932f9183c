"""`tiled-diffusion generate | upscale | bench | inspect`."""
from __future__ import annotations

import argparse
import importlib
import inspect as pyinspect
import os
import signal
import sys
import threading

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


def _suite_module(name: str):
    bdir = _benchmarks_dir()
    if bdir not in sys.path:
        sys.path.insert(0, bdir)
    return importlib.import_module(SUITES[name])


def _run_suite(module, args: argparse.Namespace) -> list:
    if "args" in pyinspect.signature(module.suite).parameters:
        return module.suite(quick=args.quick, args=args)
    return module.suite(quick=args.quick)  # a suite without flags of its own: --warmup/--iters do not reach it


def bench(args: argparse.Namespace) -> int:
    if args.compare:  # `bench compare A.json B.json`
        return bench_compare(args)
    sys.path.insert(0, _benchmarks_dir())
    import harness  # benchmarks/harness.py: importable only once its folder is on sys.path (line above)

    if args.threads:
        import torch  # not at the top: `--help` and argument errors stay free of torch

        torch.set_num_threads(args.threads)
    names = [n for n in (SUITES if args.suite == "all" else [args.suite]) if n not in args.skip]
    if not names:
        print(f"tiled-diffusion bench: error: --skip leaves no suite to run (--suite {args.suite})", file=sys.stderr)
        return 2
    env = harness.environment()
    print(harness.describe(env))
    results = {}
    profiler = _start_trace(args.trace)
    for name in names:
        module = _suite_module(name)
        rows = _run_suite(module, args)
        harness.print_table(f"{name} ({'quick' if args.quick else 'full'})", rows, getattr(module, "COLUMNS", None))
        results[name] = harness.normalize_rows(rows, name, getattr(module, "CASE_KEYS", None))
    _stop_trace(profiler, args.trace)
    if args.json:
        harness.write_json(args.json, results, env)
        print(f"wrote {args.json}")
    if args.plot:
        harness.plot_rows(results, args.plot, harness.describe(env))
        print(f"wrote {args.plot}")
    return 0


def bench_compare(args: argparse.Namespace) -> int:
    sys.path.insert(0, _benchmarks_dir())
    import harness  # benchmarks/harness.py: importable only once its folder is on sys.path (line above)

    if args.compare[0] != "compare" or len(args.compare) != 3:
        print("tiled-diffusion bench compare: error: give two files: bench compare A.json B.json", file=sys.stderr)
        return 2
    return harness.compare_main(*args.compare[1:], fail_above=args.fail_above, floor=args.noise_floor / 100,
                                stat=args.stat)


def _start_trace(path):
    """A torch.profiler session for --trace (None without it). torch is imported here, as everywhere in this module,
    only when a command needs it: `tiled-diffusion --help` and argument errors stay instant."""
    if not path:
        return None
    import torch  # only with --trace: `--help` stays free of torch (docstring)
    from torch.profiler import ProfilerActivity, profile  # only with --trace, as torch

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, record_shapes=False)
    prof.__enter__()
    return prof


def _stop_trace(prof, path, top: int = 15) -> None:
    """Write the Chrome trace (chrome://tracing, ui.perfetto.dev) and print the top ops by self time."""
    if prof is None:
        return
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(path)
    import torch  # only with --trace: `--help` stays free of torch

    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    print(f"wrote trace {path} (open in ui.perfetto.dev or chrome://tracing)")


def inspect_cmd(args: argparse.Namespace) -> int:
    from ..tools import inspect  # imports torch: `--help` stays free of it

    argv = (["--check"] if args.check else []) + (["--json"] if args.json else [])
    return inspect.main(argv)


def generate(args: argparse.Namespace) -> int:
    from . import generate as G  # only for this command: diffusers and the model load with it (seconds)

    try:
        if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:  # the same command on N local ranks
            check_before_launch(args)  # one error line here, not one per rank plus torchrun's report
            from ..parallel.launch import launch_local  # torch.distributed and the model: only for this path

            return launch_local(args.argv, args.nproc)
        prof = _start_trace(getattr(args, "trace", None))
        rc = G.run(args)
        _stop_trace(prof, args.trace)
        return rc
    except G.RequestError as e:  # a bad request: one clear line, no traceback
        print(f"tiled-diffusion generate: error: {e}", file=sys.stderr)
        return 2


def check_before_launch(args: argparse.Namespace) -> None:
    """What `cli_generate.run` checks before loading, done once in the --nproc launcher. The memory estimate is
    checked here for CPU ranks (they share this machine's memory); GPU ranks check their own device's."""
    from . import generate as G  # diffusers and the model (seconds): only when --nproc launches
    from .guidance import check_guidance  # as generate: loads diffusers (controlnet, regions)

    cfg = G.validate(args)
    try:
        check_guidance(args, *args.size)
    except ValueError as e:
        raise G.RequestError(str(e)) from None
    try:  # every rank must get a band (or a tile): refused here, not in N tracebacks after the launch
        G.Dd.check_ranks(cfg, G.transformer_config(args.model), G.vae_scale_factor(args.model), args.nproc,
                         width=args.size[0], height=args.size[1], guidance_scale=args.guidance_scale)
    except ValueError as e:
        raise G.RequestError(str(e)) from None
    su = G.setup(args)
    if su.device.type == "cpu":
        G.check_request_memory(args, cfg, su, *args.size)


def upscale(args: argparse.Namespace) -> int:
    from .upscale import main  # only for this command: diffusers and PIL load with it

    return main(args)


class _DeprecatedProfile(argparse.Action):
    """`--profile` (the blend-weight profile) before it became `--blend-profile`: still works, with a warning,
    for one release (a researcher's --profile is a profiler: see --trace)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("tiled-diffusion: warning: --profile is now --blend-profile (the blend weights); the old spelling "
              "goes in the next release. To profile, use --trace OUT.json", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_blend_profile(p: argparse.ArgumentParser) -> None:
    choices = ["uniform", "linear", "cosine", "gaussian"]
    p.add_argument("--blend-profile", dest="profile", choices=choices, default="cosine",
                   help="multidiffusion/seam blend weights across a tile")
    p.add_argument("--profile", dest="profile", choices=choices, action=_DeprecatedProfile, help=argparse.SUPPRESS)


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
    add_blend_profile(u)  # --blend-profile (and the old --profile, with a warning)
    u.add_argument("--int8", choices=["auto", "w8a8", "none"], default="auto")
    u.add_argument("--guidance-scale", type=float, default=0.0)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    u.add_argument("--device", default=None)
    add_guidance_arguments(u, regions=False)
    u.add_argument("--out", default="upscaled.png")
    u.add_argument("--json", default=None, help="write per-stage timings and peak memory here")


def _suite_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"not a suite: {', '.join(unknown) or repr(text)} "
                                         f"(suites: {', '.join(SUITES)})")
    return names


def add_bench_arguments(b: argparse.ArgumentParser, suite: str | None) -> None:
    """`bench`'s flags: the common ones, then those of `suite` (its module's add_arguments) when one is named."""
    b.add_argument("compare", nargs="*", default=None, metavar="compare A.json B.json",
                   help="compare two --json files row by row (ratio, interval, verdict)")
    b.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    b.add_argument("--skip", type=_suite_list, default=(), metavar="SUITE[,SUITE]",
                   help="leave these suites out of the run (CI skips memory: its test stage runs the same quick "
                        "suite, benchmarks/bench_memory.py::test_memory_quick)")
    b.add_argument("--quick", action="store_true", help="tiny sizes (what CI runs)")
    b.add_argument("--json", default=None, help="also write the rows and environment to this file "
                                                "(schema: benchmarks/SCHEMA.md)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs before the timed ones (suite default)")
    b.add_argument("--iters", type=int, default=None, help="timed runs (rounds of the round robin; suite default)")
    b.add_argument("--trace", default=None, metavar="OUT.json",
                   help="record a torch.profiler Chrome trace of the run and print the top ops")
    b.add_argument("--plot", default=None, metavar="OUT.png",
                   help="plot time and %% of peak/copy against the case size (needs matplotlib)")
    b.add_argument("--fail-above", type=float, default=None, metavar="PCT",
                   help="compare: exit 1 when a row is slower beyond noise by more than PCT %%")
    b.add_argument("--noise-floor", type=float, default=5.0, metavar="PCT",
                   help="compare: ratios within this %% are 'same' whatever the spreads (default 5)")
    b.add_argument("--stat", choices=["median", "min"], default="median",
                   help="compare: the statistic compared (min: steadier on a shared machine)")
    if suite in SUITES:
        try:
            module = _suite_module(suite)
        except SystemExit:
            return
        if hasattr(module, "add_arguments"):
            module.add_arguments(b.add_argument_group(f"suite {suite}"))


def _suite_in(argv: list[str]) -> str | None:
    """The --suite value in a bench command line (read before parsing, so the suite's flags can be added)."""
    for i, a in enumerate(argv):
        if a == "--suite" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--suite="):
            return a.split("=", 1)[1]
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    suite = _suite_in(argv or [])

    p = argparse.ArgumentParser(prog="tiled-diffusion", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    shown = argparse.ArgumentDefaultsHelpFormatter  # every flag's help ends with its default

    g = sub.add_parser("generate", help="generate one image on a tiled canvas", formatter_class=shown)
    g.add_argument("--prompt", required=True)
    g.add_argument("--size", type=_size, default="2048x2048", help="WIDTHxHEIGHT in pixels (multiples of 16)")
    g.add_argument("--steps", type=int, default=4, help="LCM steps (2-4 for PixArt-δ)")
    g.add_argument("--model", default="tiny",
                   help="a local diffusers PixArt folder, or 'tiny' (the built-in lab model, trained on lab/world.py)")
    g.add_argument("--mode", choices=["cross_tile", "multidiffusion", "global"], default="cross_tile")
    g.add_argument("--tile", type=int, default=None,
                   help="tile size in pixels (default: 512 for cross_tile, 1024 for multidiffusion)")
    g.add_argument("--radius", type=int, default=1, help="cross_tile: neighbour radius in tiles")
    g.add_argument("--overlap", type=float, default=0.5, help="multidiffusion: overlap as a fraction of the tile")
    add_blend_profile(g)  # --blend-profile (and the old --profile, with a warning)
    g.add_argument("--window", type=float, default=None,
                   help="cross_tile: each token's attention window, centred on it, in multiples of the model's "
                        "training size (default: core.config.DEFAULT_WINDOW); 0: tile-blocked windows (--tile, --radius)")
    g.add_argument("--stride", type=float, default=None,
                   help="cross_tile: side of the token groups sharing one window, in multiples of the training "
                        "size (default: core.config.DEFAULT_STRIDE)")
    g.add_argument("--shift", action="store_true",
                   help="cross_tile with --window 0: move the tile grid by half a tile every other step (partial "
                        "tiles at the border, no wrap)")
    g.add_argument("--positional", choices=["canvas_stretched", "canvas_native", "tile_local"],
                   default="canvas_stretched", help="positions the tiles' tokens carry (see positional.py)")
    g.add_argument("--tile-batch-size", type=int, default=None,
                   help="multidiffusion: tiles per forward (default: all; lower it to bound memory)")
    g.add_argument("--head-chunk", type=int, default=None,
                   help="cross_tile: attention heads per window_attention call (default: all; lower bounds memory)")
    g.add_argument("--int8", choices=["auto", "w8a8", "none"], default="auto",
                   help="transformer linear layers: auto = W8A8 where it was measured faster than bf16 on this "
                        "device (the reason is in --json and TILED_DIFFUSION_LOG=info); none also keeps T5 in float")
    g.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance (0: off, as LCM)")
    g.add_argument("--seed", type=int, default=0, help="0 .. 2**64-1")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 (fp16 on GPU)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--max-memory-gb", type=float, default=None,
                   help="refuse requests whose estimate exceeds this (default: this machine's memory)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N local processes (torchrun; one device each); under torchrun, leave it out")
    g.add_argument("--out", default="image.png", help="the PNG to write (atomically)")
    g.add_argument("--json", default=None, help="write a report here: prompt, seed, tiling settings, per-stage "
                                                "timings, peak memory")
    g.add_argument("--trace", default=None, metavar="OUT.json",
                   help="record a torch.profiler Chrome trace (tiled_diffusion.<phase> ranges) and print the top ops")
    add_guidance_arguments(g)  # --controlnet, --control-image, --control-scale, --region
    g.set_defaults(func=generate)

    u = sub.add_parser("upscale", help="upscale an image: resize, tiled encode, noise to a strength, tiled "
                                       "denoise, tiled decode", formatter_class=shown)
    add_upscale_arguments(u)
    u.set_defaults(func=upscale)

    b = sub.add_parser("bench", help="run a benchmark suite and print a table; `bench compare A.json B.json`",
                       description="Run a benchmark suite (`bench --suite NAME --help` lists its own flags) or "
                                   "compare two --json files: `bench compare A.json B.json [--fail-above PCT]`.")
    add_bench_arguments(b, suite)
    b.set_defaults(func=bench)

    i = sub.add_parser("inspect", help="static GPU report: compile every kernel for sm_80/sm_90, list resources")
    i.add_argument("--check", action="store_true", help="exit non-zero on spills or missing tensor-core code")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=inspect_cmd)
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt: `finally` blocks run (the temp file of an
    atomic write is removed) and the command ends with one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    from .checks import silence_accelerate_notice  # here, not at the top: `--help` stays free of torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # --nproc re-runs the same command under torchrun
    silence_accelerate_notice()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    old = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"tiled-diffusion {args.command}: interrupted (Ctrl-C); no partial output left", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"tiled-diffusion {args.command}: stopped by SIGTERM; no partial output left", file=sys.stderr)
        return 128 + e.signum
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
