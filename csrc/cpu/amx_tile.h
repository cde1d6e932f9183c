// The AMX tile operations the int8 GEMM and the bf16 attention use, behind a thin layer of macros so that the same kernel source
// builds either with the real instructions or, with TD_AMX_EMULATE=1, with a scalar emulation of them
// (tests/backends/cpu/amx_emulation.cpp: proves the packing and index math on machines without AMX, the way
// tests/backends/cuda/int8_gemm_mma_emulation.cpp does for the CUDA MMA layout).
//
// Semantics emulated (Intel SDM, palette 1): 8 tiles tmm0..7 of `rows` x `colsb` bytes (<= 16 x 64), set by
// LDTILECFG, which also zeroes every tile; TILELOADD t, [base + r*stride] reads rows x colsb bytes, bytes
// past colsb and rows past `rows` read as 0; TDPBSSD c, a, b: for m < rows(a), n < colsb(c)/4:
// c.i32[m][n] += sum_{k < colsb(a)/4} sum_{i<4} a.s8[m][4k+i] * b.s8[k][4n+i], which requires rows(c) = rows(a),
// colsb(c) = colsb(b), rows(b) = colsb(a)/4 (else #UD: the emulation aborts); TILESTORED writes rows x colsb
// bytes. The emulation also aborts on a tile instruction before LDTILECFG (the hardware raises #UD).
// TDPBF16PS c, a, b (AMX-BF16, used by the neighbourhood attention kernel, amx_attention.h): for m < rows(a),
// n < colsb(c)/4: c.f32[m][n] += sum_{k < colsb(a)/4} (a.bf16[m][2k]*b.bf16[k][2n] + a.bf16[m][2k+1]*b.bf16[k][2n+1]),
// each pair summed in fp32 before the accumulate, same shape rules as TDPBSSD. The hardware also treats denormal
// inputs as zero and flushes denormal results; the emulation does not model that (the kernel runs with
// MXCSR.FTZ/DAZ, and its tests use normal inputs).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace td_amx {

// LDTILECFG's 64-byte operand.
struct alignas(64) TileConfig {
  uint8_t palette_id = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

}  // namespace td_amx

#if defined(TD_AMX_EMULATE) && TD_AMX_EMULATE

namespace td_amx::emu {

struct Tile {
  int rows = 0, colsb = 0;
  alignas(64) uint8_t b[16][64] = {};
};
inline thread_local Tile reg[8];
inline thread_local bool configured = false;
inline thread_local long long dp_count = 0;  // TDPBSSDs / TDPBF16PSs issued (the test checks the kernel issues what it should)

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "AMX emulation: #UD: %s\n", what);
  std::abort();
}

inline void loadconfig(const TileConfig* c) {
  if (c->palette_id != 1) fault("palette must be 1");
  for (int t = 0; t < 8; ++t) {
    if (c->rows[t] > 16 || c->colsb[t] > 64) fault("tile larger than 16 rows x 64 bytes");
    reg[t] = Tile{};
    reg[t].rows = c->rows[t];
    reg[t].colsb = c->colsb[t];
  }
  configured = true;
}

inline Tile& tile(int t) {
  if (!configured) fault("tile instruction before LDTILECFG");
  return reg[t];
}

inline void release() {
  for (Tile& t : reg) t = Tile{};
  configured = false;
}

inline void zero(int t) { std::memset(tile(t).b, 0, sizeof(Tile::b)); }

inline void load(int t, const void* base, long stride) {
  Tile& x = tile(t);
  std::memset(x.b, 0, sizeof(x.b));
  for (int r = 0; r < x.rows; ++r) std::memcpy(x.b[r], static_cast<const uint8_t*>(base) + r * stride, x.colsb);
}

inline void store(int t, void* base, long stride) {
  const Tile& x = tile(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, x.b[r], x.colsb);
}

