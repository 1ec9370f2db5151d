// GEGLU's epilogue on the CPU: the projection's bias, the exact GELU of the gate half and the gate product in
// one pass over the bias-free GEMM output, where the unfused layer makes three (bias, GELU, multiply) and
// writes two intermediates of the GEMM's size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "vec.h"

namespace sdcore {
namespace cpu {
namespace {

void geglu_f32(const GegluParams& p) {
  const float* h = static_cast<const float*>(p.h);
  const float* bias = static_cast<const float*>(p.bias);
  float* out = static_cast<float*>(p.out);
  const int64_t f = p.features;
  // About 16K outputs per task: enough to amortize a task, small enough to spread short GEMMs over threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(f, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) geglu_row(h + r * p.h_stride, bias, out + r * f, f);
  });
}

at::Tensor geglu_cpu(const at::Tensor& h, const std::optional<at::Tensor>& bias) {
  GegluCall c = prepare_geglu(h, bias);
  if (c.p.rows == 0 || c.p.features == 0) return c.out;
  if (c.p.dtype == DType::kFloat32) {
    geglu_f32(c.p);
    return c.out;
  }
  // Half precision on the CPU: float32 math on float32 copies, one rounding at the end.
  // (prepare_geglu converts the bias to the float32 h's dtype.)
  GegluCall f = prepare_geglu(c.h.to(at::kFloat), c.bias.defined() ? std::optional<at::Tensor>(c.bias) : std::nullopt);
  geglu_f32(f.p);
  c.out.view_as(f.out).copy_(f.out);  // f works on the [rows, 2F] view of h
  return c.out;
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("geglu", &sdcore::cpu::geglu_cpu); }
