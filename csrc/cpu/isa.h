// Which instruction set the CPU int8 kernels use, and why (torch-free: tests/backends/cpu/amx_emulation.cpp includes it).
//
// Best first: amx (AMX-TILE + AMX-INT8 with the OS tile-data permission, plus AVX-512 for quantize and
// epilogue) -> avx512 (AVX-512 F/BW/VL/DQ + VNNI) -> avx2 (AVX2 + FMA + F16C) -> ref (plain C++).
// The CPU is probed once per process (cpuid, xgetbv, and for AMX the arch_prctl permission request, which
// must happen before the first tile instruction or the process dies of SIGILL). TD_CPU_ISA=amx|avx512|avx2|ref
// (read at every call, so tests can switch) forces a path; forcing one the machine cannot run is an error that
// carries the probe's reason.
#pragma once

#include <string>

namespace td_cpu {

enum class Isa { ref = 0, avx2 = 1, avx512 = 2, amx = 3 };

const char* isa_name(Isa isa);

// The path the kernels take now: TD_CPU_ISA if set (checked against the probe), else the best usable one.
Isa current_isa();

// Whether `isa` can run here; when not, *why says why (cpuid bit missing, OS state off, permission refused).
bool isa_usable(Isa isa, std::string* why = nullptr);

// One line per ISA, best first: "amx: no (...)", "avx512: yes", ... plus the TD_CPU_ISA override if any.
std::string isa_report();

}  // namespace td_cpu
