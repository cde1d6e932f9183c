// CPU kernels of the W8A8 ops: quantize_per_token, pack_int8_weight, int8_gemm_packed, int8_gemm, and the
// fused w8a8_linear (float x -> per-token quantize inside the A packing -> GEMM -> dequantize/bias/cast).
//
// The TU is compiled without -march (the .so ships to other CPUs): each ISA path is a set of functions
// compiled with __attribute__((target(...))) and chosen at call time (isa.h: probed once, TD_CPU_ISA forces):
//   amx     AMX-TILE/INT8 tdpbssd on 16x64 tiles (amx_gemm.h), AVX-512 quantize and epilogue.
//   avx512  AVX-512 F/BW/VL + VNNI: vpdpbusd on zmm, 8x32 register tile.
//   avx2    AVX2 + FMA + F16C: the vpdpbusd emulation vpsignb/vpabsb + vpmaddubsw + vpmaddwd, 4x16 tile.
//   ref     plain C++.
//
// Packed weight layout: pack.h ([Np/16][Kp/4][16][4] int8 + comp + flags; the same bytes are AMX B tiles).
// The avx512 path feeds A as u8 = a xor 0x80 = a + 128 to vpdpbusd (u8 x s8, no saturation: each 4-product
// sum is formed exactly in int32), so acc = sum (a + 128) w = a.w + comp[n]; the epilogue subtracts comp.
// The avx2 path multiplies |a| (u8) by sign(a)*w (s8): |a| <= 128 and |w| <= 127 keep the pair sums of
// vpmaddubsw (<= 2*128*127 = 32512) below int16 saturation, which is why w = -128 is excluded there.
// AMX's tdpbssd is s8 x s8: no compensation.
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
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "amx_gemm.h"
#include "avx512_common.h"
#include "isa.h"
#include "pack.h"

