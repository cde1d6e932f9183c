"""Quality benchmark: the lab model (tiled_diffusion/lab, shipped as `--model tiny`) through every tiling mode at
1×, 4× and 16× its training area (128², 256², 512² px), scored against ground truth rendered from the same world
at the same size: seam ratio at the mode's own seams, KID and power-spectrum distance to the ground truth, PSNR
against `global` at the same seed, prompt fidelity (the share of samples the lab's family classifier assigns to
the prompted family), per family a structure figure over the ground truth's (waves, suns, trunks, windows), time.
See tiled_diffusion/lab/quality.py for the definitions.

Writes quality.json and one contact sheet per size (one seed per row, one mode per column, seams in red) into
$TD_QUALITY_OUT, or a fresh folder under the system temp dir (never into the repository); the path is printed.

suite(quick=False): 12 seeds (three per scene family: the fewest a KID error needs), 4 LCM steps, every mode, 16
ground-truth canvases per size (~4 min on a 2-core machine at 1 thread).
suite(quick=True): 256² only, 1 seed, 2 steps, global / cross_tile r1 / r0 / multidiffusion (+ pipe(...)), 12
ground-truth canvases: a smoke run that keeps the suite alive in CI; its figures mean nothing (one seed has no
KID: a family needs two images; the ground-truth row has one, and its error).
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time


def out_dir() -> str:
    path = os.environ.get("TD_QUALITY_OUT")
    if not path:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = os.path.join(tempfile.gettempdir(), "tiled-diffusion-quality", f"{stamp}-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def suite(quick: bool) -> list[dict]:
    from tiled_diffusion.lab import quality

    path = out_dir()
    t0 = time.perf_counter()
    if quick:
        rows = quality.run(path, scales=(4,), seeds=1, steps=2,
                           modes=quality.QUICK_MODES + (quality.PIPE_CALL.name,), gt_count=12, log=lambda m: None)
    else:
        rows = quality.run(path, scales=(1, 4, 16), seeds=12, steps=4, gt_count=16,
                           log=lambda m: print(m, flush=True))
    rows.append({"note": f"wrote {path} (quality.json, contact_*.png); {time.perf_counter() - t0:.0f} s"})
    print(f"bench quality: wrote {path}")
    return rows
