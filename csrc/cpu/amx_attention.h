// Neighbourhood attention on AMX-BF16 tiles (the CPU kernel of `neighborhood_attention` for bf16 inputs).
// Torch-free: neighborhood_attention.cpp builds it with the real tile instructions; a host test may build it with
// TD_AMX_EMULATE=1 (amx_tile.h) to check the index math without AMX.
//
// Semantics (the op's, generic by bounds): query (b, h, y, x) attends the keys of rows [ylo[y], yhi[y]) (indices
// into k's rows: the band form is free) and columns [xlo[x], xhi[x]); out = softmax(scale·q·kᵀ)·v in bf16, lse =
// natural log of the softmax denominator of the scaled logits (fp32). An empty window gives out 0, lse -inf.
//
// Work unit: a segment of 16 consecutive queries of one canvas row. Its 16 queries share their key rows exactly;
// their key columns are the union of their column ranges, [c0, c0 + Wk) with Wk rounded up to 16 (79 -> 80
// columns for 64-token windows), masked per query column. A task is (b, h, segment), walking the query rows
// top to bottom: consecutive rows share all but one key row, so each task packs its key strip (rows x Wk
// columns) once, lazily as the window slides down, and a window of it (64 rows x 80 keys x D 72 x 2 B x K and V
// = 1.5 MB) stays in L2 while the rows use it.
//
// Packed strip (per task, per key row r of the strip; D even):
//   K  [r][D/2][Wk][2]  the VNNI layout of QKᵀ's B operand: the 16-key tile at column j, d-pairs 16c..16c+15 is
//                       one AMX B tile at Kr + (16c·Wk + j)·2, row stride Wk·4 bytes.
//   V  [r][Wk/2][Dv][2] key pairs, PV's B operand, Dv = D rounded up to 16 (zero columns; see align64); rows
//                       follow each other, so the keys of the strip are ONE flat sequence (flat = r·Wk + col) and
//                       a 32-key PV chunk may straddle two rows: the 16-column tile j of chunk f is at
//                       V + f·Dv + 32j, row stride Dv·4 bytes.
// The tiles are all 16 rows x 64 bytes (one LDTILECFG per thread): for D = 72 the last d chunk of QKᵀ has 4 real
// pairs and the last PV column tile 8 real columns (and 8 zero ones). Q is zero padded to Dq = D rounded up to 32 in a small
// buffer, so the K tile's extra 12 pair rows, which read the next key row's pairs, multiply zeros (those rows
// must hold finite values: they are packed ahead, or zero rows past the strip's end).
//
// Per step of two query rows (32 queries; one row where rows do not pair, see task) and block of up to kTB key
// tiles (128 keys):
//   QKᵀ: 2 x 2 score tiles (tmm0-3: 2 rows x 2 key tiles), the rows' Q d-chunks in tmm4/5, K tiles in tmm6/7;
//        the scores go to L1 buffers S [16][128] fp32 per row.
//   softmax (AVX-512, per query): masked block max; the running max m is lazy: it moves (and O and l are
//        rescaled) only when the block max exceeds it by more than kLazy (log2 units), so p = 2^(s·c - m) <= 2^8
//        — exact in the end since out = O / l with both under the same m (FlashAttention-4's trick); p rounded to
//        bf16 into P [16][128] (as SDPA does), the sum l kept in fp32 (16 lanes per query).
//   PV:  O [16][Dp] fp32 per row (Dp = D rounded up to 16) lives in L1 between blocks; 2 x 2 O tiles at a time
//        (2 rows x 2 column tiles) in tmm0-3, the rows' P chunks in tmm4/5, V tiles in tmm6/7.
//   Every loaded tile feeds two TDPBF16PS and no tile register is reloaded within 4 of them (tiles are not
//   renamed). The one-row path (qk_block / pv_block) alternates K and V in two registers and is ~1.3x slower.
// Keys per query computed: the step's key rows x Wk (stride 1, 64-token windows: 65 x 80 = 5200; the window
// itself is 4096).
//
// exp2 (exp2_poly below): 2^x = 2^floor(x) · 2^f, f = x - floor(x) in [0, 1) from vreduceps, 2^f by a degree-3
// polynomial fitted for relative error (max 7.5e-5 = 2^-13.7 on [0, 1), below P's bf16 rounding of 2^-9),
// 2^floor(x) by vscalefps. The kernel runs with MXCSR FTZ/DAZ (restored afterwards): tiny p flush to 0.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "amx_tile.h"

