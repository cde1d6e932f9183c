// Index math of the int8 tensor-core GEMM (csrc/cuda/int8_gemm.cu), as __host__ __device__ functions so that
// tests/backends/cuda/int8_gemm_mma_emulation.cpp can compile the very same functions with g++ and emulate one thread block
// on the CPU (the kernel cannot run on machines without a GPU; a wrong lane mapping must still fail a test).
//
// No CUDA or torch headers here: plain C++ that both nvcc and g++ accept.
//
// Block tile: kBM x kBN output, kBK bytes of K per pipeline stage. 8 warps as 2 (M) x 4 (N), warp tile 64 x 32
// = 4 x 4 mma tiles of m16n8k32: per k32 step a warp issues 4 ldmatrix.x4 for A, 2 for B and 16 mma
// (16 mma per 6 ldmatrix; 64 int32 accumulators per thread). Shared memory per stage: A [128][64] + B [128][64]
// int8 = 16 KiB; 4 stages = 64 KiB -> 2 CTAs per SM on A100 (164 KiB) and H100 (227 KiB, register-bound at 2).
#pragma once

#if defined(__CUDACC__)
#define TD_HD __host__ __device__ __forceinline__
#else
#define TD_HD inline
#endif

namespace td_mma {

constexpr int kBM = 128;                    // block rows (M)
constexpr int kBN = 128;                    // block cols (N)
constexpr int kBK = 64;                     // K bytes per stage (= 2 mma k-steps of 32)
constexpr int kStages = 4;                  // cp.async pipeline depth
constexpr int kWarpsM = 2, kWarpsN = 4;     // warp grid inside the block
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpM = kBM / kWarpsM;       // 64 rows per warp
constexpr int kWarpN = kBN / kWarpsN;       // 32 cols per warp
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;
constexpr int kTilesM = kWarpM / kMmaM;     // 4 mma tiles along M per warp
constexpr int kTilesN = kWarpN / kMmaN;     // 4 mma tiles along N per warp
constexpr int kChunk = 16;                  // bytes per cp.async / per ldmatrix row
constexpr int kChunksPerRow = kBK / kChunk; // 4
constexpr int kStageBytesA = kBM * kBK;
constexpr int kStageBytesB = kBN * kBK;
constexpr int kStageBytes = kStageBytesA + kStageBytesB;
constexpr int kSmemBytes = kStages * kStageBytes;  // 64 KiB dynamic shared memory
constexpr int kLoadsPerThread = kBM * kChunksPerRow / kThreads;  // 16-byte chunks per operand per thread (2)

static_assert(kBM == kBN, "load_chunk assumes A and B tiles have the same number of rows");
static_assert(kChunksPerRow == 4, "swizzle_offset is written for 64-byte rows");

struct RC {
  int row, col;
};

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` inside one [rows][64 B] operand tile.
// Rows are 64 B, so rows r and r+2 start in the same bank group: the 8 row addresses of one ldmatrix phase
// (8 consecutive rows, same logical chunk) would hit 4-way bank conflicts. XOR-ing the chunk with bits 1..2
// of the row spreads those 8 rows over all 8 distinct 16-byte bank groups of a 128-byte line.
TD_HD int swizzle_offset(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) * kChunk); }

// cp.async assignment: load `i` (0..kLoadsPerThread-1) of thread `tid` copies this (row, chunk) of a tile.
// Consecutive threads take consecutive chunks of a row, so a warp copies 512 contiguous global bytes.
TD_HD RC load_chunk(int tid, int i) {
  const int idx = tid + i * kThreads;
  return {idx / kChunksPerRow, idx % kChunksPerRow};
}

// First row/col of warp `warp`'s 64 x 32 sub-tile inside the block tile.
TD_HD int warp_row0(int warp) { return (warp / kWarpsN) * kWarpM; }
TD_HD int warp_col0(int warp) { return (warp % kWarpsN) * kWarpN; }

// ldmatrix.x4 source row for A (one 16 x 32 mma tile, k-step `ks` of the stage): lanes 0-7 address matrix 0
// (rows 0-7, k bytes 0-15), lanes 8-15 matrix 1 (rows 8-15, k 0-15), 16-23 matrix 2 (rows 0-7, k 16-31),
// 24-31 matrix 3 (rows 8-15, k 16-31): registers 0..3 then equal the mma A fragment a0..a3.
// Returns (row within the 16-row tile, chunk within the stage row).
TD_HD RC ldsm_a(int lane, int ks) { return {lane & 15, ks * 2 + (lane >> 4)}; }

// ldmatrix.x4 source row for B = two n8 tiles (16 rows of w [N][K]): matrix 0 = n 0-7 k 0-15 (b0 of tile 0),
// matrix 1 = n 0-7 k 16-31 (b1 of tile 0), matrix 2 = n 8-15 k 0-15 (b0 of tile 1), matrix 3 = n 8-15 k 16-31.
// Returns (row within the 16-row pair, chunk within the stage row).
TD_HD RC ldsm_b(int lane, int ks) { return {(lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)}; }

// mma.m16n8k32 .s8 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32"); groupID = lane / 4,
// threadID_in_group = lane % 4. Element `byte` (0..3) of 32-bit register `reg`:
// A (row-major 16 x 32): a0 (row g, k 4t..4t+3), a1 (row g+8), a2 (row g, k 16+4t..), a3 (row g+8, k 16+4t..).
TD_HD RC a_elem(int lane, int reg, int byte) {
  return {(lane >> 2) + (reg & 1) * 8, (lane & 3) * 4 + byte + (reg >> 1) * 16};
}
// B (32 x 8, "col" = stored n-major like w [N][K]): b0 (k 4t..4t+3, n g), b1 (k 16+4t.., n g). Returns (k, n).
TD_HD RC b_elem(int lane, int reg, int byte) { return {(lane & 3) * 4 + byte + reg * 16, lane >> 2}; }
// C/D (16 x 8 int32): c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, cols 2t, 2t+1).
TD_HD RC c_elem(int lane, int reg) { return {(lane >> 2) + (reg >> 1) * 8, (lane & 3) * 2 + (reg & 1)}; }

// Launch grid: every kBM x kBN output tile is one block on grid.x alone (CUDA caps grid.y at 65535, which
// ceil(M / 128) passes at 8.4 M rows: a 16384² canvas, 4 images, CFG). The N-tiles of one M-tile are adjacent
// block indices, so they run together and read their A rows from L2 (w is small and stays L2-resident).
// grid_blocks is the launch size (int64: the launcher refuses more than 2^31 - 1); block_origin maps blockIdx.x
// to the tile's first (row, col).
TD_HD long long grid_blocks(long long M, long long N) { return ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN); }
TD_HD RC block_origin(int block, int N) {
  const int n_tiles = (N + kBN - 1) / kBN;
  return {(block / n_tiles) * kBM, (block % n_tiles) * kBN};
}

// Output coordinate (within the block tile) of accumulator register `reg` of mma tile (mi, ni) of lane `lane`
// in warp `warp`: what the epilogue writes.
TD_HD RC out_coord(int warp, int lane, int mi, int ni, int reg) {
  const RC c = c_elem(lane, reg);
  return {warp_row0(warp) + mi * kMmaM + c.row, warp_col0(warp) + ni * kMmaN + c.col};
}

}  // namespace td_mma
