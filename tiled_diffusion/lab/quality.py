"""The quality suite: the lab model through every tiling mode at 1×, 4× and 16× its training area, scored against
ground truth rendered from the same world at the same size (benchmarks/bench_quality.py runs it).

Per (canvas size, mode), over the same seeds (seed s draws family s mod 4 and its caption):

- seam_ratio   mean |∇| across the mode's own tile seams / mean |∇| at the other lines of the same phase on the
               model's token grid (`metrics.seam_ratio(period=Geometry.token)`: 16 px = patch 2 × VAE 8 for PixArt,
               8 px = patch 2 × VAE 4 for the shipped lab model). Every
               seam of every mode is a token boundary, and the model draws its own texture on that grid (its
               patch embedding and output unpatchify work per token), so the baseline must be the other
               token boundaries: against all 8-px lines (the suite's metric until 2026-12-06) a mode with no seam
               at all read 1.13 on any 64-px grid, at every offset (benchmarks/NOTES.md, issue 18).
               cross_tile: its token grid (plus the half-tile shifted grid when shift is on); multidiffusion:
               every tile edge; global, token-centred windows with stride 1 and the ground truth are scored on
               the cross_tile grid as controls (what "no seam" reads).
- kid          KID between 128-px patches of the samples and of ground-truth canvases of the same size, on
               features of the lab VAE's encoder (per-channel mean and std after each down block and the
               mid-block, standardised by the ground truth's statistics), stratified by family and never pairing
               two patches of one image (`kid_to`; None below 2 images per family). The `ground truth` row is a
               second, independent ground-truth set: what a perfect model reads (0 in expectation).
- kid_se       the KID's standard error (`metrics.kid_se`: jackknife deleting one whole image of either set at a
               time; None below 3 images per family). Rows share their ground truth, so a difference between two
               rows is better known than their two errors suggest.
- spectrum     `metrics.spectrum_distance` to the ground-truth canvases (mean |Δ log10 power| per radial bin).
- psnr_global  PSNR against `global` at the same seed (agreement with the untiled model).
- fidelity     prompt fidelity: share of the samples the family classifier (lab/fidelity.py, trained on
               ground-truth renders) assigns to the prompted family (canvases: by the mean over 128-px patches).
- waves, suns, trunks, windows
               per family, its structure figure (lab/structure.py: wave coherence in the ocean, sun-disc pixels in
               the sunset, dark trunk pixels in the forest, lit-window pixels in the city) over the family's
               samples / over its ground-truth canvases (1: as much as the world has; None: family not sampled).
- time_s       median wall time of one `pipeline.generate` call (encode, denoise, decode).

Layouts: images [B, 3, H, W] in [-1, 1].
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import statistics
import subprocess
import time
from typing import Optional

import torch
from PIL import Image, ImageDraw

from .. import pipeline as P
from ..core.config import TiledConfig
from ..model.canvas import pixel_grid
from ..tools import metrics
from . import fidelity as fid
from . import models, structure, world

CROSS_TILE_PX = models.TRAIN_SIZE // 2  # as PixArt's 512-px tiles for its 1024-px training size
MULTIDIFFUSION_PX = models.TRAIN_SIZE  # multidiffusion tiles are whole training-size images
GT_SEED0 = 1_000_000  # ground-truth world seeds: far from the trainer's (seed·100000 + i, i < images)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A model's pixel geometry: the VAE's factor and the transformer's patch. Seams are drawn in pixels from it and
    scored on its token grid (`token` px: 16 for PixArt's f8 VAE with patch 2, 8 for the lab model's f4 VAE with
    patch 2)."""
    vae: int = 8
    patch: int = 2

    @property
    def token(self) -> int:
        return self.vae * self.patch

    @classmethod
    def of(cls, pipe) -> "Geometry":
        return cls(int(pipe.vae_scale_factor), int(pipe.transformer.config.patch_size))


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    mode: str
    overrides: tuple = ()  # (key, value) pairs for pipeline.generate
    drop_in: bool = False  # through diffusers' own pipe(...) after accelerate (with the accelerated config)

    def kwargs(self) -> dict:
        tile = MULTIDIFFUSION_PX if self.mode == "multidiffusion" else CROSS_TILE_PX
        kw = {"mode": self.mode, "tile": tile, **dict(self.overrides)}
        if self.mode == "cross_tile":  # rows named by radius are the tile-blocked windows (issue 18: window=None)
            kw.setdefault("window", None)
        return kw


