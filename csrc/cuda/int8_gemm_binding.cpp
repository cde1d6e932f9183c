// CUDA implementations of tiled_diffusion_C::int8_gemm and ::quantize_per_token: argument checks, output
// allocation and the launch on the current stream. The kernels are in int8_gemm.cu (no torch headers there).
// tiled_diffusion/ops.py has already checked shapes/dtypes for users; these checks guard direct calls.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "td_cuda.h"

namespace {

int td_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return TD_DTYPE_F32;
    case at::kBFloat16: return TD_DTYPE_BF16;
    case at::kHalf: return TD_DTYPE_F16;
    default: TORCH_CHECK(false, what, " must be float32/bfloat16/float16, got ", t);
  }
  return -1;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "quantize_per_token: x must be a 2-D CUDA tensor [M, K], got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int>::max() && x.size(1) <= std::numeric_limits<int>::max(),
              "quantize_per_token: x has too many rows or columns for int32 indexing");
  const int dt = td_dtype(x.scalar_type(), "quantize_per_token: x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({xc.size(0)}, xc.options().dtype(at::kFloat));
  const int M = static_cast<int>(xc.size(0)), K = static_cast<int>(xc.size(1));
  if (M > 0 && K == 0) scale.zero_();  // an empty row has absmax 0 (kernel loops do not run for K == 0 anyway)
  check_launch(td_quantize_per_token_cuda(xc.data_ptr(), dt, q.data_ptr<int8_t>(), scale.data_ptr<float>(), M, K,
                                          at::cuda::getCurrentCUDAStream()),
               "quantize_per_token");
  return {q, scale};
}

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                          const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && a.scalar_type() == at::kChar,
              "int8_gemm: a must be an int8 CUDA tensor [M, K], got ", a.scalar_type(), " ", a.sizes());
  TORCH_CHECK(w.device() == a.device() && w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) == a.size(1),
              "int8_gemm: w must be int8 [N, K=", a.size(1), "] on ", a.device(), ", got ", w.scalar_type(), " ",
              w.sizes(), " on ", w.device());
  const int64_t M = a.size(0), N = w.size(0), K = a.size(1);
  TORCH_CHECK(M <= std::numeric_limits<int>::max() && N <= std::numeric_limits<int>::max() &&
                  K <= std::numeric_limits<int>::max(),
              "int8_gemm: dimensions must fit int32");
  TORCH_CHECK(a_scale.device() == a.device() && a_scale.scalar_type() == at::kFloat && a_scale.numel() == M,
              "int8_gemm: a_scale must be float32 [M=", M, "] on ", a.device());
  TORCH_CHECK(w_scale.device() == a.device() && w_scale.scalar_type() == at::kFloat && w_scale.numel() == N,
              "int8_gemm: w_scale must be float32 [N=", N, "] on ", a.device());
  const int odt = td_dtype(out_dtype, "int8_gemm: out_dtype");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), wc = w.contiguous();
  const at::Tensor asc = a_scale.contiguous(), wsc = w_scale.contiguous();
  at::Tensor bf;  // the kernel reads fp32 bias; converting [N] values costs nothing next to the GEMM
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == a.device() && bias->numel() == N, "int8_gemm: bias must be [N=", N, "] on ",
                a.device(), ", got ", bias->sizes(), " on ", bias->device());
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({M, N}, ac.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // empty reduction: out = bias (or 0)
    return bias.has_value() ? bf.to(out_dtype).unsqueeze(0).expand({M, N}).contiguous() : out.zero_();
  }
  check_launch(td_int8_gemm_cuda(ac.data_ptr<int8_t>(), asc.data_ptr<float>(), wc.data_ptr<int8_t>(),
                                 wsc.data_ptr<float>(), bias.has_value() ? bf.data_ptr<float>() : nullptr,
                                 out.data_ptr(), odt, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                 at::cuda::getCurrentCUDAStream()),
               "int8_gemm");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tiled_diffusion_C, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token_cuda);
  m.impl("int8_gemm", &int8_gemm_cuda);
}
