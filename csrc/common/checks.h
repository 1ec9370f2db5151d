// Input validation shared by the CPU and CUDA glue: every op checks its tensors here once, with messages
// that name the argument and the expected/actual value, and gets back a filled params struct together
// with the tensors that own the memory the struct points to.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

#include "params.h"

namespace sdcore {

struct AttentionCall {
  at::Tensor q, k, v, out;
  AttentionParams p;
};

struct GroupNormCall {
  at::Tensor x, y, gamma, beta;
  GroupNormParams p;
};

struct GegluCall {
  at::Tensor h, bias, out;
  GegluParams p;
};

// x @ weight^T + bias + residual as 2-D row-major operands ([m, k], [n, k], [n], [m, n]), each with unit stride along
// its rows (views of the inputs where reshape allows, else dense copies); out is the dense [..., n] result.
struct LinearAddCall {
  at::Tensor x, weight, bias, residual, out;
  int64_t m = 0, n = 0, k = 0;
};

// A 3x3, stride-1, padding-1 convolution: x [B, C, H, W] and weight [Co, C, 3, 3] contiguous (copies where they
// are not), bias [Co] or undefined; out the dense [B, Co, H, W] result. float32 only: the one CPU kernel.
struct Conv3x3Call {
  at::Tensor x, weight, bias, out;
};

struct StepCall {
  at::Tensor model_output, sample, noise, out, state;
  std::vector<at::Tensor> history;
  StepParams p;
};

// Number of entries in the packed `coeffs` list of scheduler_step (StepCoeffs minus the history).
constexpr int64_t kStepCoeffCount = 10;

DType dtype_of(const at::Tensor& t, const char* op, const char* arg);

AttentionCall prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                std::optional<double> scale);

// After a causal attention: the reference computes softmax(...) @ v over every key, so a key that row i
// can't see (j > i) still meets v[j] with weight exactly 0, and 0 * NaN = 0 * inf = NaN. The kernels never
// read those keys (that is what causal saves), so this applies the reference's rule to c.out afterwards:
// out[i, d] = NaN where v[j, d] is not finite for some j > i. Nothing to do for causal = false; a caller
// that knows v is finite may skip it (the CPU does; on a GPU finding out would be a host sync, so the CUDA
// glue always runs these few small ops).
void mark_unseen_nonfinite_v(const AttentionCall& c);

GroupNormCall prepare_group_norm(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps, bool silu);

Conv3x3Call prepare_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

GegluCall prepare_geglu(const at::Tensor& h, const std::optional<at::Tensor>& bias);

LinearAddCall prepare_linear_add(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& residual);

// The ATen form of linear_add: residual + bias written in one pass, then a GEMM that accumulates into it (beta = 1).
// The CPU's implementation, and the CUDA one's where cuBLASLt offers no algorithm for the operands.
void linear_add_aten(const LinearAddCall& c);

StepCall prepare_step(const at::Tensor& model_output, const at::Tensor& sample, c10::ArrayRef<double> coeffs,
                      at::TensorList history, c10::ArrayRef<double> history_coeffs,
                      const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
                      bool return_state);

}  // namespace sdcore
