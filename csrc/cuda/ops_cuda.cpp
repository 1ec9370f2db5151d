// Torch glue for the CUDA kernels: validate once (csrc/common/checks), run on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../common/checks.h"
#include "launch.h"

namespace sdcore {
namespace {

cudaStream_t stream_for(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// SDCORE_CUDA_ATTENTION picks the kernel family: sm80 (the default, mma.sync) or sm90 (wgmma, where it applies:
// a cc 9.0 device, a build with sm_90a code, fp16/bf16, 16-byte rows, a head dim in its table). Read per call,
// so a process can switch (the tests do).
bool attention_sm90_requested() {
  const char* v = std::getenv("SDCORE_CUDA_ATTENTION");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "sm80") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "sm90") == 0, "SDCORE_CUDA_ATTENTION must be 'sm80' or 'sm90', not '", v, "'");
  return true;
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                          std::optional<double> scale) {
  c10::cuda::CUDAGuard guard(q.device());
  AttentionCall c = prepare_attention(q, k, v, causal, scale);
  c.p.use_sm90 = attention_sm90_requested();
  C10_CUDA_CHECK(cuda::attention(c.p, stream_for(q)));
  mark_unseen_nonfinite_v(c);  // ATen ops on the same (current) stream
  return c.out;
}

at::Tensor group_norm_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  GroupNormCall c = prepare_group_norm(x, num_groups, weight, bias, eps, silu);
  // Scratch from the caching allocator (stream-ordered, a graph's private pool under capture), not cudaMalloc.
  at::Tensor workspace;
  const int64_t bytes = cuda::group_norm_workspace_bytes(c.p);
  if (bytes > 0) {
    workspace = at::empty({bytes}, x.options().dtype(at::kByte));
    c.p.workspace = workspace.data_ptr();
    c.p.workspace_bytes = bytes;
  }
  C10_CUDA_CHECK(cuda::group_norm(c.p, stream_for(x)));
  return c.y;
}

at::Tensor geglu_cuda(const at::Tensor& h, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard guard(h.device());
  GegluCall c = prepare_geglu(h, bias);
  C10_CUDA_CHECK(cuda::geglu(c.p, stream_for(h)));
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> scheduler_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                       at::ArrayRef<double> coeffs, at::TensorList history,
                                                       at::ArrayRef<double> history_coeffs,
                                                       const std::optional<at::Tensor>& noise,
                                                       std::optional<double> guidance_scale, bool return_state) {
  c10::cuda::CUDAGuard guard(sample.device());
  StepCall c = prepare_step(model_output, sample, coeffs, history, history_coeffs, noise, guidance_scale,
                            return_state);
  C10_CUDA_CHECK(cuda::scheduler_step(c.p, stream_for(sample)));
  return {c.out, c.state};
}

}  // namespace
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CUDA, m) {
  m.impl("attention", &sdcore::attention_cuda);
  m.impl("group_norm", &sdcore::group_norm_cuda);
  m.impl("geglu", &sdcore::geglu_cuda);
  m.impl("scheduler_step", &sdcore::scheduler_step_cuda);
}
