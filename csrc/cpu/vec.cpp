#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SDCORE_X86_VARIANTS 1
#include <immintrin.h>
#endif

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace sdcore {
namespace cpu {
namespace {

// ln2 in two parts (Cephes'): n * kLn2Hi is exact for |n| < 2^16, and every exp here has |n| < 2^11.
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
// 1.5 * 2^23: (x + kRound) is x rounded to an integer (|x| < 2^22), held in the low mantissa bits.
constexpr float kRound = 12582912.0f;

// exp(x) for x in [-87.3, 88.0], branch-free so the loops that call it vectorize: Cody-Waite range
// reduction to r in [-ln2/2, ln2/2] (up to rounding ties), the Cephes degree-6 polynomial (about 1 ulp), and 2^n written into
// the exponent bits (n stays within the normal range there; x = -88 gives n = -127, exponent bits 0, so 0).
inline float exp_in_range(float x) {
  // n = x / ln2 rounded to nearest by adding and subtracting 1.5 * 2^23 (no -ffast-math, so not folded):
  // std::floor is a libm call in the baseline (SSE2) build, which kept the whole loop scalar there.
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
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

#define BODY __attribute__((always_inline)) inline

BODY float row_max_body(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

BODY float exp_sub_sum_body(float* x, int64_t n, float sub) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    float e = fast_exp(x[j] - sub);
    x[j] = e;
    s += e;
  }
  return s;
}

BODY void scale_row_body(float* x, int64_t n, float s) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

BODY bool all_finite_body(const float* x, int64_t rows, int64_t n, int64_t stride) {
  // x - x is 0 for finite x and NaN for NaN and +-inf (not folded to 0: no -ffinite-math-only).
  float acc = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * stride;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += row[j] - row[j];
  }
  return acc == 0.0f;
}

BODY void shifted_sums_body(const float* x, int64_t n, float shift, double& sum, double& sumsq) {
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

BODY void affine_act_rows_body(const float* x, float* y, int64_t rows, int64_t n, const float* center,
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

BODY void affine_act_channels_body(const float* x, float* y, int64_t pixels, int64_t channels, int64_t stride,
                                   const float* center, const float* scale, const float* shift, bool silu) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* xr = x + p * stride;
    float* yr = y + p * stride;
    if (silu) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) yr[c] = fast_silu((xr[c] - center[c]) * scale[c] + shift[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) yr[c] = (xr[c] - center[c]) * scale[c] + shift[c];
    }
  }
}

BODY void channel_sums_body(const float* x, int64_t pixels, int64_t channels, int64_t stride,
                            const float* shift, float* sum, float* sumsq) {
  // Tiles of kTile channels, all pixels each, so the running sums stay in registers (4 + 4 vectors with
  // AVX-512) instead of a load and a store of sum[c] and sumsq[c] per element, which made channels_last
  // statistics 2-3x slower than NCHW's.
  constexpr int64_t kTile = 64;
  int64_t c0 = 0;
  for (; c0 + kTile <= channels; c0 += kTile) {
    float s[kTile], q[kTile], sh[kTile];
    for (int64_t j = 0; j < kTile; ++j) {
      s[j] = sum[c0 + j];
      q[j] = sumsq[c0 + j];
      sh[j] = shift[c0 + j];
    }
    for (int64_t p = 0; p < pixels; ++p) {
      const float* row = x + p * stride + c0;
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) {
        const float d = row[j] - sh[j];
        s[j] += d;
        q[j] += d * d;
      }
    }
    for (int64_t j = 0; j < kTile; ++j) {
      sum[c0 + j] = s[j];
      sumsq[c0 + j] = q[j];
    }
  }
  for (int64_t p = 0; p < pixels && c0 < channels; ++p) {
    const float* row = x + p * stride;
#pragma omp simd
    for (int64_t c = c0; c < channels; ++c) {
      const float d = row[c] - shift[c];
      sum[c] += d;
      sumsq[c] += d * d;
    }
  }
}

