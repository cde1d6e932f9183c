// Host-side emulation of csrc/cuda/int8_gemm.cu's index math (built with g++ by tests/backends/cuda/test_int8_gemm_cuda.py).
//
// Uses the kernel's own csrc/cuda/mma_layout.h for everything the kernel computes (cp.async chunk assignment,
// smem swizzle, stage ring, ldmatrix lane addresses, warp tiling, epilogue output coordinates) and models the
// hardware (ldmatrix distribution, mma.m16n8k32 fragment ownership) from the PTX ISA tables, written here
// independently of the header. Runs every block of an M x N x K problem in kernel order, one warp's 32 lanes
// at a time, and compares the integer result with a plain GEMM.
//
// usage: emu M N K seed      prints "OK ..." and exits 0, or prints the first problems and exits 1.
//        emu grid M N        checks only the launch grid (grid_blocks / block_origin): every output tile is
//                            one block, once, for M up to the largest canvases (no GEMM is computed).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "mma_layout.h"

using namespace td_mma;

static int g_errors = 0;
#define EXPECT(cond, ...)                       \
  do {                                          \
    if (!(cond)) {                              \
      if (g_errors < 20) {                      \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);               \
        std::printf("\n");                      \
      }                                         \
      ++g_errors;                               \
    }                                           \
  } while (0)

// ---------------------------------------------------------------- hardware model (PTX ISA), not the header
// m16n8k32 .s8: groupID g = lane >> 2, threadID_in_group t = lane % 4, element index i = 4 * reg + byte.
static void spec_a(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
  *col = t * 4 + (i & 3) + (i >= 8 ? 16 : 0);
}
static void spec_b(int lane, int i, int* k, int* n) {
  const int g = lane >> 2, t = lane % 4;
  *k = t * 4 + (i & 3) + (i >= 4 ? 16 : 0);
  *n = g;
}
static void spec_c(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = i < 2 ? g : g + 8;
  *col = t * 2 + (i & 1);
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8j..8j+7 give the 8 row addresses (16 bytes each) of matrix j;
// lane l receives, in register j, the 32-bit word (l % 4) of row (l / 4) of matrix j.
static void ldmatrix_x4(const uint8_t* smem, const int addr[32], uint32_t out[32][4]) {
  // Bank conflicts: each matrix is one shared-memory phase; its 8 rows must use 8 distinct 16-byte bank groups.
  for (int j = 0; j < 4; ++j) {
    std::set<int> groups;
    for (int r = 0; r < 8; ++r) {
      EXPECT(addr[8 * j + r] % 16 == 0, "ldmatrix row address %d not 16-byte aligned", addr[8 * j + r]);
      groups.insert((addr[8 * j + r] % 128) / 16);
    }
    EXPECT(groups.size() == 8, "ldmatrix matrix %d: bank conflict (%zu distinct bank groups of 8)", j, groups.size());
  }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) std::memcpy(&out[l][j], smem + addr[8 * j + l / 4] + 4 * (l % 4), 4);
}

// One warp-wide mma.m16n8k32 s8 * s8 + s32: reassemble A, B from the lanes' registers, multiply, scatter D.
static void mma(const uint32_t a[32][4], const uint32_t b[32][2], int32_t c[32][4]) {
  int8_t A[16][32], B[32][8];
  std::set<int> seen_a, seen_b;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 16; ++i) {
      int r, k;
      spec_a(l, i, &r, &k);
      A[r][k] = (int8_t)((a[l][i / 4] >> (8 * (i % 4))) & 0xff);
      seen_a.insert(r * 32 + k);
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 8; ++i) {
      int k, n;
      spec_b(l, i, &k, &n);
      B[k][n] = (int8_t)((b[l][i / 4] >> (8 * (i % 4))) & 0xff);
      seen_b.insert(k * 8 + n);
    }
  EXPECT(seen_a.size() == 512 && seen_b.size() == 256, "PTX fragment tables do not cover A/B");
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      int r, n;
      spec_c(l, i, &r, &n);
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += (int32_t)A[r][k] * (int32_t)B[k][n];
      c[l][i] += s;
    }
}

// ---------------------------------------------------------------- header self-consistency with the PTX tables
static void check_fragment_functions() {
  for (int l = 0; l < 32; ++l) {
    for (int reg = 0; reg < 4; ++reg)
      for (int byte = 0; byte < 4; ++byte) {
        int r, k;
        spec_a(l, reg * 4 + byte, &r, &k);
        const RC h = a_elem(l, reg, byte);
        EXPECT(h.row == r && h.col == k, "a_elem(lane %d, reg %d, byte %d)", l, reg, byte);
      }
    for (int reg = 0; reg < 2; ++reg)
      for (int byte = 0; byte < 4; ++byte) {
        int k, n;
        spec_b(l, reg * 4 + byte, &k, &n);
        const RC h = b_elem(l, reg, byte);
        EXPECT(h.row == k && h.col == n, "b_elem(lane %d, reg %d, byte %d)", l, reg, byte);
      }
    for (int reg = 0; reg < 4; ++reg) {
      int r, c;
      spec_c(l, reg, &r, &c);
      const RC h = c_elem(l, reg);
      EXPECT(h.row == r && h.col == c, "c_elem(lane %d, reg %d)", l, reg);
    }
  }
}