namespace td_cpu {
namespace na {

#define TD_NA __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma" TD_AMX_BF16_TARGET_EXTRA)))

constexpr int kQ = 16;         // queries per segment (tile rows)
constexpr int kTB = 8;         // key tiles (16 keys) per softmax block: S 8 KiB + P 4 KiB per query row (L1)
constexpr int kMaxD = 256;     // largest head dim taken (O group loop and the Q buffer are sized by it)
constexpr float kLazy = 8.0f;  // the running max moves when a block's max exceeds it by more than this (log2)

struct Problem {
  const uint16_t* q;  // bf16 bits, [B, H, Hq, W, D] through strides (d stride 1)
  const uint16_t* k;  // [B, H, Hk, W, D]
  const uint16_t* v;
  int64_t B, H, Hq, Hk, W, D;
  int64_t qs[4], ks[4], vs[4];  // element strides of b, h, row, column
  const int32_t* ylo;  // [Hq] key rows, relative to k's rows
  const int32_t* yhi;
  const int32_t* xlo;  // [W]
  const int32_t* xhi;
  float scale;
  int64_t q_row0;  // the canvas row of q's first row (rows pair from even canvas rows)
  uint16_t* out;  // contiguous [B, H, Hq, W, D] bf16
  float* lse;     // contiguous [B, H, Hq, W]
};

// The state of one query row's 16 queries (a step runs one or two rows).
struct RowState {
  alignas(64) float s[kQ][kTB * 16];     // the block's scores
  alignas(64) uint16_t p[kQ][kTB * 16];  // its probabilities, bf16
  alignas(64) float o[kQ][kMaxD];        // O, fp32 (Dp columns used)
  alignas(64) uint16_t qb[kQ][kMaxD];    // Q, zero padded to Dq columns
  alignas(64) float l[kQ][16];           // the softmax sums, 16 lanes per query
  float m[kQ];                           // the running (lazy) max, log2 units
  __mmask16 bm[kTB][kQ];                 // the block's masks: [tile][query]
};

struct Scratch {
  std::vector<uint16_t> kp, vp;  // the task's strip (see above)
  RowState r[2];
  std::vector<__mmask16> colmask;  // [column block of the strip][query]: the keys each query may see
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tile rows that straddle two cache lines cost two line reads: the strips start on a 64-byte boundary and V's key
// pairs are padded to Dv = D rounded up to 16 columns (64 bytes per 16-column tile row; 11% more V for D = 72).
inline uint16_t* align64(uint16_t* p) {
  return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

// 2^x for x <= 2^7 or so (see the header comment): lanes outside `keep` are 0.
TD_NA inline __m512 exp2_poly(__m512 x, __mmask16 keep) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07802422f), f, _mm512_set1_ps(0.22606723f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958337f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999252f));
  return _mm512_maskz_scalef_ps(keep, p, x);  // p · 2^floor(x)
}

// bf16 bits -> float, 16 lanes (masked lanes 0).
TD_NA inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1u);
}

// Palette 1, all 8 tiles 16 rows x 64 bytes (LDTILECFG zeroes them). See amx_gemm.h's configure() for the asm.
TD_NA inline void configure() {
  td_amx::TileConfig cfg;
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  TD_TILE_LOADCONFIG(&cfg);
}

TD_NA inline void release() { TD_TILE_RELEASE(); }

