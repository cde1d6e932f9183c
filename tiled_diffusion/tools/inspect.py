"""Static GPU report: resources and instruction mix of every kernel for sm_80 and sm_90, no GPU needed.

`tiled-diffusion inspect [--check] [--json]` (or `python -m tiled_diffusion.tools.inspect`).

- CUDA kernels of `tiled_diffusion._C`: `cuobjdump -res-usage` and `-sass` on the built library, per arch.
- Triton kernels: every module in `tiled_diffusion/backends/triton/` that defines `AOT_CONFIGS` (a list of
  {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages", "expects_mma"}) is compiled ahead
  of time with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`; its cubin goes through
  the same cuobjdump queries.

Each record: kind, name, arch, registers (per thread), shared (bytes per block, static + dynamic), stack (frame
bytes: register spills land here), local, tensor_core (SASS tensor-core mnemonics found: IMMA/HMMA/*GMMA),
expects_tensor_core, threads (per block: CUDA kernels' __launch_bounds__ from the cubin's EIATTR_MAX_THREADS, Triton
32·num_warps), warps, blocks_per_sm / occupancy (resident warps / max warps per SM, from registers, shared memory
and threads with the arch's limits: OCCUPANCY_LIMITS) and its limiter, warnings (e.g. at the 255-register cap:
no headroom, the next change spills), problems. The JSON also carries the tools' versions.
`--check` exits 1 when any record has a problem: spills (stack frame or local memory > 0), missing
tensor-core instructions where expected, shared memory above the per-block limit, or a kernel that failed to compile;
and when `_C` has no CUDA kernels on a machine whose build should have compiled them (nvcc found, torch a CUDA
build, TD_SKIP_CUDA unset: setup.py's conditions), so a CUDA-less build cannot pass the check on CI.

TRITON_INTERPRET=1 makes @triton.jit return interpreter functions that cannot be compiled, so main() re-runs
itself in a child process without it.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

import torch  # loaded by `import tiled_diffusion` anyway; also loads the libraries _C links against

from ..backends.cpu import isa
# the records, the occupancy model and cuobjdump's parsers (OCCUPANCY_LIMITS, occupancy: re-exported)
from .resources import (OCCUPANCY_LIMITS, SMEM_LIMIT, Record, _demangle, occupancy, parse_max_threads,  # noqa: F401
                        parse_res_usage, parse_sass_tc)

ARCHS = (80, 90)
# CUDA kernels (by name substring) that must use tensor cores.
CUDA_EXPECTS_TC = ("int8_gemm_kernel",)


# ------------------------------------------------------------------------------------------ tools


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the triton wheel (backends/nvidia/bin), else from PATH / CUDA_HOME."""
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        p = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(p, os.X_OK):
            return p
    p = shutil.which("cuobjdump")
    if p:
        return p
    home = os.environ.get("CUDA_HOME")
    if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
        return os.path.join(home, "bin", "cuobjdump")
    return None