// Winograd F(2x2, 3x3) input transform of one tile row of one channel: d = the 4x4 patch of tile t (rows
// rows[0..3], columns 2t-1 .. 2t+2, zero outside the image), V = B^T d B with B^T = [1 0 -1 0; 0 1 1 0;
// 0 -1 1 0; 0 1 0 -1], V[4i+j] written to v[(4i+j) * xi_stride + t]. Rows above or below the image are the
// caller's zero rows. s holds 4 zero-padded rows of 2 * tiles + 2 floats: the row transform is done there
// once per column, and the column transform then reads each of its columns twice, from L1.
BODY void winograd_input_row_body(const float* const* rows, int64_t width, int64_t tiles, float* s, float* v,
                                  int64_t xi_stride) {
  const int64_t padded = 2 * tiles + 2;
  float *s0 = s, *s1 = s + padded, *s2 = s + 2 * padded, *s3 = s + 3 * padded;
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
  // Padded column p holds image column p - 1; column 0 and those past the image are the zero padding.
  s0[0] = s1[0] = s2[0] = s3[0] = 0.0f;
  for (int64_t p = width + 1; p < padded; ++p) s0[p] = s1[p] = s2[p] = s3[p] = 0.0f;
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    const float x0 = r0[c], x1 = r1[c], x2 = r2[c], x3 = r3[c];
    s0[c + 1] = x0 - x2;
    s1[c + 1] = x1 + x2;
    s2[c + 1] = x2 - x1;
    s3[c + 1] = x1 - x3;
  }
  for (int i = 0; i < 4; ++i) {
    const float* r = s + i * padded;
    float *v0 = v + (4 * i) * xi_stride, *v1 = v0 + xi_stride, *v2 = v1 + xi_stride, *v3 = v2 + xi_stride;
#pragma omp simd
    for (int64_t t = 0; t < tiles; ++t) {
      const float c0 = r[2 * t], c1 = r[2 * t + 1], c2 = r[2 * t + 2], c3 = r[2 * t + 3];
      v0[t] = c0 - c2;
      v1[t] = c1 + c2;
      v2[t] = c2 - c1;
      v3[t] = c1 - c3;
    }
  }
}

// Winograd F(2x2, 3x3) filter transform of n <= 64 consecutive 3x3 filters g (9 floats each): U = G g G^T
// with G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], U[4i+j] of filter k written to u[(4i+j) * plane + k]. In
// double, rounded once. The filters go tap-major through a local copy first, so the loop vectorizes across
// them with plain loads, and each of U's 16 planes gets one contiguous run.
BODY void winograd_filters_body(const float* g, int64_t n, float* u, int64_t plane, bool streaming) {
  constexpr int64_t kMax = 64;
  alignas(64) float taps[9][kMax];
  alignas(64) float out[16][kMax];
  for (int q = 0; q < 9; ++q) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) taps[q][k] = g[9 * k + q];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    double t[4][3];  // G g
    for (int c = 0; c < 3; ++c) {
      const double g0 = taps[c][k], g1 = taps[3 + c][k], g2 = taps[6 + c][k];
      t[0][c] = g0;
      t[1][c] = 0.5 * (g0 + g1 + g2);
      t[2][c] = 0.5 * (g0 - g1 + g2);
      t[3][c] = g2;
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const double a = t[i][0], b = t[i][1], c = t[i][2];
      out[4 * i + 0][k] = static_cast<float>(a);
      out[4 * i + 1][k] = static_cast<float>(0.5 * (a + b + c));
      out[4 * i + 2][k] = static_cast<float>(0.5 * (a - b + c));
      out[4 * i + 3][k] = static_cast<float>(c);
    }
  }
  // When U goes to memory (larger than the cache) before the GEMMs read it, streaming stores skip reading each
  // line before writing it; the caller fences (store_fence) before the GEMMs.
  for (int xi = 0; xi < 16; ++xi) {
    float* dst = u + xi * plane;
    int64_t k = 0;
#ifdef SDCORE_X86_VARIANTS
    if (streaming) {
      for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) & 15) != 0; ++k) dst[k] = out[xi][k];
      for (; k + 4 <= n; k += 4) _mm_stream_ps(dst + k, _mm_loadu_ps(&out[xi][k]));
    }
#endif
    for (; k < n; ++k) dst[k] = out[xi][k];
  }
}

