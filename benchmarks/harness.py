"""Benchmark harness shared by benchmarks/bench_<name>.py and `tiled-diffusion bench`.

Each bench_<name>.py defines `suite(quick: bool, args=None) -> list[dict]` (rows for the table; `quick` = a tiny
size so CI keeps every benchmark alive; `args` = the parsed command line, with the suite's own flags from its
optional `add_arguments(parser)`), and pytest-benchmark tests at a tiny size. The JSON written here follows
benchmarks/SCHEMA.md (version SCHEMA): environment, then per suite its rows, every key snake_case, times in
milliseconds with their spread (n, min, median, p20, p80), `null` never NaN. `compare()` joins two such files row
by row (`tiled-diffusion bench compare A.json B.json`).

Numbers on a shared machine: rows measured against each other are sampled round robin (`interleaved`), so a burst
of someone else's work hits all of them alike; the copy/peak probes that normalise a row are entries of the same
round robin; a row whose probes or spread say the machine was busy is marked `"noisy": true` (`mark_noisy`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

import torch

SCHEMA = 1
TIME_KEYS = ("n", "min", "median", "p20", "p80")  # per timed row, milliseconds (n: samples)

# Noise rules (SCHEMA.md "noisy"): a row is noisy when its own spread p80/p20, or a probe's, exceeds SPREAD_MAX,
# when a probe ran slower than PROBE_SLOW_MAX x its best reading in this process (someone else had the core), or
# when it claims more than 100% of a copy or of peak (impossible at idle: the baseline was slowed, not the op fast).
SPREAD_MAX = 1.5
PROBE_SLOW_MAX = 1.3


def sync(device: Optional[torch.device] = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stats(times_s: list[float]) -> dict:
    """Spread of wall times in seconds: {n, min_s, median_s, p20_s, p80_s}."""
    t = sorted(times_s)
    return {"n": len(t), "min_s": t[0], "median_s": statistics.median(t), "p20_s": t[int(0.2 * (len(t) - 1))],
            "p80_s": t[int(0.8 * (len(t) - 1) + 0.5)]}


def measure(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5, min_time_s: float = 0.0) -> dict:
    """Wall time of fn() over `iters` runs (more until min_time_s is spent), after `warmup` runs: stats()."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return stats(times)


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, rounds: int = 5) -> dict[str, dict]:
    """Round robin: every fn once per round, `rounds` rounds after `warmup`; {name: stats()} in seconds. On a shared
    machine a burst of load then hits every entry (rows and the probes normalising them) alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(rounds, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: stats(v) for name, v in samples.items()}


def timing(m: dict) -> dict:
    """The schema's time fields (ms) from a stats() dict."""
    return {"n": m["n"], "min": m["min_s"] * 1e3, "median": m["median_s"] * 1e3, "p20": m["p20_s"] * 1e3,
            "p80": m["p80_s"] * 1e3}


def spread(m: dict) -> float:
    """p80 / p20 of a stats() dict (1 = no spread)."""
    return m["p80_s"] / m["p20_s"] if m["p20_s"] > 0 else math.inf


class Probe:
    """A baseline timed beside rows (a copy, a register-only peak): remembers its best reading in this process, so
    a reading well above it says the machine was busy while the rows around it ran."""

    def __init__(self, name: str):
        self.name, self.best_s = name, math.inf

    def check(self, m: dict) -> list[str]:
        """Reasons this probe reading is untrustworthy ([] = fine); updates the best reading."""
        self.best_s = min(self.best_s, m["min_s"])
        why = []
        if spread(m) > SPREAD_MAX:
            why.append(f"{self.name} spread p80/p20 {spread(m):.2f}")
        if m["median_s"] > PROBE_SLOW_MAX * self.best_s:
            why.append(f"{self.name} {m['median_s'] / self.best_s:.2f}x its best")
        return why


