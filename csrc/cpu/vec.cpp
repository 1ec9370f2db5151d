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

// exp(x) for x in [-87.3, 88.0], branch-free so the loops that call it vectorize: Cody-Waite range
// reduction to r in [-ln2/2, ln2/2], the Cephes degree-6 polynomial (about 1 ulp), and 2^n written into
// the exponent bits (n stays within the normal range there; x = -88 gives n = -127, exponent bits 0, so 0).
inline float exp_in_range(float x) {
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

// Clamps below -87.3 return a value under 1.2e-38 instead of a denormal.
inline float clamp(float x, float lo, float hi) {
  x = x > lo ? x : lo;
  return x < hi ? x : hi;
}

// exp(x) for softmax weights, where x = score - running max is <= 0 or NaN (so no upper clamp). Below -87.3
// (a -inf score included) the weight is exactly 0, and NaN (NaN or +inf in q or k) gives NaN, as the
// reference's softmax does: clamping both to -87.3 gave 1.2e-38, which made a NaN query row come out as the
// mean of v. Two selects (compare + blend each); fewer vector ops than the two-sided clamp this replaces.
inline float fast_exp(float x) {
  const float e = exp_in_range(x > -87.33654f ? x : -88.0f);  // NaN, -inf and underflow -> -88 -> 0
  return x == x ? e : x;
}

// y * sigmoid(y) = y / (1 + exp(-y)). The clamp happens before the exp so the compiler emits a single
// divide (the slowest vector op here). Below y = -80 the divisor is inf (exp(-y) > e^80 = 5.5e34): -0 for
// finite y, where y / (1 + e^80) is not small once |y| > 1e20, and NaN for -inf (-inf * sigmoid(-inf) in the
// reference); a select on the divisor costs no more than the clamp-only version.
inline float fast_silu(float y) {
  const float d = 1.0f + exp_in_range(clamp(-y, -87.33654f, 80.0f));
  return y / (y < -80.0f ? INFINITY : d);
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

SDCORE_MULTIVERSION bool all_finite(const float* x, int64_t rows, int64_t n, int64_t stride) {
  // x - x is 0 for finite x and NaN for NaN and +-inf (not folded to 0: no -ffinite-math-only).
  float acc = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * stride;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += row[j] - row[j];
  }
  return acc == 0.0f;
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

SDCORE_MULTIVERSION void affine_act_rows(const float* x, float* y, int64_t rows, int64_t n, const float* center,
                                         const float* scale, const float* shift, bool silu) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const float c = center[r], a = scale[r], b = shift[r];
    if (silu) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = fast_silu((xr[j] - c) * a + b);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - c) * a + b;
    }
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

namespace {

// The step over n elements. Without guidance m is the model output itself: guide(u, u, 1) = u + (u - u)
// would make it NaN wherever u is infinite, where the reference (and the CUDA kernel) keep the infinity.
// always_inline: inlined into each clone of step_chunk, the loop is compiled for that clone's target.
template <bool kGuided, bool kState>
__attribute__((always_inline)) inline void step_loop(const StepCoeffs& k, const float* x, const float* uncond,
                                                     const float* cond, float guidance, const float* const* h,
                                                     const float* z, float* out, float* state, int64_t n) {
  const float *h0 = h[0], *h1 = h[1], *h2 = h[2], *h3 = h[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float m = kGuided ? guide(uncond[i], cond[i], guidance) : uncond[i];
    const StepResult r = step_element(k, x[i], m, h0[i], h1[i], h2[i], h3[i], z[i]);
    out[i] = r.out;
    if constexpr (kState) state[i] = r.state;
  }
}

}  // namespace

SDCORE_MULTIVERSION void step_chunk(const StepCoeffs& c, const float* x, const float* uncond, const float* cond,
                                    float guidance, const float* const* h, const float* z, float* out,
                                    float* state, int64_t n) {
  const StepCoeffs k = c;
  if (cond != nullptr) {
    if (state) {
      step_loop<true, true>(k, x, uncond, cond, guidance, h, z, out, state, n);
    } else {
      step_loop<true, false>(k, x, uncond, cond, guidance, h, z, out, state, n);
    }
  } else if (state) {
    step_loop<false, true>(k, x, uncond, cond, guidance, h, z, out, state, n);
  } else {
    step_loop<false, false>(k, x, uncond, cond, guidance, h, z, out, state, n);
  }
}

}  // namespace cpu
}  // namespace sdcore