// Winograd F(2x2, 3x3) output transform of one tile row of one output channel: M[4i+j] at
// m[(4i+j) * xi_stride + t], Y = A^T M A + bias with A^T = [1 1 1 0; 0 1 -1 -1]; Y[a][b] goes to
// out_a[2t + b] (row 1 only when kTwoRows: the image's last row may be row 0 of a tile).
template <bool kTwoRows>
__attribute__((always_inline)) inline void winograd_output_tiles(const float* m, int64_t xi_stride, int64_t t0,
                                                                 int64_t t1, float bias, float* out0, float* out1) {
#pragma omp simd
  for (int64_t t = t0; t < t1; ++t) {
    float z0[4], z1[4];
    for (int i = 0; i < 4; ++i) {
      const float* mi = m + (4 * i) * xi_stride + t;
      const float q0 = mi[0], q1 = mi[xi_stride], q2 = mi[2 * xi_stride], q3 = mi[3 * xi_stride];
      z0[i] = q0 + q1 + q2;
      z1[i] = q1 - q2 - q3;
    }
    out0[2 * t] = z0[0] + z0[1] + z0[2] + bias;
    out0[2 * t + 1] = z1[0] + z1[1] + z1[2] + bias;
    if (kTwoRows) {
      out1[2 * t] = z0[1] - z0[2] - z0[3] + bias;
      out1[2 * t + 1] = z1[1] - z1[2] - z1[3] + bias;
    }
  }
}

BODY void winograd_output_row_body(const float* m, int64_t xi_stride, int64_t tiles, int64_t width, float bias,
                                   float* out0, float* out1) {
  const int64_t full = width / 2;  // tiles whose two columns are both inside the image
  if (out1 != nullptr) {
    winograd_output_tiles<true>(m, xi_stride, 0, full, bias, out0, out1);
  } else {
    winograd_output_tiles<false>(m, xi_stride, 0, full, bias, out0, out1);
  }
  if (full < tiles) {  // an odd width: the last tile's first column only
    float z0[4];
    for (int i = 0; i < 4; ++i) {
      const float* mi = m + (4 * i) * xi_stride + full;
      z0[i] = mi[0] + mi[xi_stride] + mi[2 * xi_stride];
    }
    out0[2 * full] = z0[0] + z0[1] + z0[2] + bias;
    if (out1 != nullptr) out1[2 * full] = z0[1] - z0[2] - z0[3] + bias;
  }
}