def mark_noisy(row: dict, m: Optional[dict] = None, probe_why: Iterable[str] = ()) -> dict:
    """Set row["noisy"] (and row["noisy_why"]) from the row's own spread, its probes' verdicts and any percentage
    above 100."""
    why = list(probe_why)
    if m is not None and spread(m) > SPREAD_MAX:
        why.append(f"spread p80/p20 {spread(m):.2f}")
    for k, v in row.items():
        if k.startswith("pct_of_") and isinstance(v, (int, float)) and v > 100:
            why.append(f"{k} {v:.0f} > 100")
    row["noisy"] = bool(why)
    if why:
        row["noisy_why"] = "; ".join(why)
    return row


# ------------------------------------------------------------------------------------------ environment


def cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_flags() -> list[str]:
    """The ISA extensions the kernels care about, as /proc/cpuinfo spells them."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_int8", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _load() -> Optional[list[float]]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """Everything a reader needs to judge a number: commit, versions, CPU, threads, load (SCHEMA.md)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import tiled_diffusion
    from tiled_diffusion import ops

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "device": device_name(),
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_isa": ops.cpu_isa(),
        "td_impl": os.environ.get("TD_IMPL") or None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "tiled_diffusion": tiled_diffusion.__version__},
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_before": _load(),
        "load_after": None,
    }


def describe(env: dict) -> str:
    """One line for the top of a table."""
    v = env["versions"]
    commit = (env["commit"] or "?")[:10] + ("+dirty" if env["dirty"] else "")
    return (f"{env['device']}  isa={env['cpu_isa']}  torch={v['torch']}  triton={v['triton']}  commit={commit}  "
            f"load={env['load_before']}" + (f"  TD_IMPL={env['td_impl']}" if env["td_impl"] else ""))


# ------------------------------------------------------------------------------------------ rows


def snake(key: str) -> str:
    """A legacy column name as a schema key: '% of copy' -> 'pct_of_copy', 'GOP/s' -> 'gop_per_s'."""
    k = key.replace("%", "pct ").replace("/", " per ").replace("²", "").replace("(", " ").replace(")", " ")
    k = re.sub(r"[^0-9a-zA-Z]+", "_", k).strip("_").lower()
    return k.replace("pct_peak", "pct_of_peak")


_SQUARE = re.compile(r"^(\d+)²$")


def clean(value):
    """JSON-safe value: NaN/inf -> None, '512²' -> 512, tensors/dtypes -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int)) or value is None:
        return value
    if isinstance(value, str):
        m = _SQUARE.match(value)
        return int(m.group(1)) if m else value
    if isinstance(value, dict):
        return {snake(str(k)): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return str(value)


def normalize_rows(rows: Iterable[dict], suite: str, case_keys: Optional[Iterable[str]] = None) -> list[dict]:
    """Rows in the schema: snake_case keys, clean values, a `case` string that `compare` joins on."""
    out = []
    for r in rows:
        r = {snake(str(k)): clean(v) for k, v in r.items()}
        if "case" not in r:
            keys = list(case_keys) if case_keys is not None else [
                k for k, v in r.items() if isinstance(v, str) and k not in _NOT_CASE or k in _INT_CASE]
            r = {"case": f"{suite}: " + " ".join(f"{k}={r.get(k)}" for k in keys), **r}
        out.append(r)
    return out


_NOT_CASE = {"note", "noisy_why", "isa", "cpu_isa", "runs", "case"}
_INT_CASE = {"size", "canvas", "tile", "tile_px", "steps", "layers", "batch", "m", "k", "n_out", "heads", "head_dim",
             "radius", "height", "width"}


def write_json(path: str, suites: dict[str, list[dict]], env: Optional[dict] = None) -> dict:
    """Write the schema's document (strict JSON: a NaN anywhere is a bug and raises). Returns it."""
    env = dict(env or environment())
    env["load_after"] = _load()
    payload = {"schema": SCHEMA, "environment": clean(env),
               "suites": {name: normalize_rows(rows, name) for name, rows in suites.items()}}
    text = json.dumps(payload, indent=2, allow_nan=False)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return payload


# ------------------------------------------------------------------------------------------ table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3e}"
    return str(v)


