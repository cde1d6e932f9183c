"""Local ranks: `torchrun_command` / `launch_local` for `generate --nproc N` (torchrun with signals forwarded), and
`run_local` — N local CPU ranks for tests and benchmarks (what torchrun does, from a forkserver)."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Sequence

import torch
import torch.multiprocessing as mp

def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """`tiled-diffusion <argv> --nproc N` -> the torchrun command that runs the same request on N local ranks
    (`--nproc` removed; `--standalone` picks a free rendezvous port)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tiled_diffusion", *out]


def launch_local(argv: Sequence[str], nproc: int, grace_s: float = 30.0) -> int:
    """Run `tiled-diffusion <argv>` on `nproc` local ranks through torchrun; returns its exit status.

    SIGTERM / SIGINT to this launcher (a supervisor, `kill PID`, Ctrl-C) are forwarded to torchrun, which stops
    its workers (SIGTERM, then SIGKILL after its own grace period); the launcher waits for it, so no worker outlives
    the command, and returns 128 + the signal. torchrun runs in a session of its own so a terminal's Ctrl-C
    reaches it once, through here; each worker also dies with torchrun (`die_with_parent`, set in the CLI)."""

    proc = subprocess.Popen(torchrun_command(argv, nproc), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=grace_s if received else None)
                break
            except subprocess.TimeoutExpired:  # torchrun did not stop its workers in time: end the lot
                proc.kill()
                rc = proc.wait()
                break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else rc


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent exits (a torchrun worker whose torchrun was killed)."""
    _die_with_parent()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the process that forked it exits (a killed test or benchmark must not leave
    ranks computing). Best effort elsewhere."""
    try:
    
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _local_entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, threads: int) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        res = fn(rank, world, *args)
        torch.save({"ok": res, "elapsed": time.monotonic() - t0, "ended_at": time.monotonic()}, path)
    except BaseException as e:  # report, then exit non-zero
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(),
                    "elapsed": time.monotonic() - t0, "ended_at": time.monotonic()}, path)
        os._exit(1)


def run_local(fn: Callable, world: int, args: tuple = (), *, timeout_s: float = 120.0, threads: int = 1,
              preload: Sequence[str] = ("torch", "tiled_diffusion.parallel.comm")) -> list[dict]:
    """Run fn(rank, world, *args) on `world` local processes with torchrun's environment variables set (so
    `setup()` inside fn initialises the group exactly as under torchrun). One dict per rank: {"ok": result} or
    {"error": "Type: message", "trace": ...}, both with "elapsed" and "ended_at" (time.monotonic(), one clock
    for every process of the machine); {"missing": True} for a rank that died without a report. Raises if a
    rank is still running after timeout_s (a hang).

    fn must be importable (module level). Processes fork from a forkserver that imported `preload` once: a
    fresh interpreter per rank costs seconds of imports, and the server never ran a torch op, so there is no
    thread pool to break by forking."""

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="td-ranks-") as out_dir:
        procs = [ctx.Process(target=_local_entry, args=(r, world, port, fn, args, out_dir, threads), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        if hung:
            raise TimeoutError(f"run_local: ranks {hung} still running after {timeout_s:g} s (a hang)")
        out = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"missing": True})
    return out