namespace td_int8 {
namespace {

using td_cpu::Dt;
using td_cpu::Isa;
using td_cpu::packed_numel;
using td_cpu::round_up;

#define TD_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int64_t kNB = 16;  // columns per packed block = int32 lanes of a zmm
constexpr int64_t kMC = 128; // rows per task: the packed A block (kMC x Kp) stays in L2 beside one B panel

// The ISA for this call; a forced one this machine cannot run is a RuntimeError naming the reason.
Isa current_isa() {
  try {
    return td_cpu::current_isa();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return Isa::ref;  // not reached
}

Dt dt_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dt::f32;
    case at::kBFloat16: return Dt::bf16;
    case at::kHalf: return Dt::f16;
    case at::kChar: return Dt::i8;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
  return Dt::f32;  // not reached
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
  const float* a_scale; // row m's scale is a_scale[m - scale_m0] (global [M], or a task's own rows)
  const float* ws;      // [Np] zero padded
  const float* bias;    // [Np] zero padded (zeros when there is no bias)
  void* out;            // [M, N]
  int64_t M, N;
  Dt odt;
  bool has_bf16 = false;  // CPU has AVX512-BF16 (vcvtne2ps2bf16) for the bf16 epilogue
  int64_t scale_m0 = 0;
  int64_t comp_n0 = 0;  // comp holds columns from comp_n0 on (a task's own packed chunk, or all of them)
  float scale(int64_t m) const { return a_scale[m - scale_m0]; }
  const int32_t* compn(int64_t n) const { return comp + (n - comp_n0); }
};

void epilogue_scalar(const Epi& e, const int32_t* acc /*[rows][16]*/, int64_t m0, int64_t rows, int64_t n0) {
  const int32_t* comp = e.compn(n0);
  const int64_t ncols = std::min<int64_t>(kNB, e.N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const float as = e.scale(m);
    switch (e.odt) {
      case Dt::f32:
        epilogue_scalar_row(acc + r * kNB, comp, as, e.ws + n0, e.bias + n0,
                            static_cast<float*>(e.out) + m * e.N + n0, ncols);
        break;
      case Dt::bf16:
        epilogue_scalar_row(acc + r * kNB, comp, as, e.ws + n0, e.bias + n0,
                            static_cast<c10::BFloat16*>(e.out) + m * e.N + n0, ncols);
        break;
      default:
        epilogue_scalar_row(acc + r * kNB, comp, as, e.ws + n0, e.bias + n0,
                            static_cast<c10::Half*>(e.out) + m * e.N + n0, ncols);
        break;
    }
  }
}

// ----------------------------------------------------------------------------------------- packing

// pack.h's layout, column blocks in parallel; the AVX-512 transposes wherever the CPU has them (same bytes).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* dst) {
  const int64_t np = round_up(N, kNB), kp = round_up(K, 4);
  int32_t* flags = reinterpret_cast<int32_t*>(dst + np * kp) + np;
  std::memset(flags, 0, 64);
  const bool vec = current_isa() >= Isa::avx512;
  std::vector<char> has_min(np / kNB, 0);
  // >= 2 MiB of weight per task: a 1152x1152 weight (1.3 MB, ~0.5 ms on one core) packs without a parallel
  // region, which on a busy machine costs more than the packing (the region waits for a descheduled thread).
  const int64_t grain = std::max<int64_t>(1, (2 << 20) / std::max<int64_t>(16 * K, 1));
  int32_t* comp = flags - np;
  at::parallel_for(0, np / kNB, grain, [&](int64_t b0, int64_t b1) {
    int8_t* blocks = dst + b0 * kp * kNB;
    has_min[b0] = vec ? td_cpu::pack_blocks_avx512(w, N, K, blocks, comp + b0 * kNB, b0, b1)
                      : td_cpu::pack_blocks_scalar(w, N, K, blocks, comp + b0 * kNB, b0, b1);
  });
  for (char v : has_min) flags[0] |= v;
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
  const int es = td_cpu::dt_size(e.odt);
  for (int j = 0; j < nblk; ++j) {
    const int64_t n = n0 + j * kNB;
    if (n >= e.N) break;
    const __mmask16 mask = td_cpu::tail_mask16(e.N - n);
    for (int r = 0; r < rows; ++r)
      td_cpu::epilogue16(slot + (2 * r + j) * 16, e.compn(n), e.scale(m0 + r), e.ws + n, e.bias + n,
                         static_cast<char*>(e.out) + ((m0 + r) * e.N + n) * es, e.odt, mask);
  }
}

#define TD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))

// Full 8 x 32 tile to bf16 with vcvtne2ps2bf16 (round to nearest even, as store16): one 64-byte store per row.
TD_AVX512BF16 void epi_tile_bf16x32(const int32_t* slot, const Epi& e, int64_t m0, int64_t n0) {
  const int64_t rows = std::min<int64_t>(kMR512, e.M - m0);
  const __m512i c0 = _mm512_loadu_si512(e.compn(n0)), c1 = _mm512_loadu_si512(e.compn(n0 + 16));
  const __m512 w0 = _mm512_loadu_ps(e.ws + n0), w1 = _mm512_loadu_ps(e.ws + n0 + 16);
  const __m512 b0 = _mm512_loadu_ps(e.bias + n0), b1 = _mm512_loadu_ps(e.bias + n0 + 16);
  for (int r = 0; r < rows; ++r) {
    const __m512 as = _mm512_set1_ps(e.scale(m0 + r));
    const __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(slot + 2 * r * 16), c0)),
                                      _mm512_mul_ps(as, w0), b0);
    const __m512 v1 = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(slot + (2 * r + 1) * 16), c1)), _mm512_mul_ps(as, w1),
        b1);
    _mm512_storeu_si512(static_cast<c10::BFloat16*>(e.out) + (m0 + r) * e.N + n0,
                        reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)));
  }
}

// Rows [m0, m0+rows) (A block packed in ablk) against column blocks [b0, b1); wp points at block b0 (here and
// in block_avx2/block_scalar). For each 32-column B panel the
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
    const int8_t* bp = wp + (b - b0) * bstride;
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
    const bool fast_bf16 = e.has_bf16 && e.odt == Dt::bf16 && nblk == 2 && (b + 2) * kNB <= e.N;
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
    for (int64_t p = 0; p < rows; p += kMR2) tile_avx2(ablk + p * kq * 4, wp + (b - b0) * kq * 64, kq, e, m0 + p, b * kNB);
}

// ----------------------------------------------------------------------------------------- scalar