MODES = (
    Mode("global", "global"),
    Mode("cross_tile r1", "cross_tile", (("radius", 1),)),
    Mode("cross_tile r0 (independent)", "cross_tile", (("radius", 0),)),
    Mode("cross_tile r1 shift", "cross_tile", (("radius", 1), ("shift", True))),
    Mode("cross_tile r0 shift", "cross_tile", (("radius", 0), ("shift", True))),
    Mode("cross_tile r1 canvas_native", "cross_tile", (("radius", 1), ("positional", "canvas_native"))),
    Mode("cross_tile r1 tile_local", "cross_tile", (("radius", 1), ("positional", "tile_local"))),
    Mode("multidiffusion 50%", "multidiffusion", (("overlap", 0.5),)),
    # tiles of the training size: fewer seams, but each tile nearer the untiled model's large-canvas behaviour
    Mode("cross_tile r1 train-size tiles", "cross_tile", (("radius", 1), ("tile", models.TRAIN_SIZE))),
    Mode("cross_tile r1 shift train-size tiles", "cross_tile", (("radius", 1), ("shift", True),
                                                                ("tile", models.TRAIN_SIZE))),
    # token-centred windows (issue 18), window and stride in multiples of the training size (16 tokens, lab v1.6)
    Mode("window 0.5x stride 1", "cross_tile", (("window", 0.5), ("stride", 0.0))),
    Mode("window 0.75x stride 1", "cross_tile", (("window", 0.75), ("stride", 0.0))),
    Mode("window 1x stride 1", "cross_tile", (("window", 1.0), ("stride", 0.0))),
    Mode("window 1.5x stride 1", "cross_tile", (("window", 1.5), ("stride", 0.0))),
    Mode("window 0.75x stride 1/4 (GNA)", "cross_tile", (("window", 0.75), ("stride", 0.25))),
    Mode("window 1x stride 1/4 (GNA)", "cross_tile", (("window", 1.0), ("stride", 0.25))),
)
# diffusers' own call, tiled by accelerate (canvas.py); the suite accelerates with cross_tile r1 at CROSS_TILE_PX,
# so this row must equal "cross_tile r1" (tests/pipeline/test_dropin.py asserts that for generate vs pipe(...)).
PIPE_CALL = Mode("pipe(...) cross_tile r1", "cross_tile", (("radius", 1),), drop_in=True)
QUICK_MODES = ("global", "cross_tile r1", "cross_tile r0 (independent)", "multidiffusion 50%")


# ------------------------------------------------------------------------------------------- seams


