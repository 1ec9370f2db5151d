// Math shared by the CPU and CUDA kernels: one definition of each formula, so both devices agree.
#pragma once

#include <cmath>
#include <limits>

#include "macros.h"
#include "params.h"

namespace sdcore {

// Running mean / sum of squared deviations (Welford), merged with Chan's formula so partial results
// from threads, SIMD lanes or chunks combine without the cancellation of sum(x^2) - n*mean^2.
template <typename T>
struct Welford {
  T mean = 0;
  T m2 = 0;
  T count = 0;

  SDCORE_HD void add(T x) {
    count += T(1);
    T delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  SDCORE_HD void merge(const Welford& o) {
    if (o.count == T(0)) return;
    if (count == T(0)) {
      *this = o;
      return;
    }
    T n = count + o.count;
    T delta = o.mean - mean;
    T wb = o.count / n;
    mean += delta * wb;
    m2 += o.m2 + delta * delta * count * wb;
    count = n;
  }

  // Population variance, as group norm uses.
  SDCORE_HD T variance() const { return count > T(0) ? m2 / count : T(0); }
};

// Stats of a chunk from sums taken around a shift value c (the chunk's first element): the shift keeps
// sum((x-c)^2) - (sum(x-c))^2/n well conditioned when |mean| >> std.
template <typename T>
SDCORE_HD Welford<T> welford_from_shifted_sums(T shift, T sum, T sumsq, T n) {
  Welford<T> w;
  if (n <= T(0)) return w;
  w.count = n;
  w.mean = shift + sum / n;
  T m2 = sumsq - sum * sum / n;
  // Clamp rounding below 0, but keep NaN (from NaN/Inf in the data): `m2 > 0 ? m2 : 0` would zero it.
  w.m2 = m2 < T(0) ? T(0) : m2;
  return w;
}

// Group norm writes y = (x - mean_hi) * scale + shift with mean = mean_hi + mean_lo (mean_hi = the mean rounded
// to float), so shift = beta - mean_lo * scale. An infinite scale (inf weight, or eps = 0 on a constant group)
// would make mean_lo * scale inf, or NaN for mean_lo = 0, and the whole channel NaN, where the reference gives
// +-inf by the sign of x - mean: there the shift is beta alone (exact but for x == mean_hi != mean).
template <typename T>
SDCORE_HD T group_norm_shift(T beta, T mean_lo, T scale) {
  const bool finite = scale <= std::numeric_limits<T>::max() && scale >= -std::numeric_limits<T>::max();
  return finite ? beta - mean_lo * scale : beta;
}

// Online softmax (Milakov & Gimelshein; FlashAttention): after seeing a block whose row maximum is
// block_max, move the running max to the new maximum and return the factor by which every quantity
// accumulated so far (the denominator and the output row) must be multiplied.
SDCORE_HD float online_softmax_rescale(float& running_max, float& running_sum, float block_max) {
  float new_max = running_max > block_max ? running_max : block_max;
  // A row that has seen only masked (-inf) scores keeps factor 1 instead of exp(-inf - -inf) = NaN.
  float factor = new_max == -INFINITY ? 1.0f : expf(running_max - new_max);
  running_max = new_max;
  running_sum *= factor;
  return factor;
}

SDCORE_HD float silu(float x) { return x / (1.0f + expf(-x)); }

// erf(x) for float: the odd/even rational approximation x * P(x^2) / Q(x^2) on [-4, 4] that Eigen and XLA
// use for float (|error| < 4.2e-7 on a dense grid; beyond +-4, erf is +-1 in float). Branch-free, so the
// CPU loops that call it vectorize; NaN stays NaN (both comparisons are false).
SDCORE_HD float erf_rational(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// The exact (erf) GELU, x * Phi(x), as F.gelu's default: +inf -> +inf; -inf -> NaN (-inf * 0, as the float64
// formula gives), NaN -> NaN.
SDCORE_HD float gelu(float x) { return 0.5f * x * (1.0f + erf_rational(x * 0.70710678118654752f)); }

// Classifier-free guidance: uncond + g * (cond - uncond).
SDCORE_HD float guide(float uncond, float cond, float g) { return uncond + g * (cond - uncond); }

struct StepResult {
  float out;    // the next sample
  float state;  // what the next step keeps (see StepCoeffs)
};

// One element of a denoising step (see StepCoeffs). h0..h3 are the history values; the coefficients of
// unused slots are 0, so those must hold finite values (callers pass 0). Straight-line code with no
// branches or arrays, so compilers vectorize the loops that call it.
SDCORE_HD StepResult step_element(const StepCoeffs& c, float x, float m, float h0, float h1, float h2, float h3,
                                  float z) {
  static_assert(kMaxStepHistory == 4, "step_element spells out four history terms");
  float x0 = c.x0_x * x + c.x0_m * m;
  float clipped = x0 < -c.clip ? -c.clip : x0;
  clipped = clipped > c.clip ? c.clip : clipped;
  x0 = c.clip > 0.0f ? clipped : x0;
  float o = c.out_x * x + c.out_m * m + c.out_x0 * x0 + c.out_noise * z;
  o += c.hist[0] * h0 + c.hist[1] * h1 + c.hist[2] * h2 + c.hist[3] * h3;
  return {o, c.st_x * x + c.st_m * m + c.st_x0 * x0};
}

}  // namespace sdcore