void block_scalar(const int8_t* ablk, int64_t rows, const int8_t* wp, int64_t kq, const Epi& e, int64_t m0,
                  int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* bp = wp + (b - b0) * kq * 64;
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

namespace td_int8 {
namespace {

// --------------------------------------------------------------------------------------- quantize

// Same fp32 operations as reference.quantize_per_token (absmax/127, 1/scale, round-half-even of x*inv), edge rows
// included (td_cpu::quant_scale), so the result is bit-identical (the AVX-512 row is quant_row_avx512).
template <typename T>
void quant_row_scalar(const T* x, int64_t K, int8_t* q, float* scale_out) {
  uint32_t amax = 0;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, td_cpu::abs_bits(static_cast<float>(x[k])));
  float scale, inv;
  if (!td_cpu::quant_scale(amax, &scale, &inv)) {
    std::fill(q, q + K, int8_t(0));
    *scale_out = scale;
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(static_cast<float>(x[k]) * inv);
    v = std::min(127.f, std::max(-127.f, v));
    q[k] = static_cast<int8_t>(v);
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
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i amax = _mm256_setzero_si256();  // |x| bits, unsigned max: NaN propagates (td_cpu::abs_bits)
  for (int64_t k = 0; k < K8; k += 8)
    amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(load8_avx2(x + k)), absmask));
  alignas(32) uint32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), amax);
  uint32_t am = 0;
  for (uint32_t v : t) am = std::max(am, v);
  for (int64_t k = K8; k < K; ++k) am = std::max(am, td_cpu::abs_bits(static_cast<float>(x[k])));
  float scale, inv;
  if (!td_cpu::quant_scale(am, &scale, &inv)) {
    std::fill(q, q + K, int8_t(0));
    *scale_out = scale;
    return;
  }
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
void quant_row(const T* x, int64_t K, int8_t* q, float* s, Isa isa) {
  if (isa >= Isa::avx512)
    td_cpu::quant_row_avx512(x, dt_of(c10::CppTypeToScalarType<T>::value), K, q, s);
  else if (isa == Isa::avx2)
    quant_row_avx2(x, K, q, s);
  else
    quant_row_scalar(x, K, q, s);
}

// Row r of x (fp32/bf16/fp16, row-major [M, K]) quantized.
void quant_row_dt(const void* x, Dt dt, int64_t K, int64_t r, int8_t* q, float* s, Isa isa) {
  switch (dt) {
    case Dt::f32: return quant_row(static_cast<const float*>(x) + r * K, K, q, s, isa);
    case Dt::bf16: return quant_row(static_cast<const c10::BFloat16*>(x) + r * K, K, q, s, isa);
    default: return quant_row(static_cast<const c10::Half*>(x) + r * K, K, q, s, isa);
  }
}

void quantize_rows(const void* x, Dt dt, int64_t M, int64_t K, int8_t* q, float* s, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quant_row_dt(x, dt, K, r, q + r * K, s + r, isa);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 2, "x must be 2-D [M, K]");
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32/bfloat16/float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  quantize_rows(x.data_ptr(), dt_of(x.scalar_type()), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), current_isa());
  return {q, s};
}

// ------------------------------------------------------------------------------------------- driver

// A operand of a GEMM: int8 [M, K] with its per-row scales, or float [M, K] quantized per token while it is
// packed (the fused path of w8a8_linear: no int8 copy of x in memory).
struct ASrc {
  const void* p;
  Dt dt;
  const float* scale;  // [M] for int8 A
};

