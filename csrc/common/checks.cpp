#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sdcore {

DType dtype_of(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

namespace {

void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device(), "; all inputs must be on one device");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ",
                   a_name, " has dtype ", a.scalar_type(), "; all inputs must have one dtype");
}

// An optional 1-D bias of n values beside x (same device and dtype), contiguous; undefined when absent. `rows` says
// where n comes from in the message ("" or " (weight's rows)").
at::Tensor optional_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t n, const char* rows,
                         const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_same(x, "x", *bias, "bias", op);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [", n, "]", rows, ", got ",
              bias->sizes());
  return bias->contiguous();
}

void check_not_empty(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.numel() > 0, op, ": ", arg, " is empty (shape ", t.sizes(), ")");
}

// Kernels read rows of D contiguous elements; any other layout of the outer dims is fine.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A [rows, cols] view with unit column stride and non-overlapping rows where reshape gives one, else a dense copy.
at::Tensor rows_view(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor t2 = t.reshape({rows, cols});
  const bool strided_row = cols > 1 && t2.stride(1) != 1;
  const bool overlapping_rows = rows > 1 && t2.stride(0) < cols;
  return strided_row || overlapping_rows ? t2.contiguous() : t2;
}

}  // namespace

AttentionCall prepare_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                bool causal, std::optional<double> scale) {
  constexpr const char* op = "sdcore.attention";
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be 4-D [B, H, N, D], got shape ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 4, op, ": k must be 4-D [B, H, M, D], got shape ", k_in.sizes());
  TORCH_CHECK(v_in.dim() == 4, op, ": v must be 4-D [B, H, M, D], got shape ", v_in.sizes());
  check_same(q_in, "q", k_in, "k", op);
  check_same(q_in, "q", v_in, "v", op);
  DType dtype = dtype_of(q_in, op, "q");
  check_not_empty(q_in, op, "q");
  check_not_empty(k_in, op, "k");
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), M = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D, op, ": k must have shape [", B, ", ", H,
              ", M, ", D, "] to match q ", q_in.sizes(), ", got ", k_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), op, ": v must have the shape of k ", k_in.sizes(), ", got ",
              v_in.sizes());
  TORCH_CHECK(D <= kMaxHeadDim, op, ": head dim D = ", D, " is larger than the supported maximum ", kMaxHeadDim);
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }

  AttentionCall c;
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);
  // [B, H, N, D] in the memory order [B, N, H, D]: the layout the out-projection reads as [B, N, H*D], so
  // out.transpose(1, 2).flatten(2) in the models is a view, not the copy a contiguous output cost per call.
  c.out = at::empty({B, N, H, D}, c.q.options()).permute({0, 2, 1, 3});

  AttentionParams& p = c.p;
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.o = c.out.data_ptr();
  p.batch = B;
  p.heads = H;
  p.n = N;
  p.m = M;
  p.d = D;
  p.q_stride_b = c.q.stride(0);
  p.q_stride_h = c.q.stride(1);
  p.q_stride_n = c.q.stride(2);
  p.k_stride_b = c.k.stride(0);
  p.k_stride_h = c.k.stride(1);
  p.k_stride_m = c.k.stride(2);
  p.v_stride_b = c.v.stride(0);
  p.v_stride_h = c.v.stride(1);
  p.v_stride_m = c.v.stride(2);
  p.o_stride_b = c.out.stride(0);
  p.o_stride_h = c.out.stride(1);
  p.o_stride_n = c.out.stride(2);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  p.causal = causal;
  p.dtype = dtype;
  return c;
}

