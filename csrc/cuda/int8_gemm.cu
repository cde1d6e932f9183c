// Tensor-core int8 GEMM with fused dequantisation, and per-token int8 quantisation, for sm_80+.
// No torch headers here (each TU with them costs ~90 s to compile); int8_gemm_binding.cpp checks arguments,
// allocates, and calls the launchers below with raw pointers and the current stream.
//
// out[M, N] = (a[M, K] int8 @ w[N, K]ᵀ int8, exact int32) * a_scale[M] * w_scale[N] + bias[N]  -> fp32/bf16/fp16
//
// Index math (block/warp tiling, ldmatrix lane addresses, swizzle, fragment layouts) lives in mma_layout.h and
// is emulated on the CPU by tests/backends/cuda/int8_gemm_mma_emulation.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma_layout.h"
#include "td_cuda.h"

using namespace td_mma;

constexpr long long kMaxGridX = 2147483647LL;  // CUDA's grid.x limit (y and z: 65535)
constexpr int kQuantWarps = 8;                 // quantize: rows per 256-thread block, one warp per row

// The launch grids (declared in td_cuda.h), used by the launchers below and exported for tests/backends/triton/test_launch.py,
// which checks them on the CPU against CUDA's limits at the largest canvases the README promises.
extern "C" void td_int8_gemm_grid(long long M, long long N, long long grid[3]) {
  grid[0] = grid_blocks(M, N);
  grid[1] = grid[2] = 1;
}

extern "C" void td_quantize_per_token_grid(long long M, long long grid[3]) {
  grid[0] = (M + kQuantWarps - 1) / kQuantWarps;
  grid[1] = grid[2] = 1;
}

namespace {

// ------------------------------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination (out-of-range rows / K tail).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------ tile loads

// Copies rows [row0, row0 + 128) x K bytes [k0, k0 + 64) of src [rows, K] into one swizzled stage tile.
// kAligned: K % 16 == 0 and src 16-byte aligned, so every 16-byte chunk is either fully inside or fully
// outside the matrix and cp.async can be used. Otherwise bytes are loaded one by one through registers with
// zero fill (a correct, slower path for odd K that the PixArt shapes never take).
template <bool kAligned>
__device__ __forceinline__ void load_tile(uint8_t* tile, const int8_t* __restrict__ src, int rows, int K,
                                          int row0, int k0, int tid) {
#pragma unroll
  for (int i = 0; i < kLoadsPerThread; ++i) {
    const RC c = load_chunk(tid, i);
    const int grow = row0 + c.row;
    const int gk = k0 + c.col * kChunk;
    uint8_t* dst = tile + swizzle_offset(c.row, c.col);
    if constexpr (kAligned) {
      const bool in = grow < rows && gk < K;
      const int8_t* p = in ? src + (size_t)grow * K + gk : src;  // keep a valid address when zero-filling
      cp_async_16(smem_addr(dst), p, in ? 16 : 0);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (grow < rows) {
        const uint8_t* p = reinterpret_cast<const uint8_t*>(src) + (size_t)grow * K;
#pragma unroll
        for (int b = 0; b < kChunk; ++b)
          if (gk + b < K) w[b >> 2] |= (uint32_t)__ldg(p + gk + b) << (8 * (b & 3));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// ------------------------------------------------------------------------------------------ epilogue stores

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Two horizontally adjacent outputs (col, col + 1); one vector store when both are inside and aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* out, int N, int row, int col, float v0, float v1, bool vec_ok) {
  T* p = out + (size_t)row * N + col;
  if (vec_ok && col + 1 < N) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
      struct alignas(4) P2 { T x, y; };
      *reinterpret_cast<P2*>(p) = P2{from_float<T>(v0), from_float<T>(v1)};
    }
  } else {
    if (col < N) p[0] = from_float<T>(v0);
    if (col + 1 < N) p[1] = from_float<T>(v1);
  }
}

// ------------------------------------------------------------------------------------------ GEMM kernel

// grid: grid_blocks(M, N) on x (block_origin maps it to a tile); block: 256 threads; dynamic smem: kSmemBytes.
// __launch_bounds__(256, 2) caps registers at 128 so two CTAs fit per SM (64 accumulators + fragments).
template <bool kAligned, typename OutT>
__global__ void __launch_bounds__(kThreads, 2)
    int8_gemm_kernel(const int8_t* __restrict__ a, const float* __restrict__ a_scale, const int8_t* __restrict__ w,
                     const float* __restrict__ w_scale, const float* __restrict__ bias, OutT* __restrict__ out, int M,
                     int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const RC origin = block_origin(blockIdx.x, N);
  const int m0 = origin.row;
  const int n0 = origin.col;
  const int k_tiles = (K + kBK - 1) / kBK;

  auto stage_a = [&](int s) { return smem + s * kStageBytes; };
  auto stage_b = [&](int s) { return smem + s * kStageBytes + kStageBytesA; };

  int32_t acc[kTilesM][kTilesN][4];
#pragma unroll
  for (int i = 0; i < kTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Prologue: fill kStages - 1 stages. One commit per stage even when empty keeps wait_group counts uniform.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      load_tile<kAligned>(stage_a(s), a, M, K, m0, s * kBK, tid);
      load_tile<kAligned>(stage_b(s), w, N, K, n0, s * kBK, tid);
    }
    cp_async_commit();
  }

  const int wr0 = warp_row0(warp);
  const int wc0 = warp_col0(warp);

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed once at most kStages - 2 newer groups are pending; the barrier also guarantees every
    // warp finished reading stage (kt - 1) % kStages, which the load below overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      load_tile<kAligned>(stage_a(next % kStages), a, M, K, m0, next * kBK, tid);
      load_tile<kAligned>(stage_b(next % kStages), w, N, K, n0, next * kBK, tid);
    }
    cp_async_commit();