// wp: the packed weight; or nullptr and w_plain: the int8 [N, K] weight, packed chunk by chunk inside the tasks
// into per-thread scratch (small M only, where each chunk serves few tasks: no N*K copy in fresh pages).
void gemm_packed_into(const ASrc& A, int64_t M, int64_t K, const int8_t* wp, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& bias, at::Tensor& out, Isa isa,
                      const int8_t* w_plain = nullptr) {
  const int64_t N = w_scale.size(0);
  const int64_t np = round_up(N, kNB), kp = round_up(K, 4), kq = kp / 4;
  if (M == 0 || N == 0) return;
  const int32_t* comp = wp != nullptr ? reinterpret_cast<const int32_t*>(wp + np * kp) : nullptr;
  if (isa == Isa::avx2 && comp != nullptr && comp[np] != 0) isa = Isa::ref;  // w holds -128: vpmaddubsw saturates

  // zero-padded fp32 copies of the per-column vectors so the tiles load 16 lanes without bounds checks
  std::vector<float> ws(np, 0.f), bs(np, 0.f);
  std::memcpy(ws.data(), w_scale.data_ptr<float>(), N * sizeof(float));
  if (bias.has_value()) {
    at::Tensor b = bias->to(at::kFloat).contiguous();
    std::memcpy(bs.data(), b.data_ptr<float>(), N * sizeof(float));
  }
  const Dt odt = dt_of(out.scalar_type());
  const int64_t threads = at::get_num_threads();

  if (isa == Isa::amx && wp == nullptr) {  // the AMX kernel reads packed B tiles: pack the whole weight
    at::Tensor packed = at::empty({packed_numel(N, K)}, out.options().dtype(at::kChar));
    pack_weight(w_plain, N, K, packed.data_ptr<int8_t>());
    return gemm_packed_into(A, M, K, packed.data_ptr<int8_t>(), w_scale, bias, out, isa);
  }
  if (isa == Isa::amx) {
    const td_cpu::amx::Gemm g{A.p, A.dt, A.scale, M, K, N, wp, ws.data(), bs.data(), out.data_ptr(), odt};
    td_cpu::amx::gemm(g, threads, [](int64_t n, auto&& body) { at::parallel_for(0, n, 1, body); });
    return;
  }
  if (A.dt != Dt::i8 && isa != Isa::avx512) {  // fused quantization exists for the avx512 and amx paths only
    at::Tensor q = at::empty({M, K}, out.options().dtype(at::kChar));
    at::Tensor s = at::empty({M}, out.options().dtype(at::kFloat));
    quantize_rows(A.p, A.dt, M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), isa);
    return gemm_packed_into(ASrc{q.data_ptr<int8_t>(), Dt::i8, s.data_ptr<float>()}, M, K, wp, w_scale, bias, out,
                            isa, w_plain);
  }

  std::vector<int32_t> zero_comp;
  if (isa != Isa::avx512 || wp == nullptr) zero_comp.assign(np, 0);
  Epi e{isa == Isa::avx512 && wp != nullptr ? comp : zero_comp.data(), A.scale, ws.data(), bs.data(), out.data_ptr(), M, N, odt};
  static const bool has_bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  e.has_bf16 = has_bf16;

  const int mr = isa == Isa::avx512 ? kMR512 : kMR2;
  const int64_t mblocks = (M + kMC - 1) / kMC;
  const int64_t nblocks = np / kNB;
  int64_t nchunks, chunk;  // small M splits N too, in even numbers of blocks (the 32-column panel)
  td_cpu::amx::plan_chunks(mblocks, nblocks, threads, &nchunks, &chunk);
  if (wp == nullptr) {  // packing in the tasks: chunks of <= 256 KiB of packed weight, which stay in L2 while used
    chunk = std::min(round_up(nblocks, 2), std::max<int64_t>(2, 262144 / std::max<int64_t>(kq * 64, 1) / 2 * 2));
    nchunks = (nblocks + chunk - 1) / chunk;
  }
  const int8_t* ap = static_cast<const int8_t*>(A.p);

  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> ablk(static_cast<size_t>(kMC * kp) + 64);
    std::vector<int8_t> qrows;          // fused path: 8 quantized rows, then transposed into the A panel
    std::vector<float> scales(kMC);     // fused path: this task's row scales
    std::vector<int8_t> wchunk;         // unpacked weight: this task's column blocks, packed
    std::vector<int32_t> wcomp;
    Epi et = e;
    int64_t packed_m = -1, packed_nc = -1;
    bool wchunk_has_min = false;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / nchunks, nc = t % nchunks;
      const int64_t m0 = mb * kMC, rows = std::min<int64_t>(kMC, M - m0);
      const int64_t rows_p = round_up(rows, mr);
      if (packed_m != m0) {
        if (A.dt != Dt::i8) {
          qrows.resize(kMR512 * K);
          for (int64_t p = 0; p < rows_p; p += kMR512) {
            const int64_t n = std::min<int64_t>(kMR512, rows - p);
            for (int64_t r = 0; r < n; ++r)
              quant_row_dt(A.p, A.dt, K, m0 + p + r, qrows.data() + r * K, &scales[p + r], isa);
            pack_a8_avx512(qrows.data(), n, K, 0, kMR512, ablk.data() + p * kp);
          }
          et.a_scale = scales.data();
          et.scale_m0 = m0;
        } else if (isa == Isa::avx512) {
          pack_a8_avx512(ap, M, K, m0, rows_p, ablk.data());
        } else {
          pack_a<kMR2>(ap, M, K, m0, rows_p, false, ablk.data());
        }
        packed_m = m0;
      }
      const int64_t b0 = nc * chunk, b1 = std::min(nblocks, b0 + chunk);
      const int8_t* wb0 = wp != nullptr ? wp + b0 * kq * 64 : nullptr;
      Isa tisa = isa;
      if (wp == nullptr) {
        wchunk.resize(chunk * kq * 64);
        wcomp.resize(chunk * kNB);
        if (packed_nc != nc) {
          const bool has_min = isa >= Isa::avx512
                                   ? td_cpu::pack_blocks_avx512(w_plain, N, K, wchunk.data(), wcomp.data(), b0, b1)
                                   : td_cpu::pack_blocks_scalar(w_plain, N, K, wchunk.data(), wcomp.data(), b0, b1);
          wchunk_has_min = has_min;
          packed_nc = nc;
        }
        if (isa == Isa::avx2 && wchunk_has_min) tisa = Isa::ref;
        wb0 = wchunk.data();
        if (isa == Isa::avx512) {
          et.comp = wcomp.data();
          et.comp_n0 = b0 * kNB;
        }
      }
      if (tisa == Isa::avx512)
        block_avx512(ablk.data(), rows_p, wb0, kq, et, m0, b0, b1);
      else if (tisa == Isa::avx2)
        block_avx2(ablk.data(), rows_p, wb0, kq, et, m0, b0, b1);
      else
        block_scalar(ablk.data(), rows_p, wb0, kq, et, m0, b0, b1);
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