// One key row of the strip: K [D/2][Wk][2] and V [Wk/2][D][2] from k/v row `src` (columns c0.., zero past W).
TD_NA inline void pack_row(const Problem& pr, const uint16_t* ksrc, const uint16_t* vsrc, int64_t c0, int64_t Wk,
                           int64_t Dv, uint16_t* kd, uint16_t* vd) {
  const int64_t D = pr.D, xk = pr.ks[3], xv = pr.vs[3];
  // K: for each d-pair, one 16-lane dword gather over 16 keys (columns past W read as 0), one aligned store
  // (Wk is a multiple of 16 and the strip 64-byte aligned): the transpose of [keys][D/2] dwords
  uint32_t* k32 = reinterpret_cast<uint32_t*>(kd);
  const __m512i kidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(xk / 2)));
  for (int64_t j = 0; j < Wk; j += 16) {
    const __mmask16 live = tail16(pr.W - (c0 + j));
    const uint32_t* src = reinterpret_cast<const uint32_t*>(ksrc + (c0 + j) * xk);
    for (int64_t p = 0; p < D / 2; ++p)
      _mm512_store_si512(k32 + p * Wk + j,
                         _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, kidx, src + p, 4));
  }
  // V pairs: out[2d] = key 2i, out[2d + 1] = key 2i + 1, 16 d at a time with one vpermt2w
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t i = 0; i < Wk / 2; ++i) {
    const int64_t ca = c0 + 2 * i, cb = ca + 1;
    uint16_t* dst = vd + i * 2 * Dv;
    for (int64_t d = 0; d < Dv; d += 16) {  // columns [D, Dv) are zeros
      const __mmask16 m = tail16(D - d);
      const __m256i a = ca < pr.W ? _mm256_maskz_loadu_epi16(m, vsrc + ca * xv + d) : _mm256_setzero_si256();
      const __m256i b = cb < pr.W ? _mm256_maskz_loadu_epi16(m, vsrc + cb * xv + d) : _mm256_setzero_si256();
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      const __m512i r = _mm512_permutexvar_epi16(idx, ab);
      _mm512_storeu_si512(dst + 2 * d, r);
    }
  }
}

// The scores of `nt` key tiles (global tiles g0.. of the row's flat sequence, nt even) against the 16 queries
// in s.qb: s.s[i][16t + lane]. kr0 = the strip row of the first key row, nb = Wk/16 tiles per row.
TD_NA inline void qk_block(RowState& s, const uint16_t* kp, int64_t kr0, int64_t g0, int nt, int64_t nb,
                           int64_t Wk, int64_t D, int nqd, int64_t qstride) {
  const int64_t krow = D * Wk;  // elements per packed K row
  for (int t0 = 0; t0 < nt; t0 += 4) {
    const int nc = std::min(4, nt - t0);
    const uint16_t* kt[4];
    for (int t = 0; t < nc; ++t) {
      const int64_t g = g0 + t0 + t;
      kt[t] = kp + (kr0 + g / nb) * krow + (g % nb) * 32;
    }
    TD_TILE_ZERO(0);
    TD_TILE_ZERO(1);
    TD_TILE_ZERO(2);
    TD_TILE_ZERO(3);
    for (int c = 0; c < nqd; ++c) {
      const int64_t koff = static_cast<int64_t>(c) * 16 * Wk * 2;
      // tile numbers must be immediates: unrolled by hand over the 4 accumulators and the alternating A/B
      if (c & 1) {
        TD_TILE_LOAD(5, s.qb[0] + 32 * c, qstride);
        TD_TILE_LOAD(6, kt[0] + koff, Wk * 4);
        TD_TILE_DPBF16PS(0, 5, 6);
        TD_TILE_LOAD(7, kt[1] + koff, Wk * 4);
        TD_TILE_DPBF16PS(1, 5, 7);
        if (nc > 2) {
          TD_TILE_LOAD(6, kt[2] + koff, Wk * 4);
          TD_TILE_DPBF16PS(2, 5, 6);
          if (nc > 3) {
            TD_TILE_LOAD(7, kt[3] + koff, Wk * 4);
            TD_TILE_DPBF16PS(3, 5, 7);
          }
        }
      } else {
        TD_TILE_LOAD(4, s.qb[0] + 32 * c, qstride);
        TD_TILE_LOAD(6, kt[0] + koff, Wk * 4);
        TD_TILE_DPBF16PS(0, 4, 6);
        TD_TILE_LOAD(7, kt[1] + koff, Wk * 4);
        TD_TILE_DPBF16PS(1, 4, 7);
        if (nc > 2) {
          TD_TILE_LOAD(6, kt[2] + koff, Wk * 4);
          TD_TILE_DPBF16PS(2, 4, 6);
          if (nc > 3) {
            TD_TILE_LOAD(7, kt[3] + koff, Wk * 4);
            TD_TILE_DPBF16PS(3, 4, 7);
          }
        }
      }
    }
    float* out = &s.s[0][0] + 16 * t0;
    constexpr int64_t ss = kTB * 16 * 4;
    TD_TILE_STORE(0, out, ss);
    TD_TILE_STORE(1, out + 16, ss);
    if (nc > 2) TD_TILE_STORE(2, out + 32, ss);
    if (nc > 3) TD_TILE_STORE(3, out + 48, ss);
  }
}

