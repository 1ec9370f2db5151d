// Every sdcore op's schema, declared once. Device kernels register in csrc/cpu and csrc/cuda.
#include <torch/library.h>

#include <string>

#include "cpu/vec.h"

#ifdef SDCORE_PYTHON_MODULE
#include <Python.h>
#endif

#ifndef SDCORE_BUILT_WITH_TORCH
#define SDCORE_BUILT_WITH_TORCH "unknown"
#endif

#ifndef SDCORE_CUDA_ARCHS
#define SDCORE_CUDA_ARCHS ""
#endif

#ifndef SDCORE_BUILT_WITH_CUDA
#define SDCORE_BUILT_WITH_CUDA ""
#endif

namespace sdcore {
namespace {

std::string build_info() {
  std::string s = "cpu=1";
#ifdef SDCORE_WITH_CUDA
  s += ";cuda=1;cuda_archs=" SDCORE_CUDA_ARCHS;
#else
  s += ";cuda=0;cuda_archs=";
#endif
  s += ";built_with_torch=" SDCORE_BUILT_WITH_TORCH;
  s += ";built_with_cuda=" SDCORE_BUILT_WITH_CUDA;  // empty: no CUDA kernels
  s += ";cpu_capability=";
  s += cpu::capability();  // the CPU build picked at load time (see csrc/cpu/vec.h)
  return s;
}

}  // namespace
}  // namespace sdcore

TORCH_LIBRARY(sdcore, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None) -> Tensor");
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05, "
      "bool silu=False) -> Tensor");
  m.def("conv3x3(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("geglu(Tensor h, Tensor? bias=None) -> Tensor");
  m.def("linear_add(Tensor x, Tensor weight, Tensor? bias, Tensor residual) -> Tensor");
  m.def(
      "scheduler_step(Tensor model_output, Tensor sample, float[] coeffs, Tensor[] history, "
      "float[] history_coeffs, Tensor? noise=None, float? guidance_scale=None, bool return_state=True) "
      "-> (Tensor, Tensor)");
  m.def("build_info() -> str", &sdcore::build_info);
}

#ifdef SDCORE_PYTHON_MODULE
// `import sdcore._C` loads this library, whose static initializers register the ops with torch.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