void check_packed(const at::Tensor& w_packed, int64_t N, int64_t K) {
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 1 && w_packed.is_contiguous() &&
                  w_packed.numel() == packed_numel(N, K),
              "w_packed must be the 1-D int8 tensor from pack_int8_weight for N=", N, ", K=", K, " (",
              packed_numel(N, K), " bytes), got ", w_packed.numel(), " elements of ", w_packed.scalar_type());
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
  check_packed(w_packed, N, K);
  at::Tensor out = at::empty({a.size(0), N}, a.options().dtype(out_dtype));
  gemm_packed_into(ASrc{a.data_ptr<int8_t>(), Dt::i8, a_scale.data_ptr<float>()}, a.size(0), K,
                   w_packed.data_ptr<int8_t>(), w_scale, bias, out, current_isa());
  return out;
}

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_inputs(a, a_scale, w_scale, bias, out_dtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) == a.size(1) && w.size(0) == w_scale.size(0),
              "w must be int8 [N, K]");
  at::Tensor out = at::empty({a.size(0), w.size(0)}, a.options().dtype(out_dtype));
  const ASrc A{a.data_ptr<int8_t>(), Dt::i8, a_scale.data_ptr<float>()};
  const Isa isa = current_isa();
  const at::Tensor wc = w.contiguous();
  // Few row blocks: every column chunk serves <= 2 tasks, so each task packs its own chunk into scratch (no
  // N*K copy; at M=120, K=4096, N=10240 that copy cost as much as the GEMM). Many row blocks: pack once
  // (N*K byte moves against 2*M*N*K ops).
  if (isa != Isa::amx && a.size(0) <= 2 * kMC) {
    gemm_packed_into(A, a.size(0), a.size(1), nullptr, w_scale, bias, out, isa, wc.data_ptr<int8_t>());
  } else {
    at::Tensor wp = pack_int8_weight_cpu(wc);
    gemm_packed_into(A, a.size(0), a.size(1), wp.data_ptr<int8_t>(), w_scale, bias, out, isa);
  }
  return out;
}

// x [M, K] float (fp32/bf16/fp16) -> out [M, N] in x's dtype = int8_gemm_packed(quantize_per_token(x), ...),
// bit for bit, with the quantization fused into the A packing on the avx512 and amx paths.
at::Tensor w8a8_linear_cpu(const at::Tensor& x_, const at::Tensor& w_packed, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.dim() == 2, "x must be 2-D [M, K]");
  const at::Tensor x = x_.contiguous();
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "x must be float32/bfloat16/float16, got ",
              dt);
  TORCH_CHECK(x.size(1) <= 65536, "K must be <= 65536 (int32 accumulation), got ", x.size(1));
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.dim() == 1,
              "w_scale must be contiguous float32 [N]");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == w_scale.numel(), "bias must be [N]");
  const int64_t N = w_scale.size(0), K = x.size(1);
  check_packed(w_packed, N, K);
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  gemm_packed_into(ASrc{x.data_ptr(), dt_of(dt), nullptr}, x.size(0), K, w_packed.data_ptr<int8_t>(), w_scale, bias,
                   out, current_isa());
  return out;
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

