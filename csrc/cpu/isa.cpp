// CPU probe for the int8 kernels' ISA choice (see isa.h).
#include "isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace td_cpu {
namespace {

constexpr long kArchGetXcompPerm = 0x1022;  // asm/prctl.h (Linux >= 5.16)
constexpr long kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct Probe {
  bool usable[4] = {true, false, false, false};  // indexed by Isa
  std::string why[4];
};

unsigned long long xgetbv0() {
  unsigned int lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Asks Linux for the AMX tile-data state (process-wide, inherited by threads). Returns "" when granted, else
// the reason. TD_CPU_SIMULATE_AMX=refused makes it answer as a kernel that refuses would (tests; no syscall).
std::string request_tile_permission(bool simulate_refusal) {
  if (simulate_refusal)
    return "the OS refused the tile-data permission: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed "
           "with EPERM (simulated by TD_CPU_SIMULATE_AMX=refused)";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    const int err = errno;
    return std::string("the OS refused the tile-data permission: arch_prctl(ARCH_REQ_XCOMP_PERM, "
                       "XFEATURE_XTILEDATA) failed with ") +
           std::strerror(err) + (err == EINVAL ? " (Linux < 5.16 has no AMX support)" : "");
  }
  unsigned long long perm = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0 || !(perm & (1ull << kXfeatureXtiledata)))
    return "arch_prctl(ARCH_REQ_XCOMP_PERM) returned 0 but ARCH_GET_XCOMP_PERM does not show XTILEDATA";
  return "";
}

Probe probe() {
  Probe p;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni");
  p.usable[static_cast<int>(Isa::avx2)] = avx2;
  if (!avx2) p.why[static_cast<int>(Isa::avx2)] = "cpuid: no AVX2/FMA/F16C";
  p.usable[static_cast<int>(Isa::avx512)] = avx512;
  if (!avx512) p.why[static_cast<int>(Isa::avx512)] = "cpuid: no AVX-512 F/BW/VL/DQ/VNNI (or the OS left ZMM state off)";

  const char* sim = std::getenv("TD_CPU_SIMULATE_AMX");
  const bool simulate_refusal = sim != nullptr && std::strcmp(sim, "refused") == 0;
  unsigned int a = 0, b = 0, c = 0, d = 0;
  bool amx_cpu = false, osxsave = false;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) amx_cpu = (d >> 24 & 1) && (d >> 25 & 1);  // AMX-TILE, AMX-INT8
  if (__get_cpuid(1, &a, &b, &c, &d)) osxsave = c >> 27 & 1;
  const bool os_tiles = osxsave && (xgetbv0() & (3ull << 17)) == (3ull << 17);  // XTILECFG, XTILEDATA
  std::string& why = p.why[static_cast<int>(Isa::amx)];
  if (!(amx_cpu || simulate_refusal))
    why = "cpuid: no AMX-TILE/AMX-INT8";
  else if (!(os_tiles || simulate_refusal))
    why = "the OS does not enable the AMX tile state (XCR0 bits 17/18 off)";
  // a simulated AMX CPU has AVX-512 too (every AMX CPU does): only the refusal is simulated, on any host
  else if (!(avx512 || simulate_refusal))
    why = "AMX needs AVX-512 too (quantize and epilogue), and " + p.why[static_cast<int>(Isa::avx512)];
  else
    why = request_tile_permission(simulate_refusal);
  p.usable[static_cast<int>(Isa::amx)] = why.empty();
  return p;
}

const Probe& the_probe() {
  static const Probe p = probe();
  return p;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx: return "amx";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "ref";
  }
}

bool isa_usable(Isa isa, std::string* why) {
  const Probe& p = the_probe();
  const int i = static_cast<int>(isa);
  if (why != nullptr) *why = p.why[i];
  return p.usable[i];
}

Isa current_isa() {
  const char* env = std::getenv("TD_CPU_ISA");
  if (env != nullptr && env[0] != '\0') {
    for (Isa isa : {Isa::amx, Isa::avx512, Isa::avx2, Isa::ref}) {
      if (std::strcmp(env, isa_name(isa)) != 0) continue;
      std::string why;
      if (!isa_usable(isa, &why))
        throw std::runtime_error(std::string("TD_CPU_ISA=") + env + " cannot run on this machine: " + why);
      return isa;
    }
    throw std::runtime_error(std::string("TD_CPU_ISA must be amx, avx512, avx2 or ref, got '") + env + "'");
  }
  for (Isa isa : {Isa::amx, Isa::avx512, Isa::avx2})
    if (isa_usable(isa)) return isa;
  return Isa::ref;
}

std::string isa_report() {
  std::string s;
  for (Isa isa : {Isa::amx, Isa::avx512, Isa::avx2, Isa::ref}) {
    std::string why;
    const bool ok = isa_usable(isa, &why);
    s += std::string(isa_name(isa)) + ": " + (ok ? "yes" : "no (" + why + ")") + "\n";
  }
  const char* env = std::getenv("TD_CPU_ISA");
  if (env != nullptr && env[0] != '\0') s += std::string("override: TD_CPU_ISA=") + env + "\n";
  return s;
}

}  // namespace td_cpu
