// CPU kernels of the W8A8 ops: quantize_per_token, pack_int8_weight, int8_gemm_packed, int8_gemm.
//
// The TU is compiled without -march (the .so ships to other CPUs): each ISA path is a set of functions
// compiled with __attribute__((target(...))) and chosen at call time (cpu_isa()):
//   avx512  AVX-512 F/BW/VL + VNNI: vpdpbusd on zmm, 8x32 register tile.
//   avx2    AVX2 + FMA + F16C: the vpdpbusd emulation vpsignb/vpabsb + vpmaddubsw + vpmaddwd, 4x16 tile.
//   scalar  plain C++.
// TD_CPU_ISA=avx512|avx2|scalar (read at every call) forces a path; a path the CPU lacks is an error.
//
// Packed weight layout for w [N, K] (Np = N rounded up to 16, Kp = K rounded up to 4), one int8 tensor:
//   bytes [0, Np*Kp)              blocks of 16 columns: [Np/16][Kp/4][16 columns][4 k] int8, zero padded
//   int32 [Np] after that         comp[n] = 128 * sum_k w[n, k]
//   int32 [16] after that         flags; flags[0] = 1 when w holds -128 (the avx2 path then goes scalar)
// The avx512 path feeds A as u8 = a xor 0x80 = a + 128 to vpdpbusd (u8 x s8, no saturation: each 4-product
// sum is formed exactly in int32), so acc = sum (a + 128) w = a.w + comp[n]; the epilogue subtracts comp.
// The avx2 path multiplies |a| (u8) by sign(a)*w (s8): |a| <= 128 and |w| <= 127 keep the pair sums of
// vpmaddubsw (<= 2*128*127 = 32512) below int16 saturation, which is why w = -128 is excluded there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace td_int8 {
namespace {

#define TD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define TD_AVX2 __attribute__((target("avx2,fma,f16c")))

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

constexpr int64_t kNB = 16;  // columns per packed block = int32 lanes of a zmm
constexpr int64_t kMC = 128; // rows per task: the packed A block (kMC x Kp) stays in L2 beside one B panel

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

Isa current_isa() {
  static const bool has512 = cpu_has_avx512(), has2 = cpu_has_avx2();
  const char* env = std::getenv("TD_CPU_ISA");
  if (env != nullptr && env[0] != '\0') {
    std::string s(env);
    if (s == "scalar") return Isa::scalar;
    if (s == "avx2") {
      TORCH_CHECK(has2, "TD_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
      return Isa::avx2;
    }
    if (s == "avx512") {
      TORCH_CHECK(has512, "TD_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ/VNNI");
      return Isa::avx512;
    }
    TORCH_CHECK(false, "TD_CPU_ISA must be avx512, avx2 or scalar, got '", s, "'");
  }
  return has512 ? Isa::avx512 : has2 ? Isa::avx2 : Isa::scalar;
}

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar"; }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int64_t packed_numel(int64_t n, int64_t k) {
  const int64_t np = round_up(n, kNB), kp = round_up(k, 4);
  return np * kp + 4 * np + 64;
}

// ------------------------------------------------------------------------------------- epilogue (scalar)

// out[r, c] = float(acc - comp[c]) * (a_scale[r] * w_scale[c]) + bias[c] as one fma, like the avx512 path,
// so every ISA path gives bit-identical results.
template <typename Out>
inline void epilogue_scalar_row(const int32_t* acc, const int32_t* comp, float as, const float* ws,
                                const float* bias, Out* out, int64_t ncols) {
  for (int64_t c = 0; c < ncols; ++c) {
    const float v = std::fma(static_cast<float>(acc[c] - comp[c]), as * ws[c], bias[c]);
    out[c] = static_cast<Out>(v);
  }
}

struct Epi {
  const int32_t* comp;  // [Np], zeros for the paths that need no compensation
  const float* a_scale; // [M]
  const float* ws;      // [Np] zero padded
  const float* bias;    // [Np] zero padded (zeros when there is no bias)
  void* out;            // [M, N]
  int64_t M, N;
  at::ScalarType odt;
  bool has_bf16 = false;  // CPU has AVX512-BF16 (vcvtne2ps2bf16) for the bf16 epilogue
};

void epilogue_scalar(const Epi& e, const int32_t* acc /*[rows][16]*/, int64_t m0, int64_t rows, int64_t n0) {
  const int32_t* comp = e.comp;
  const int64_t ncols = std::min<int64_t>(kNB, e.N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float as = e.a_scale[m];
    switch (e.odt) {
      case at::kFloat:
        epilogue_scalar_row(acc + r * kNB, comp + n0, as, e.ws + n0, e.bias + n0,
                            static_cast<float*>(e.out) + m * e.N + n0, ncols);
        break;
      case at::kBFloat16:
        epilogue_scalar_row(acc + r * kNB, comp + n0, as, e.ws + n0, e.bias + n0,
                            static_cast<c10::BFloat16*>(e.out) + m * e.N + n0, ncols);
        break;
      default:
        epilogue_scalar_row(acc + r * kNB, comp + n0, as, e.ws + n0, e.bias + n0,
                            static_cast<c10::Half*>(e.out) + m * e.N + n0, ncols);
        break;
    }
  }
}

// ----------------------------------------------------------------------------------------- packing

void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* dst) {
  const int64_t np = round_up(N, kNB), kp = round_up(K, 4), kq = kp / 4;
  std::memset(dst, 0, packed_numel(N, K));
  int32_t* comp = reinterpret_cast<int32_t*>(dst + np * kp);
  int32_t* flags = comp + np;
  std::vector<int> has_min(np / kNB, 0);
  at::parallel_for(0, np / kNB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int8_t* blk = dst + b * kq * 64;
      for (int64_t c = 0; c < kNB; ++c) {
        const int64_t n = b * kNB + c;
        if (n >= N) break;
        const int8_t* row = w + n * K;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          blk[(k / 4) * 64 + c * 4 + (k % 4)] = row[k];
          sum += row[k];
          has_min[b] |= row[k] == -128;
        }
        comp[n] = 128 * sum;
      }
    }
  });
  for (int v : has_min) flags[0] |= v;
}

