// Plain parameter structs: what a kernel needs, with no torch types, so the .cu files never include
// torch headers. The torch glue (csrc/common/checks.cpp) validates tensors once and fills these.
#pragma once

#include <cstdint>

namespace sdcore {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest head dim the attention kernels accept.
constexpr int64_t kMaxHeadDim = 512;

// q [B,H,N,D], k/v [B,H,M,D], o [B,H,N,D]. Strides are in elements; the last dim is contiguous
// (stride 1) for every tensor. o is contiguous.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t batch, heads, n, m, d;
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int64_t k_stride_b, k_stride_h, k_stride_m;
  int64_t v_stride_b, v_stride_h, v_stride_m;
  int64_t o_stride_b, o_stride_h, o_stride_n;
  float scale;  // multiplies q.k before the softmax
  bool causal;  // query i sees keys j <= i (top-left aligned, as torch's is_causal)
  DType dtype;
  // CUDA: run the Hopper (wgmma) kernel where it applies (SDCORE_CUDA_ATTENTION=sm90; opt-in until measured on
  // a card). The CPU kernel ignores it.
  bool use_sm90 = false;
};

// x is [B, C, spatial...] viewed as [B, C, hw]; in channels_last the memory order is [B, hw, C].
// gamma/beta are float32 [C] or null. y has the same layout as x.
struct GroupNormParams {
  const void* x;
  void* y;
  // Per-channel weight and bias, [C] or null: float32 when affine_float32, else in x's dtype (a model's own
  // weights, read as they are: no conversion launch per call).
  const void* gamma;
  const void* beta;
  bool affine_float32;
  int64_t batch, channels, hw, groups;
  float eps;
  bool silu;
  bool channels_last;
  DType dtype;
  // Device scratch of the CUDA split path (cuda::group_norm_workspace_bytes), allocated by the caller from
  // PyTorch's caching allocator: the kernels never allocate, so a call can be captured in a CUDA graph.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// GEGLU after its projection's GEMM (run without bias): out[r, j] = (h[r, j] + bias[j]) * gelu(h[r, F + j] +
// bias[F + j]) for rows r < rows and j < F = features. h's rows are h_stride elements apart, each contiguous;
// out is a contiguous [rows, F]. bias (2F values, in h's dtype, so there is no conversion launch) may be null.
struct GegluParams {
  const void* h;
  const void* bias;
  void* out;
  int64_t rows, features, h_stride;
  DType dtype;
};

constexpr int kMaxStepHistory = 4;

// The scalar coefficients of one denoising step; the scheduler computes them on the host in float64.
// With m the (guided) model output, x the sample, h_i the history tensors and z the noise:
//   x0    = clamp(x0_x*x + x0_m*m, -clip, clip)       (no clamp when clip <= 0)
//   out   = out_x*x + out_m*m + out_x0*x0 + sum_i hist_i*h_i + out_noise*z
//   state = st_x*x + st_m*m + st_x0*x0                 (what the next step keeps: x0, a derivative, ...)
struct StepCoeffs {
  float x0_x, x0_m, clip;
  float out_x, out_m, out_x0, out_noise;
  float st_x, st_m, st_x0;
  float hist[kMaxStepHistory];
  int n_hist;
};

// model_output is [G*B, ...] with G = 2 under classifier-free guidance (uncond first, then cond) and
// G = 1 otherwise; every other tensor is [B, ...]. All tensors are contiguous and of one dtype.
struct StepParams {
  const void* model_output;
  const void* sample;
  const void* history[kMaxStepHistory];
  const void* noise;  // null when out_noise is unused
  void* out;
  void* state;        // null when the caller asked for no state
  int64_t numel;      // elements of sample
  bool cfg;
  float guidance_scale;
  StepCoeffs c;
  DType dtype;
};

}  // namespace sdcore