def print_table(title: str, rows: Iterable[dict], columns: Optional[list[str]] = None) -> None:
    """A plain table. A percentage of a copy/peak above 100 is never printed bare: it gets a '!' (and rows marked
    noisy a '~' on their time), with a warning line under the table."""
    rows = list(rows)
    if not rows:
        print(f"{title}: no rows")
        return
    columns = columns or [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("noisy_why", "case")]
    cells = []
    for r in rows:
        row = []
        for c in columns:
            v = r.get(c, "")
            s = _fmt(v)
            if (c.startswith("pct_of_") or c.startswith("%")) and isinstance(v, (int, float)) and v > 100:
                s += "!"
            elif c == "median" and r.get("noisy"):
                s += "~"
            row.append(s)
        cells.append(row)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        print(f"WARNING: {len(noisy)} of {len(rows)} rows noisy (the machine was busy or the spread is wide; their "
              f"percentages are not this code's speed): " + " | ".join(
                  sorted({r.get("noisy_why", "") for r in noisy}))[:400])


# ------------------------------------------------------------------------------------------ compare

NOISE_FLOOR = 0.05  # ratios within ±5% are "same" even when both runs had no spread (n = 1 rows)


def verdict(a: dict, b: dict, floor: float = NOISE_FLOOR, stat: str = "median") -> dict:
    """B against A for one joined row: ratio = B.median / A.median (> 1: B slower), its interval from the spreads
    [B.p20 / A.p80, B.p80 / A.p20] widened by the noise floor, and the verdict: "slower" when the whole interval
    is above 1, "faster" when below, else "same". stat="min": ratio of the minima, interval [B.min / A.p20,
    B.p20 / A.min] (the fastest samples: what the code can do when the machine leaves it alone; steadier on a
    shared machine, blind to a slowdown that only shows under load)."""
    if stat == "min" and a.get("min") and b.get("min"):
        ratio = b["min"] / a["min"]
        lo = b["min"] / (a.get("p20") or a["min"])
        hi = (b.get("p20") or b["min"]) / a["min"]
    else:
        ratio = b["median"] / a["median"]
        lo = (b.get("p20") or b["median"]) / (a.get("p80") or a["median"])
        hi = (b.get("p80") or b["median"]) / (a.get("p20") or a["median"])
    lo, hi = min(lo, ratio) / (1 + floor), max(hi, ratio) * (1 + floor)
    v = "slower" if lo > 1 else "faster" if hi < 1 else "same"
    return {"ratio": ratio, "lo": lo, "hi": hi, "verdict": v}


def _timed_rows(doc: dict) -> dict[str, dict]:
    out = {}
    for name, rows in doc.get("suites", {}).items():
        for r in rows:
            if isinstance(r.get("median"), (int, float)) and r["median"] > 0 and "case" in r:
                out[r["case"]] = r
    return out


def compare(a: dict, b: dict, floor: float = NOISE_FLOOR, stat: str = "median") -> list[dict]:
    """Join two schema documents by row case; one dict per case timed in both."""
    ra, rb = _timed_rows(a), _timed_rows(b)
    out = []
    for case in ra:
        if case in rb:
            key = "min" if stat == "min" else "median"
            out.append({"case": case, "a_ms": ra[case].get(key) or ra[case]["median"],
                        "b_ms": rb[case].get(key) or rb[case]["median"],
                        "noisy": bool(ra[case].get("noisy") or rb[case].get("noisy")),
                        **verdict(ra[case], rb[case], floor, stat)})
    return out