// A block rows [m0, m0 + rows) -> panels of MR rows: [rows/MR][Kp/4][MR][4], rows past M and k past K are 0.
// xor80 turns s8 into u8 (a + 128) for vpdpbusd.
template <int MR>
void pack_a(const int8_t* a, int64_t M, int64_t K, int64_t m0, int64_t rows, bool xor80, int8_t* dst) {
  const int64_t kp = round_up(K, 4), kq = kp / 4;
  const int64_t K4 = K / 4 * 4;
  const uint32_t x = xor80 ? 0x80808080u : 0u;
  for (int64_t p = 0; p < rows; p += MR) {
    int8_t* panel = dst + p * kp;
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + p + r;
      uint32_t* d = reinterpret_cast<uint32_t*>(panel) + r;
      if (m >= M) {
        for (int64_t q = 0; q < kq; ++q) d[q * MR] = 0;
        continue;
      }
      const int8_t* src = a + m * K;
      int64_t q = 0;
      for (; q < K4 / 4; ++q) {
        uint32_t v;
        std::memcpy(&v, src + 4 * q, 4);
        d[q * MR] = v ^ x;
      }
      if (K4 < K) {  // tail group: pad with 0 (the padded weights are 0, any value works)
        uint8_t t[4] = {0, 0, 0, 0};
        for (int64_t k = K4; k < K; ++k) t[k - K4] = static_cast<uint8_t>(src[k]) ^ static_cast<uint8_t>(x);
        uint32_t v;
        std::memcpy(&v, t, 4);
        d[q * MR] = v;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ avx512

// pack_a<8> for the avx512 path: per 8-row panel, 8x8 dword transposes (row r, k-group q) -> (q, r) in ymm,
// xor 0x80 on the way. The scalar pack_a cost ~8% of a K=1152 GEMM; this is a few shuffles per 32 bytes.
TD_AVX512 void pack_a8_avx512(const int8_t* a, int64_t M, int64_t K, int64_t m0, int64_t rows, int8_t* dst) {
  constexpr int MR = 8;
  const int64_t kp = round_up(K, 4), kq = kp / 4, kq8 = (K / 4) / 8 * 8;
  const __m256i x80 = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = 0; p < rows; p += MR) {
    int8_t* panel = dst + p * kp;
    const int8_t* src[MR];
    bool full = true;
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + p + r;
      src[r] = m < M ? a + m * K : nullptr;
      full &= m < M;
    }
    int64_t q = 0;
    if (full) {
      for (; q < kq8; q += 8) {
        __m256i r[MR], t[MR], u[MR];
        for (int i = 0; i < MR; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[i] + 4 * q));
        for (int i = 0; i < MR; i += 2) {
          t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
          t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int h = 0; h < MR; h += 4) {
          u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
          u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
          u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
          u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
        __m256i* d = reinterpret_cast<__m256i*>(panel + q * MR * 4);
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_si256(d + i, _mm256_xor_si256(_mm256_permute2x128_si256(u[i], u[i + 4], 0x20), x80));
          _mm256_storeu_si256(d + i + 4, _mm256_xor_si256(_mm256_permute2x128_si256(u[i], u[i + 4], 0x31), x80));
        }
      }
    }
    // the rest (short panels, the last < 8 groups and the K % 4 tail) one dword at a time
    for (int r = 0; r < MR; ++r) {
      uint32_t* d = reinterpret_cast<uint32_t*>(panel) + r;
      for (int64_t qq = q; qq < kq; ++qq) {
        uint8_t t4[4] = {0, 0, 0, 0};
        if (src[r] != nullptr)
          for (int64_t k = 4 * qq; k < std::min<int64_t>(K, 4 * qq + 4); ++k)
            t4[k - 4 * qq] = static_cast<uint8_t>(src[r][k]) ^ 0x80u;
        uint32_t v;
        std::memcpy(&v, t4, 4);
        d[qq * MR] = v;
      }
    }
  }
}