BODY void geglu_row_body(const float* h, const float* bias, float* out, int64_t f) {
  const float* gate = h + f;
  if (bias != nullptr) {
    const float* gate_bias = bias + f;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) out[j] = (h[j] + bias[j]) * gelu(gate[j] + gate_bias[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) out[j] = h[j] * gelu(gate[j]);
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

BODY void step_chunk_body(const StepCoeffs& c, const float* x, const float* uncond, const float* cond,
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

#ifdef SDCORE_X86_VARIANTS
// SiLU written out for AVX-512 and AVX2. The compiler's vectorization of fast_silu keeps its divide (a vdivps)
// and the degree-6 exp polynomial; here the GroupNorm+SiLU apply pass, bound by the FP pipes, does less:
//  - e^-v = 2^(n / T) * e^r with a T-entry table of 2^(j / T) (T = 16 in a zmm, 8 in a ymm register) read by
//    one permute: the low bits of n (-v * T / ln2 rounded) pick the entry, the rest are added into the exponent
//    bits. |r| <= ln2 / 2T, where a degree-3 (T = 16) or 4 (T = 8) polynomial is within 1e-8 of e^r.
//  - 1 / (1 + e^-v) is the hardware reciprocal estimate and one Newton step (2^-14 -> ~2^-27 with AVX-512's,
//    2^-12 -> ~2^-23 with AVX2's).
//  - Against float64 the whole SiLU is within 2.0e-7 (3 ulp) in either build; fast_silu is within 1.3e-7
//    (tests/test_cpu_capabilities.py sweeps [-90, 90]). In a loop over 16K floats the AVX-512 one takes 20%
//    less time than the exp + rcp14 version it replaces.
//  - fast_silu's rules, lane for lane: v is clamped to [-80, 87.34] with y first, so NaN takes the bound and
//    y * (...) keeps it NaN; below -80 the factor is 0, so y * 0 is -0 for finite y and NaN for -inf.
//  - At v = 87.34 the table value times 2^-126 may land in the subnormals (the exponent add does not
//    renormalize); e^-v is then under 1.2e-38 either way, and 1 + e^-v is 1.
// GCC 12's avx512fintrin.h reads an uninitialized "undefined" vector in the masked loads it inlines, and in
// the extracts of _mm512_reduce_add_ps.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define SDCORE_AVX512 __attribute__((target("arch=x86-64-v4"), always_inline)) inline
#define SDCORE_AVX2 __attribute__((target("arch=x86-64-v3"), always_inline)) inline

// 2^(j / 16) and 2^(j / 8), rounded to float.
alignas(64) constexpr float kExp2Sixteenths[16] = {
    1.0f,        1.04427373f, 1.09050775f, 1.13878858f, 1.18920708f, 1.24185777f, 1.29683959f, 1.35425556f,
    1.41421354f, 1.47682619f, 1.54221082f, 1.61049032f, 1.68179286f, 1.75625217f, 1.8340081f,  1.91520655f};
alignas(32) constexpr float kExp2Eighths[8] = {1.0f,        1.09050775f, 1.18920708f, 1.29683959f,
                                               1.41421354f, 1.54221082f, 1.68179286f, 1.8340081f};

// The lanes of a 16-wide step with `left` elements to go (all 16 when left >= 16).
SDCORE_AVX512 __mmask16 lanes16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// Cody-Waite exp for softmax weights (x in [-87.3, 88]): the degree-6 polynomial and one scalef for 2^n.
SDCORE_AVX512 __m512 exp_in_range16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                        _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n in one instruction (n is integral and in the normal range)
}

SDCORE_AVX512 __m512 silu16(__m512 y) {
  const __m512 v = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-80.0f)), _mm512_set1_ps(87.33654f));
  const __m512 round = _mm512_set1_ps(kRound);
  const __m512 k = _mm512_fnmadd_ps(v, _mm512_set1_ps(23.0831203f), round);  // -v * 16 / ln2, rounded
  const __m512 n = _mm512_sub_ps(k, round);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(kLn2Hi / 16), v);  // -v - n * ln2 / 16
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo / 16), r);
  const __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 6), r, _mm512_set1_ps(0.5f));
  const __m512 p = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r);  // e^r - 1
  const __m512i bits = _mm512_castps_si512(k);
  const __m512 t = _mm512_permutexvar_ps(bits, _mm512_load_ps(kExp2Sixteenths));  // the low 4 bits pick
  const __m512i scale = _mm512_and_si512(_mm512_slli_epi32(bits, 19), _mm512_set1_epi32(int(0xFF800000u)));
  const __m512 e = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(_mm512_fmadd_ps(p, t, t)), scale));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  const __m512 rc = _mm512_rcp14_ps(d);
  const __mmask16 near = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-80.0f), _CMP_NLT_UQ);
  return _mm512_mul_ps(y, _mm512_maskz_mul_ps(near, rc, _mm512_fnmadd_ps(d, rc, _mm512_set1_ps(2.0f))));
}

SDCORE_AVX2 __m256 silu8(__m256 y) {
  const __m256 v = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-80.0f)), _mm256_set1_ps(87.33654f));
  const __m256 round = _mm256_set1_ps(kRound);
  const __m256 k = _mm256_fnmadd_ps(v, _mm256_set1_ps(11.5415602f), round);  // -v * 8 / ln2, rounded
  const __m256 n = _mm256_sub_ps(k, round);
  __m256 r = _mm256_fnmsub_ps(n, _mm256_set1_ps(kLn2Hi / 8), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo / 8), r);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 24), r, _mm256_set1_ps(1.0f / 6));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  const __m256 p = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r);
  const __m256i bits = _mm256_castps_si256(k);
  const __m256 t = _mm256_permutevar8x32_ps(_mm256_load_ps(kExp2Eighths), bits);  // the low 3 bits pick
  const __m256i scale = _mm256_and_si256(_mm256_slli_epi32(bits, 20), _mm256_set1_epi32(int(0xFF800000u)));
  const __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(_mm256_fmadd_ps(p, t, t)), scale));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  __m256 rc = _mm256_rcp_ps(d);
  rc = _mm256_mul_ps(rc, _mm256_fnmadd_ps(d, rc, _mm256_set1_ps(2.0f)));
  const __m256 far = _mm256_cmp_ps(y, _mm256_set1_ps(-80.0f), _CMP_LT_OQ);
  return _mm256_mul_ps(y, _mm256_andnot_ps(far, rc));
}