// O[:, 16·j0 ..] += P · V over `nch` 32-key chunks starting at flat key f0 (even), for O column tiles
// [j0, j0 + ng), ng <= 5.
template <int NG>
TD_NA inline void pv_group(RowState& s, const uint16_t* vp, int64_t f0, int nch, int64_t D, int j0) {
  constexpr int64_t os = kMaxD * 4, ps = kTB * 16 * 2;
  float* o = &s.o[0][16 * j0];
  TD_TILE_LOAD(0, o, os);
  if (NG > 1) TD_TILE_LOAD(1, o + 16, os);
  if (NG > 2) TD_TILE_LOAD(2, o + 32, os);
  if (NG > 3) TD_TILE_LOAD(3, o + 48, os);
  if (NG > 4) TD_TILE_LOAD(4, o + 64, os);
  for (int c = 0; c < nch; ++c) {
    const uint16_t* vt = vp + (f0 + 32 * c) * D + 32 * j0;
    TD_TILE_LOAD(5, &s.p[0][32 * c], ps);
    TD_TILE_LOAD(6, vt, D * 4);
    TD_TILE_DPBF16PS(0, 5, 6);
    if (NG > 1) {
      TD_TILE_LOAD(7, vt + 32, D * 4);
      TD_TILE_DPBF16PS(1, 5, 7);
    }
    if (NG > 2) {
      TD_TILE_LOAD(6, vt + 64, D * 4);
      TD_TILE_DPBF16PS(2, 5, 6);
    }
    if (NG > 3) {
      TD_TILE_LOAD(7, vt + 96, D * 4);
      TD_TILE_DPBF16PS(3, 5, 7);
    }
    if (NG > 4) {
      TD_TILE_LOAD(6, vt + 128, D * 4);
      TD_TILE_DPBF16PS(4, 5, 6);
    }
  }
  TD_TILE_STORE(0, o, os);
  if (NG > 1) TD_TILE_STORE(1, o + 16, os);
  if (NG > 2) TD_TILE_STORE(2, o + 32, os);
  if (NG > 3) TD_TILE_STORE(3, o + 48, os);
  if (NG > 4) TD_TILE_STORE(4, o + 64, os);
}

TD_NA inline void pv_block(RowState& s, const uint16_t* vp, int64_t f0, int nch, int64_t D) {
  const int nod = static_cast<int>((D + 15) / 16);
  for (int j0 = 0; j0 < nod; j0 += 5) {
    switch (std::min(5, nod - j0)) {
      case 1: pv_group<1>(s, vp, f0, nch, D, j0); break;
      case 2: pv_group<2>(s, vp, f0, nch, D, j0); break;
      case 3: pv_group<3>(s, vp, f0, nch, D, j0); break;
      case 4: pv_group<4>(s, vp, f0, nch, D, j0); break;
      default: pv_group<5>(s, vp, f0, nch, D, j0); break;
    }
  }
}