constexpr int kMR512 = 8;  // 8 rows x 2 zmm (32 columns) = 16 accumulators; 2 B loads + 8 broadcasts per k4

TD_AVX512 inline void store16(const Epi& e, __m512 v, int64_t m, int64_t n0, __mmask16 mask) {
  switch (e.odt) {
    case at::kFloat:
      _mm512_mask_storeu_ps(static_cast<float*>(e.out) + m * e.N + n0, mask, v);
      break;
    case at::kBFloat16: {
      // round to nearest even on the bit pattern (NaN stays NaN: its payload sits in the high bits here)
      __m512i b = _mm512_castps_si512(v);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
      b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      b = _mm512_srli_epi32(b, 16);
      _mm256_mask_storeu_epi16(static_cast<c10::BFloat16*>(e.out) + m * e.N + n0, mask, _mm512_cvtepi32_epi16(b));
      break;
    }
    default:
      _mm256_mask_storeu_epi16(static_cast<c10::Half*>(e.out) + m * e.N + n0, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

// Accumulators of one 8 x 32 tile live in a 1 KiB slot of an L1-resident buffer between K blocks:
// slot[(2*r + j) * 16 + lane] = row r, column block j.
constexpr int64_t kSlot = 16 * 16;

// 8 rows x 2 blocks over qn k4-groups: ap = packed A panel slice [qn][8][4] (u8), bp = block 0 of the B slice
// (block 1 is bstride bytes further), acc slot in/out (init: start from 0).
TD_AVX512 void kern_8x2(const int8_t* ap, const int8_t* bp, int64_t bstride, int64_t qn, int32_t* slot, bool init) {
  // In asm: gcc's schedule of the intrinsics rotated the 16 accumulators through extra register moves every
  // iteration, and gcc allows only 30 asm operands, so the accumulators are fixed registers zmm0..zmm15
  // (row r, block j -> zmm(2r+j)). Per k4 step: 2 B loads, 8 A broadcasts, 16 vpdpbusd.
#define TD_ROW(r0, r1, off)                    \
  "vpbroadcastd " #off "(%[a]), %%zmm18\n\t"   \
  "vpdpbusd %%zmm16, %%zmm18, %%zmm" #r0 "\n\t" \
  "vpdpbusd %%zmm17, %%zmm18, %%zmm" #r1 "\n\t"
#define TD_LD(r) "vmovdqa64 " #r "*64(%[o]), %%zmm" #r "\n\t"
#define TD_ST(r) "vmovdqa64 %%zmm" #r ", " #r "*64(%[o])\n\t"
  const int8_t* a = ap;
  const int8_t* b = bp;
  int64_t n = qn;
  const int64_t zero = init ? 1 : 0;
  __asm__ volatile(
      "test %[z], %[z]\n\t"
      "jz 3f\n\t"
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
      "vmovdqa64 %%zmm0, %%zmm1\n\t vmovdqa64 %%zmm0, %%zmm2\n\t vmovdqa64 %%zmm0, %%zmm3\n\t"
      "vmovdqa64 %%zmm0, %%zmm4\n\t vmovdqa64 %%zmm0, %%zmm5\n\t vmovdqa64 %%zmm0, %%zmm6\n\t"
      "vmovdqa64 %%zmm0, %%zmm7\n\t vmovdqa64 %%zmm0, %%zmm8\n\t vmovdqa64 %%zmm0, %%zmm9\n\t"
      "vmovdqa64 %%zmm0, %%zmm10\n\t vmovdqa64 %%zmm0, %%zmm11\n\t vmovdqa64 %%zmm0, %%zmm12\n\t"
      "vmovdqa64 %%zmm0, %%zmm13\n\t vmovdqa64 %%zmm0, %%zmm14\n\t vmovdqa64 %%zmm0, %%zmm15\n\t"
      "jmp 4f\n\t"
      "3:\n\t"
      TD_LD(0) TD_LD(1) TD_LD(2) TD_LD(3) TD_LD(4) TD_LD(5) TD_LD(6) TD_LD(7) TD_LD(8) TD_LD(9) TD_LD(10)
      TD_LD(11) TD_LD(12) TD_LD(13) TD_LD(14) TD_LD(15)
      "4:\n\t"
      "test %[n], %[n]\n\t"
      "jz 2f\n\t"
      ".p2align 5\n\t"
      "1:\n\t"
      "vmovdqu64 (%[b]), %%zmm16\n\t"
      "vmovdqu64 (%[b],%[bs]), %%zmm17\n\t"
      TD_ROW(0, 1, 0) TD_ROW(2, 3, 4) TD_ROW(4, 5, 8) TD_ROW(6, 7, 12) TD_ROW(8, 9, 16) TD_ROW(10, 11, 20)
      TD_ROW(12, 13, 24) TD_ROW(14, 15, 28)
      "add $64, %[b]\n\t"
      "add $32, %[a]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      TD_ST(0) TD_ST(1) TD_ST(2) TD_ST(3) TD_ST(4) TD_ST(5) TD_ST(6) TD_ST(7) TD_ST(8) TD_ST(9) TD_ST(10)
      TD_ST(11) TD_ST(12) TD_ST(13) TD_ST(14) TD_ST(15)
      : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)
      : [bs] "r"(bstride), [o] "r"(slot), [z] "r"(zero)
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11",
        "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "cc", "memory");
#undef TD_ROW
#undef TD_LD
#undef TD_ST
}

// The same for the last, single 16-column block when N/16 is odd (intrinsics; rare).
TD_AVX512 void kern_8x1(const int8_t* ap, const int8_t* bp, int64_t qn, int32_t* slot, bool init) {
  __m512i acc[kMR512];
  for (int r = 0; r < kMR512; ++r)
    acc[r] = init ? _mm512_setzero_si512() : _mm512_load_si512(slot + 2 * r * 16);
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
  for (int64_t q = 0; q < qn; ++q) {
    const __m512i b = _mm512_loadu_si512(bp + q * 64);
    for (int r = 0; r < kMR512; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(a32[q * kMR512 + r]), b);
  }
  for (int r = 0; r < kMR512; ++r) _mm512_store_si512(slot + 2 * r * 16, acc[r]);
}

// Epilogue of one tile from its slot: out = float(acc - comp) * (a_scale * w_scale) + bias, cast, masked store.
TD_AVX512 void epi_tile(const int32_t* slot, int nblk, const Epi& e, int64_t m0, int64_t n0) {
  const int64_t rows = std::min<int64_t>(kMR512, e.M - m0);
  for (int j = 0; j < nblk; ++j) {
    const int64_t n = n0 + j * kNB;
    const int64_t ncols = std::min<int64_t>(kNB, e.N - n);
    if (ncols <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << ncols) - 1u);
    const __m512i comp = _mm512_loadu_si512(e.comp + n);
    const __m512 ws = _mm512_loadu_ps(e.ws + n);
    const __m512 bias = _mm512_loadu_ps(e.bias + n);
    for (int r = 0; r < rows; ++r) {
      const __m512i acc = _mm512_load_si512(slot + (2 * r + j) * 16);
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(e.a_scale[m0 + r]), ws);
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp)), s, bias);
      store16(e, v, m0 + r, n, mask);
    }
  }
}

