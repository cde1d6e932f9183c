"""What a kernel's resources mean: the report's `Record` and its checks, the occupancy model, and the parsers of
cuobjdump's text (-res-usage, -elf, -sass). Pure functions of text and numbers: tests feed them recorded output."""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from typing import Callable, Iterable, Iterator, Optional

# Max shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# SASS mnemonics of tensor-core instructions: IMMA (int mma.sync), HMMA (fp16/bf16/tf32 mma.sync),
# HGMMA/IGMMA/QGMMA (Hopper wgmma).
_TC_RE = re.compile(r"\b([HIQ]?GMMA|IMMA|HMMA)(\.[A-Z0-9_.]+)?")
# Per-SM limits (CUDA occupancy calculator / programming guide, compute capabilities 8.0 and 9.0): registers per SM,
# max registers per thread, max resident warps, max resident blocks, shared memory per SM usable by blocks (bytes),
# shared memory the runtime reserves per block, register allocation unit (registers per warp, rounded up to it).
OCCUPANCY_LIMITS = {
    80: {"regs": 65536, "max_regs": 255, "warps": 64, "blocks": 32, "smem": 164 * 1024, "smem_reserved": 1024,
         "reg_unit": 256},
    90: {"regs": 65536, "max_regs": 255, "warps": 64, "blocks": 32, "smem": 228 * 1024, "smem_reserved": 1024,
         "reg_unit": 256},
}