void mark_unseen_nonfinite_v(const AttentionCall& c) {
  if (!c.p.causal) return;
  const int64_t N = c.p.n, M = c.p.m;
  const int64_t rows = std::min(N, M - 1);  // row i has unseen keys (i, M) only while i < M - 1
  if (rows <= 0) return;
  // last[b, h, 0, d]: the last key whose v[..., d] is not finite, -1 if none.
  const at::TensorOptions index = c.v.options().dtype(at::kInt);
  const at::Tensor last = at::where(at::isfinite(c.v), -1, at::arange(M, index).view({M, 1})).amax(2, true);
  const at::Tensor row = at::arange(rows, index).view({rows, 1});
  c.out.narrow(2, 0, rows).masked_fill_(last > row, std::numeric_limits<double>::quiet_NaN());
}

GroupNormCall prepare_group_norm(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps, bool silu) {
  constexpr const char* op = "sdcore.group_norm";
  TORCH_CHECK(x_in.dim() >= 2, op, ": x must be [B, C, *spatial] (at least 2-D), got shape ", x_in.sizes());
  DType dtype = dtype_of(x_in, op, "x");
  check_not_empty(x_in, op, "x");
  const int64_t B = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, op, ": channels C = ", C, " must be divisible by num_groups = ", num_groups);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);

  auto affine = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->device() == x_in.device(), op, ": ", name, " is on ", t->device(), " but x is on ",
                x_in.device(), "; all inputs must be on one device");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [", C, "] (one per channel), got ",
                t->sizes());
    dtype_of(*t, op, name);
    return *t;
  };

  GroupNormCall c;
  at::Tensor gamma = affine(weight, "weight"), beta = affine(bias, "bias");
  // Both in x's dtype (a model's case): read as they are. Otherwise both as float32, which every one of
  // the three dtypes converts to exactly.
  const auto in_x_dtype = [&](const at::Tensor& t) { return !t.defined() || t.scalar_type() == x_in.scalar_type(); };
  const bool as_x = in_x_dtype(gamma) && in_x_dtype(beta);
  const auto as_read = [&](const at::Tensor& t) {
    return t.defined() ? t.to(as_x ? x_in.scalar_type() : at::kFloat).contiguous() : t;
  };
  c.gamma = as_read(gamma);
  c.beta = as_read(beta);

  bool channels_last = false;
  if (x_in.is_contiguous()) {
    c.x = x_in;
  } else if ((x_in.dim() == 4 && x_in.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (x_in.dim() == 5 && x_in.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    c.x = x_in;
    channels_last = true;
  } else {
    c.x = x_in.contiguous();
  }
  // empty_like keeps channels_last for a dense channels_last input.
  c.y = at::empty_like(c.x);

  GroupNormParams& p = c.p;
  p.x = c.x.data_ptr();
  p.y = c.y.data_ptr();
  p.gamma = c.gamma.defined() ? c.gamma.data_ptr() : nullptr;
  p.beta = c.beta.defined() ? c.beta.data_ptr() : nullptr;
  p.affine_float32 = !as_x || dtype == DType::kFloat32;
  p.batch = B;
  p.channels = C;
  p.hw = c.x.numel() / (B * C);
  p.groups = num_groups;
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  p.channels_last = channels_last;
  p.dtype = dtype;
  return c;
}

GegluCall prepare_geglu(const at::Tensor& h_in, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sdcore.geglu";
  TORCH_CHECK(h_in.dim() >= 1, op, ": h must have at least one dim (its last holds value and gate), got a 0-D tensor");
  DType dtype = dtype_of(h_in, op, "h");
  const int64_t two_f = h_in.size(-1);
  TORCH_CHECK(two_f % 2 == 0, op, ": the last dim of h must be even (the value half, then the gate half), got ",
              two_f);
  GegluCall c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == h_in.device(), op, ": bias is on ", bias->device(), " but h is on ", h_in.device(),
                "; all inputs must be on one device");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == two_f, op, ": bias must have shape [", two_f,
                "] (the last dim of h), got ", bias->sizes());
    dtype_of(*bias, op, "bias");
    c.bias = bias->to(h_in.scalar_type()).contiguous();
  }
  // [rows, 2F] rows read in place where they are (a column slice of a wider GEMM output, a batch of them).
  const int64_t rows = two_f == 0 ? 0 : h_in.numel() / two_f;
  at::Tensor h2 = rows_view(h_in, rows, two_f);
  c.h = h2;
  std::vector<int64_t> out_shape = h_in.sizes().vec();
  out_shape.back() = two_f / 2;
  c.out = at::empty(out_shape, h_in.options());

  GegluParams& p = c.p;
  p.h = c.h.data_ptr();
  p.bias = c.bias.defined() ? c.bias.data_ptr() : nullptr;
  p.out = c.out.data_ptr();
  p.features = two_f / 2;
  p.rows = rows;
  p.h_stride = rows > 1 ? h2.stride(0) : two_f;
  p.dtype = dtype;
  return c;
}

