// The fused denoising step on the CPU: guidance, prediction-type conversion and update in one pass over
// the latents (see StepCoeffs), in parallel chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "vec.h"

namespace sdcore {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;

void scheduler_step_f32(const StepParams& p) {
  const float* mo = static_cast<const float*>(p.model_output);
  const float* x = static_cast<const float*>(p.sample);
  const float* z = static_cast<const float*>(p.noise);
  // Unused history slots and absent noise read zeros, so the leaf loop has no branches.
  static const std::vector<float> zeros(kChunk, 0.0f);
  at::parallel_for(0, (p.numel + kChunk - 1) / kChunk, 4, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t i0 = chunk * kChunk, n = std::min(kChunk, p.numel - i0);
      const float* h[kMaxStepHistory];
      for (int j = 0; j < kMaxStepHistory; ++j) {
        h[j] = p.history[j] ? static_cast<const float*>(p.history[j]) + i0 : zeros.data();
      }
      const float* uncond = mo + i0;
      const float* cond = p.cfg ? mo + p.numel + i0 : nullptr;
      step_chunk(p.c, x + i0, uncond, cond, p.guidance_scale, h, z ? z + i0 : zeros.data(),
                 static_cast<float*>(p.out) + i0, p.state ? static_cast<float*>(p.state) + i0 : nullptr, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> scheduler_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                      at::ArrayRef<double> coeffs, at::TensorList history,
                                                      at::ArrayRef<double> history_coeffs,
                                                      const std::optional<at::Tensor>& noise,
                                                      std::optional<double> guidance_scale, bool return_state) {
  StepCall c = prepare_step(model_output, sample, coeffs, history, history_coeffs, noise, guidance_scale,
                            return_state);
  if (c.p.dtype == DType::kFloat32) {
    scheduler_step_f32(c.p);
    return {c.out, c.state};
  }
  std::vector<at::Tensor> history_f;
  for (const auto& h : c.history) history_f.push_back(h.to(at::kFloat));
  std::optional<at::Tensor> noise_f;
  if (c.noise.defined()) noise_f = c.noise.to(at::kFloat);
  StepCall f = prepare_step(c.model_output.to(at::kFloat), c.sample.to(at::kFloat), coeffs, history_f,
                            history_coeffs, noise_f, guidance_scale, return_state);
  scheduler_step_f32(f.p);
  c.out.copy_(f.out);
  if (return_state) c.state.copy_(f.state);
  return {c.out, c.state};
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("scheduler_step", &sdcore::cpu::scheduler_step_cpu); }