// y[j] = silu((x[j] - c[j]) * a[j] + b[j]) for j < n; kBroadcast: c, a, b are one value for the whole row.
// Full vectors through plain loads and stores, and only the tail through masked ones: masked on every step,
// the loop took 10-15% longer (Zen 4, a 16K-float microbenchmark).
template <bool kBroadcast>
SDCORE_AVX512 void affine_silu16(const float* x, float* y, int64_t n, const float* c, const float* a,
                                 const float* b) {
  __m512 vc = _mm512_set1_ps(c[0]), va = _mm512_set1_ps(a[0]), vb = _mm512_set1_ps(b[0]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    if constexpr (!kBroadcast) {
      vc = _mm512_loadu_ps(c + j);
      va = _mm512_loadu_ps(a + j);
      vb = _mm512_loadu_ps(b + j);
    }
    _mm512_storeu_ps(y + j, silu16(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vc), va, vb)));
  }
  if (j < n) {
    const __mmask16 m = lanes16(n - j);
    if constexpr (!kBroadcast) {
      vc = _mm512_maskz_loadu_ps(m, c + j);
      va = _mm512_maskz_loadu_ps(m, a + j);
      vb = _mm512_maskz_loadu_ps(m, b + j);
    }
    const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vc), va, vb);
    _mm512_mask_storeu_ps(y + j, m, silu16(v));
  }
}

// exp_sub_sum with exp_in_range16: about 30% fewer instructions per element than the compiler's vectorization of
// fast_exp (its 2^n bit arithmetic and two selects become one scalef and one masked move). The same rules:
// at or below -87.33654 (-inf included, whose lanes compute NaN before the mask) the weight is exactly 0, and
// NaN (unordered, so kept by the mask) stays NaN.
__attribute__((target("arch=x86-64-v4"))) float exp_sub_sum_avx512_scalef(float* x, int64_t n, float sub) {
  const __m512 vs = _mm512_set1_ps(sub), lowest = _mm512_set1_ps(-87.33654f);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(n - j);
    const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vs);
    const __mmask16 keep = _mm512_cmp_ps_mask(t, lowest, _CMP_NLE_UQ);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp_in_range16(t));
    _mm512_mask_storeu_ps(x + j, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// winograd_filters_body by hand: 16 filters' taps come in by 9 gathers (the compiler's vectorization reads them
// with a scalar insert each, half of its time), a prefetch 32 filters ahead keeps the gathers from waiting on
// memory, and each of U's 16 planes gets one store per 16 filters (no staging copy). About 1.4x the body's speed
// on 1280x1280 filters read from memory (7.6 -> 5.0-5.6 ms on two Zen 4 cores), 1.1-1.2x on filters in cache.
// The same double arithmetic in the same order, so U is bitwise equal to the other builds'
// (tests/test_cpu_capabilities.py).
__attribute__((target("arch=x86-64-v4"))) void winograd_filters_avx512_gather(const float* g, int64_t n, float* u,
                                                                             int64_t plane, bool streaming) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(9));
  const __m512d half = _mm512_set1_pd(0.5);
  for (int64_t k0 = 0; k0 < n; k0 += 16) {
    const __mmask16 m = lanes16(n - k0);
    // Past the last filter it prefetches whatever follows: a hint, which never faults.
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(g) + 36 * (k0 + 32);
    for (int l = 0; l < 9; ++l) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * l), _MM_HINT_T0);
    __m512 tap[9];
    for (int q = 0; q < 9; ++q) tap[q] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, g + 9 * k0 + q, 4);
    __m256 lo[16], hi[16];
    for (int h = 0; h < 2; ++h) {
      __m512d t[4][3];
      for (int c = 0; c < 3; ++c) {
        const __m512d g0 = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(tap[c], 1) : _mm512_castps512_ps256(tap[c]));
        const __m512d g1 =
            _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(tap[3 + c], 1) : _mm512_castps512_ps256(tap[3 + c]));
        const __m512d g2 =
            _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(tap[6 + c], 1) : _mm512_castps512_ps256(tap[6 + c]));
        t[0][c] = g0;
        t[1][c] = _mm512_mul_pd(half, _mm512_add_pd(_mm512_add_pd(g0, g1), g2));
        t[2][c] = _mm512_mul_pd(half, _mm512_add_pd(_mm512_sub_pd(g0, g1), g2));
        t[3][c] = g2;
      }
      __m256* out = h ? hi : lo;
      for (int i = 0; i < 4; ++i) {
        const __m512d a = t[i][0], b = t[i][1], c = t[i][2];
        out[4 * i + 0] = _mm512_cvtpd_ps(a);
        out[4 * i + 1] = _mm512_cvtpd_ps(_mm512_mul_pd(half, _mm512_add_pd(_mm512_add_pd(a, b), c)));
        out[4 * i + 2] = _mm512_cvtpd_ps(_mm512_mul_pd(half, _mm512_add_pd(_mm512_sub_pd(a, b), c)));
        out[4 * i + 3] = _mm512_cvtpd_ps(c);
      }
    }
    for (int xi = 0; xi < 16; ++xi) {
      const __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(lo[xi]), hi[xi], 1);
      float* dst = u + xi * plane + k0;
      if (streaming && m == 0xFFFF && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
        _mm512_stream_ps(dst, v);
      } else {
        _mm512_mask_storeu_ps(dst, m, v);
      }
    }
  }
}

