// linear_add on the CPU: residual + bias in one pass into the output, then the GEMM accumulating into it
// (beta = 1). The unfused layer writes the GEMM's output over a broadcast copy of the bias, then reads it again
// with the residual to write a third tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace sdcore {
namespace cpu {
namespace {

at::Tensor linear_add_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& residual) {
  LinearAddCall c = prepare_linear_add(x, weight, bias, residual);
  linear_add_aten(c);
  return c.out;
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("linear_add", &sdcore::cpu::linear_add_cpu); }