def compare_main(path_a: str, path_b: str, fail_above: Optional[float] = None, floor: float = NOISE_FLOOR,
                 stat: str = "median") -> int:
    """`bench compare`: print the joined table; 1 when --fail-above is given and a row is slower beyond noise by
    more than that percentage."""
    docs = []
    for p in (path_a, path_b):
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"tiled-diffusion bench compare: error: cannot read {p}: {e}", file=sys.stderr)
            return 2
        if doc.get("schema") != SCHEMA:
            print(f"tiled-diffusion bench compare: error: {p} has schema {doc.get('schema')!r}, this version reads "
                  f"{SCHEMA} (rerun bench --json)", file=sys.stderr)
            return 2
        docs.append(doc)
    rows = compare(*docs, floor=floor, stat=stat)
    if not rows:
        print("no timed rows in common (different suites or cases?)")
        return 2 if fail_above is not None else 0
    for doc, p in zip(docs, (path_a, path_b)):
        print(f"{p}: {describe(doc['environment'])}")
    w = max(len(r["case"]) for r in rows)
    print(f"{'case'.ljust(w)}  {'A ' + stat:>9}  {'B ' + stat:>9}  {'B/A':>6}  {'interval':>13}  verdict")
    for r in rows:
        print(f"{r['case'].ljust(w)}  {r['a_ms']:9.3f}  {r['b_ms']:9.3f}  {r['ratio']:6.3f}  "
              f"[{r['lo']:.2f}, {r['hi']:.2f}]  {r['verdict']}{' (noisy)' if r['noisy'] else ''}")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("same", "slower", "faster")}
    noisy = sum(r["noisy"] and r["verdict"] != "same" for r in rows)
    print(f"{len(rows)} rows: {counts['same']} same, {counts['slower']} slower, {counts['faster']} faster "
          f"(B against A; interval = spreads p20..p80 of both runs, ±{100 * floor:.0f}% noise floor)"
          + (f"; {noisy} of the slower/faster rows are noisy in A or B: the machine's load moved, maybe not the "
             f"code" if noisy else ""))
    if fail_above is not None:
        bad = [r for r in rows if r["verdict"] == "slower" and r["ratio"] > 1 + fail_above / 100]
        if bad:
            print(f"FAIL: {len(bad)} rows slower by more than {fail_above}%: " + ", ".join(r["case"] for r in bad))
            return 1
    return 0


# ------------------------------------------------------------------------------------------ plot

_SIZE_KEYS = (("height", "width"), ("m", "k", "n_out"), ("size",), ("canvas",))
_SERIES_KEYS = ("impl", "method", "op", "mode", "dtype")


def _size_of(row: dict) -> Optional[float]:
    """The x of a scaling plot: canvas pixels (height·width), GEMM work (m·k·n_out) or the row's size."""
    for keys in _SIZE_KEYS:
        if all(isinstance(row.get(k), (int, float)) for k in keys):
            return float(math.prod(row[k] for k in keys))
    return None


def plot_rows(suites: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Time (median, p20..p80 bars) and % of peak/copy against the case size, one panel pair per suite, one line
    per implementation. Needs matplotlib (a dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench --plot needs matplotlib: pip install matplotlib") from None
    names = [n for n, rows in suites.items() if any(_size_of(r) and r.get("median") for r in rows)]
    if not names:
        raise SystemExit("bench --plot: no timed rows with a size to plot")
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4 * len(names)), squeeze=False)
    for (ax_t, ax_p), name in zip(axes, names):
        series: dict[str, list[dict]] = {}
        for r in suites[name]:
            if _size_of(r) and r.get("median"):
                label = " ".join(str(r[k]) for k in _SERIES_KEYS if k in r and isinstance(r[k], str))
                series.setdefault(label, []).append(r)
        for label, rs in series.items():
            rs.sort(key=_size_of)
            x = [_size_of(r) for r in rs]
            y = [r["median"] for r in rs]
            err = [[r["median"] - (r.get("p20") or r["median"]) for r in rs],
                   [(r.get("p80") or r["median"]) - r["median"] for r in rs]]
            ax_t.errorbar(x, y, yerr=err, marker="o", label=label, capsize=3)
            # % of peak/copy where the suite measures one, else its throughput column
            pct = next((k for k in ("pct_of_peak", "pct_of_copy", "gflop_per_s", "gop_per_s", "gb_per_s")
                        if any(r.get(k) is not None for r in rs)), None)
            if pct:
                ax_p.plot(x, [r.get(pct) for r in rs], marker="o", label=f"{label} ({pct})")
                for xi, r in zip(x, rs):
                    if r.get("noisy"):
                        ax_p.annotate("noisy", (xi, r.get(pct) or 0), fontsize=7)
        for ax, ylabel in ((ax_t, "median ms (bars p20..p80)"), (ax_p, "% of peak / copy (or throughput)")):
            ax.set_xscale("log")
            ax.set_xlabel("case size (canvas px² or M·K·N)")
            ax.set_ylabel(ylabel)
            ax.set_title(name)
            if ax.has_data():
                ax.legend(fontsize=7)
        ax_t.set_yscale("log")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