#define TD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))

// Full 8 x 32 tile to bf16 with vcvtne2ps2bf16 (round to nearest even, as store16): one 64-byte store per row.
TD_AVX512BF16 void epi_tile_bf16x32(const int32_t* slot, const Epi& e, int64_t m0, int64_t n0) {
  const int64_t rows = std::min<int64_t>(kMR512, e.M - m0);
  const __m512i c0 = _mm512_loadu_si512(e.comp + n0), c1 = _mm512_loadu_si512(e.comp + n0 + 16);
  const __m512 w0 = _mm512_loadu_ps(e.ws + n0), w1 = _mm512_loadu_ps(e.ws + n0 + 16);
  const __m512 b0 = _mm512_loadu_ps(e.bias + n0), b1 = _mm512_loadu_ps(e.bias + n0 + 16);
  for (int r = 0; r < rows; ++r) {
    const __m512 as = _mm512_set1_ps(e.a_scale[m0 + r]);
    const __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(slot + 2 * r * 16), c0)),
                                      _mm512_mul_ps(as, w0), b0);
    const __m512 v1 = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(slot + (2 * r + 1) * 16), c1)), _mm512_mul_ps(as, w1),
        b1);
    _mm512_storeu_si512(static_cast<c10::BFloat16*>(e.out) + (m0 + r) * e.N + n0,
                        reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)));
  }
}