    const uint8_t* sa = stage_a(kt % kStages);
    const uint8_t* sb = stage_b(kt % kStages);
#pragma unroll
    for (int ks = 0; ks < kBK / kMmaK; ++ks) {
      uint32_t fa[kTilesM][4];
      uint32_t fb[kTilesN / 2][4];
#pragma unroll
      for (int i = 0; i < kTilesM; ++i) {
        const RC c = ldsm_a(lane, ks);
        ldmatrix_x4(fa[i], smem_addr(sa + swizzle_offset(wr0 + i * kMmaM + c.row, c.col)));
      }
#pragma unroll
      for (int j = 0; j < kTilesN / 2; ++j) {
        const RC c = ldsm_b(lane, ks);
        ldmatrix_x4(fb[j], smem_addr(sb + swizzle_offset(wc0 + j * 2 * kMmaN + c.row, c.col)));
      }
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) mma_s8(acc[i][j], fa[i], fb[j >> 1][(j & 1) * 2], fb[j >> 1][(j & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();  // drain (only empty groups can remain) before the block exits

  // Fused epilogue: int32 -> fp32, * a_scale[row] * w_scale[col] + bias[col], cast, masked store.
  const bool vec_ok = (N % 2) == 0;  // (row * N + col) even for even col, so pair stores are aligned
#pragma unroll
  for (int i = 0; i < kTilesM; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const RC rc = out_coord(warp, lane, i, 0, half * 2);
      const int row = m0 + rc.row;
      if (row >= M) continue;
      const float sa_row = a_scale[row];
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const int col = n0 + out_coord(warp, lane, i, j, half * 2).col;
        if (col >= N) continue;
        const bool has1 = col + 1 < N;
        const float ws0 = w_scale[col], ws1 = has1 ? w_scale[col + 1] : 0.f;
        const float b0 = bias ? bias[col] : 0.f, b1 = (bias && has1) ? bias[col + 1] : 0.f;
        const float v0 = __fmaf_rn((float)acc[i][j][half * 2] * sa_row, ws0, b0);
        const float v1 = __fmaf_rn((float)acc[i][j][half * 2 + 1] * sa_row, ws1, b1);
        store_pair<OutT>(out, N, row, col, v0, v1, vec_ok);
      }
    }
  }
}

template <bool kAligned, typename OutT>
cudaError_t launch_gemm(const int8_t* a, const float* a_scale, const int8_t* w, const float* w_scale,
                        const float* bias, void* out, int M, int N, int K, cudaStream_t stream) {
  auto kernel = int8_gemm_kernel<kAligned, OutT>;
  // Above 48 KiB, dynamic shared memory must be opted into per kernel (cheap; idempotent).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  long long grid[3];
  td_int8_gemm_grid(M, N, grid);
  if (grid[0] > kMaxGridX) return cudaErrorInvalidConfiguration;  // 2^31 output tiles: M beyond any canvas
  kernel<<<dim3(static_cast<unsigned>(grid[0])), kThreads, kSmemBytes, stream>>>(a, a_scale, w, w_scale, bias, static_cast<OutT*>(out), M, N, K);
  return cudaGetLastError();
}

template <bool kAligned>
cudaError_t dispatch_out(const int8_t* a, const float* a_scale, const int8_t* w, const float* w_scale,
                         const float* bias, void* out, int out_dtype, int M, int N, int K, cudaStream_t stream) {
  switch (out_dtype) {
    case TD_DTYPE_F32: return launch_gemm<kAligned, float>(a, a_scale, w, w_scale, bias, out, M, N, K, stream);
    case TD_DTYPE_BF16:
      return launch_gemm<kAligned, __nv_bfloat16>(a, a_scale, w, w_scale, bias, out, M, N, K, stream);
    case TD_DTYPE_F16: return launch_gemm<kAligned, __half>(a, a_scale, w, w_scale, bias, out, M, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------------------------------ quantize

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);  // exact, no cvt that could flush
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Semantics of reference.quantize_per_token, edge rows included, independent of --use_fast_math (which flushes
// subnormals to zero in every .f32 instruction nvcc emits and lets fmaxf drop NaN):
// - absmax is taken on the bit patterns |x| as unsigned ints: IEEE order for non-NaN values, and a NaN (bits
//   above inf's) wins, so a NaN row is seen; no float instruction touches a possibly subnormal value;
// - a row with absmax < kTinyBits (127 * 2^-126: scale would be subnormal and 1 / scale overflow) gets scale 0
//   and zeros, as an all-zero row; a row holding ±inf or NaN gets scale inf / NaN and zeros (its dequantized
//   product is NaN, not a silently finite number);
// - otherwise scale = absmax / 127 and inv = 1 / scale are normal floats, and q = rint(x * inv) uses a mul
//   without flush-to-zero (inline PTX), so a subnormal x rounds like the reference's.
constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kTinyBits = 0x03fe0000u;  // 127 * 2^-126 = 1.4928778e-36 (reference.TINY_ABSMAX)

__device__ __forceinline__ float mul_rn_noftz(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & kAbsMask; }

__device__ __forceinline__ int8_t quant1(float x, float inv) {
  float q = rintf(mul_rn_noftz(x, inv));  // |x * inv| <= 127 (+ rounding): finite, so fminf/fmaxf are exact
  q = fminf(fmaxf(q, -127.f), 127.f);
  return static_cast<int8_t>(static_cast<int>(q));
}

// x [M, K] (row stride K) -> q [M, K] int8, scale [M]. kVec: 16-byte loads (K * sizeof(T) % 16 == 0 and x
// aligned); the row is read twice (absmax, then quantise), the second pass mostly from L1/L2.
template <typename T, bool kVec>
__global__ void __launch_bounds__(32 * kQuantWarps)
    quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int M,
                              int K) {
  const int row = blockIdx.x * kQuantWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= M) return;
  const T* xr = x + (size_t)row * K;
  int8_t* qr = q + (size_t)row * K;
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  struct alignas(16) Vec { T v[V]; };
  struct alignas(V) QVec { int8_t v[V]; };

  uint32_t amax_bits = 0u;  // max of |x| as bit patterns (see kTinyBits above)
  if constexpr (kVec) {
    const Vec* xv = reinterpret_cast<const Vec*>(xr);
    for (int i = lane; i < K / V; i += 32) {
      const Vec v = xv[i];
#pragma unroll
      for (int e = 0; e < V; ++e) amax_bits = max(amax_bits, abs_bits(to_float(v.v[e])));
    }
  } else {
    for (int i = lane; i < K; i += 32) amax_bits = max(amax_bits, abs_bits(to_float(xr[i])));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax_bits = max(amax_bits, __shfl_xor_sync(0xffffffffu, amax_bits, off));

  // Integer comparisons only: a subnormal absmax must not be flushed before it is classified.
  const bool finite = amax_bits < kInfBits;
  const bool ok = finite && amax_bits >= kTinyBits;
  const float amax = __uint_as_float(amax_bits);
  const float s = ok ? __fdiv_rn(amax, 127.f) : (finite ? 0.f : amax);  // normal / 0 / inf or NaN
  const float inv = ok ? __frcp_rn(s) : 0.f;
  if (lane == 0) scale[row] = s;
  if (!ok) {  // zeros, and x * 0 would be NaN for inf / NaN elements
    for (int i = lane; i < K; i += 32) qr[i] = 0;
    return;
  }

  if constexpr (kVec) {
    const Vec* xv = reinterpret_cast<const Vec*>(xr);
    QVec* qv = reinterpret_cast<QVec*>(qr);
    for (int i = lane; i < K / V; i += 32) {
      const Vec v = xv[i];
      QVec o;
#pragma unroll
      for (int e = 0; e < V; ++e) o.v[e] = quant1(to_float(v.v[e]), inv);
      qv[i] = o;
    }
  } else {
    for (int i = lane; i < K; i += 32) qr[i] = quant1(to_float(xr[i]), inv);
  }
}

template <typename T>
cudaError_t launch_quant(const void* x, int8_t* q, float* scale, int M, int K, bool vec, cudaStream_t stream) {
  long long g[3];
  td_quantize_per_token_grid(M, g);
  const dim3 grid(static_cast<unsigned>(g[0]));  // M < 2^31 (checked by the binding): g[0] < 2^28
  if (vec)
    quantize_per_token_kernel<T, true><<<grid, 32 * kQuantWarps, 0, stream>>>(static_cast<const T*>(x), q, scale, M, K);
  else
    quantize_per_token_kernel<T, false><<<grid, 32 * kQuantWarps, 0, stream>>>(static_cast<const T*>(x), q, scale, M,
                                                                                K);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t td_int8_gemm_cuda(const int8_t* a, const float* a_scale, const int8_t* w,
                                         const float* w_scale, const float* bias, void* out, int out_dtype, int M,
                                         int N, int K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const bool aligned = K % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(w) % 16 == 0;
  return aligned ? dispatch_out<true>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K, stream)
                 : dispatch_out<false>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K, stream);
}

extern "C" cudaError_t td_quantize_per_token_cuda(const void* x, int x_dtype, int8_t* q, float* scale, int M, int K,
                                                  cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int elem = x_dtype == TD_DTYPE_F32 ? 4 : 2;
  // Vector path: every row starts 16-byte aligned in x, and V-byte aligned in q (q rows are K bytes apart).
  const bool vec = (size_t)K * elem % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(q) % 16 == 0;
  switch (x_dtype) {
    case TD_DTYPE_F32: return launch_quant<float>(x, q, scale, M, K, vec, stream);
    case TD_DTYPE_BF16: return launch_quant<__nv_bfloat16>(x, q, scale, M, K, vec, stream);
    case TD_DTYPE_F16: return launch_quant<__half>(x, q, scale, M, K, vec, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Dynamic shared memory per kernel, for tiled_diffusion/inspect.py (cuobjdump only sees static smem):
// "<substring of the kernel name>=<bytes>;..."
extern "C" const char* td_cuda_dynamic_smem_table() {
  static const char table[] = "int8_gemm_kernel=65536;";
  static_assert(kSmemBytes == 65536, "update td_cuda_dynamic_smem_table");
  return table;
}
