"""The lab model's yardstick (issue 19): the figures benchmarks/NOTES.md compares lab models by, side by side.

Per model folder (default: the shipped one), through `lab.quality.run` (its definitions of KID, fidelity and
structure):
- 1×: `global` at the training size, X1 seeds per family, against 4·X1 ground-truth crops; a second, independent
  truth set reads the KID noise floor.
- 16×: the named modes at 4× the training side, X16 seeds per family, against 4·X16 ground-truth canvases.
- best ÷ 1×: the lowest 16× KID over the 1× KID (the issue's target: ≤ 2), with its standard error from the two
  KIDs' (`kid_se`, first-order: (se16/k16)² + (se1/k1)² relative; the two rows share no samples).

Run: `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/lab_yardstick.py [MODEL ...] [--x1 64] [--x16 8]`
(one thread keeps the float kernels' summation order fixed across hosts; 64/8 take ~14 min per model on a 2-core
AMD EPYC, two models side by side). Writes each model's quality.json and contact sheets under --out and prints
one table.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from tiled_diffusion.lab import models, quality

MODES_16X = ("window 0.75x stride 1", "window 1x stride 1", "cross_tile r0 shift", "cross_tile r1")
COLUMNS = ("kid ± se", "fidelity", "waves", "suns", "trunks", "windows")


def measure(model: str, x1: int, x16: int, modes, out: str) -> dict:
    """{"1x": row, "1x truth": the second truth set's row, "16x": {mode: row, "ground truth": row}} for a folder."""
    one = quality.run(os.path.join(out, "x1"), scales=(1,), seeds=4 * x1, gt_count=4 * x1, modes=("global",),
                      model_dir=model, log=lambda m: None)
    sixteen = quality.run(os.path.join(out, "x16"), scales=(16,), seeds=4 * x16, gt_count=4 * x16, modes=modes,
                          model_dir=model, log=lambda m: None)
    return {"1x": one[0], "1x truth": one[-1], "16x": {r["mode"]: r for r in sixteen}}


def fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def kid_cell(row) -> str:
    """'0.041±0.012': the KID and its standard error."""
    return fmt(row["kid"]) + ("" if row.get("kid_se") is None else f"±{row['kid_se']:.3f}")


def ratio(best: dict, one_x: dict) -> str:
    """best 16× KID ÷ 1× KID, ± its first-order standard error; none when the 1× KID is not above its own error
    (a ratio to an estimate that may be 0 says nothing)."""
    k1, k16 = one_x["kid"], best["kid"]
    if k1 <= 0 or k1 <= (one_x.get("kid_se") or 0):
        return f"— (1x KID {kid_cell(one_x)} is not above its error)"
    r = k16 / k1
    errors = (best.get("kid_se"), one_x.get("kid_se"))  # None below 3 seeds per family
    se = r * ((errors[0] / k16) ** 2 + (errors[1] / k1) ** 2) ** 0.5 if k16 > 0 and None not in errors else None
    return f"{r:.2f}" + ("" if se is None else f" ± {se:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", default=[models.MODEL_DIR], help="lab model folders (default: shipped)")
    p.add_argument("--x1", type=int, default=64, help="1× seeds per family")
    p.add_argument("--x16", type=int, default=8, help="16× seeds per family")
    p.add_argument("--modes", nargs="+", default=list(MODES_16X), help="16× modes (lab.quality.MODES names)")
    p.add_argument("--out", default="", help="folder for quality.json and sheets (default: a fresh temp folder)")
    args = p.parse_args(argv)
    unknown = set(args.modes) - {m.name for m in quality.MODES}
    if unknown:
        p.error(f"--modes: not in lab.quality.MODES: {', '.join(sorted(unknown))}")
    if min(args.x1, args.x16) < 2:  # a family's KID needs two images (quality.kid_to), its error three
        p.error(f"--x1 and --x16: seeds per family, at least 2 (got {args.x1}, {args.x16})")
    for model in args.models:
        if not os.path.exists(os.path.join(model, "model_index.json")):
            p.error(f"no lab model in {model!r} (a folder written by python -m tiled_diffusion.lab.train)")
    out = args.out or tempfile.mkdtemp(prefix="lab-yardstick-")
    for i, model in enumerate(args.models):
        r = measure(model, args.x1, args.x16, args.modes, os.path.join(out, f"model{i}"))
        print(f"\n{model}  (1x: {args.x1} seeds/family; 16x: {args.x16}; truth-vs-truth 1x KID "
              f"{kid_cell(r['1x truth'])}, 16x {kid_cell(r['16x']['ground truth'])})")
        rows = [("1x global", r["1x"])] + [(f"16x {m}", r["16x"][m]) for m in args.modes]
        width = max(len(name) for name, _ in rows)
        print(f"  {'row':{width}s}{COLUMNS[0]:>14s}" + "".join(f"{c:>10s}" for c in COLUMNS[1:]))
        for name, row in rows:
            print(f"  {name:{width}s}{kid_cell(row):>14s}" + "".join(f"{fmt(row[c]):>10s}" for c in COLUMNS[1:]))
        best = min(args.modes, key=lambda m: r["16x"][m]["kid"])
        print(f"  best 16x ({best}) / 1x KID: {ratio(r['16x'][best], r['1x'])}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