// Rows [m0, m0+rows) (A block packed in ablk) against column blocks [b0, b1). For each 32-column B panel the
// K loop is cut in slices of <= kKC k4-groups so that the B slice (2 x 64 x qn bytes, <= 8 KiB), the 16 tiles'
// accumulators (16 KiB) and the A slice of the tile being computed (2 KiB) stay in L1 while the slice is reused
// by every 8-row tile of the block; A and B stream from L2 (the whole A block and the B panel fit there).
constexpr int64_t kKC = 64;
TD_AVX512 void block_avx512(const int8_t* ablk, int64_t rows, const int8_t* wp, int64_t kq, const Epi& e,
                            int64_t m0, int64_t b0, int64_t b1) {
  const int64_t bstride = kq * 64;
  const int64_t nslices = std::max<int64_t>(1, (kq + kKC - 1) / kKC);
  const int64_t slice = (kq + nslices - 1) / nslices;
  alignas(64) int32_t acc[kMC / kMR512][kSlot];
  const int64_t ntiles = rows / kMR512;
  for (int64_t b = b0; b < b1; b += 2) {
    const int nblk = b + 1 < b1 ? 2 : 1;
    const int8_t* bp = wp + b * bstride;
    for (int64_t q0 = 0; q0 < kq || q0 == 0; q0 += slice) {
      const int64_t qn = std::min(slice, kq - q0);
      for (int64_t t = 0; t < ntiles; ++t) {
        const int8_t* ap = ablk + t * kMR512 * kq * 4 + q0 * kMR512 * 4;
        if (nblk == 2)
          kern_8x2(ap, bp + q0 * 64, bstride, qn, acc[t], q0 == 0);
        else
          kern_8x1(ap, bp + q0 * 64, qn, acc[t], q0 == 0);
      }
      if (kq == 0) break;
    }
    const bool fast_bf16 = e.has_bf16 && e.odt == at::kBFloat16 && nblk == 2 && (b + 2) * kNB <= e.N;
    for (int64_t t = 0; t < ntiles; ++t) {
      if (fast_bf16)
        epi_tile_bf16x32(acc[t], e, m0 + t * kMR512, b * kNB);
      else
        epi_tile(acc[t], nblk, e, m0 + t * kMR512, b * kNB);
    }
  }
}

// ------------------------------------------------------------------------------------------- avx2

constexpr int kMR2 = 4;  // 4 rows x 16 columns (2 ymm) = 8 accumulators of the 16 ymm registers