def mode_seams(m: Mode, width: int, height: int, geo: Geometry = Geometry()) -> tuple[list[int], list[int]]:
    """(seams_y, seams_x) in pixels of the tile grid the mode works on (global: the cross_tile grid, a control)."""
    if m.mode == "multidiffusion":
        cfg, f = TiledConfig(**m.kwargs()).validate(), geo.vae
        g = pixel_grid(cfg, height // f, width // f, 1, geo.patch, vae_scale_factor=f)
        edges = lambda origins, t, size: sorted({v * f for o in origins for v in (o, o + t) if 0 < v * f < size})  # noqa: E731
        return edges(g.origins_y, g.th, height), edges(g.origins_x, g.tw, width)
    kw = m.kwargs() if m.mode == "cross_tile" else {"tile": CROSS_TILE_PX}
    t = kw["tile"]
    if kw.get("window") is not None:  # token-centred: the stride groups' edges, or (stride 1) the control grid
        tok = geo.token
        t = max(1, round(kw.get("stride", 0) * models.TRAIN_SIZE / tok)) * tok if kw.get("stride") else CROSS_TILE_PX
    ys, xs = metrics.grid_seams(t, height), metrics.grid_seams(t, width)
    if kw.get("shift"):  # odd steps run on the grid shifted by half a tile
        ys = sorted(set(ys) | set(metrics.grid_seams(t, height, t // 2)))
        xs = sorted(set(xs) | set(metrics.grid_seams(t, width, t // 2)))
    return ys, xs


def seam_score(images: torch.Tensor, seams: tuple[list[int], list[int]],
               geo: Geometry = Geometry()) -> Optional[float]:
    """Mean over images of the seam ratio at `seams` (token-grid phase baseline); None without seams (one tile)."""
    ys, xs = seams
    if not ys and not xs:
        return None
    return statistics.fmean(metrics.seam_ratio(img, ys, xs, period=geo.token) for img in images)


# ---------------------------------------------------------------------------------------- features


@torch.no_grad()
def vae_features(vae, images: torch.Tensor, patch: int = models.TRAIN_SIZE) -> torch.Tensor:
    """[N, F] features of every non-overlapping patch×patch crop of images [B, 3, H, W]: per-channel mean and std
    of the VAE encoder's activations after each down block and after the mid-block."""
    B, C, H, W = images.shape
    crops = images[:, :, : H // patch * patch, : W // patch * patch]
    crops = crops.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, ny, nx, p, p]
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, C, patch, patch).to(vae.dtype)
    enc = vae.encoder
    x = enc.conv_in(crops)
    feats = []
    for block in list(enc.down_blocks) + [enc.mid_block]:
        x = block(x)
        feats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
    return torch.cat(feats, dim=1).float()


def _standardised(features: torch.Tensor, reference: torch.Tensor):
    mu, sd = reference.mean(0), reference.std(0).clamp(min=1e-6)
    return (features - mu) / sd, (reference - mu) / sd


def _design(families, per_image: int):
    """(strata, groups) of vae_features rows: `per_image` patches per image, image-major."""
    fam = torch.as_tensor(list(families))
    return fam.repeat_interleave(per_image), torch.arange(len(fam)).repeat_interleave(per_image)


def _fewest_images(families) -> int:
    return min(collections.Counter(int(f) for f in families).values())


def kid_to(features: torch.Tensor, reference: torch.Tensor, families=None, ref_families=None,
           per_image: int = 1) -> Optional[float]:
    """KID after standardising both sets with the reference's per-feature mean and std.

    With the images' families (rows: `per_image` patches per image, image-major) it is stratified by family and
    never pairs two patches of one image (metrics.kid): the suite's sets are designed (seed s draws family s mod 4),
    and the plain statistic reads such sets low (NOTES, issue 19, thirteenth session). None when a family has a
    single image in either set (no independent pair in it)."""
    f, r = _standardised(features, reference)
    if families is None:
        return metrics.kid(f, r)
    if min(_fewest_images(families), _fewest_images(ref_families)) < 2:
        return None
    (sa, ga), (sb, gb) = _design(families, per_image), _design(ref_families, per_image)
    return metrics.kid(f, r, sa, sb, ga, gb)


def kid_se_to(features: torch.Tensor, reference: torch.Tensor, families, ref_families,
              per_image: int = 1) -> Optional[float]:
    """kid_to's standard error (metrics.kid_se: whole images deleted); None below 3 images of a family in either
    set (a deletion must leave each family an independent pair)."""
    if min(_fewest_images(families), _fewest_images(ref_families)) < 3:
        return None
    f, r = _standardised(features, reference)
    (sa, ga), (sb, gb) = _design(families, per_image), _design(ref_families, per_image)
    return metrics.kid_se(f, r, sa, sb, ga, gb)


# ------------------------------------------------------------------------------------ ground truth


def ground_truth(size: int, count: int, offset: int = 0) -> torch.Tensor:
    """`count` ground-truth canvases [count, 3, size, size], family k mod 4, fresh world seeds, offset 0."""
    fams = list(world.FAMILIES)
    return torch.stack([world.render(fams[k % len(fams)], GT_SEED0 + offset + k, 0, 0, size, size)
                        for k in range(count)])


# ------------------------------------------------------------------------------------------ the run


def pipe_call_available() -> bool:
    """Whether the drop-in `pipe(...)` path (tiled after accelerate) has landed: a commit titled "canvas forward"."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        log = subprocess.run(["git", "-C", root, "log", "--oneline", "-i", "--grep", "canvas forward"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(log.strip())


def accelerated_pipeline(model_dir: Optional[str] = None):
    """The lab model (the shipped one by default) accelerated as the suite runs it: cross_tile r1 at CROSS_TILE_PX
    is the config pipe(...) uses; `_generate` overrides it per call for the other modes."""
    pipe = models.load_lab_pipeline(model_dir or models.MODEL_DIR)
    P.accelerate(pipe, int8=None, text_encoder_int8=False, mode="cross_tile", tile=CROSS_TILE_PX, radius=1,
                 window=None)
    return pipe


def run(out_dir: str, scales=(1, 4, 16), seeds: int = 8, steps: int = 4, modes=None, gt_count: int = 16,
        sheet_rows: int = 4, model_dir: Optional[str] = None, log=print) -> list[dict]:
    """Run the suite; write `quality.json` and one contact sheet per scale (`contact_<size>.png`) into out_dir.

    scales: canvas area as multiples of the training area (side = TRAIN_SIZE·√scale). Returns the table rows.
    """
    os.makedirs(out_dir, exist_ok=True)
    pipe = accelerated_pipeline(model_dir)
    geo = Geometry.of(pipe)
    chosen = [m for m in MODES if modes is None or m.name in modes]
    if pipe_call_available() and (modes is None or PIPE_CALL.name in modes):
        chosen.append(PIPE_CALL)
    fams = list(world.FAMILIES)
    net = fid.load_classifier()
    rows, details = [], {}
    for scale in scales:
        size = int(round(models.TRAIN_SIZE * math.sqrt(scale)))
        size -= size % 16
        t0 = time.perf_counter()
        gt = ground_truth(size, gt_count)
        gt2 = ground_truth(size, gt_count, offset=gt_count)
        gt_feats = vae_features(pipe.vae, gt)
        per_image = (size // models.TRAIN_SIZE) ** 2  # vae_features' patches per canvas
        gt_fams = [k % len(fams) for k in range(gt_count)]
        log(f"quality {size}²: ground truth {time.perf_counter() - t0:.1f} s")
        images: dict[str, torch.Tensor] = {}
        for m in chosen:
            outs, times = [], []
            for s in range(seeds):
                t0 = time.perf_counter()
                img = _generate(pipe, m, world.CAPTIONS[s % len(fams)], size, steps, s)
                times.append(time.perf_counter() - t0)
                outs.append(img.float().clamp(-1, 1))
            images[m.name] = torch.cat(outs)
            log(f"quality {size}²: {m.name} {statistics.median(times):.2f} s/image")
            rows.append({"size": f"{size}²", "area": f"{scale}x", "mode": m.name, "time_s": statistics.median(times)})
        ref = images.get("global")
        ct_seams = mode_seams(Mode("cross_tile", "cross_tile"), size, size, geo)
        for row in rows[-len(chosen):]:
            m = next(mm for mm in chosen if mm.name == row["mode"])
            imgs = images[m.name]
            row["seam_ratio"] = seam_score(imgs, ct_seams if m.mode == "global" else mode_seams(m, size, size, geo),
                                           geo)
            feats, fams_s = vae_features(pipe.vae, imgs), [s % len(fams) for s in range(seeds)]
            row["kid"] = kid_to(feats, gt_feats, fams_s, gt_fams, per_image)
            row["kid_se"] = kid_se_to(feats, gt_feats, fams_s, gt_fams, per_image)
            row["spectrum"] = metrics.spectrum_distance(imgs, gt)
            row["psnr_global"] = (statistics.fmean(metrics.psnr(a, b) for a, b in zip(imgs, ref))
                                  if ref is not None and m.name != "global" else None)
            row.update(prompt_scores(imgs, fams_s, gt, gt_fams, net))
        gt2_feats = vae_features(pipe.vae, gt2)
        rows.append({"size": f"{size}²", "area": f"{scale}x", "mode": "ground truth", "time_s": None,
                     "seam_ratio": seam_score(gt2, ct_seams, geo),
                     "kid": kid_to(gt2_feats, gt_feats, gt_fams, gt_fams, per_image),
                     "kid_se": kid_se_to(gt2_feats, gt_feats, gt_fams, gt_fams, per_image),
                     "spectrum": metrics.spectrum_distance(gt2, gt), "psnr_global": None,
                     **prompt_scores(gt2, gt_fams, gt, gt_fams, net)})
        sheet = os.path.join(out_dir, f"contact_{size}.png")
        truth = torch.stack([world.render(fams[s % len(fams)], GT_SEED0 + 10**5 + s, 0, 0, size, size)
                             for s in range(min(seeds, sheet_rows))])
        contact_sheet(sheet, {"ground truth (other world)": truth, **images}, chosen, size, sheet_rows, geo=geo)
        details[f"{size}"] = {"contact_sheet": sheet}
        log(f"quality {size}²: wrote {sheet}")
    P.restore(pipe)
    payload = {"rows": rows, "steps": steps, "seeds": seeds, "train_size": models.TRAIN_SIZE,
               "cross_tile_px": CROSS_TILE_PX, "multidiffusion_px": MULTIDIFFUSION_PX, "gt_count": gt_count,
               "details": details, "captions": world.FAMILIES}
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(payload, f, indent=2)
    return rows


STRUCTURE_COLUMNS = {"ocean": "waves", "sunset": "suns", "forest": "trunks", "city": "windows"}


def prompt_scores(images: torch.Tensor, families, truth: torch.Tensor, truth_families, net=None) -> dict:
    """The fidelity and per-family structure columns of a row (see the module docstring)."""
    cmp = structure.compare(images, families, truth, truth_families)
    out = {"fidelity": fid.fidelity(images, families, net)}
    for name, col in STRUCTURE_COLUMNS.items():
        out[col] = cmp[name]["ratio"] if name in cmp else None
    return out


def _generate(pipe, m: Mode, caption: str, size: int, steps: int, seed: int) -> torch.Tensor:
    """One image [1, 3, size, size] in [-1, 1] (unclamped for generate's raw decode)."""
    if not m.drop_in:
        return P.generate(pipe, caption, width=size, height=size, steps=steps, seed=seed, output_type="pt_raw",
                          progress=False, **m.kwargs())
    # use_resolution_binning=False: diffusers has no aspect-ratio bins for the lab's sample size
    out = pipe(caption, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(seed), output_type="pt", use_resolution_binning=False,
               clean_caption=False)
    return out.images * 2 - 1


def contact_sheet(path: str, images: dict, modes, size: int, rows: int, cell: int = 192,
                  geo: Geometry = Geometry()) -> None:
    """One seed per row, one mode per column (ground truth first), the mode's seams drawn in red, names on top."""
    names = list(images)
    n_rows = min(rows, min(v.shape[0] for v in images.values()))
    head = 14
    sheet = Image.new("RGB", (cell * len(names), head + cell * n_rows), "white")
    draw = ImageDraw.Draw(sheet)
    by_name = {m.name: m for m in modes}
    for c, name in enumerate(names):
        draw.text((c * cell + 3, 1), name[:30], fill="black")
        m = by_name.get(name)
        seams = mode_seams(m, size, size, geo) if m is not None and m.mode != "global" else ([], [])
        for r in range(n_rows):
            arr = ((images[name][r].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.BILINEAR)
            td = ImageDraw.Draw(tile)
            k = cell / size
            for y in seams[0]:
                td.line([(0, y * k), (cell, y * k)], fill=(255, 0, 0), width=1)
            for x in seams[1]:
                td.line([(x * k, 0), (x * k, cell)], fill=(255, 0, 0), width=1)
            sheet.paste(tile, (c * cell, head + r * cell))
    sheet.save(path)