Conv3x3Call prepare_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sdcore.conv3x3";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": x must be float32 on the CPU, got ", x.scalar_type());
  check_same(x, "x", weight, "weight", op);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3, op,
              ": weight must be [out_channels, ", x.size(1), ", 3, 3], got shape ", weight.sizes());
  const int64_t co = weight.size(0);
  Conv3x3Call c;
  c.bias = optional_bias(x, bias, co, "", op);
  c.x = x.contiguous();
  c.weight = weight.contiguous();
  c.out = at::empty({x.size(0), co, x.size(2), x.size(3)}, x.options());
  return c;
}

LinearAddCall prepare_linear_add(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& residual) {
  constexpr const char* op = "sdcore.linear_add";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim (its last is the input features), got a 0-D tensor");
  dtype_of(x, op, "x");
  check_same(x, "x", weight, "weight", op);
  check_same(x, "x", residual, "residual", op);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), op, ": weight must be [out_features, ",
              x.size(-1), "] (the last dim of x), got ", weight.sizes());
  const int64_t k = x.size(-1), n = weight.size(0);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  const c10::IntArrayRef out_sizes(out_shape);
  TORCH_CHECK(residual.sizes() == out_sizes, op, ": residual must have shape ", out_sizes,
              " (x's with the last dim out_features), got ", residual.sizes());
  LinearAddCall c;
  c.bias = optional_bias(x, bias, n, " (weight's rows)", op);
  c.m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  c.n = n;
  c.k = k;
  c.x = rows_view(x, c.m, k);
  c.weight = rows_view(weight, n, k);
  c.residual = rows_view(residual, c.m, n);
  c.out = at::empty(out_shape, x.options());
  return c;
}

void linear_add_aten(const LinearAddCall& c) {
  if (c.out.numel() == 0) return;
  at::Tensor out = c.out.view({c.m, c.n});
  if (c.bias.defined()) {
    at::add_out(out, c.residual, c.bias);
  } else {
    out.copy_(c.residual);
  }
  if (c.k > 0) out.addmm_(c.x, c.weight.t());
}

