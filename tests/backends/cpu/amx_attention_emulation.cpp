// Host check of the AMX-BF16 neighbourhood attention kernel (csrc/cpu/amx_attention.h) on machines without AMX
// (run by tests/backends/cpu/test_neighborhood_attention_emulation.py). Builds the kernel with TD_AMX_EMULATE=1,
// which swaps the tile instructions for the scalar emulation in csrc/cpu/amx_tile.h (shape rules and #UD checks
// included), and runs its own task decomposition, strip packing, row pairing, softmax and epilogue. The softmax
// and the bf16 conversions are AVX-512 (BF16): without them the run prints SKIP.
//
// The test writes the problem to a file and compares what comes back with the fp64 reference, so the window
// bounds come from the same `reference.neighborhood_bounds` as the real op's, and the tolerance is the AMX tests'.
// Inputs sit in buffers that end at a PROT_NONE page, outputs too and NaN-filled: a read or write past any of
// them faults, and an element the kernel does not write stays NaN.
//
// usage: amx_attention_emulation IN OUT threads
//   IN:  int64 B, H, Hq, Hk, W, D, q_row0; float32 scale; bf16 q [B,H,Hq,W,D], k and v [B,H,Hk,W,D];
//        int32 ylo, yhi [Hq], xlo, xhi [W]   (all contiguous, native byte order)
//   OUT: bf16 out [B,H,Hq,W,D]; float32 lse [B,H,Hq,W]
// prints "OK" or "SKIP ..." (exit 0), errors on stderr (exit 1); threads run the kernel's dynamic task dealing.
#define TD_AMX_EMULATE 1
#include "amx_attention.h"
#include "guarded.h"

#include <cstdio>
#include <thread>
#include <vector>

static void read_exact(std::FILE* f, void* p, size_t n) {
  if (std::fread(p, 1, n, f) != n) {
    std::fprintf(stderr, "short input file\n");
    std::exit(1);
  }
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IN OUT threads\n", argv[0]);
    return 1;
  }
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512bf16")) {
    std::printf("SKIP the kernel's softmax and bf16 conversions need AVX512-F/BW/BF16\n");
    return 0;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 1;
  int64_t hdr[7];
  float scale;
  read_exact(in, hdr, sizeof hdr);
  read_exact(in, &scale, sizeof scale);
  const int64_t B = hdr[0], H = hdr[1], Hq = hdr[2], Hk = hdr[3], W = hdr[4], D = hdr[5];
  const int64_t nq = B * H * Hq * W * D, nk = B * H * Hk * W * D;
  uint16_t* q = guarded<uint16_t>(nq, 0);
  uint16_t* k = guarded<uint16_t>(nk, 0);
  uint16_t* v = guarded<uint16_t>(nk, 0);
  int32_t *ylo = guarded<int32_t>(Hq, 0), *yhi = guarded<int32_t>(Hq, 0);
  int32_t *xlo = guarded<int32_t>(W, 0), *xhi = guarded<int32_t>(W, 0);
  read_exact(in, q, nq * 2);
  read_exact(in, k, nk * 2);
  read_exact(in, v, nk * 2);
  read_exact(in, ylo, Hq * 4);
  read_exact(in, yhi, Hq * 4);
  read_exact(in, xlo, W * 4);
  read_exact(in, xhi, W * 4);
  std::fclose(in);

  td_cpu::na::Problem pr{};
  pr.q = q, pr.k = k, pr.v = v;
  pr.B = B, pr.H = H, pr.Hq = Hq, pr.Hk = Hk, pr.W = W, pr.D = D;
  const int64_t qs[4] = {H * Hq * W * D, Hq * W * D, W * D, D}, ks[4] = {H * Hk * W * D, Hk * W * D, W * D, D};
  for (int i = 0; i < 4; ++i) pr.qs[i] = qs[i], pr.ks[i] = ks[i], pr.vs[i] = ks[i];
  pr.ylo = ylo, pr.yhi = yhi, pr.xlo = xlo, pr.xhi = xhi;
  pr.scale = scale;
  pr.q_row0 = hdr[6];
  pr.out = guarded<uint16_t>(nq, 0xff);  // bf16 0xffff: NaN
  pr.lse = guarded<float>(B * H * Hq * W, 0xff);
  // each body on its own thread (the emulated tiles are thread_local, as the hardware's are per core)
  td_cpu::na::run(pr, std::atoi(argv[3]), [](int64_t n, auto&& body) {
    std::vector<std::thread> ts;
    for (int64_t i = 0; i < n; ++i) ts.emplace_back([&body, i] { body(i, i + 1); });
    for (std::thread& t : ts) t.join();
  });

  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out || std::fwrite(pr.out, 2, nq, out) != static_cast<size_t>(nq) ||
      std::fwrite(pr.lse, 4, B * H * Hq * W, out) != static_cast<size_t>(B * H * Hq * W) || std::fclose(out) != 0)
    return 1;
  std::printf("OK\n");
  return 0;
}