// affine_silu16 with 8 lanes; the tail through maskload/maskstore (inactive lanes read 0 and are not written).
template <bool kBroadcast>
SDCORE_AVX2 void affine_silu8(const float* x, float* y, int64_t n, const float* c, const float* a, const float* b) {
  __m256 vc = _mm256_set1_ps(c[0]), va = _mm256_set1_ps(a[0]), vb = _mm256_set1_ps(b[0]);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if constexpr (!kBroadcast) {
      vc = _mm256_loadu_ps(c + j);
      va = _mm256_loadu_ps(a + j);
      vb = _mm256_loadu_ps(b + j);
    }
    _mm256_storeu_ps(y + j, silu8(_mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vc), va, vb)));
  }
  if (j < n) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    if constexpr (!kBroadcast) {
      vc = _mm256_maskload_ps(c + j, m);
      va = _mm256_maskload_ps(a + j, m);
      vb = _mm256_maskload_ps(b + j, m);
    }
    _mm256_maskstore_ps(y + j, m, silu8(_mm256_fmadd_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, m), vc), va, vb)));
  }
}

// The rows and channels entry points of a build with a written-out SiLU loop (LOOP<kBroadcast>, above); without
// SiLU, the build's plain body.
#define SDCORE_SILU_ENTRIES(ISA, TARGET, LOOP)                                                                  \
  __attribute__((target(TARGET))) void affine_act_rows_##ISA##_silu(                                          \
      const float* x, float* y, int64_t rows, int64_t n, const float* center, const float* scale,             \
      const float* shift, bool silu) {                                                                          \
    if (!silu) return affine_act_rows_body(x, y, rows, n, center, scale, shift, false);                       \
    for (int64_t r = 0; r < rows; ++r) LOOP<true>(x + r * n, y + r * n, n, center + r, scale + r, shift + r); \
  }                                                                                                             \
  __attribute__((target(TARGET))) void affine_act_channels_##ISA##_silu(                                      \
      const float* x, float* y, int64_t pixels, int64_t channels, int64_t stride, const float* center,        \
      const float* scale, const float* shift, bool silu) {                                                      \
    if (!silu) return affine_act_channels_body(x, y, pixels, channels, stride, center, scale, shift, false);  \
    for (int64_t p = 0; p < pixels; ++p) {                                                                      \
      LOOP<false>(x + p * stride, y + p * stride, channels, center, scale, shift);                             \
    }                                                                                                           \
  }

SDCORE_SILU_ENTRIES(avx512, "arch=x86-64-v4", affine_silu16)
SDCORE_SILU_ENTRIES(avx2, "arch=x86-64-v3", affine_silu8)
#endif

