// The packed int8 weight shared by every CPU path (VNNI, AVX2, reference, and AMX, whose B tiles it is).
// Torch-free: tests/backends/cpu/amx_emulation.cpp includes it.
//
// w [N, K] int8 -> one int8 buffer (Np = N rounded up to 16, Kp = K rounded up to 4, kq = Kp/4):
//   bytes [0, Np*Kp)     blocks of 16 columns: block b = [kq][16 columns][4 k] int8 at b*kq*64, zero padded
//   int32 [Np] after it  comp[n] = 128 * sum_k w[n, k]   (the VNNI path's u8 x s8 correction)
//   int32 [16] after it  flags; flags[0] = 1 when w holds -128 (the avx2 path then goes to the reference)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx512_common.h"

namespace td_cpu {

inline int64_t packed_numel(int64_t n, int64_t k) { return round_up(n, 16) * round_up(k, 4) + 4 * round_up(n, 16) + 64; }

// Column blocks [b0, b1) of w: their weights to blocks[(b - b0) * kq * 64 ...] and their comp to
// comp[(b - b0) * 16 ...] (in the full layout: blocks = dst + b0*kq*64, comp = the comp array + 16*b0; the
// unpacked GEMM packs a chunk into a scratch buffer the same way). Returns whether they hold -128.
inline bool pack_blocks_scalar(const int8_t* w, int64_t N, int64_t K, int8_t* blocks, int32_t* comp, int64_t b0,
                               int64_t b1) {
  const int64_t kq = round_up(K, 4) / 4;
  bool has_min = false;
  for (int64_t b = b0; b < b1; ++b) {
    int8_t* blk = blocks + (b - b0) * kq * 64;
    std::memset(blk, 0, kq * 64);
    for (int64_t c = 0; c < 16; ++c) {
      const int64_t n = b * 16 + c;
      if (n >= N) {
        comp[n - 16 * b0] = 0;
        continue;
      }
      const int8_t* row = w + n * K;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        blk[(k >> 2) * 64 + c * 4 + (k & 3)] = row[k];
        sum += row[k];
        has_min |= row[k] == -128;
      }
      comp[n - 16 * b0] = 128 * sum;
    }
  }
  return has_min;
}

// The same with 16x16 dword transposes: 16 rows x 64 bytes in, 16 k4-rows x 64 bytes out, per step.
TD_AVX512 inline bool pack_blocks_avx512(const int8_t* w, int64_t N, int64_t K, int8_t* blocks, int32_t* comp,
                                         int64_t b0, int64_t b1) {
  const int64_t kq = round_up(K, 4) / 4;
  const __m512i ones = _mm512_set1_epi8(1), m128 = _mm512_set1_epi8(-128);
  __mmask64 has_min = 0;
  for (int64_t b = b0; b < b1; ++b) {
    int8_t* blk = blocks + (b - b0) * kq * 64;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const __mmask64 km = K - k0 >= 64 ? ~0ull : (1ull << (K - k0)) - 1ull;
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = b * 16 + i;
        r[i] = n < N ? _mm512_maskz_loadu_epi8(km, w + n * K + k0) : _mm512_setzero_si512();
        has_min |= _mm512_cmpeq_epi8_mask(r[i], m128);
      }
      // r[i] = row i's dwords j = 0..15 -> t[j] = dword j of rows 0..15
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      // r[4g + s] (g = row group of 4, s = dword slot within each 128-bit lane) holds, in 128-bit lane l,
      // rows 4g..4g+3 of dword 4l + s. Gather the four row groups of each (l, s).
      for (int s = 0; s < 4; ++s) {
        const __m512i a01lo = _mm512_shuffle_i32x4(r[s], r[4 + s], 0x44);    // lanes: g0 l0, g0 l1, g1 l0, g1 l1
        const __m512i a01hi = _mm512_shuffle_i32x4(r[s], r[4 + s], 0xee);    // g0 l2, g0 l3, g1 l2, g1 l3
        const __m512i a23lo = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0x44);
        const __m512i a23hi = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0xee);
        t[0 * 4 + s] = _mm512_shuffle_i32x4(a01lo, a23lo, 0x88);  // l0: g0 g1 g2 g3
        t[1 * 4 + s] = _mm512_shuffle_i32x4(a01lo, a23lo, 0xdd);  // l1
        t[2 * 4 + s] = _mm512_shuffle_i32x4(a01hi, a23hi, 0x88);  // l2
        t[3 * 4 + s] = _mm512_shuffle_i32x4(a01hi, a23hi, 0xdd);  // l3
      }
      // t[4l + s] = dword 4l + s (k4 group k0/4 + 4l + s) of all 16 rows
      const int64_t q0 = k0 / 4, qn = std::min<int64_t>(16, kq - q0);
      for (int j = 0; j < qn; ++j) {
        _mm512_storeu_si512(blk + (q0 + j) * 64, t[j]);
        sum = _mm512_dpbusd_epi32(sum, ones, t[j]);
      }
    }
    _mm512_storeu_si512(comp + (b - b0) * 16, _mm512_slli_epi32(sum, 7));
  }
  return has_min != 0;
}

}  // namespace td_cpu