inline void dpbssd(int ci, int ai, int bi) {
  Tile &c = tile(ci), &a = tile(ai), &b = tile(bi);
  if (c.rows != a.rows || c.colsb != b.colsb || b.rows * 4 != a.colsb || c.colsb % 4 || a.colsb % 4)
    fault("TDPBSSD tile shapes do not match");
  for (int m = 0; m < c.rows; ++m)
    for (int n = 0; n < c.colsb / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, &c.b[m][4 * n], 4);
      for (int k = 0; k < a.colsb / 4; ++k)
        for (int i = 0; i < 4; ++i)
          acc += static_cast<int32_t>(static_cast<int8_t>(a.b[m][4 * k + i])) *
                 static_cast<int32_t>(static_cast<int8_t>(b.b[k][4 * n + i]));
      std::memcpy(&c.b[m][4 * n], &acc, 4);
    }
  ++dp_count;
}

inline float bf16_bits_to_float(const uint8_t* p) {
  uint32_t u = static_cast<uint32_t>(p[0] | (p[1] << 8)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void dpbf16ps(int ci, int ai, int bi) {
  Tile &c = tile(ci), &a = tile(ai), &b = tile(bi);
  if (c.rows != a.rows || c.colsb != b.colsb || b.rows * 4 != a.colsb || c.colsb % 4 || a.colsb % 4)
    fault("TDPBF16PS tile shapes do not match");
  for (int m = 0; m < c.rows; ++m)
    for (int n = 0; n < c.colsb / 4; ++n) {
      float acc;
      std::memcpy(&acc, &c.b[m][4 * n], 4);
      for (int k = 0; k < a.colsb / 4; ++k) {
        const float pair = bf16_bits_to_float(&a.b[m][4 * k]) * bf16_bits_to_float(&b.b[k][4 * n]) +
                           bf16_bits_to_float(&a.b[m][4 * k + 2]) * bf16_bits_to_float(&b.b[k][4 * n + 2]);
        acc += pair;
      }
      std::memcpy(&c.b[m][4 * n], &acc, 4);
    }
  ++dp_count;
}

}  // namespace td_amx::emu

#define TD_AMX_TARGET_EXTRA ""
#define TD_AMX_BF16_TARGET_EXTRA ""
#define TD_TILE_DPBF16PS(c, a, b) ::td_amx::emu::dpbf16ps(c, a, b)
#define TD_TILE_LOADCONFIG(cfg) ::td_amx::emu::loadconfig(cfg)
#define TD_TILE_RELEASE() ::td_amx::emu::release()
#define TD_TILE_ZERO(t) ::td_amx::emu::zero(t)
#define TD_TILE_LOAD(t, base, stride) ::td_amx::emu::load(t, base, stride)
#define TD_TILE_STORE(t, base, stride) ::td_amx::emu::store(t, base, stride)
#define TD_TILE_DPBSSD(c, a, b) ::td_amx::emu::dpbssd(c, a, b)

#else

#include <immintrin.h>

// gcc 12's tile load/store intrinsics are asm statements without a memory operand: the barriers keep the
// compiler from moving the plain stores that fill a buffer past the tile load that reads it (and the reads
// of a stored tile before the store).
#define TD_AMX_TARGET_EXTRA ",amx-tile,amx-int8"
#define TD_AMX_BF16_TARGET_EXTRA ",amx-tile,amx-bf16"
#define TD_TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#define TD_TILE_LOADCONFIG(cfg) _tile_loadconfig(cfg)
#define TD_TILE_RELEASE() _tile_release()
#define TD_TILE_ZERO(t) _tile_zero(t)
#define TD_TILE_LOAD(t, base, stride)        \
  do {                                       \
    __asm__ volatile("" ::: "memory");       \
    _tile_loadd(t, base, stride);            \
  } while (0)
#define TD_TILE_STORE(t, base, stride)       \
  do {                                       \
    _tile_stored(t, base, stride);           \
    __asm__ volatile("" ::: "memory");       \
  } while (0)
#define TD_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)

#endif