TD_AVX2 void tile_avx2(const int8_t* ap, const int8_t* bp, int64_t kq, const Epi& e, int64_t m0, int64_t n0) {
  __m256i acc[kMR2][2];
  for (int r = 0; r < kMR2; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
  for (int64_t q = 0; q < kq; ++q) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + q * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + q * 64 + 32));
    for (int r = 0; r < kMR2; ++r) {
      const __m256i av = _mm256_set1_epi32(a32[q * kMR2 + r]);
      const __m256i aa = _mm256_abs_epi8(av);
      const __m256i p0 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b0, av));
      const __m256i p1 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b1, av));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  alignas(64) int32_t buf[kMR2 * kNB];
  for (int r = 0; r < kMR2; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf + r * kNB), acc[r][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf + r * kNB + 8), acc[r][1]);
  }
  epilogue_scalar(e, buf, m0, std::min<int64_t>(kMR2, e.M - m0), n0);
}

TD_AVX2 void block_avx2(const int8_t* ablk, int64_t rows, const int8_t* wp, int64_t kq, const Epi& e, int64_t m0,
                        int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t p = 0; p < rows; p += kMR2) tile_avx2(ablk + p * kq * 4, wp + b * kq * 64, kq, e, m0 + p, b * kNB);
}

// ----------------------------------------------------------------------------------------- scalar

void block_scalar(const int8_t* ablk, int64_t rows, const int8_t* wp, int64_t kq, const Epi& e, int64_t m0,
                  int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* bp = wp + b * kq * 64;
    for (int64_t p = 0; p < rows; p += kMR2) {
      int32_t acc[kMR2 * kNB] = {0};
      const int8_t* ap = ablk + p * kq * 4;
      for (int64_t q = 0; q < kq; ++q)
        for (int r = 0; r < kMR2; ++r)
          for (int c = 0; c < kNB; ++c)
            for (int t = 0; t < 4; ++t) acc[r * kNB + c] += ap[(q * kMR2 + r) * 4 + t] * bp[q * 64 + c * 4 + t];
      epilogue_scalar(e, acc, m0 + p, std::min<int64_t>(kMR2, e.M - m0 - p), b * kNB);
    }
  }
}

}  // namespace
}  // namespace td_int8

// ------------------------------------------------------------------------------------------- driver

namespace td_int8 {
namespace {

void gemm_packed_into(const at::Tensor& a, const at::Tensor& a_scale, const int8_t* wp, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& bias, at::Tensor& out, Isa isa) {
  const int64_t M = a.size(0), K = a.size(1), N = w_scale.size(0);
  const int64_t np = round_up(N, kNB), kp = round_up(K, 4), kq = kp / 4;
  if (M == 0 || N == 0) return;
  const int32_t* comp = reinterpret_cast<const int32_t*>(wp + np * kp);
  if (isa == Isa::avx2 && comp[np] != 0) isa = Isa::scalar;  // w holds -128: vpmaddubsw could saturate

  // zero-padded fp32 copies of the per-column vectors so the tiles load 16 lanes without bounds checks
  std::vector<float> ws(np, 0.f), bs(np, 0.f);
  std::memcpy(ws.data(), w_scale.data_ptr<float>(), N * sizeof(float));
  if (bias.has_value()) {
    at::Tensor b = bias->to(at::kFloat).contiguous();
    std::memcpy(bs.data(), b.data_ptr<float>(), N * sizeof(float));
  }
  std::vector<int32_t> zero_comp;
  if (isa != Isa::avx512) zero_comp.assign(np, 0);
  Epi e{isa == Isa::avx512 ? comp : zero_comp.data(), a_scale.data_ptr<float>(), ws.data(), bs.data(),
        out.data_ptr(), M, N, out.scalar_type()};
  static const bool has_bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  e.has_bf16 = has_bf16;

  const int mr = isa == Isa::avx512 ? kMR512 : kMR2;
  const int64_t mblocks = (M + kMC - 1) / kMC;
  const int64_t nblocks = np / kNB;
  // Split N too when there are few row blocks (small M), in even numbers of blocks (the 32-column panel).
  const int64_t threads = at::get_num_threads();
  int64_t nchunks = 1;
  if (mblocks < 4 * threads) nchunks = std::min<int64_t>((nblocks + 1) / 2, (4 * threads + mblocks - 1) / mblocks);
  const int64_t chunk = round_up((nblocks + nchunks - 1) / nchunks, 2);
  nchunks = (nblocks + chunk - 1) / chunk;
  const int8_t* ap = a.data_ptr<int8_t>();

  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> ablk(static_cast<size_t>(kMC * kp) + 64);
    int64_t packed_m = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / nchunks, nc = t % nchunks;
      const int64_t m0 = mb * kMC, rows = std::min<int64_t>(kMC, M - m0);
      const int64_t rows_p = round_up(rows, mr);
      if (packed_m != m0) {
        if (isa == Isa::avx512)
          pack_a8_avx512(ap, M, K, m0, rows_p, ablk.data());
        else if (mr == kMR512)
          pack_a<kMR512>(ap, M, K, m0, rows_p, false, ablk.data());
        else
          pack_a<kMR2>(ap, M, K, m0, rows_p, false, ablk.data());
        packed_m = m0;
      }
      const int64_t b0 = nc * chunk, b1 = std::min(nblocks, b0 + chunk);
      if (isa == Isa::avx512)
        block_avx512(ablk.data(), rows_p, wp, kq, e, m0, b0, b1);
      else if (isa == Isa::avx2)
        block_avx2(ablk.data(), rows_p, wp, kq, e, m0, b0, b1);
      else
        block_scalar(ablk.data(), rows_p, wp, kq, e, m0, b0, b1);
    }
  });
}