// Two query rows at once (rows a and b share the key tiles): 2 x 2 tiles per step, every loaded tile feeds two
// TDPBF16PS and no tile register is reloaded sooner than 4 instructions later (the tiles are not renamed: a
// load into a register still read by an earlier TDPBF16PS waits for it; with one query row the K and V tiles
// alternate in two registers and stall on that).
TD_NA inline void qk_block2(RowState& a, RowState& b, const uint16_t* kp, int64_t kr0, int64_t g0, int nt,
                            int64_t nb, int64_t Wk, int64_t D, int nqd) {
  const int64_t krow = D * Wk;
  constexpr int64_t qs = kMaxD * 2, ss = kTB * 16 * 4;
  for (int t0 = 0; t0 < nt; t0 += 2) {
    const int64_t ga = g0 + t0, gb = ga + 1;
    const uint16_t* ka = kp + (kr0 + ga / nb) * krow + (ga % nb) * 32;
    const uint16_t* kb = kp + (kr0 + gb / nb) * krow + (gb % nb) * 32;
    TD_TILE_ZERO(0);
    TD_TILE_ZERO(1);
    TD_TILE_ZERO(2);
    TD_TILE_ZERO(3);
    for (int c = 0; c < nqd; ++c) {
      const int64_t koff = static_cast<int64_t>(c) * 16 * Wk * 2;
      TD_TILE_LOAD(4, a.qb[0] + 32 * c, qs);
      TD_TILE_LOAD(6, ka + koff, Wk * 4);
      TD_TILE_DPBF16PS(0, 4, 6);
      TD_TILE_LOAD(7, kb + koff, Wk * 4);
      TD_TILE_DPBF16PS(1, 4, 7);
      TD_TILE_LOAD(5, b.qb[0] + 32 * c, qs);
      TD_TILE_DPBF16PS(2, 5, 6);
      TD_TILE_DPBF16PS(3, 5, 7);
    }
    TD_TILE_STORE(0, &a.s[0][16 * t0], ss);
    TD_TILE_STORE(1, &a.s[0][16 * t0 + 16], ss);
    TD_TILE_STORE(2, &b.s[0][16 * t0], ss);
    TD_TILE_STORE(3, &b.s[0][16 * t0 + 16], ss);
  }
}

template <bool TWO>  // O column tiles j and j + 1 (TWO) or j alone, of both rows
TD_NA inline void pv_cols2(RowState& a, RowState& b, const uint16_t* vp, int64_t f0, int nch, int64_t D, int j) {
  constexpr int64_t os = kMaxD * 4, ps = kTB * 16 * 2;
  TD_TILE_LOAD(0, &a.o[0][16 * j], os);
  TD_TILE_LOAD(2, &b.o[0][16 * j], os);
  if (TWO) {
    TD_TILE_LOAD(1, &a.o[0][16 * j + 16], os);
    TD_TILE_LOAD(3, &b.o[0][16 * j + 16], os);
  }
  for (int c = 0; c < nch; ++c) {
    const uint16_t* vt = vp + (f0 + 32 * c) * D + 32 * j;
    TD_TILE_LOAD(4, &a.p[0][32 * c], ps);
    TD_TILE_LOAD(6, vt, D * 4);
    TD_TILE_DPBF16PS(0, 4, 6);
    if (TWO) {
      TD_TILE_LOAD(7, vt + 32, D * 4);
      TD_TILE_DPBF16PS(1, 4, 7);
    }
    TD_TILE_LOAD(5, &b.p[0][32 * c], ps);
    TD_TILE_DPBF16PS(2, 5, 6);
    if (TWO) TD_TILE_DPBF16PS(3, 5, 7);
  }
  TD_TILE_STORE(0, &a.o[0][16 * j], os);
  TD_TILE_STORE(2, &b.o[0][16 * j], os);
  if (TWO) {
    TD_TILE_STORE(1, &a.o[0][16 * j + 16], os);
    TD_TILE_STORE(3, &b.o[0][16 * j + 16], os);
  }
}

TD_NA inline void pv_block2(RowState& a, RowState& b, const uint16_t* vp, int64_t f0, int nch, int64_t D) {
  const int nod = static_cast<int>((D + 15) / 16);
  for (int j = 0; j < nod; j += 2) {
    if (j + 1 < nod)
      pv_cols2<true>(a, b, vp, f0, nch, D, j);
    else
      pv_cols2<false>(a, b, vp, f0, nch, D, j);
  }
}

