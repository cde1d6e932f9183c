// Host check of the AMX int8 GEMM's packing and index math on machines without AMX (run by
// tests/backends/cpu/test_int8_gemm_amx.py). Builds csrc/cpu/amx_gemm.h with TD_AMX_EMULATE=1, which swaps the tile
// instructions for the scalar emulation in csrc/cpu/amx_tile.h (shape rules and #UD checks included), runs the
// kernel's own task decomposition, packing, fused quantization and epilogue, and compares bit for bit with a
// plain reference of the documented formula:
//   a_i8, a_scale = per-token quantization of x (or the given int8 A and scales)
//   out[m, n] = cast(fma(float(Σ_k a_i8[m,k]·w[n,k]), a_scale[m]·w_scale[n], bias[n]))   (RNE casts)
// Also checks that the AVX-512 weight packing equals the scalar one byte for byte, and that the kernel writes
// every output element and nothing past the output.
//
// usage: amx_emulation M K N seed out(f32|bf16|f16) bias(0|1) a(i8|f32|bf16|f16) [threads]
// prints "OK ..." or "FAIL ..." (exit 1); "SKIP ..." without AVX-512 (the kernel's quantize/epilogue need it).
#define TD_AMX_EMULATE 1
#include "amx_gemm.h"
#include "pack.h"
#include "guarded.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using td_cpu::Dt;

static Dt parse_dt(const char* s) {
  const std::string v(s);
  if (v == "f32") return Dt::f32;
  if (v == "bf16") return Dt::bf16;
  if (v == "f16") return Dt::f16;
  if (v == "i8") return Dt::i8;
  std::fprintf(stderr, "bad dtype %s\n", s);
  std::exit(2);
}