def occupancy(cc: int, registers: Optional[int], shared: Optional[int], threads: Optional[int]) -> dict:
    """Blocks and warps resident per SM for a kernel: {blocks_per_sm, occupancy (0..1), limiter}; {} when the
    threads per block or registers are unknown. Registers are allocated per warp in units of reg_unit; the
    register file is split over 4 SM sub-partitions, so warps fit per sub-partition."""
    lim = OCCUPANCY_LIMITS.get(cc)
    if lim is None or not threads or registers is None:
        return {}
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    warps_by_regs = (lim["regs"] // 4 // per_warp) * 4
    by = {"registers": warps_by_regs // warps, "threads": lim["warps"] // warps, "blocks": lim["blocks"]}
    if shared:
        by["shared memory"] = lim["smem"] // (shared + lim["smem_reserved"])
    limiter = min(by, key=lambda k: by[k])
    blocks = by[limiter]
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / lim["warps"], "limiter": limiter}


@dataclasses.dataclass
class Record:
    kind: str  # "cuda" | "triton"
    name: str
    arch: str  # "sm_80"
    registers: Optional[int] = None
    shared: Optional[int] = None  # bytes per block, static + dynamic
    stack: Optional[int] = None  # stack frame bytes: where ptxas puts register spills
    local: Optional[int] = None  # local memory bytes (cuobjdump LOCAL)
    tensor_core: list = dataclasses.field(default_factory=list)
    expects_tensor_core: bool = False
    threads: Optional[int] = None  # per block
    warps: Optional[int] = None  # per block
    blocks_per_sm: Optional[int] = None
    occupancy: Optional[float] = None  # resident warps / max warps per SM, 0..1
    limiter: Optional[str] = None  # what bounds blocks_per_sm: registers / shared memory / threads / blocks
    warnings: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)

    def check(self) -> "Record":
        cc = int(self.arch.split("_")[1])
        if self.threads:
            self.warps = -(-self.threads // 32)
            occ = occupancy(cc, self.registers, self.shared, self.threads)
            self.blocks_per_sm, self.occupancy, self.limiter = (occ.get("blocks_per_sm"), occ.get("occupancy"),
                                                                occ.get("limiter"))
        cap = OCCUPANCY_LIMITS.get(cc, {}).get("max_regs", 255)
        if self.registers is not None and self.registers >= cap:
            self.warnings.append(f"at the {cap}-register cap of {self.arch}: no headroom, the next change spills")
        # ptxas puts register spills in the stack frame: cuobjdump shows them as STACK, with LOCAL still 0
        # (checked against ptxas -v: "8 bytes stack frame, 4 bytes spill stores" -> STACK:8 LOCAL:0).
        # None of our kernels has local arrays or calls, so any stack frame is treated as spilling.
        if self.local or self.stack:
            self.problems.append(f"spills: stack frame {self.stack or 0} B, local {self.local or 0} B")
        if self.expects_tensor_core and not self.tensor_core:
            self.problems.append("no tensor-core instructions (IMMA/HMMA/GMMA) in SASS")
        if self.shared is not None and self.shared > SMEM_LIMIT.get(cc, 0):
            self.problems.append(f"shared memory {self.shared} B > {SMEM_LIMIT[cc]} B limit of {self.arch}")
        return self


def _demangle(names: Iterable[str]) -> dict[str, str]:
    """Mangled -> short readable name (namespace and parameter list dropped; template arguments kept)."""
    names = list(names)
    tool = shutil.which("c++filt")
    out = names
    if tool and names:
        r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
        if r.returncode == 0 and len(r.stdout.splitlines()) == len(names):
            out = r.stdout.splitlines()
    short = {}
    for m, d in zip(names, out):
        d = d.replace("(anonymous namespace)::", "")
        depth, cut, last_ns = 0, len(d), 0
        for i, ch in enumerate(d):
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:  # start of the parameter list
                cut = i
                break
            elif d.startswith("::", i) and depth == 0:
                last_ns = i + 2
            elif ch == " " and depth == 0:  # after a template function's return type ("void f<...>(...)")
                last_ns = i + 1
        short[m] = d[last_ns:cut]
    return short


def _per_function(text: str, header: Callable[[str], Optional[str]]) -> Iterator[tuple[str, str, Optional[str]]]:
    """Walks cuobjdump output: (arch, function, None) at each function header (`header(line)` gives its mangled
    name, None for other lines), then (arch, function, line) for each stripped line below it."""
    arch, func = "unknown", None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif (name := header(s)) is not None:
            func = name
            yield arch, func, None
        elif func is not None:
            yield arch, func, s


def parse_res_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """`cuobjdump -res-usage` -> {arch: {mangled function: {"REG", "STACK", "SHARED", "LOCAL", ...}}}."""
    res: dict[str, dict[str, dict[str, int]]] = {}
    header = lambda s: s[len("Function "):-1].strip() if s.startswith("Function ") and s.endswith(":") else None
    for arch, func, s in _per_function(text, header):
        if s is not None and s.startswith("REG:") and func not in res.get(arch, {}):  # the function's first REG line
            vals = dict(re.findall(r"([A-Z_\[\]0-9]+):(\d+)", s))
            res.setdefault(arch, {})[func] = {k: int(v) for k, v in vals.items()}
    return res


def parse_max_threads(text: str) -> dict[str, int]:
    """`cuobjdump -elf` of one arch -> {mangled function: threads per block} from EIATTR_MAX_THREADS (the kernel's
    __launch_bounds__; absent for kernels without one)."""
    out: dict[str, int] = {}
    func, attr = None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".nv.info.") and " " not in s:
            func, attr = s[len(".nv.info."):], None
        elif s.startswith("Attribute:"):
            attr = s.split(":", 1)[1].strip()
        elif func and attr == "EIATTR_MAX_THREADS" and s.startswith("Value:"):
            dims = [int(v, 16) for v in s.split(":", 1)[1].split()]
            out[func] = 1
            for d in dims:
                out[func] *= d
            attr = None
    return out


def parse_sass_tc(text: str) -> dict[str, dict[str, list[str]]]:
    """`cuobjdump -sass` -> {arch: {mangled function: sorted tensor-core mnemonics}} (functions without: [])."""
    res: dict[str, dict[str, set]] = {}
    header = lambda s: s[len("Function : "):].strip() if s.startswith("Function : ") else None
    for arch, func, s in _per_function(text, header):
        if s is None:
            res.setdefault(arch, {}).setdefault(func, set())
        elif "MMA" in s:
            res[arch][func].update(m.group(0) for m in _TC_RE.finditer(s))
    return {a: {f: sorted(v) for f, v in fs.items()} for a, fs in res.items()}