// Softmax of the block's scores for the 16 queries: updates m, l, rescales O rows when m moves, writes P.
// mask(t, i): the allowed keys of tile t for query i.
TD_NA inline void softmax_block(RowState& s, int nt, float c, int64_t Dp) {
  const auto& bm = s.bm;
  for (int i = 0; i < kQ; ++i) {
    const float* si = s.s[i];
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int t = 0; t < nt; ++t) vmax = _mm512_mask_max_ps(vmax, bm[t][i], vmax, _mm512_load_ps(si + 16 * t));
    const float bmax = _mm512_reduce_max_ps(vmax) * c;  // c > 0
    if (bmax > s.m[i] + kLazy) {  // false for a block with no allowed key (bmax = -inf)
      const float alpha = s.m[i] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(s.m[i] - bmax);
      const __m512 a = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < Dp; d += 16) _mm512_store_ps(s.o[i] + d, _mm512_mul_ps(a, _mm512_load_ps(s.o[i] + d)));
      _mm512_store_ps(s.l[i], _mm512_mul_ps(a, _mm512_load_ps(s.l[i])));
      s.m[i] = bmax;
    }
    uint16_t* pi = s.p[i];
    if (s.m[i] == -std::numeric_limits<float>::infinity()) {  // nothing allowed so far: p = 0
      std::memset(pi, 0, nt * 16 * 2);
      continue;
    }
    const __m512 vc = _mm512_set1_ps(c), nm = _mm512_set1_ps(-s.m[i]);
    __m512 l = _mm512_load_ps(s.l[i]);
    for (int t = 0; t < nt; t += 2) {
      const __m512 p0 = exp2_poly(_mm512_fmadd_ps(_mm512_load_ps(si + 16 * t), vc, nm), bm[t][i]);
      const __m512 p1 = exp2_poly(_mm512_fmadd_ps(_mm512_load_ps(si + 16 * t + 16), vc, nm), bm[t + 1][i]);
      l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
      _mm512_store_si512(pi + 16 * t, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    _mm512_store_ps(s.l[i], l);
  }
}

