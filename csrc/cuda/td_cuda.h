// Launchers of the CUDA kernels in csrc/cuda/*.cu, callable from torch-side C++ (int8_gemm_binding.cpp)
// without either side including the other's headers. Pointers are raw device pointers; every launcher
// enqueues on `stream` and returns the launch error (cudaSuccess when fine).
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

// Element types across the boundary (torch ScalarType is not visible to the .cu files).
#define TD_DTYPE_F32 0
#define TD_DTYPE_BF16 1
#define TD_DTYPE_F16 2

#ifdef __cplusplus
extern "C" {
#endif

// out [M, N] (out_dtype) = (a [M, K] @ w [N, K]ᵀ, int32) * a_scale [M] * w_scale [N] + bias [N] (bias may be null).
// All row-major contiguous; scales and bias fp32.
cudaError_t td_int8_gemm_cuda(const int8_t* a, const float* a_scale, const int8_t* w, const float* w_scale,
                              const float* bias, void* out, int out_dtype, int M, int N, int K, cudaStream_t stream);

// x [M, K] (x_dtype, contiguous) -> q [M, K] int8, scale [M] fp32 (symmetric absmax / 127, round-half-even).
cudaError_t td_quantize_per_token_cuda(const void* x, int x_dtype, int8_t* q, float* scale, int M, int K,
                                       cudaStream_t stream);

// Launch grids (x, y, z) of the two launchers above, for M rows (and N columns): what they launch.
void td_int8_gemm_grid(long long M, long long N, long long grid[3]);
void td_quantize_per_token_grid(long long M, long long grid[3]);

// "<kernel-name substring>=<dynamic shared memory bytes>;..." for tiled_diffusion/inspect.py.
const char* td_cuda_dynamic_smem_table(void);

#ifdef __cplusplus
}
#endif