static float bf16_to_f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t f_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
__attribute__((target("f16c"))) static float f16_to_f(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("f16c"))) static uint16_t f_to_f16(float f) {
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s M K N seed out bias a [threads]\n", argv[0]);
    return 2;
  }
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c"))) {
    std::printf("SKIP: this CPU lacks AVX-512 (every AMX CPU has it; the kernel's quantize/epilogue use it)\n");
    return 0;
  }
  const int64_t M = std::atoll(argv[1]), K = std::atoll(argv[2]), N = std::atoll(argv[3]);
  std::mt19937 rng(std::atoi(argv[4]));
  const Dt out_dt = parse_dt(argv[5]);
  const bool with_bias = std::atoi(argv[6]) != 0;
  const Dt a_dt = parse_dt(argv[7]);
  const int64_t threads = argc > 8 ? std::atoll(argv[8]) : 2;

  std::uniform_int_distribution<int> i8(-128, 127);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  std::normal_distribution<float> gauss(0.f, 1.f);

  // weights (full int8 range: tdpbssd is exact for -128 too) and their packing, vector vs scalar
  std::vector<int8_t> w(N * K);
  for (auto& v : w) v = static_cast<int8_t>(i8(rng));
  const int64_t pn = td_cpu::packed_numel(N, K), np = td_cpu::round_up(N, 16);
  int8_t* wp = guarded<int8_t>(pn, 0x5a);  // the kernel must not read past the packed weight
  std::vector<int8_t> wp_ref(pn, 0x5a);
  const int64_t kp = td_cpu::round_up(K, 4);
  td_cpu::pack_blocks_avx512(w.data(), N, K, wp, reinterpret_cast<int32_t*>(wp + np * kp), 0, np / 16);
  td_cpu::pack_blocks_scalar(w.data(), N, K, wp_ref.data(), reinterpret_cast<int32_t*>(wp_ref.data() + np * kp), 0,
                             np / 16);
  if (std::memcmp(wp, wp_ref.data(), pn - 64) != 0) {
    std::printf("FAIL: AVX-512 weight packing differs from the scalar packing\n");
    return 1;
  }
  std::vector<float> ws(np, 0.f), bias(np, 0.f);
  for (int64_t n = 0; n < N; ++n) {
    ws[n] = (u01(rng) + 0.01f) * 1e-2f;
    if (with_bias) bias[n] = gauss(rng);
  }

  // A: int8 with scales, or float rows (a few with a large channel, one all-zero) quantized by the reference
  std::vector<int8_t> a_i8(M * K);
  std::vector<float> a_scale(M);
  std::vector<uint8_t> x_bytes;
  if (a_dt == Dt::i8) {
    for (auto& v : a_i8) v = static_cast<int8_t>(i8(rng));
    for (auto& s : a_scale) s = (u01(rng) + 0.01f) * 1e-2f;
  } else {
    const int es = td_cpu::dt_size(a_dt);
    x_bytes.resize(M * K * es);
    std::vector<float> xf(M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        float v = m == 1 ? 0.f : gauss(rng) * (k % 17 == 3 ? 20.f : 1.f);
        if (a_dt == Dt::bf16) {
          const uint16_t h = f_to_bf16(v);
          std::memcpy(&x_bytes[(m * K + k) * 2], &h, 2);
          v = bf16_to_f(h);
        } else if (a_dt == Dt::f16) {
          const uint16_t h = f_to_f16(v);
          std::memcpy(&x_bytes[(m * K + k) * 2], &h, 2);
          v = f16_to_f(h);
        } else {
          std::memcpy(&x_bytes[(m * K + k) * 4], &v, 4);
        }
        xf[m * K + k] = v;
      }
    for (int64_t m = 0; m < M; ++m) {  // reference.quantize_per_token's fp32 operations
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xf[m * K + k]));
      const float scale = amax / 127.0f, inv = scale > 0.f ? 1.0f / scale : 0.f;
      for (int64_t k = 0; k < K; ++k)
        a_i8[m * K + k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xf[m * K + k] * inv))));
      a_scale[m] = scale;
    }
  }

  // output poisoned (0xff bytes: NaN for every float type) with a guard region after it
  const int oes = td_cpu::dt_size(out_dt);
  const int64_t guard = 4096;
  std::vector<uint8_t> out(M * N * oes + guard, 0xff);

  td_cpu::amx::Gemm g{a_dt == Dt::i8 ? static_cast<const void*>(a_i8.data()) : x_bytes.data(),
                      a_dt, a_scale.data(), M, K, N, wp, ws.data(), bias.data(), out.data(), out_dt};
  // run the tasks the way at::parallel_for would hand them to `threads` workers (contiguous ranges), serially
  td_cpu::amx::gemm(g, threads, [&](int64_t n, auto&& body) {
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t t0 = n * t / threads, t1 = n * (t + 1) / threads;
      if (t0 < t1) body(t0, t1);
    }
  });
  if (td_amx::emu::configured) {
    std::printf("FAIL: tiles still configured after the GEMM (no TILERELEASE)\n");
    return 1;
  }
  for (int64_t i = M * N * oes; i < M * N * oes + guard; ++i)
    if (out[i] != 0xff) {
      std::printf("FAIL: wrote past the output at byte %lld\n", static_cast<long long>(i - M * N * oes));
      return 1;
    }

  int64_t bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int64_t>(a_i8[m * K + k]) * w[n * K + k];
      const float ref = std::fma(static_cast<float>(static_cast<int32_t>(acc)), a_scale[m] * ws[n], bias[n]);
      uint32_t want = 0, got = 0;
      if (out_dt == Dt::f32) {
        std::memcpy(&want, &ref, 4);
        std::memcpy(&got, &out[(m * N + n) * 4], 4);
      } else {
        want = out_dt == Dt::bf16 ? f_to_bf16(ref) : f_to_f16(ref);
        uint16_t h;
        std::memcpy(&h, &out[(m * N + n) * 2], 2);
        got = h;
      }
      if (want != got && bad++ < 5)
        std::printf("FAIL at m=%lld n=%lld: acc=%lld want 0x%x got 0x%x\n", static_cast<long long>(m),
                    static_cast<long long>(n), static_cast<long long>(acc), want, got);
    }
  if (bad) {
    std::printf("FAIL: %lld of %lld outputs differ\n", static_cast<long long>(bad), static_cast<long long>(M * N));
    return 1;
  }
  std::printf("OK M=%lld K=%lld N=%lld: %lld outputs bit-exact, %lld tdpbssd\n", static_cast<long long>(M),
              static_cast<long long>(K), static_cast<long long>(N), static_cast<long long>(M * N),
              static_cast<long long>(td_amx::emu::dp_count));
  return 0;
}
