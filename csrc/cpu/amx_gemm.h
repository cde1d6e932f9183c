// AMX int8 GEMM with per-token activation quantization fused into the A packing and the dequantize + bias +
// cast epilogue fused into the store. Torch-free: int8_gemm.cpp builds it with the real tile instructions,
// tests/backends/cpu/amx_emulation.cpp with TD_AMX_EMULATE=1 (see amx_tile.h).
//
// out[M, N] (fp32/bf16/fp16) = cast(float(Σ_k a[m,k]·w[n,k]) · a_scale[m] · w_scale[n] + bias[n]).
//
// B = the packed weight of pack_int8_weight, [Np/16][Kp/4][16][4] int8 (Np = N rounded up to 16, Kp = K rounded
// up to 4): block b, rows 16c..16c+15 of its [Kp/4][64 bytes] are exactly one AMX B tile (16 k4-groups x 16
// columns x 4 bytes, the "VNNI layout" TDPBSSD reads) for k chunk c, stride 64. The last chunk of a block has
// only Kp/4 - 16c rows; it is copied to a zero-padded 1 KiB tile so no load reads past the block.
// A = one task's rows, quantized (or copied, for int8 A) into a row-major buffer [rows16][lda] int8 with
// lda = K rounded up to 64, zero padded in k and in rows: tile (row tile t, chunk c) = buf + 16t·lda + 64c.
// TDPBSSD is signed x signed, so no compensation term (the VNNI path's comp) is needed.
//
// Blocking: tasks of kMC rows x a chunk of 16-column blocks, run in parallel (as the VNNI path). In a task,
// per 32-column pair and per K slice of kKC chunks, every 32-row pair accumulates 2 x 2 C tiles (tmm0-3) from
// A tiles tmm4-5 and B tiles tmm6-7; the B slice (2 x kKC KiB) stays in L1 across the row pairs, the A block
// (kMC x lda) in L2; C goes to a per-task int32 buffer between slices and through the epilogue at the end.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tile.h"
#include "avx512_common.h"

