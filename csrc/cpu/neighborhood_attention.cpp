// CPU kernel of `neighborhood_attention` for bf16 on AMX-BF16 (amx_attention.h holds the kernel and its design).
// Private ops (namespace tiled_diffusion_C, declared here: only the CPU has them):
//   neighborhood_attention_amx(q, k, v, ylo, yhi, xlo, xhi, scale, q_row0=0) -> (out, lse)
//       q [B, H, Hq, W, D], k/v [B, H, Hk, W, D] bf16, any strides with the last one 1; the window of query
//       (y, x) is key rows [ylo[y], yhi[y]) (into k's rows) x columns [xlo[x], xhi[x]) (int32, from
//       reference.neighborhood_bounds); q_row0 = the canvas row of q's first row (a band's q_top: the kernel pairs
//       rows from even canvas rows, so a band cut at an even row gives the whole canvas's rows bit for bit).
//       out contiguous bf16, lse contiguous fp32 [B, H, Hq, W].
//   neighborhood_attention_amx_out(..., scale, q_row0, out, lse) -> ()
//       the same into given outputs (contiguous; the tests pass NaN-filled ones that must be fully overwritten).
//   neighborhood_attention_amx_unavailable(head_dim) -> str
//       "" when the kernel can run here for that head dim, else why not (the Python path then keeps torch's
//       flash attention): TD_CPU_ISA / the probe (isa.h) must say amx, the CPU must have AMX-BF16 and
//       AVX512-BF16, and D must be even and <= 256.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "amx_attention.h"
#include "isa.h"

namespace td_na {
namespace {

std::string unavailable(int64_t head_dim) {
  try {
    const td_cpu::Isa isa = td_cpu::current_isa();
    if (isa != td_cpu::Isa::amx) return std::string("the CPU ISA in use is ") + td_cpu::isa_name(isa) + ", not amx";
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-bf16")) return "cpuid: no AMX-BF16";
  if (!__builtin_cpu_supports("avx512bf16")) return "cpuid: no AVX512-BF16";
  if (head_dim % 2 != 0 || head_dim < 2 || head_dim > td_cpu::na::kMaxD)
    return "head dim " + std::to_string(head_dim) + " is not even and in [2, 256]";
  return "";
}

void neighborhood_attention_amx_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& ylo, const at::Tensor& yhi, const at::Tensor& xlo,
                                    const at::Tensor& xhi, double scale, int64_t q_row0, at::Tensor& out,
                                    at::Tensor& lse) {
  const char* op = "neighborhood_attention_amx: ";
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5, op, "q, k, v must be 5-D [B, H, rows, W, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, op, "q, k, v must be bfloat16");
  TORCH_CHECK(q.stride(4) == 1 && k.stride(4) == 1 && v.stride(4) == 1, op, "the head dim must have stride 1");
  const int64_t B = q.size(0), H = q.size(1), Hq = q.size(2), W = q.size(3), D = q.size(4), Hk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == W && k.size(4) == D, op,
              "k and v must be [B, H, Hk, W, D] with q's B, H, W, D");
  const std::string why = unavailable(D);
  TORCH_CHECK(why.empty(), op, "cannot run here: ", why);
  for (const at::Tensor* t : {&ylo, &yhi, &xlo, &xhi})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(), op,
                "bounds must be contiguous int32 CPU vectors");
  TORCH_CHECK(ylo.numel() == Hq && yhi.numel() == Hq && xlo.numel() == W && xhi.numel() == W, op,
              "ylo/yhi must have q's rows, xlo/xhi its columns");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op, "scale must be finite and > 0");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.sizes() == q.sizes(), op,
              "out must be contiguous bfloat16 with q's shape");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == q.sizes().slice(0, 4), op,
              "lse must be contiguous float32 [B, H, Hq, W]");
  const int32_t *pyl = ylo.data_ptr<int32_t>(), *pyh = yhi.data_ptr<int32_t>();
  const int32_t *pxl = xlo.data_ptr<int32_t>(), *pxh = xhi.data_ptr<int32_t>();
  for (int64_t y = 0; y < Hq; ++y)  // a non-empty window lies in k's rows (an empty one is out 0, lse -inf)
    TORCH_CHECK(pyl[y] >= pyh[y] || (pyl[y] >= 0 && pyh[y] <= Hk), op, "row ", y, "'s window [", pyl[y], ", ",
                pyh[y], ") is outside k's ", Hk, " rows");
  for (int64_t x = 0; x < W; ++x)
    TORCH_CHECK(pxl[x] >= pxh[x] || (pxl[x] >= 0 && pxh[x] <= W), op, "column ", x, "'s window [", pxl[x], ", ",
                pxh[x], ") is outside the ", W, " columns");
  // the K packing gathers (d, d + 1) pairs as dwords at a column stride of stride(3) / 2 dwords
  const at::Tensor kk = k.stride(3) % 2 != 0 ? k.contiguous() : k;
  td_cpu::na::Problem pr{};
  pr.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  pr.k = reinterpret_cast<const uint16_t*>(kk.data_ptr());
  pr.v = reinterpret_cast<const uint16_t*>(v.data_ptr());
  pr.B = B, pr.H = H, pr.Hq = Hq, pr.Hk = Hk, pr.W = W, pr.D = D;
  for (int i = 0; i < 4; ++i) pr.qs[i] = q.stride(i), pr.ks[i] = kk.stride(i), pr.vs[i] = v.stride(i);
  pr.ylo = pyl, pr.yhi = pyh, pr.xlo = pxl, pr.xhi = pxh;
  pr.scale = static_cast<float>(scale);
  pr.q_row0 = q_row0;
  pr.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  pr.lse = lse.data_ptr<float>();
  td_cpu::na::run(pr, at::get_num_threads(), [](int64_t n, auto&& body) { at::parallel_for(0, n, 1, body); });
}

std::tuple<at::Tensor, at::Tensor> neighborhood_attention_amx(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& ylo,
                                                              const at::Tensor& yhi, const at::Tensor& xlo,
                                                              const at::Tensor& xhi, double scale,
                                                              int64_t q_row0) {
  TORCH_CHECK(q.dim() == 5, "neighborhood_attention_amx: q must be 5-D [B, H, rows, W, D]");
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  neighborhood_attention_amx_out(q, k, v, ylo, yhi, xlo, xhi, scale, q_row0, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace td_na

TORCH_LIBRARY_FRAGMENT(tiled_diffusion_C, m) {
  m.def("neighborhood_attention_amx(Tensor q, Tensor k, Tensor v, Tensor ylo, Tensor yhi, Tensor xlo, Tensor xhi, "
        "float scale, int q_row0=0) -> (Tensor, Tensor)");
  m.impl("neighborhood_attention_amx", c10::DispatchKey::CPU, TORCH_FN(td_na::neighborhood_attention_amx));
  m.def("neighborhood_attention_amx_out(Tensor q, Tensor k, Tensor v, Tensor ylo, Tensor yhi, Tensor xlo, "
        "Tensor xhi, float scale, int q_row0, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.impl("neighborhood_attention_amx_out", c10::DispatchKey::CPU, TORCH_FN(td_na::neighborhood_attention_amx_out));
  m.def("neighborhood_attention_amx_unavailable(int head_dim) -> str", &td_na::unavailable);
}