StepCall prepare_step(const at::Tensor& model_output, const at::Tensor& sample, c10::ArrayRef<double> coeffs,
                      at::TensorList history, c10::ArrayRef<double> history_coeffs,
                      const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
                      bool return_state) {
  constexpr const char* op = "sdcore.scheduler_step";
  TORCH_CHECK(sample.dim() >= 1, op, ": sample must have a batch dim, got a 0-D tensor");
  DType dtype = dtype_of(sample, op, "sample");
  check_not_empty(sample, op, "sample");
  check_same(sample, "sample", model_output, "model_output", op);
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == kStepCoeffCount, op, ": coeffs must hold ", kStepCoeffCount,
              " numbers (x0_x, x0_m, clip, out_x, out_m, out_x0, out_noise, st_x, st_m, st_x0), got ",
              coeffs.size());
  for (double v : coeffs) TORCH_CHECK(std::isfinite(v), op, ": coeffs must be finite, got ", coeffs);
  TORCH_CHECK(static_cast<int64_t>(history.size()) <= kMaxStepHistory, op, ": at most ", kMaxStepHistory,
              " history tensors are supported, got ", history.size());
  TORCH_CHECK(history.size() == history_coeffs.size(), op, ": history has ", history.size(),
              " tensors but history_coeffs has ", history_coeffs.size(), " numbers");

  const int64_t B = sample.size(0);
  const bool cfg = guidance_scale.has_value();
  if (cfg) {
    TORCH_CHECK(std::isfinite(*guidance_scale), op, ": guidance_scale must be finite, got ", *guidance_scale);
    TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == 2 * B &&
                    model_output.sizes().slice(1) == sample.sizes().slice(1),
                op, ": with guidance_scale, model_output must be [2*B, ...] = uncond then cond for sample ",
                sample.sizes(), ", got ", model_output.sizes());
  } else {
    TORCH_CHECK(model_output.sizes() == sample.sizes(), op, ": model_output must have the shape of sample ",
                sample.sizes(), " (or [2*B, ...] with guidance_scale), got ", model_output.sizes());
  }

  StepCall c;
  c.model_output = model_output.contiguous();
  c.sample = sample.contiguous();
  for (size_t i = 0; i < history.size(); ++i) {
    const at::Tensor& h = history[i];
    check_same(sample, "sample", h, "history tensor", op);
    TORCH_CHECK(h.sizes() == sample.sizes(), op, ": history[", i, "] must have the shape of sample ",
                sample.sizes(), ", got ", h.sizes());
    c.history.push_back(h.contiguous());
  }
  const bool uses_noise = coeffs[6] != 0.0;
  if (uses_noise) {
    TORCH_CHECK(noise.has_value() && noise->defined(), op,
                ": this step adds noise (out_noise != 0) but no noise tensor was given");
  }
  if (noise.has_value() && noise->defined()) {
    check_same(sample, "sample", *noise, "noise", op);
    TORCH_CHECK(noise->sizes() == sample.sizes(), op, ": noise must have the shape of sample ", sample.sizes(),
                ", got ", noise->sizes());
    c.noise = noise->contiguous();
  }
  c.out = at::empty_like(c.sample);
  c.state = return_state ? at::empty_like(c.sample) : at::empty({0}, c.sample.options());

  StepParams& p = c.p;
  p.model_output = c.model_output.data_ptr();
  p.sample = c.sample.data_ptr();
  for (int i = 0; i < kMaxStepHistory; ++i) {
    p.history[i] = i < static_cast<int>(c.history.size()) ? c.history[i].data_ptr() : nullptr;
  }
  p.noise = uses_noise ? c.noise.data_ptr() : nullptr;
  p.out = c.out.data_ptr();
  p.state = return_state ? c.state.data_ptr() : nullptr;
  p.numel = c.sample.numel();
  p.cfg = cfg;
  p.guidance_scale = static_cast<float>(cfg ? *guidance_scale : 1.0);
  StepCoeffs& k = p.c;
  k.x0_x = static_cast<float>(coeffs[0]);
  k.x0_m = static_cast<float>(coeffs[1]);
  k.clip = static_cast<float>(coeffs[2]);
  k.out_x = static_cast<float>(coeffs[3]);
  k.out_m = static_cast<float>(coeffs[4]);
  k.out_x0 = static_cast<float>(coeffs[5]);
  k.out_noise = uses_noise ? static_cast<float>(coeffs[6]) : 0.0f;
  k.st_x = static_cast<float>(coeffs[7]);
  k.st_m = static_cast<float>(coeffs[8]);
  k.st_x0 = static_cast<float>(coeffs[9]);
  k.n_hist = static_cast<int>(history.size());
  for (int i = 0; i < kMaxStepHistory; ++i) {
    k.hist[i] = i < k.n_hist ? static_cast<float>(history_coeffs[i]) : 0.0f;
    TORCH_CHECK(i >= k.n_hist || std::isfinite(history_coeffs[i]), op, ": history_coeffs must be finite");
  }
  p.dtype = dtype;
  return c;
}

}  // namespace sdcore