// Every loop in three builds, picked once at load time (see kernels()): baseline x86-64, x86-64-v3
// (AVX2 + FMA) and x86-64-v4 (AVX-512), each the body above compiled for that target.
#ifdef SDCORE_X86_VARIANTS
#define SDCORE_VARIANTS(RET, NAME, PARAMS, ARGS)                                                              \
  __attribute__((target("arch=x86-64-v4"))) RET NAME##_avx512 PARAMS { return NAME##_body ARGS; }            \
  __attribute__((target("arch=x86-64-v3"))) RET NAME##_avx2 PARAMS { return NAME##_body ARGS; }              \
  RET NAME##_default PARAMS { return NAME##_body ARGS; }
#else
#define SDCORE_VARIANTS(RET, NAME, PARAMS, ARGS) \
  RET NAME##_default PARAMS { return NAME##_body ARGS; }
#endif

SDCORE_VARIANTS(float, row_max, (const float* x, int64_t n), (x, n))
SDCORE_VARIANTS(float, exp_sub_sum, (float* x, int64_t n, float sub), (x, n, sub))
SDCORE_VARIANTS(void, scale_row, (float* x, int64_t n, float s), (x, n, s))
SDCORE_VARIANTS(bool, all_finite, (const float* x, int64_t rows, int64_t n, int64_t stride), (x, rows, n, stride))
SDCORE_VARIANTS(void, shifted_sums, (const float* x, int64_t n, float shift, double& sum, double& sumsq),
                (x, n, shift, sum, sumsq))
SDCORE_VARIANTS(void, affine_act_rows,
                (const float* x, float* y, int64_t rows, int64_t n, const float* center, const float* scale,
                 const float* shift, bool silu),
                (x, y, rows, n, center, scale, shift, silu))
SDCORE_VARIANTS(void, affine_act_channels,
                (const float* x, float* y, int64_t pixels, int64_t channels, int64_t stride, const float* center,
                 const float* scale, const float* shift, bool silu),
                (x, y, pixels, channels, stride, center, scale, shift, silu))
SDCORE_VARIANTS(void, channel_sums,
                (const float* x, int64_t pixels, int64_t channels, int64_t stride, const float* shift, float* sum,
                 float* sumsq),
                (x, pixels, channels, stride, shift, sum, sumsq))
SDCORE_VARIANTS(void, winograd_input_row,
                (const float* const* rows, int64_t width, int64_t tiles, float* s, float* v, int64_t xi_stride),
                (rows, width, tiles, s, v, xi_stride))
SDCORE_VARIANTS(void, winograd_filters, (const float* g, int64_t n, float* u, int64_t plane, bool streaming),
                (g, n, u, plane, streaming))
SDCORE_VARIANTS(void, winograd_output_row,
                (const float* m, int64_t xi_stride, int64_t tiles, int64_t width, float bias, float* out0,
                 float* out1),
                (m, xi_stride, tiles, width, bias, out0, out1))
SDCORE_VARIANTS(void, geglu_row, (const float* h, const float* bias, float* out, int64_t f), (h, bias, out, f))
SDCORE_VARIANTS(void, step_chunk,
                (const StepCoeffs& c, const float* x, const float* uncond, const float* cond, float guidance,
                 const float* const* h, const float* z, float* out, float* state, int64_t n),
                (c, x, uncond, cond, guidance, h, z, out, state, n))

struct Kernels {
  const char* name;
  decltype(&row_max_default) row_max;
  decltype(&exp_sub_sum_default) exp_sub_sum;
  decltype(&scale_row_default) scale_row;
  decltype(&all_finite_default) all_finite;
  decltype(&shifted_sums_default) shifted_sums;
  decltype(&affine_act_rows_default) affine_act_rows;
  decltype(&affine_act_channels_default) affine_act_channels;
  decltype(&channel_sums_default) channel_sums;
  decltype(&winograd_input_row_default) winograd_input_row;
  decltype(&winograd_filters_default) winograd_filters;
  decltype(&winograd_output_row_default) winograd_output_row;
  decltype(&geglu_row_default) geglu_row;
  decltype(&step_chunk_default) step_chunk;
};