void check_inputs(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w_scale,
                  const c10::optional<at::Tensor>& bias, at::ScalarType odt) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kChar && a.is_contiguous(), "a must be contiguous int8 [M, K]");
  TORCH_CHECK(a.size(1) <= 65536, "K must be <= 65536 (int32 accumulation), got ", a.size(1));
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.is_contiguous() && a_scale.numel() == a.size(0),
              "a_scale must be contiguous float32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.dim() == 1,
              "w_scale must be contiguous float32 [N]");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == w_scale.numel(), "bias must be [N]");
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16 || odt == at::kHalf, "out_dtype must be fp32/bf16/fp16");
}

at::Tensor pack_int8_weight_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "w must be int8 [N, K]");
  at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({packed_numel(w.size(0), w.size(1))}, w.options());
  pack_weight(wc.data_ptr<int8_t>(), w.size(0), w.size(1), out.data_ptr<int8_t>());
  return out;
}

at::Tensor int8_gemm_packed_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w_packed,
                                const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                at::ScalarType out_dtype) {
  check_inputs(a, a_scale, w_scale, bias, out_dtype);
  const int64_t N = w_scale.size(0), K = a.size(1);
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 1 && w_packed.is_contiguous() &&
                  w_packed.numel() == packed_numel(N, K),
              "w_packed must be the 1-D int8 tensor from pack_int8_weight for N=", N, ", K=", K, " (",
              packed_numel(N, K), " bytes), got ", w_packed.numel(), " elements of ", w_packed.scalar_type());
  at::Tensor out = at::empty({a.size(0), N}, a.options().dtype(out_dtype));
  gemm_packed_into(a, a_scale, w_packed.data_ptr<int8_t>(), w_scale, bias, out, current_isa());
  return out;
}

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_inputs(a, a_scale, w_scale, bias, out_dtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) == a.size(1) && w.size(0) == w_scale.size(0),
              "w must be int8 [N, K]");
  // Packing costs N*K byte moves against 2*M*N*K ops: negligible unless M is tiny (then use the packed op).
  at::Tensor wp = pack_int8_weight_cpu(w);
  at::Tensor out = at::empty({a.size(0), w.size(0)}, a.options().dtype(out_dtype));
  gemm_packed_into(a, a_scale, wp.data_ptr<int8_t>(), w_scale, bias, out, current_isa());
  return out;
}

// --------------------------------------------------------------------------------------- quantize

// Same fp32 operations as reference.quantize_per_token (absmax/127, 1/scale, round-half-even of x*inv), so the
// result is bit-identical.
inline void quant_row_finish(float amax, float& scale, float& inv) {
  scale = amax / 127.0f;
  inv = scale > 0.f ? 1.0f / scale : 0.f;
}

template <typename T>
void quant_row_scalar(const T* x, int64_t K, int8_t* q, float* scale_out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  float scale, inv;
  quant_row_finish(amax, scale, inv);
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(static_cast<float>(x[k]) * inv);
    v = std::min(127.f, std::max(-127.f, v));
    q[k] = static_cast<int8_t>(v);
  }
  *scale_out = scale;
}

template <typename T>
TD_AVX512 inline __m512 load16_512(const T* x, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m256i h = _mm256_maskz_loadu_epi16(m, x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x));
  }
}