def find_nvcc() -> Optional[str]:
    """nvcc where setup.py looks for it (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda*), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    p = shutil.which("nvcc")
    if p:
        return p
    for home in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def cuda_build_expected() -> Optional[str]:
    """Why `_C` should hold CUDA kernels here (setup.py builds them when torch is a CUDA build, nvcc is found and
    TD_SKIP_CUDA is unset), or None when a CPU-only build is legitimate."""
    if os.environ.get("TD_SKIP_CUDA") == "1":
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    if torch.version.cuda is None:
        return None
    return f"nvcc is at {nvcc} and torch is a CUDA {torch.version.cuda} build"


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "does not contain device code" not in (r.stderr + r.stdout):
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r.stdout


def tool_versions() -> dict:
    """Versions of what produced the report (the JSON's `tools`)."""
    out: dict = {}
    for name, find in (("cuobjdump", find_cuobjdump), ("nvcc", find_nvcc)):
        tool = find()
        try:
            text = _run([tool, "--version"]) if tool else ""
        except (OSError, RuntimeError):  # a tool that is found but does not run: its version is unknown
            text = ""
        m = re.search(r"V([0-9][0-9.]*)", text)
        out[name] = m.group(1) if m else None
    for mod in ("triton", "torch"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            out[mod] = None
    return out


# ------------------------------------------------------------------------------------------ CUDA (_C)


def native_library() -> Optional[str]:
    """Path of the built tiled_diffusion._C, without importing it."""
    spec = importlib.util.find_spec("tiled_diffusion._C")
    return spec.origin if spec and spec.origin else None


def _dynamic_smem_table(lib: str) -> dict[str, int]:
    """Dynamic shared memory per kernel-name substring, from td_cuda_dynamic_smem_table() in the library.

    cuobjdump only reports static shared memory; the launchers know the dynamic amounts.
    """
    try:
        fn = ctypes.CDLL(lib).td_cuda_dynamic_smem_table
        fn.restype = ctypes.c_char_p
        table = fn().decode()
    except (OSError, AttributeError):
        return {}
    out = {}
    for item in table.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = int(v)
    return out


def cuda_records(lib: Optional[str] = None, archs: Iterable[int] = ARCHS) -> list[Record]:
    """One record per (CUDA kernel in `_C`, arch). [] when the library has no device code."""
    lib = lib or native_library()
    if lib is None or not os.path.exists(lib):
        raise FileNotFoundError("tiled_diffusion._C is not built (pip install --no-build-isolation -e .)")
    tool = find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it ships in the triton wheel: triton/backends/nvidia/bin)")
    usage = parse_res_usage(_run([tool, "-res-usage", lib]))
    dyn = _dynamic_smem_table(lib) if usage else {}
    records = []
    for cc in archs:
        arch = f"sm_{cc}"
        funcs = usage.get(arch, {})
        if not funcs:
            continue
        tc = parse_sass_tc(_run([tool, "-sass", "-arch", arch, lib])).get(arch, {})
        threads = parse_max_threads(_run([tool, "-elf", "-arch", arch, lib]))
        names = _demangle(funcs)
        for mangled, u in sorted(funcs.items(), key=lambda kv: names[kv[0]]):
            extra = next((v for k, v in dyn.items() if k in mangled), 0)
            records.append(Record(
                kind="cuda", name=names[mangled], arch=arch, registers=u.get("REG"),
                shared=u.get("SHARED", 0) + extra, stack=u.get("STACK"), local=u.get("LOCAL"),
                tensor_core=tc.get(mangled, []),
                expects_tensor_core=any(k in mangled for k in CUDA_EXPECTS_TC), threads=threads.get(mangled),
            ).check())
    return records


# ------------------------------------------------------------------------------------------ Triton


def triton_configs() -> list[dict]:
    """AOT_CONFIGS of every module in tiled_diffusion/backends/triton/ (modules without it are skipped)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "backends", "triton")
    configs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        mod = os.path.splitext(os.path.basename(path))[0]
        if mod.startswith("_"):
            continue
        module = importlib.import_module(f"tiled_diffusion.backends.triton.{mod}")
        configs.extend(getattr(module, "AOT_CONFIGS", []))
    return configs


def compile_triton(config: dict, cc: int):
    """Ahead-of-time compile one AOT config for compute capability `cc` (no GPU needed)."""
    import triton  # optional dependency (no triton on CPU-only installs: the CUDA records still come)
    from triton.backends.compiler import GPUTarget  # optional, as triton
    from triton.compiler import ASTSource  # optional, as triton

    kernel = config["kernel"]
    if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("kernel is an interpreter function: run inspect without TRITON_INTERPRET=1")
    signature = dict(config["signature"])
    for k in config.get("constexprs", {}):
        signature.setdefault(k, "constexpr")
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(config.get("constexprs", {})))
    options = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def triton_records(configs: Optional[list[dict]] = None, archs: Iterable[int] = ARCHS) -> list[Record]:
    """One record per (AOT config, arch); compile errors become records with a problem."""
    configs = triton_configs() if configs is None else configs
    tool = find_cuobjdump()
    records = []
    with tempfile.TemporaryDirectory(prefix="td_inspect_") as tmp:
        for cfg in configs:
            for cc in archs:
                arch = f"sm_{cc}"
                rec = Record(kind="triton", name=cfg["name"], arch=arch,
                             expects_tensor_core=bool(cfg.get("expects_mma", False)),
                             threads=32 * cfg.get("num_warps", 4))
                try:
                    ck = compile_triton(cfg, cc)
                except Exception as e:  # report every kernel, not just the first failure
                    rec.problems.append(f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    records.append(rec)
                    continue
                rec.shared = int(ck.metadata.shared)
                ptx = ck.asm.get("ptx", "")
                cubin = os.path.join(tmp, f"{cfg['name']}_{arch}.cubin")
                with open(cubin, "wb") as f:
                    f.write(ck.asm["cubin"])
                if tool:
                    usage = parse_res_usage(_run([tool, "-res-usage", cubin]))
                    u = next(iter(usage.get(arch, {}).values()), None) or next(
                        (v for fs in usage.values() for v in fs.values()), {})
                    rec.registers, rec.stack, rec.local = u.get("REG"), u.get("STACK"), u.get("LOCAL")
                    sass = parse_sass_tc(_run([tool, "-sass", cubin]))
                    rec.tensor_core = sorted({m for fs in sass.values() for ms in fs.values() for m in ms})
                else:
                    rec.problems.append("cuobjdump not found: registers/spills unknown")
                if not rec.tensor_core and ("mma.sync" in ptx or "wgmma" in ptx):
                    rec.tensor_core = ["ptx:" + ("wgmma" if "wgmma" in ptx else "mma.sync")]
                records.append(rec.check())
    return records


# ------------------------------------------------------------------------------------------ report


def collect(archs: Iterable[int] = ARCHS, include_triton: bool = True) -> tuple[list[Record], list[str]]:
    """All records, plus notes on what could not be inspected (e.g. `_C` built without CUDA)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and include_triton:
        raise RuntimeError("TRITON_INTERPRET=1 is set: Triton kernels cannot be compiled; unset it "
                           "(main() does this by re-running itself)")
    archs = tuple(archs)
    notes: list[str] = []
    records: list[Record] = []
    why_missing = None
    try:
        cuda = cuda_records(archs=archs)
        if not cuda:
            why_missing = "tiled_diffusion._C has no CUDA kernels (built without nvcc or with TD_SKIP_CUDA=1)"
        records += cuda
    except (FileNotFoundError, RuntimeError) as e:
        why_missing = f"CUDA kernels not inspected: {e}"
    if why_missing:
        expected = cuda_build_expected()
        if expected:  # a problem, not a note: --check must fail (CI has nvcc)
            records.append(Record(kind="cuda", name="tiled_diffusion._C", arch="all", problems=[
                f"{why_missing}, but {expected}: rebuild (pip install --no-build-isolation -e .) without "
                "TD_SKIP_CUDA, or set TD_SKIP_CUDA=1 to accept a CPU-only build"]))
        else:
            notes.append(why_missing)
    if include_triton:
        try:
            records += triton_records(archs=archs)
        except ImportError as e:
            notes.append(f"Triton kernels not inspected: {e}")
    return records, notes


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def print_table(records: list[Record], notes: list[str]) -> None:
    cols = ["kind", "kernel", "arch", "regs/thread", "smem B/block", "stack B", "local B", "threads/block", "warps",
            "blocks/SM", "occupancy %/SM (limit)", "tensor core", "status"]
    rows = []
    for r in records:
        tc = ",".join(sorted({t.split(".")[0] for t in r.tensor_core})) or "-"
        occ = "-" if r.occupancy is None else f"{100 * r.occupancy:.0f} ({r.limiter})"
        status = "; ".join(r.problems) or "ok"
        if r.warnings:
            status += " | warning: " + "; ".join(r.warnings)
        rows.append([r.kind, r.name, r.arch, _fmt(r.registers), _fmt(r.shared), _fmt(r.stack), _fmt(r.local),
                     _fmt(r.threads), _fmt(r.warps), _fmt(r.blocks_per_sm), occ,
                     tc + (" (expected)" if r.expects_tensor_core else ""), status])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for n in notes:
        print(f"note: {n}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tiled-diffusion inspect", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 on spills, missing tensor cores, smem overflow")
    p.add_argument("--json", action="store_true", help="print machine-readable records")
    p.add_argument("--no-triton", action="store_true", help="only the CUDA kernels of _C")
    p.add_argument("--arch", type=int, action="append", help="compute capability (repeatable), default 80 and 90")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run([sys.executable, "-m", "tiled_diffusion.tools.inspect", *argv], env=env).returncode
    records, notes = collect(archs=args.arch or ARCHS, include_triton=not args.no_triton)
    cpu = isa.describe()  # the CPU int8 path this machine takes, beside the GPU report
    if args.json:
        units = {"registers": "per thread", "shared": "bytes per block", "stack": "bytes per thread",
                 "local": "bytes per thread", "threads": "per block", "warps": "per block",
                 "occupancy": "resident warps / max warps per SM (0..1)"}
        print(json.dumps({"records": [dataclasses.asdict(r) for r in records], "notes": notes, "cpu_isa": cpu,
                          "units": units, "tools": tool_versions()}, indent=1))
    else:
        print_table(records, notes)
        print(f"CPU int8 path: {cpu}")
    bad = [r for r in records if r.problems]
    if args.check and bad:
        if not args.json:
            print(f"check failed: {len(bad)} kernel/arch pair(s) with problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
