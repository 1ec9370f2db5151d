// CPU leaf loops over float arrays. Each is compiled three times (AVX-512, AVX2+FMA and baseline x86-64) and
// the best one the CPU runs is picked at load time, so one build runs fast on any x86-64 machine without
// -march=native. SDCORE_CPU_CAPABILITY=default|avx2|avx512 caps the choice (tests run every build that way).
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace sdcore {
namespace cpu {

// The build in use: "avx512", "avx2" or "default".
const char* capability();
// max_j x[j]
float row_max(const float* x, int64_t n);
// x[j] = exp(x[j] - sub); returns sum_j x[j]
float exp_sub_sum(float* x, int64_t n, float sub);
// x[j] *= s
void scale_row(float* x, int64_t n, float s);
// Whether rows x[r * stride + j] (r < rows, j < n) are all finite
bool all_finite(const float* x, int64_t rows, int64_t n, int64_t stride);
// sum_j (x[j]-shift) and sum_j (x[j]-shift)^2, accumulated in double across float chunks
void shifted_sums(const float* x, int64_t n, float shift, double& sum, double& sumsq);
// Rows apply y = act((x - center) * scale + shift), act = SiLU or identity. Subtracting the
// (float-rounded) mean first keeps large-mean inputs exact; shift carries the rest of the mean and the bias.
// `rows` consecutive rows of n elements, row i with its own center/scale/shift (NCHW channels of a group).
void affine_act_rows(const float* x, float* y, int64_t rows, int64_t n, const float* center, const float* scale,
                     const float* shift, bool silu);
// `pixels` channels_last rows of `channels` values, row p at x + p * stride (and y + p * stride):
// y[p, c] = act((x[p, c] - center[c]) * scale[c] + shift[c])
void affine_act_channels(const float* x, float* y, int64_t pixels, int64_t channels, int64_t stride,
                         const float* center, const float* scale, const float* shift, bool silu);
// Per-channel sums over `pixels` rows (row p at x + p * stride) of `channels` channels_last values:
// sum[c] += x[p,c]-shift[c], sumsq[c] += (..)^2
void channel_sums(const float* x, int64_t pixels, int64_t channels, int64_t stride, const float* shift,
                  float* sum, float* sumsq);
// Winograd F(2x2, 3x3) transforms of one tile row (see csrc/cpu/conv3x3.cpp): the input transform of 4 image rows
// (zero rows outside the image) into v[xi * xi_stride + t], xi < 16, t < tiles, with s a scratch of
// 4 * (2 * tiles + 2) floats; and the output transform of m[xi * xi_stride + t] plus bias into one or two
// output rows (out1 null past the image's last row) of `width` columns.
void winograd_input_row(const float* const* rows, int64_t width, int64_t tiles, float* s, float* v,
                        int64_t xi_stride);
// U = G g G^T of n <= 64 consecutive 3x3 filters g into u[xi * plane + k] (xi < 16, k < n); with `streaming`, by
// non-temporal stores (call store_fence() on the same thread before others read u).
void winograd_filters(const float* g, int64_t n, float* u, int64_t plane, bool streaming);
// Orders this thread's streaming stores before its later stores (an sfence on x86-64).
void store_fence();
void winograd_output_row(const float* m, int64_t xi_stride, int64_t tiles, int64_t width, float bias, float* out0,
                         float* out1);
// One GEGLU row (see GegluParams): out[j] = (h[j] + bias[j]) * gelu(h[f + j] + bias[f + j]), j < f; bias may be null
void geglu_row(const float* h, const float* bias, float* out, int64_t f);
// A denoising step over n elements (see StepCoeffs); cond is null without guidance (uncond is then the model
// output), h[i]/z are zero-filled buffers where unused, state may be null.
void step_chunk(const StepCoeffs& c, const float* x, const float* uncond, const float* cond, float guidance,
                const float* const* h, const float* z, float* out, float* state, int64_t n);

}  // namespace cpu
}  // namespace sdcore