template <typename T>
TD_AVX512 void quant_row_avx512(const T* x, int64_t K, int8_t* q, float* scale_out) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1u);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_512(x + k, m)));
  }
  float scale, inv;
  quant_row_finish(_mm512_reduce_max_ps(amax), scale, inv);
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 v = _mm512_mul_ps(load16_512(x + k, m), vinv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  *scale_out = scale;
}

template <typename T>
TD_AVX2 inline __m256 load8_avx2(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
}

template <typename T>
TD_AVX2 void quant_row_avx2(const T* x, int64_t K, int8_t* q, float* scale_out) {
  const int64_t K8 = K / 8 * 8;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(load8_avx2(x + k), absmask));
  alignas(32) float t[8];
  _mm256_store_ps(t, amax);
  float am = 0.f;
  for (float v : t) am = std::max(am, v);
  for (int64_t k = K8; k < K; ++k) am = std::max(am, std::fabs(static_cast<float>(x[k])));
  float scale, inv;
  quant_row_finish(am, scale, inv);
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(load8_avx2(x + k), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
    __m256i i = _mm256_cvtps_epi32(v);
    __m128i s = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    s = _mm_packs_epi16(s, s);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), s);
  }
  for (int64_t k = K8; k < K; ++k) {
    float v = std::nearbyint(static_cast<float>(x[k]) * inv);
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  *scale_out = scale;
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* s, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (isa == Isa::avx512)
        quant_row_avx512(x + r * K, K, q + r * K, s + r);
      else if (isa == Isa::avx2)
        quant_row_avx2(x + r * K, K, q + r * K, s + r);
      else
        quant_row_scalar(x + r * K, K, q + r * K, s + r);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 2, "x must be 2-D [M, K]");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  const Isa isa = current_isa();
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_rows(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), isa);
      break;
    case at::kBFloat16:
      quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), isa);
      break;
    case at::kHalf:
      quantize_rows(x.data_ptr<c10::Half>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), isa);
      break;
    default:
      TORCH_CHECK(false, "x must be float32/bfloat16/float16, got ", x.scalar_type());
  }
  return {q, s};
}

// ------------------------------------------------------------------------------- ISA and peak probes

// 12 independent vpdpbusd chains per thread (hides the 4-5 cycle latency); nothing leaves the registers.
TD_AVX512 int64_t vnni_spin(int64_t iters) {
#define TD_DP(r) "vpdpbusd %%zmm13, %%zmm12, %%zmm" #r "\n\t"
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\t"
      "vpabsb %%zmm12, %%zmm13\n\t"
      "test %[n], %[n]\n\t"
      "jz 2f\n\t"
      ".p2align 5\n\t"
      "1:\n\t" TD_DP(0) TD_DP(1) TD_DP(2) TD_DP(3) TD_DP(4) TD_DP(5) TD_DP(6) TD_DP(7) TD_DP(8) TD_DP(9)
      TD_DP(10) TD_DP(11)
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      : [n] "+r"(iters)
      :
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12",
        "zmm13", "cc");
#undef TD_DP
  return iters;
}

// Measured int8 peak over at::get_num_threads() threads, in GOP/s (1 multiply-add = 2 ops).
double vnni_peak_gops(int64_t iters) {
  TORCH_CHECK(cpu_has_avx512(), "vnni_peak_gops needs AVX-512 VNNI");
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink[i] = vnni_spin(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(threads) * iters * 12 * 64 * 2 / s / 1e9;
}

std::string cpu_isa() { return isa_name(current_isa()); }

}  // namespace
}  // namespace td_int8

TORCH_LIBRARY_IMPL(tiled_diffusion_C, CPU, m) {
  m.impl("quantize_per_token", &td_int8::quantize_per_token_cpu);
  m.impl("pack_int8_weight", &td_int8::pack_int8_weight_cpu);
  m.impl("int8_gemm_packed", &td_int8::int8_gemm_packed_cpu);
  m.impl("int8_gemm", &td_int8::int8_gemm_cpu);
}

TORCH_LIBRARY_FRAGMENT(tiled_diffusion_C, m) {
  m.def("cpu_isa() -> str", &td_int8::cpu_isa);
  m.def("vnni_peak_gops(int iters) -> float", &td_int8::vnni_peak_gops);
}