namespace td_cpu {
namespace amx {

#define TD_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni" TD_AMX_TARGET_EXTRA)))

constexpr int64_t kNB = 16;   // columns per packed block
constexpr int64_t kMC = 256;  // rows per task
constexpr int64_t kKC = 8;    // 64-byte k chunks per K slice (B slice of a 32-column pair: 16 KiB)

struct Gemm {
  const void* a;          // [M, K]: int8 (with a_scale) or fp32/bf16/fp16 (quantized per token while packed)
  Dt a_dt;
  const float* a_scale;   // [M], int8 A only
  int64_t M, K, N;
  const int8_t* wp;       // packed weight (see above)
  const float* ws;        // [Np] w_scale, zero padded
  const float* bias;      // [Np], zero padded (zeros without bias)
  void* out;              // [M, N]
  Dt out_dt;
};

struct Scratch {
  std::vector<int8_t> a;       // [kMC][lda]
  std::vector<float> scale;    // [kMC]: the task's per-row scales
  std::vector<int32_t> acc;    // [kMC/32][4][16][16]
  alignas(64) int8_t btail[2][1024];
  int64_t packed_m0 = -1;
};

// (number of N chunks, blocks per chunk) so that mblocks x nchunks tasks keep `threads` busy; chunks hold an
// even number of blocks (32-column pairs). Shared with the VNNI driver.
inline void plan_chunks(int64_t mblocks, int64_t nblocks, int64_t threads, int64_t* nchunks, int64_t* chunk) {
  int64_t n = 1;
  if (mblocks < 4 * threads) n = std::min<int64_t>((nblocks + 1) / 2, (4 * threads + mblocks - 1) / mblocks);
  n = std::max<int64_t>(n, 1);
  *chunk = std::max<int64_t>(2, round_up((nblocks + n - 1) / n, 2));
  *nchunks = (nblocks + *chunk - 1) / *chunk;
}

// Rows [m0, m0 + rows) of A into s.a (row-major, lda), quantized per token for float A; rows up to rows16 zero.
TD_AMX inline void pack_a(const Gemm& g, int64_t m0, int64_t rows, int64_t rows16, int64_t lda, Scratch& s) {
  const int es = dt_size(g.a_dt);
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* dst = s.a.data() + r * lda;
    const char* src = static_cast<const char*>(g.a) + (m0 + r) * g.K * es;
    if (g.a_dt == Dt::i8) {
      std::memcpy(dst, src, g.K);
      s.scale[r] = g.a_scale[m0 + r];
    } else {
      quant_row_avx512(src, g.a_dt, g.K, dst, &s.scale[r]);
    }
    std::memset(dst + g.K, 0, lda - g.K);
  }
  if (rows16 > rows) std::memset(s.a.data() + rows * lda, 0, (rows16 - rows) * lda);
}

TD_AMX inline void epilogue(const Gemm& g, const Scratch& s, int64_t m0, int64_t rows, int64_t t2, int64_t n0,
                            int nb) {
  alignas(64) static const int32_t kZero[16] = {};
  const int32_t* acc = s.acc.data() + t2 * 4 * 256;  // tiles: 0 = (rows 0-15, cols 0-15), 1 = (0-15, 16-31), 2, 3
  const char* out = static_cast<const char*>(g.out);
  const int es = dt_size(g.out_dt);
  for (int j = 0; j < nb; ++j) {
    const int64_t n = n0 + 16 * j;
    if (n >= g.N) break;
    const __mmask16 mask = tail_mask16(g.N - n);
    for (int64_t r = 32 * t2; r < std::min<int64_t>(rows, 32 * t2 + 32); ++r) {
      const int tile = (r - 32 * t2) / 16 * 2 + j;
      epilogue16(acc + tile * 256 + (r % 16) * 16, kZero, s.scale[r], g.ws + n, g.bias + n,
                 const_cast<char*>(out) + ((m0 + r) * g.N + n) * es, g.out_dt, mask);
    }
  }
}

// One task: rows [m0, m0 + min(kMC, M - m0)) against column blocks [b0, b1). Tiles must be configured
// (configure()) on the calling thread.
TD_AMX inline void task(const Gemm& g, int64_t m0, int64_t b0, int64_t b1, Scratch& s) {
  const int64_t rows = std::min<int64_t>(kMC, g.M - m0), rows16 = round_up(rows, 16);
  const int64_t lda = std::max<int64_t>(64, round_up(g.K, 64)), nk = round_up(g.K, 64) / 64;
  const int64_t kq = round_up(g.K, 4) / 4, bstride = kq * 64;
  const int64_t last_rows = kq - 16 * (nk - 1);  // B rows of the last chunk (1..16) when nk > 0
  if (s.a.size() < static_cast<size_t>(kMC * lda)) s.a.resize(kMC * lda);
  s.scale.resize(kMC);
  s.acc.resize(kMC / 32 * 4 * 256);
  if (s.packed_m0 != m0) {
    pack_a(g, m0, rows, rows16, lda, s);
    s.packed_m0 = m0;
  }
  const int64_t ntiles = rows16 / 16;
  for (int64_t b = b0; b < b1; b += 2) {
    const int nb = b + 1 < b1 ? 2 : 1;
    const int8_t* bp0 = g.wp + b * bstride;
    const int8_t* bp1 = bp0 + bstride;
    if (nk > 0 && last_rows < 16)
      for (int j = 0; j < nb; ++j) {
        std::memcpy(s.btail[j], (j ? bp1 : bp0) + (nk - 1) * 1024, last_rows * 64);
        std::memset(s.btail[j] + last_rows * 64, 0, (16 - last_rows) * 64);
      }
    for (int64_t c0 = 0; c0 < nk || c0 == 0; c0 += kKC) {
      const int64_t c1 = std::min(nk, c0 + kKC);
      for (int64_t t = 0; t < ntiles; t += 2) {
        const bool two = t + 1 < ntiles;
        int32_t* acc = s.acc.data() + (t / 2) * 4 * 256;
        if (c0 == 0) {
          TD_TILE_ZERO(0);
          TD_TILE_ZERO(1);
          TD_TILE_ZERO(2);
          TD_TILE_ZERO(3);
        } else {
          TD_TILE_LOAD(0, acc, 64);
          TD_TILE_LOAD(1, acc + 256, 64);
          TD_TILE_LOAD(2, acc + 512, 64);
          TD_TILE_LOAD(3, acc + 768, 64);
        }
        const int8_t* ap = s.a.data() + t * 16 * lda;
        for (int64_t c = c0; c < c1; ++c) {
          const bool tail = c == nk - 1 && last_rows < 16;
          TD_TILE_LOAD(6, tail ? s.btail[0] : bp0 + c * 1024, 64);
          TD_TILE_LOAD(4, ap + c * 64, lda);
          TD_TILE_DPBSSD(0, 4, 6);
          if (nb == 2) {
            TD_TILE_LOAD(7, tail ? s.btail[1] : bp1 + c * 1024, 64);
            TD_TILE_DPBSSD(1, 4, 7);
          }
          if (two) {
            TD_TILE_LOAD(5, ap + 16 * lda + c * 64, lda);
            TD_TILE_DPBSSD(2, 5, 6);
            if (nb == 2) TD_TILE_DPBSSD(3, 5, 7);
          }
        }
        TD_TILE_STORE(0, acc, 64);
        TD_TILE_STORE(1, acc + 256, 64);
        TD_TILE_STORE(2, acc + 512, 64);
        TD_TILE_STORE(3, acc + 768, 64);
      }
      if (nk == 0) break;
    }
    for (int64_t t2 = 0; t2 < (ntiles + 1) / 2; ++t2) epilogue(g, s, m0, rows, t2, b * kNB, nb);
  }
}

// Palette 1, all 8 tiles 16 rows x 64 bytes; once per thread before task() (LDTILECFG zeroes the tiles).
TD_AMX inline void configure() {
  td_amx::TileConfig cfg;
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 does not treat LDTILECFG's operand as a read of memory and drops the stores above as dead (the
  // tiles were then configured with 0 rows, and the first TILEZERO raised #UD: SIGILL on every AMX machine).
  // Passing the address to an empty asm with a memory clobber keeps them.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  TD_TILE_LOADCONFIG(&cfg);
}

TD_AMX inline void release() { TD_TILE_RELEASE(); }

// The whole GEMM: pfor(ntasks, body(t0, t1)) runs the tasks (at::parallel_for in the library, a loop in the
// emulation test); each body configures the tiles of its thread and releases them at the end.
template <typename ParallelFor>
void gemm(const Gemm& g, int64_t threads, ParallelFor&& pfor) {
  if (g.M == 0 || g.N == 0) return;
  const int64_t nblocks = round_up(g.N, kNB) / kNB, mblocks = (g.M + kMC - 1) / kMC;
  int64_t nchunks, chunk;
  plan_chunks(mblocks, nblocks, threads, &nchunks, &chunk);
  pfor(mblocks * nchunks, [&](int64_t t0, int64_t t1) {
    Scratch s;
    configure();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / nchunks, nc = t % nchunks;
      const int64_t b0 = nc * chunk, b1 = std::min(nblocks, b0 + chunk);
      task(g, mb * kMC, b0, b1, s);
    }
    release();
  });
}

}  // namespace amx
}  // namespace td_cpu
