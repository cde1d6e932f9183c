"""A gallery of the lab model: `python -m tiled_diffusion.lab.gallery --out DIR`.

Writes into DIR:
- `gallery.png`     contact sheet: one row per scene family, for each canvas size (1×, 4×, 16× the training area)
                    a column of ground truth and one per mode; the mode's tile seams drawn in red, every image
                    scaled to the same cell. Beside it, the README's first example (1024², "a city at night",
                    the CLI's defaults) when --example is on.
- `quality.png`     the quality figures against canvas size, one line per mode (matplotlib): KID to the ground
                    truth (the ground truth's own KID dotted: the estimator's floor), prompt fidelity, seam ratio,
                    and the structure figures' distance from the ground truth (mean |log2 ratio| over families).
- `gallery.json`    the figures plotted.
- `gallery_small.jpg` / `quality_small.png` (--docs): compressed copies for docs/ (≤ 300 KB together).

Figures come from `--per-family` seeds per family per size and mode (the contact sheet shows the first), scored
as lab/quality.py scores them. ~3 min at 1 thread with the defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

from .. import pipeline as P
from ..core.config import DEFAULT_STRIDE, DEFAULT_WINDOW
from . import models, quality, world

# the untiled model, the CLI's default (token-centred windows), tile-blocked windows, overlapping tiles
DEFAULT_MODE = next(m.name for m in quality.MODES
                    if (dict(m.overrides).get("window"), dict(m.overrides).get("stride")) == (DEFAULT_WINDOW,
                                                                                            DEFAULT_STRIDE))
GALLERY_MODES = ("global", DEFAULT_MODE, "cross_tile r1", "multidiffusion 50%")
EXAMPLE = ("a city at night", 1024)  # the README's first example: tiled-diffusion generate --size 1024x1024


def _to_pil(img: torch.Tensor, cell: int, seams=None, size: int = 0):
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    tile = Image.fromarray(arr).resize((cell, cell), Image.BILINEAR if img.shape[-1] < cell else Image.LANCZOS)
    if seams:  # red ticks on the cell's borders where the seams run (full lines would hide a fine grid's image)
        d, k, t = ImageDraw.Draw(tile), cell / size, max(4, cell // 16)
        for y in seams[0]:
            d.line([(0, y * k), (t, y * k)], fill=(255, 0, 0), width=1)
            d.line([(cell - 1 - t, y * k), (cell, y * k)], fill=(255, 0, 0), width=1)
        for x in seams[1]:
            d.line([(x * k, 0), (x * k, t)], fill=(255, 0, 0), width=1)
            d.line([(x * k, cell - 1 - t), (x * k, cell)], fill=(255, 0, 0), width=1)
    return tile


def contact_sheet(path: str, sheets: dict, modes, cell: int = 112, example=None,
                  geo: quality.Geometry = quality.Geometry()) -> None:
    """sheets: {size: {column name: images [4, 3, size, size] (one per family)}}."""
    fams = list(world.FAMILIES)
    by_name = {m.name: m for m in modes}
    cols = [(size, name) for size, d in sheets.items() for name in d]
    left, head, gap = 54, 28, 6
    width = left + len(cols) * cell + gap * (len(sheets) - 1)
    ex_w = 0
    if example is not None:
        ex_w = 4 * cell + gap
    sheet = Image.new("RGB", (width + ex_w, head + cell * len(fams)), "white")
    draw = ImageDraw.Draw(sheet)
    x = left
    prev = None
    for size, name in cols:
        if prev is not None and size != prev:
            x += gap
        if size != prev:
            draw.text((x + 2, 1), f"{size}² ({(size / models.TRAIN_SIZE) ** 2:.0f}x area)", fill="black")
        prev = size
        draw.text((x + 2, 14), name.replace("cross_tile", "ct").replace("multidiffusion", "md")[:18], fill="black")
        m = by_name.get(name)
        seams = quality.mode_seams(m, size, size, geo) if m is not None and m.mode != "global" else None
        for r, fam in enumerate(fams):
            sheet.paste(_to_pil(sheets[size][name][r], cell, seams, size), (x, head + r * cell))
        x += cell
    for r, fam in enumerate(fams):
        draw.text((2, head + r * cell + cell // 2 - 6), fam, fill="black")
    if example is not None:
        caption, img = example
        x0 = width + gap
        draw.text((x0 + 2, 1), f'generate "{caption}"', fill="black")
        draw.text((x0 + 2, 14), f"--size {img.shape[-1]}x{img.shape[-2]} (defaults)", fill="black")
        sheet.paste(_to_pil(img, 4 * cell), (x0, head))
    sheet.save(path)


def plot(path: str, figures: dict) -> None:
    import matplotlib  # optional (the dev extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display here

    sizes = figures["sizes"]
    panels = (("kid", "KID to ground truth (lower is better)", True), ("fidelity", "prompt fidelity", False),
              ("seam_ratio", "seam ratio at the mode's seams (1 = none)", False),
              ("structure", "structure: mean |log2(sample / truth)|, clip 4", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, logy) in zip(axes, panels):
        for name, per in figures["modes"].items():
            ys = [per[str(s)].get(key) for s in sizes]
            if all(v is None for v in ys):
                continue
            ax.plot(sizes, [float("nan") if v is None else v for v in ys], marker="o", label=name)
        gt = [figures["ground truth"][str(s)].get(key) for s in sizes]
        if any(v is not None for v in gt):
            ax.plot(sizes, [float("nan") if v is None else v for v in gt], "k:", marker=".", label="ground truth")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s}²" for s in sizes])
        if logy:
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"lab model, {figures['steps']} LCM steps, {figures['per_family']} seeds per family", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _structure_distance(row: dict) -> float | None:
    """Mean over families of |log2(ratio)|, each ratio clipped to [1/16, 16] (a missing structure reads 4)."""
    vals = [min(16.0, max(1 / 16, row[c])) for c in quality.STRUCTURE_COLUMNS.values() if row.get(c) is not None]
    return sum(abs(math.log2(v)) for v in vals) / len(vals) if vals else None


def run(out: str, sizes=(128, 256, 512), modes=GALLERY_MODES, per_family: int = 2, steps: int = 4,
        gt_count: int = 16, model_dir=None, example: bool = True, docs: bool = False, log=print) -> dict:
    os.makedirs(out, exist_ok=True)
    pipe = quality.accelerated_pipeline(model_dir)
    geo = quality.Geometry.of(pipe)
    chosen = [m for m in quality.MODES if m.name in modes]
    fams = list(world.FAMILIES)
    n = per_family * len(fams)
    families = [s % len(fams) for s in range(n)]
    figures = {"sizes": list(sizes), "steps": steps, "per_family": per_family, "modes": {m.name: {} for m in chosen},
               "ground truth": {}}
    sheets = {}
    for size in sizes:
        t0 = time.perf_counter()
        gt, gt2 = quality.ground_truth(size, gt_count), quality.ground_truth(size, gt_count, offset=gt_count)
        gt_fams = [k % len(fams) for k in range(gt_count)]
        gt_feats = quality.vae_features(pipe.vae, gt)
        per_image = (size // models.TRAIN_SIZE) ** 2
        ct = quality.mode_seams(quality.Mode("cross_tile", "cross_tile"), size, size, geo)
        sheets[size] = {"ground truth": gt2[: len(fams)]}
        row = {"kid": quality.kid_to(quality.vae_features(pipe.vae, gt2), gt_feats, gt_fams, gt_fams,
                                     per_image),
               "seam_ratio": quality.seam_score(gt2, ct, geo), **quality.prompt_scores(gt2, gt_fams, gt, gt_fams)}
        row["structure"] = _structure_distance(row)
        figures["ground truth"][str(size)] = row
        for m in chosen:
            imgs = torch.cat([quality._generate(pipe, m, world.CAPTIONS[families[s]], size, steps, s).float().clamp(-1, 1)
                              for s in range(n)])
            sheets[size][m.name] = imgs[: len(fams)]
            seams = ct if m.mode == "global" else quality.mode_seams(m, size, size, geo)
            row = {"kid": quality.kid_to(quality.vae_features(pipe.vae, imgs), gt_feats, families, gt_fams,
                                         per_image),
                   "seam_ratio": quality.seam_score(imgs, seams, geo), **quality.prompt_scores(imgs, families, gt, gt_fams)}
            row["structure"] = _structure_distance(row)
            figures["modes"][m.name][str(size)] = row
            kid = row["kid"] if row["kid"] is None else round(row["kid"], 3)  # None below 2 seeds per family
            log(f"gallery {size}² {m.name}: kid {kid} fidelity {row['fidelity']:.2f} "
                f"structure {row['structure'] if row['structure'] is None else round(row['structure'], 2)}")
        log(f"gallery {size}²: {time.perf_counter() - t0:.0f} s")
    ex = None
    if example:
        caption, side = EXAMPLE
        t0 = time.perf_counter()
        img = P.generate(pipe, caption, width=side, height=side, steps=steps, seed=0, output_type="pt_raw",
                         progress=False, mode="cross_tile", tile=None, radius=1, window=DEFAULT_WINDOW,
                         stride=DEFAULT_STRIDE)  # the CLI's defaults (the suite's pipe runs tile-blocked windows)
        ex = (caption, img[0].float().clamp(-1, 1))
        fid = quality.fid.fidelity(img.float().clamp(-1, 1), [caption])
        figures["example"] = {"caption": caption, "size": side, "fidelity": fid, "seconds": time.perf_counter() - t0}
        log(f"gallery example {side}² '{caption}': classified as asked: {bool(fid)}")
    contact_sheet(os.path.join(out, "gallery.png"), sheets, chosen, example=ex, geo=geo)
    plot(os.path.join(out, "quality.png"), figures)
    with open(os.path.join(out, "gallery.json"), "w") as f:
        json.dump(figures, f, indent=2)
    if docs:
        im = Image.open(os.path.join(out, "gallery.png")).convert("RGB")
        im.save(os.path.join(out, "gallery_small.jpg"), quality=80, optimize=True)
        Image.open(os.path.join(out, "quality.png")).convert("P", palette=Image.ADAPTIVE, colors=64).save(
            os.path.join(out, "quality_small.png"), optimize=True)
    log(f"gallery: wrote {out}")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiled_diffusion.lab.gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="a lab model folder (default: the shipped one)")
    p.add_argument("--sizes", default="128,256,512", help="canvas sides in px, comma-separated")
    p.add_argument("--per-family", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-example", action="store_true", help="skip the 1024² README example")
    p.add_argument("--docs", action="store_true", help="also write compressed copies for docs/")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out, sizes=tuple(int(s) for s in args.sizes.split(",")), per_family=args.per_family,
        steps=args.steps, model_dir=args.model, example=not args.no_example, docs=args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
