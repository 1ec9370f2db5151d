#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SDCORE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SDCORE_MULTIVERSION
#endif

namespace sdcore {
namespace cpu {
namespace {

// exp(x) for float, branch-free so the loops that call it vectorize: Cody-Waite range reduction to
// r in [-ln2/2, ln2/2], the Cephes degree-6 polynomial (about 1 ulp), and 2^n written into the exponent
// bits. Inputs are clamped to [-87.3, 88.0] (2^n stays a normal float); below -87.3 the result is under
// 1.2e-38 instead of a denormal.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.33654f), 88.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// 1/d for d in [1, 1e30] without a divide (divides are the slowest vector op here and dominated SiLU):
// an exponent-flipping first guess within 12%, then three Newton steps (error 0.12^8, under 1 ulp).
inline float fast_recip(float d) {
  int32_t i;
  std::memcpy(&i, &d, sizeof(float));
  i = 0x7EF311C7 - i;
  float r;
  std::memcpy(&r, &i, sizeof(float));
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  return r;
}

// y * sigmoid(y). Below y = -60 the true value is under 1e-24 in magnitude; capping exp's argument
// there keeps 1 + e inside fast_recip's range.
inline float fast_silu(float y) {
  float arg = -y < 60.0f ? -y : 60.0f;
  return y * fast_recip(1.0f + fast_exp(arg));
}

}  // namespace

SDCORE_MULTIVERSION float row_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

SDCORE_MULTIVERSION float exp_sub_sum(float* x, int64_t n, float sub) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    float e = fast_exp(x[j] - sub);
    x[j] = e;
    s += e;
  }
  return s;
}

SDCORE_MULTIVERSION void scale_row(float* x, int64_t n, float s) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

SDCORE_MULTIVERSION void shifted_sums(const float* x, int64_t n, float shift, double& sum, double& sumsq) {
  // Float partial sums over short chunks (exact enough), folded into double so millions of elements
  // don't accumulate float rounding.
  constexpr int64_t kChunk = 1024;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    float s = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s, q)
    for (int64_t j = start; j < end; ++j) {
      float d = x[j] - shift;
      s += d;
      q += d * d;
    }
    sum += s;
    sumsq += q;
  }
}

SDCORE_MULTIVERSION void affine_act(const float* x, float* y, int64_t n, float center, float scale, float shift,
                                    bool silu) {
  if (silu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = fast_silu((x[j] - center) * scale + shift);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - center) * scale + shift;
  }
}

SDCORE_MULTIVERSION void affine_act_channels(const float* x, float* y, int64_t channels, const float* center,
                                             const float* scale, const float* shift, bool silu) {
  if (silu) {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) y[c] = fast_silu((x[c] - center[c]) * scale[c] + shift[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) y[c] = (x[c] - center[c]) * scale[c] + shift[c];
  }
}

SDCORE_MULTIVERSION void channel_sums(const float* x, int64_t pixels, int64_t channels, const float* shift,
                                      float* sum, float* sumsq) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* row = x + p * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      float d = row[c] - shift[c];
      sum[c] += d;
      sumsq[c] += d * d;
    }
  }
}

SDCORE_MULTIVERSION void step_chunk(const StepCoeffs& c, const float* x, const float* uncond, const float* cond,
                                    float guidance, const float* const* h, const float* z, float* out,
                                    float* state, int64_t n) {
  const float *h0 = h[0], *h1 = h[1], *h2 = h[2], *h3 = h[3];
  const StepCoeffs k = c;
  if (state) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      StepResult r = step_element(k, x[i], guide(uncond[i], cond[i], guidance), h0[i], h1[i], h2[i], h3[i], z[i]);
      out[i] = r.out;
      state[i] = r.state;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = step_element(k, x[i], guide(uncond[i], cond[i], guidance), h0[i], h1[i], h2[i], h3[i], z[i]).out;
    }
  }
}

}  // namespace cpu
}  // namespace sdcore
