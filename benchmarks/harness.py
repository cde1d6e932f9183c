"""Benchmark harness shared by benchmarks/bench_<name>.py and `tiled-diffusion bench`.

Each bench_<name>.py defines `suite(quick: bool) -> list[dict]` (rows for the table; `quick` = a tiny size
so CI keeps every benchmark alive) and pytest-benchmark tests at a tiny size. Times are medians of
repeated runs; compare versions as ratios measured side by side in one run, never across runs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional

import torch


def sync(device: Optional[torch.device] = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5, min_time_s: float = 0.0) -> dict:
    """Median wall time of fn() over `iters` runs (more until min_time_s is spent), after `warmup` runs."""
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
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p20_s": times[int(0.2 * (len(times) - 1))],
        "p80_s": times[int(0.8 * (len(times) - 1))],
        "n": len(times),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import tiled_diffusion

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "tiled_diffusion": tiled_diffusion.__version__,
        "threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3e}"
    return str(v)


def print_table(title: str, rows: Iterable[dict], columns: Optional[list[str]] = None) -> None:
    rows = list(rows)
    if not rows:
        print(f"{title}: no rows")
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str, suites: dict[str, list[dict]]) -> None:
    payload = {"environment": environment(), "suites": suites}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