#define SDCORE_KERNELS(ISA) \
  {#ISA, row_max_##ISA, exp_sub_sum_##ISA, scale_row_##ISA, all_finite_##ISA, shifted_sums_##ISA, \
   affine_act_rows_##ISA, affine_act_channels_##ISA, channel_sums_##ISA, winograd_input_row_##ISA, \
   winograd_filters_##ISA, winograd_output_row_##ISA, geglu_row_##ISA, \
   step_chunk_##ISA}

// The best build this CPU runs, capped by SDCORE_CPU_CAPABILITY (default | avx2 | avx512, like ATen's
// ATEN_CPU_CAPABILITY), so tests and benchmarks can run the lower builds on a machine with AVX-512.
Kernels pick() {
  const char* env = std::getenv("SDCORE_CPU_CAPABILITY");
  const std::string cap = env && *env ? env : "avx512";
  TORCH_CHECK(cap == "default" || cap == "avx2" || cap == "avx512", "SDCORE_CPU_CAPABILITY=", cap,
              " is not one of default, avx2, avx512");
#ifdef SDCORE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  const bool avx2 = __builtin_cpu_supports("x86-64-v3");
  if (cap == "avx512" && avx512) {
    Kernels k = SDCORE_KERNELS(avx512);
    k.exp_sub_sum = exp_sub_sum_avx512_scalef;
    k.winograd_filters = winograd_filters_avx512_gather;
    k.affine_act_rows = affine_act_rows_avx512_silu;
    k.affine_act_channels = affine_act_channels_avx512_silu;
    return k;
  }
  if (cap != "default" && avx2) {
    Kernels k = SDCORE_KERNELS(avx2);
    k.affine_act_rows = affine_act_rows_avx2_silu;
    k.affine_act_channels = affine_act_channels_avx2_silu;
    return k;
  }
#endif
  return SDCORE_KERNELS(default);
}

const Kernels& kernels() {
  static const Kernels k = pick();
  return k;
}

}  // namespace

const char* capability() { return kernels().name; }

void store_fence() {
#ifdef SDCORE_X86_VARIANTS
  _mm_sfence();
#endif
}

float row_max(const float* x, int64_t n) { return kernels().row_max(x, n); }
float exp_sub_sum(float* x, int64_t n, float sub) { return kernels().exp_sub_sum(x, n, sub); }
void scale_row(float* x, int64_t n, float s) { kernels().scale_row(x, n, s); }
bool all_finite(const float* x, int64_t rows, int64_t n, int64_t stride) {
  return kernels().all_finite(x, rows, n, stride);
}
void shifted_sums(const float* x, int64_t n, float shift, double& sum, double& sumsq) {
  kernels().shifted_sums(x, n, shift, sum, sumsq);
}
void affine_act_rows(const float* x, float* y, int64_t rows, int64_t n, const float* center, const float* scale,
                     const float* shift, bool silu) {
  kernels().affine_act_rows(x, y, rows, n, center, scale, shift, silu);
}
void affine_act_channels(const float* x, float* y, int64_t pixels, int64_t channels, int64_t stride,
                         const float* center, const float* scale, const float* shift, bool silu) {
  kernels().affine_act_channels(x, y, pixels, channels, stride, center, scale, shift, silu);
}
void channel_sums(const float* x, int64_t pixels, int64_t channels, int64_t stride, const float* shift,
                  float* sum, float* sumsq) {
  kernels().channel_sums(x, pixels, channels, stride, shift, sum, sumsq);
}
void winograd_input_row(const float* const* rows, int64_t width, int64_t tiles, float* s, float* v,
                        int64_t xi_stride) {
  kernels().winograd_input_row(rows, width, tiles, s, v, xi_stride);
}
void winograd_filters(const float* g, int64_t n, float* u, int64_t plane, bool streaming) {
  kernels().winograd_filters(g, n, u, plane, streaming);
}
void winograd_output_row(const float* m, int64_t xi_stride, int64_t tiles, int64_t width, float bias, float* out0,
                         float* out1) {
  kernels().winograd_output_row(m, xi_stride, tiles, width, bias, out0, out1);
}
void geglu_row(const float* h, const float* bias, float* out, int64_t f) { kernels().geglu_row(h, bias, out, f); }
void step_chunk(const StepCoeffs& c, const float* x, const float* uncond, const float* cond, float guidance,
                const float* const* h, const float* z, float* out, float* state, int64_t n) {
  kernels().step_chunk(c, x, uncond, cond, guidance, h, z, out, state, n);
}

}  // namespace cpu
}  // namespace sdcore
