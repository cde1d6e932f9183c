// The Python module tiled_diffusion._C and the schemas of its private ops (namespace tiled_diffusion_C).
// The public ops (namespace tiled_diffusion) live in tiled_diffusion/ops.py and call these after checking
// their arguments; device kernels register with TORCH_LIBRARY_IMPL beside their code (csrc/cpu, csrc/cuda).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tiled_diffusion_C, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_gemm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("pack_int8_weight(Tensor w) -> Tensor");
  m.def("int8_gemm_packed(Tensor a, Tensor a_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

static PyModuleDef td_module = {PyModuleDef_HEAD_INIT, "_C", "tiled_diffusion native kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&td_module); }