// One task: batch b, head h, query columns [x0, x0 + 16) ∩ [0, W), every query row.
TD_NA inline void task(const Problem& pr, int64_t b, int64_t h, int64_t x0, Scratch& s) {
  const int64_t D = pr.D, W = pr.W, Dq = round_up(D, 32), Dp = round_up(D, 16), Dv = Dp;
  const int nq = static_cast<int>(std::min<int64_t>(kQ, W - x0));
  const int nqd = static_cast<int>(Dq / 32);
  const float c = pr.scale * 1.4426950408889634f;  // scaled logits in log2 units
  const float ninf = -std::numeric_limits<float>::infinity();
  uint16_t* out0 = pr.out + ((b * pr.H + h) * pr.Hq * W) * D;
  float* lse0 = pr.lse + (b * pr.H + h) * pr.Hq * W;
  auto empty_row = [&](int64_t y) {
    std::memset(out0 + (y * W + x0) * D, 0, nq * D * 2);
    for (int i = 0; i < nq; ++i) lse0[y * W + x0 + i] = ninf;
  };
  // the strip's columns: the union of the segment's column ranges
  int64_t c0 = W, c1 = 0;
  for (int i = 0; i < nq; ++i)
    if (pr.xlo[x0 + i] < pr.xhi[x0 + i]) c0 = std::min<int64_t>(c0, pr.xlo[x0 + i]), c1 = std::max<int64_t>(c1, pr.xhi[x0 + i]);
  int64_t r0 = pr.Hk, r1 = 0;  // and its rows
  for (int64_t y = 0; y < pr.Hq; ++y)
    if (pr.ylo[y] < pr.yhi[y]) r0 = std::min<int64_t>(r0, pr.ylo[y]), r1 = std::max<int64_t>(r1, pr.yhi[y]);
  if (c0 >= c1 || r0 >= r1) {
    for (int64_t y = 0; y < pr.Hq; ++y) empty_row(y);
    return;
  }
  const int64_t Wk = round_up(c1 - c0, 16), nb = Wk / 16;
  s.colmask.resize(nb * kQ);
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int i = 0; i < kQ; ++i) {
      uint32_t m = 0;
      if (i < nq)
        for (int lane = 0; lane < 16; ++lane) {
          const int64_t col = c0 + 16 * jb + lane;
          m |= static_cast<uint32_t>(col >= pr.xlo[x0 + i] && col < pr.xhi[x0 + i]) << lane;
        }
      s.colmask[jb * kQ + i] = static_cast<__mmask16>(m);
    }
  // Rows past the last key row read by the K tiles' padded d-chunks (and the odd block's padding tile): packed
  // ahead while they are real rows, zero rows past the strip. (Dq - D)/2 spare pairs span `spill` rows.
  const int64_t spill = (Dq - D + D - 1) / D;  // ceil((Dq - D) / D), 0 when D is a multiple of 32
  const int64_t ahead = spill + 1, nrows = r1 - r0, row = D * Wk, vrow = Dv * Wk;
  const int64_t kneed = (nrows + ahead + 1) * row + 64, vneed = (nrows + ahead + 1) * vrow + 64;
  if (s.kp.size() < static_cast<size_t>(kneed + 32)) s.kp.resize(kneed + 32);
  if (s.vp.size() < static_cast<size_t>(vneed + 32)) s.vp.resize(vneed + 32);
  uint16_t* kp = align64(s.kp.data());
  uint16_t* vp = align64(s.vp.data());
  std::memset(kp + nrows * row, 0, (kneed - nrows * row) * 2);
  std::memset(vp + nrows * vrow, 0, (vneed - nrows * vrow) * 2);
  const uint16_t* kbase = pr.k + b * pr.ks[0] + h * pr.ks[1];
  const uint16_t* vbase = pr.v + b * pr.vs[0] + h * pr.vs[1];
  int64_t packed = 0;  // strip rows [0, packed) hold key rows [r0, r0 + packed)
  const uint16_t* qbase = pr.q + b * pr.qs[0] + h * pr.qs[1] + x0 * pr.qs[3];
  for (int64_t y = 0; y < pr.Hq;) {
    const int64_t lo0 = pr.ylo[y], hi0 = pr.yhi[y];
    if (lo0 >= hi0) {
      empty_row(y++);
      continue;
    }
    // Two rows per step when the next one starts a canvas row pair with this one (pairs start at even canvas
    // rows, so a band cut at even rows pairs its rows as the whole canvas does: bitwise the same results) and
    // their key rows nearly coincide (stride 1: one row more; GNA inside a group: the same rows).
    int nr = 1;
    int64_t u0 = lo0, u1 = hi0;
    if (y + 1 < pr.Hq && (pr.q_row0 + y) % 2 == 0 && pr.ylo[y + 1] < pr.yhi[y + 1]) {
      const int64_t v0 = std::min<int64_t>(lo0, pr.ylo[y + 1]), v1 = std::max<int64_t>(hi0, pr.yhi[y + 1]);
      const int64_t big = std::max<int64_t>(hi0 - lo0, pr.yhi[y + 1] - pr.ylo[y + 1]);
      if (v1 - v0 <= big + 1 + big / 8) nr = 2, u0 = v0, u1 = v1;
    }
    for (const int64_t want = std::min(nrows, u1 - r0 + ahead); packed < want; ++packed)
      pack_row(pr, kbase + (r0 + packed) * pr.ks[2], vbase + (r0 + packed) * pr.vs[2], c0, Wk,
               Dv, kp + packed * row, vp + packed * vrow);
    for (int r = 0; r < nr; ++r) {
      RowState& rs = s.r[r];
      // queries, zero padded to Dq columns and 16 rows
      for (int i = 0; i < kQ; ++i)
        for (int64_t d = 0; d < Dq; d += 32) {
          const __mmask32 m = i < nq ? (D - d >= 32 ? 0xffffffffu : (1u << (D - d)) - 1u) : 0u;
          _mm512_store_si512(rs.qb[i] + d,
                             _mm512_maskz_loadu_epi16(m, qbase + (y + r) * pr.qs[2] + i * pr.qs[3] + d));
        }
      for (int i = 0; i < kQ; ++i) {
        rs.m[i] = ninf;
        _mm512_store_ps(rs.l[i], _mm512_setzero_ps());
        for (int64_t d = 0; d < Dp; d += 16) _mm512_store_ps(rs.o[i] + d, _mm512_setzero_ps());
      }
    }
    const int64_t kr0 = u0 - r0, T = (u1 - u0) * nb, T2 = round_up(T, 2);
    for (int64_t g0 = 0; g0 < T2; g0 += kTB) {
      const int nt = static_cast<int>(std::min<int64_t>(kTB, T2 - g0));
      for (int r = 0; r < nr; ++r) {  // a tile is allowed for the row's queries if its key row is in their window
        const int64_t lo = pr.ylo[y + r], hi = pr.yhi[y + r];
        for (int t = 0; t < nt; ++t) {
          const int64_t g = g0 + t, krow_ = u0 + g / nb;
          const bool in = g < T && krow_ >= lo && krow_ < hi;
          for (int i = 0; i < kQ; ++i) s.r[r].bm[t][i] = in ? s.colmask[g % nb * kQ + i] : 0;
        }
      }
      if (nr == 2) {
        qk_block2(s.r[0], s.r[1], kp, kr0, g0, nt, nb, Wk, D, nqd);
        softmax_block(s.r[0], nt, c, Dp);
        softmax_block(s.r[1], nt, c, Dp);
        pv_block2(s.r[0], s.r[1], vp, kr0 * Wk + 16 * g0, nt / 2, Dv);
      } else {
        qk_block(s.r[0], kp, kr0, g0, nt, nb, Wk, D, nqd, kMaxD * 2);
        softmax_block(s.r[0], nt, c, Dp);
        pv_block(s.r[0], vp, kr0 * Wk + 16 * g0, nt / 2, Dv);
      }
    }
    // out = O / l, lse = (m + log2 l)·ln 2
    for (int r = 0; r < nr; ++r) {
      const RowState& rs = s.r[r];
      const int64_t yy = y + r;
      uint16_t* orow = out0 + (yy * W + x0) * D;
      for (int i = 0; i < nq; ++i) {
        const float l = _mm512_reduce_add_ps(_mm512_load_ps(rs.l[i]));
        if (!(l > 0.f)) {
          std::memset(orow + i * D, 0, D * 2);
          lse0[yy * W + x0 + i] = ninf;
          continue;
        }
        const __m512 inv = _mm512_set1_ps(1.f / l);
        for (int64_t d = 0; d < D; d += 16) {
          const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(rs.o[i] + d), inv));
          _mm256_mask_storeu_epi16(orow + i * D + d, tail16(D - d), (__m256i)o);
        }
        lse0[yy * W + x0 + i] = (rs.m[i] + std::log2(l)) * 0.6931471805599453f;
      }
    }
    y += nr;
  }
}

// The whole op: pfor(n, body(t0, t1)) runs n = threads bodies; tasks are dealt dynamically (an atomic counter)
// so a thread that the shared machine deschedules does not hold back a static share.
template <typename ParallelFor>
void run(const Problem& pr, int64_t threads, ParallelFor&& pfor) {
  const int64_t nseg = (pr.W + kQ - 1) / kQ, ntasks = pr.B * pr.H * nseg;
  if (ntasks == 0 || pr.Hq == 0) return;
  std::atomic<int64_t> next{0};
  pfor(std::min(threads, ntasks), [&](int64_t, int64_t) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
    auto s = std::make_unique<Scratch>();
    configure();
    for (int64_t t; (t = next.fetch_add(1)) < ntasks;) {
      const int64_t seg = t % nseg, bh = t / nseg;
      task(pr, bh / pr.H, bh % pr.H, seg * kQ, *s);
    }
    release();
    _mm_setcsr(csr);
  });
}

}  // namespace na
}  // namespace td_cpu