// ---------------------------------------------------------------- the kernel, block by block
// Mirrors load_tile<kAligned>: cp.async of whole 16-byte chunks (K % 16 == 0) or byte-wise zero-filled loads.
static void load_tile(uint8_t* tile, const int8_t* src, int rows, int K, int row0, int k0, bool aligned,
                      std::vector<int>& write_count) {
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const RC c = load_chunk(tid, i);
      const int grow = row0 + c.row, gk = k0 + c.col * kChunk;
      const int off = swizzle_offset(c.row, c.col);
      EXPECT(off % 16 == 0 && off >= 0 && off + 16 <= kStageBytesA, "chunk offset %d out of the tile", off);
      ++write_count[off / 16];
      for (int b = 0; b < kChunk; ++b) {
        const bool in = aligned ? (grow < rows && gk < K) : (grow < rows && gk + b < K);
        tile[off + b] = in ? (uint8_t)src[(size_t)grow * K + gk + b] : 0;
      }
    }
}

// The kernel's block -> tile mapping: each kBM x kBN tile of an M x N output gets exactly one block index in
// [0, grid_blocks(M, N)), which must fit CUDA's grid.x (2^31 - 1).
static int check_grid(long long M, long long N) {
  const long long blocks = grid_blocks(M, N);
  const long long tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + kBN - 1) / kBN;
  EXPECT(blocks == tiles_m * tiles_n, "grid_blocks(%lld, %lld) = %lld, tiles %lld x %lld", M, N, blocks, tiles_m,
         tiles_n);
  EXPECT(blocks <= 2147483647LL, "grid.x = %lld exceeds CUDA's 2^31 - 1", blocks);
  std::vector<uint8_t> seen((size_t)(tiles_m * tiles_n), 0);
  for (long long b = 0; b < blocks && g_errors < 20; ++b) {
    const RC o = block_origin((int)b, (int)N);
    const bool inside = o.row >= 0 && o.row < M && o.col >= 0 && o.col < N && o.row % kBM == 0 && o.col % kBN == 0;
    EXPECT(inside, "block %lld -> origin (%d, %d) outside the %lld x %lld output", b, o.row, o.col, M, N);
    if (!inside) continue;
    uint8_t& s = seen[(size_t)(o.row / kBM) * tiles_n + o.col / kBN];
    EXPECT(s == 0, "tile (%d, %d) launched twice", o.row, o.col);
    s = 1;
    if (b + 1 < blocks) {  // adjacent blocks walk N first (A-tile reuse in L2)
      const RC next = block_origin((int)(b + 1), (int)N);
      EXPECT(next.row == o.row || next.col == 0, "block %lld: N-tiles of one M-tile are not adjacent", b);
    }
  }
  for (size_t i = 0; i < seen.size() && g_errors < 20; ++i) EXPECT(seen[i] == 1, "tile %zu never launched", i);
  if (g_errors) {
    std::printf("%d problems\n", g_errors);
    return 1;
  }
  std::printf("OK grid M=%lld N=%lld: %lld blocks on x\n", M, N, blocks);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "grid") == 0) return check_grid(std::atoll(argv[2]), std::atoll(argv[3]));
  if (argc != 5) {
    std::printf("usage: %s M N K seed\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[1]), N = std::atoi(argv[2]), K = std::atoi(argv[3]);
  std::mt19937 rng(std::atoi(argv[4]));
  std::uniform_int_distribution<int> dist(-128, 127);
  std::vector<int8_t> a((size_t)M * K), w((size_t)N * K);
  for (auto& v : a) v = (int8_t)dist(rng);
  for (auto& v : w) v = (int8_t)dist(rng);
  const bool aligned = K % 16 == 0;  // the launcher's choice (device pointers are 256-byte aligned)

  check_fragment_functions();

  std::vector<int64_t> out((size_t)M * N, INT64_MIN);  // poison: every element must be written exactly once
  std::vector<uint8_t> smem(kSmemBytes);
  const int k_tiles = (K + kBK - 1) / kBK;
  static int32_t acc[kThreads / 32][32][kTilesM][kTilesN][4];

  for (long long blk = 0; blk < grid_blocks(M, N); ++blk) {  // blockIdx.x, in launch order
      const RC origin = block_origin((int)blk, N);
      const int m0 = origin.row, n0 = origin.col;
      std::memset(smem.data(), 0xCD, smem.size());
      std::memset(acc, 0, sizeof(acc));
      auto load = [&](int kt) {
        const int s = kt % kStages;
        std::vector<int> cnt_a(kStageBytesA / 16), cnt_b(kStageBytesB / 16);
        load_tile(&smem[s * kStageBytes], a.data(), M, K, m0, kt * kBK, aligned, cnt_a);
        load_tile(&smem[s * kStageBytes + kStageBytesA], w.data(), N, K, n0, kt * kBK, aligned, cnt_b);
        for (int i = 0; i < (int)cnt_a.size(); ++i)
          EXPECT(cnt_a[i] == 1 && cnt_b[i] == 1, "stage chunk %d written %d/%d times", i, cnt_a[i], cnt_b[i]);
      };
      for (int s = 0; s < kStages - 1; ++s)
        if (s < k_tiles) load(s);
      for (int kt = 0; kt < k_tiles; ++kt) {
        if (kt + kStages - 1 < k_tiles) load(kt + kStages - 1);  // same order as the kernel: before the reads
        const uint8_t* sa = &smem[(kt % kStages) * kStageBytes];
        const int sb = (kt % kStages) * kStageBytes + kStageBytesA;
        for (int warp = 0; warp < kThreads / 32; ++warp) {
          const int wr0 = warp_row0(warp), wc0 = warp_col0(warp);
          for (int ks = 0; ks < kBK / kMmaK; ++ks) {
            uint32_t fa[kTilesM][32][4], fb[kTilesN / 2][32][4];
            for (int i = 0; i < kTilesM; ++i) {
              int addr[32];
              for (int l = 0; l < 32; ++l) {
                const RC c = ldsm_a(l, ks);
                addr[l] = swizzle_offset(wr0 + i * kMmaM + c.row, c.col);
              }
              ldmatrix_x4(sa, addr, fa[i]);
            }
            for (int j = 0; j < kTilesN / 2; ++j) {
              int addr[32];
              for (int l = 0; l < 32; ++l) {
                const RC c = ldsm_b(l, ks);
                addr[l] = swizzle_offset(wc0 + j * 2 * kMmaN + c.row, c.col);
              }
              ldmatrix_x4(&smem[sb], addr, fb[j]);
            }
            for (int i = 0; i < kTilesM; ++i)
              for (int j = 0; j < kTilesN; ++j) {
                uint32_t b[32][2];
                int32_t c[32][4];
                for (int l = 0; l < 32; ++l) {
                  b[l][0] = fb[j >> 1][l][(j & 1) * 2];
                  b[l][1] = fb[j >> 1][l][(j & 1) * 2 + 1];
                  for (int r = 0; r < 4; ++r) c[l][r] = acc[warp][l][i][j][r];
                }
                mma(fa[i], b, c);
                for (int l = 0; l < 32; ++l)
                  for (int r = 0; r < 4; ++r) acc[warp][l][i][j][r] = c[l][r];
              }
          }
        }
      }
      // Epilogue: output coordinates from the header, masked like the kernel.
      for (int warp = 0; warp < kThreads / 32; ++warp)
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < kTilesM; ++i)
            for (int j = 0; j < kTilesN; ++j)
              for (int r = 0; r < 4; ++r) {
                const RC o = out_coord(warp, l, i, j, r);
                EXPECT(o.row >= 0 && o.row < kBM && o.col >= 0 && o.col < kBN, "out_coord outside the block");
                const int row = m0 + o.row, col = n0 + o.col;
                if (row >= M || col >= N) continue;
                int64_t& dst = out[(size_t)row * N + col];
                EXPECT(dst == INT64_MIN, "output (%d, %d) written twice", row, col);
                dst = acc[warp][l][i][j][r];
              }
    }

  int64_t checked = 0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      int64_t ref = 0;
      for (int k = 0; k < K; ++k) ref += (int64_t)a[(size_t)m * K + k] * w[(size_t)n * K + k];
      const int64_t got = out[(size_t)m * N + n];
      EXPECT(got == ref, "out[%d, %d] = %lld, plain GEMM gives %lld%s", m, n, (long long)got, (long long)ref,
             got == INT64_MIN ? " (never written)" : "");
      ++checked;
    }
  if (g_errors) {
    std::printf("%d problems\n", g_errors);
    return 1;
  }
  std::printf("OK M=%d N=%d K=%d (%s path): %lld outputs match\n", M, N, K, aligned ? "cp.async" : "byte-wise",
              (long long)checked);
  return 0;
}