// The same with vdpbf16ps (AVX512-BF16: 16 lanes x 2 bf16 products per instruction).
__attribute__((target("avx512f,avx512bf16"))) int64_t bf16_spin(int64_t iters) {
#define TD_DP(r) "vdpbf16ps %%zmm13, %%zmm12, %%zmm" #r "\n\t"
  __asm__ volatile(
      "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"
      "vpxord %%zmm13, %%zmm13, %%zmm13\n\t"
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

// 4 independent tdpbssd accumulators (tmm0-3) fed by 2 A and 2 B tiles that never leave the registers: the
// AMX int8 peak (16x16x64 multiply-adds per instruction). Tiles must be configured on the thread.
__attribute__((target("amx-tile,amx-int8"))) int64_t amx_spin(int64_t iters) {
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  return iters;
}

__attribute__((target("amx-tile,amx-bf16"))) int64_t amx_bf16_spin(int64_t iters) {
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  return iters;
}

// Register-only peak over at::get_num_threads() threads, in GOP/s (1 multiply-add = 2 ops): "amx" (tdpbssd),
// "avx512" (vpdpbusd), "amx_bf16" (tdpbf16ps), "avx512_bf16" (vdpbf16ps); the bf16 ones are what torch's bf16
// Linear runs on. An ISA the machine cannot run is an error with the reason.
double isa_peak_gops(const std::string& name, int64_t iters) {
  const bool bf16 = name == "amx_bf16" || name == "avx512_bf16";
  const Isa isa = name == "amx" || name == "amx_bf16" ? Isa::amx
                  : name == "avx512" || name == "avx512_bf16" ? Isa::avx512 : Isa::ref;
  TORCH_CHECK(isa != Isa::ref, "isa_peak_gops: isa must be amx, avx512, amx_bf16 or avx512_bf16, got '", name, "'");
  std::string why;
  TORCH_CHECK(td_cpu::isa_usable(isa, &why), "isa_peak_gops(", name, "): not on this machine: ", why);
  __builtin_cpu_init();
  const bool has_bf16 = isa == Isa::amx ? __builtin_cpu_supports("amx-bf16") : __builtin_cpu_supports("avx512bf16");
  TORCH_CHECK(!bf16 || has_bf16,
              "isa_peak_gops(", name, "): this CPU lacks ", isa == Isa::amx ? "AMX-BF16" : "AVX512-BF16");
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (isa == Isa::amx) {
        td_cpu::amx::configure();
        sink[i] = bf16 ? amx_bf16_spin(iters) : amx_spin(iters);
        td_cpu::amx::release();
      } else {
        sink[i] = bf16 ? bf16_spin(iters) : vnni_spin(iters);
      }
    }
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double ops_per_iter = isa == Isa::amx ? 4.0 * 16 * 16 * (bf16 ? 32 : 64) * 2 : 12.0 * (bf16 ? 32 : 64) * 2;
  return static_cast<double>(threads) * iters * ops_per_iter / s / 1e9;
}

std::string cpu_isa() { return td_cpu::isa_name(current_isa()); }

std::string cpu_isa_report() { return td_cpu::isa_report(); }

}  // namespace
}  // namespace td_int8

TORCH_LIBRARY_IMPL(tiled_diffusion_C, CPU, m) {
  m.impl("quantize_per_token", &td_int8::quantize_per_token_cpu);
  m.impl("pack_int8_weight", &td_int8::pack_int8_weight_cpu);
  m.impl("int8_gemm_packed", &td_int8::int8_gemm_packed_cpu);
  m.impl("int8_gemm", &td_int8::int8_gemm_cpu);
}

// CPU-only private ops, declared here (not in module.cpp) because only the CPU kernels have them.
TORCH_LIBRARY_FRAGMENT(tiled_diffusion_C, m) {
  m.def("w8a8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias) -> Tensor");
  m.impl("w8a8_linear", c10::DispatchKey::CPU, TORCH_FN(td_int8::w8a8_linear_cpu));
  m.def("cpu_isa() -> str", &td_int8::cpu_isa);
  m.def("cpu_isa_report() -> str", &td_int8::cpu_isa_report);
  m.def("isa_peak_gops(str isa, int iters) -> float", &td_int8::isa_peak_gops);
}
