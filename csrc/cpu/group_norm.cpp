// GroupNorm (+ fused SiLU) on the CPU. Each (batch, group) is one task: its statistics come from one
// vectorized pass (shifted sums folded into Welford states), then one pass writes
// act(x * scale_c + shift_c) while the group is still in cache. channels_last groups are strided
// columns, so there the statistics are per-channel sums over pixel blocks, merged into groups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../common/checks.h"
#include "../common/math.h"
#include "vec.h"

namespace sdcore {
namespace cpu {
namespace {

// Per-channel affine of one group, y = (x - center) * scale + shift, written to center/scale/shift[i] for its
// cg channels: center = the mean rounded to float and shift = beta - (mean - center) * scale. Folding the
// whole mean into shift instead would round mean * scale to float and lose |mean| / std digits.
void channel_affine(const GroupNormParams& p, const Welford<double>& w, int64_t c0, int64_t cg, float* center,
                    float* scale, float* shift) {
  // The CPU computes in float32 (half inputs run on float32 copies), so weight and bias are float32 here.
  const float* gamma = static_cast<const float*>(p.gamma);
  const float* beta_p = static_cast<const float*>(p.beta);
  const double rstd = 1.0 / std::sqrt(w.variance() + static_cast<double>(p.eps));
  const float c = static_cast<float>(w.mean);
  const double rest = w.mean - static_cast<double>(c);
  for (int64_t i = 0; i < cg; ++i) {
    const double a = rstd * (gamma ? gamma[c0 + i] : 1.0);
    const double beta = beta_p ? beta_p[c0 + i] : 0.0;
    center[i] = c;
    scale[i] = static_cast<float>(a);
    shift[i] = static_cast<float>(group_norm_shift(beta, rest, a));
  }
}

void group_norm_nchw(const GroupNormParams& p) {
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const int64_t cg = p.channels / p.groups, hw = p.hw;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> center(cg), scale(cg), shift(cg);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % p.groups;
      const float* xg = x + task * cg * hw;  // the group is contiguous: (b * C + g * cg) * hw
      double s = 0, q = 0;
      shifted_sums(xg, cg * hw, xg[0], s, q);
      channel_affine(p, welford_from_shifted_sums<double>(xg[0], s, q, static_cast<double>(cg * hw)), g * cg, cg,
                     center.data(), scale.data(), shift.data());
      affine_act_rows(xg, y + task * cg * hw, cg, hw, center.data(), scale.data(), shift.data(), p.silu);
    }
  });
}

// A group's statistics from its channels' sums (float or double), each around its own shift (the channel's value
// at the image's first pixel): moving channel c's sums to the group's shift k (its first channel's) by
// d = shift_c - k is exact algebra in double, with no division per channel (a Welford merge per channel cost more
// than the whole pass at 8x8 pixels). Five independent sums, so the loop vectorizes instead of waiting on two
// chained double adds per channel (which took a few microseconds per 1000 channels).
template <typename Sum>
Welford<double> group_from_channel_sums(const float* shift, const Sum* cs, const Sum* cq, int64_t cg, int64_t hw) {
  const double k = shift[0];
  double s = 0.0, q = 0.0, sd = 0.0, sdd = 0.0, sds = 0.0;
#pragma omp simd reduction(+ : s, q, sd, sdd, sds)
  for (int64_t c = 0; c < cg; ++c) {
    const double d = static_cast<double>(shift[c]) - k;
    s += cs[c];
    q += cq[c];
    sd += d;
    sdd += d * d;
    sds += d * cs[c];
  }
  const double n = static_cast<double>(hw);
  return welford_from_shifted_sums<double>(k, s + n * sd, q + 2.0 * sds + n * sdd, static_cast<double>(cg * hw));
}

// Per channel, float sums over at most kPixels values, then double.
constexpr int64_t kPixels = 256;

// channels_last: a group is a strided column, so its statistics are complete only after a pass over all of the
// image's pixels, and a second pass applies them.
//
// Small images (the UNet's 8x8 and 16x16 levels): one task per (image, run of whole groups), both passes in the
// task, so the second reads the slice from L2 and the op is one parallel region instead of three. A slice is at
// most kSliceBytes, and at least kMinChannels wide so each pixel's row segment is a few cache lines (narrower,
// strided tasks ran 1.5-3x slower than full-row passes). Returns false where that does not fit.
bool group_norm_nhwc_slices(const GroupNormParams& p) {
  constexpr int64_t kSliceBytes = 256 << 10, kMinChannels = 128;
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const int64_t C = p.channels, G = p.groups, cg = C / G, hw = p.hw;
  int64_t per = std::min(G, kSliceBytes / (hw * cg * static_cast<int64_t>(sizeof(float))));
  // Enough tasks for every thread: fewer groups per task until there are.
  const int64_t threads = at::get_num_threads();
  while (per > 1 && p.batch * ((G + per - 1) / per) < threads) --per;
  if (per < 1) return false;
  const int64_t runs = (G + per - 1) / per, width = (G + runs - 1) / runs * cg;  // runs of near-equal width
  if (width < std::min(C, kMinChannels)) return false;
  at::parallel_for(0, p.batch * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(width), sumsq(width), center(width), scale(width), shift(width);
    std::vector<double> cs(width), cq(width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, c0 = task % runs * width, nc = std::min(width, C - c0);
      const float* xb = x + b * hw * C + c0;  // the slice's first pixel: every channel's shift
      // Every group's affine from its channels' sums (float or double arrays of nc).
      const auto affine = [&](const auto* s1, const auto* s2) {
        for (int64_t i = 0; i < nc; i += cg) {
          channel_affine(p, group_from_channel_sums(xb + i, s1 + i, s2 + i, cg, hw), c0 + i, cg, &center[i],
                         &scale[i], &shift[i]);
        }
      };
      std::fill(sum.begin(), sum.end(), 0.0f);
      std::fill(sumsq.begin(), sumsq.end(), 0.0f);
      if (hw <= kPixels) {  // one pixel block: its float sums are the channels' sums
        channel_sums(xb, hw, nc, C, xb, sum.data(), sumsq.data());
        affine(sum.data(), sumsq.data());
      } else {
        std::fill(cs.begin(), cs.end(), 0.0);
        std::fill(cq.begin(), cq.end(), 0.0);
        for (int64_t p0 = 0; p0 < hw; p0 += kPixels) {
          channel_sums(xb + p0 * C, std::min(kPixels, hw - p0), nc, C, xb, sum.data(), sumsq.data());
          for (int64_t c = 0; c < nc; ++c) {
            cs[c] += sum[c];
            cq[c] += sumsq[c];
            sum[c] = sumsq[c] = 0.0f;
          }
        }
        affine(cs.data(), cq.data());
      }
      affine_act_channels(xb, y + b * hw * C + c0, hw, nc, C, center.data(), scale.data(), shift.data(), p.silu);
    }
  });
  return true;
}

// Larger images: a statistics pass, a merge into groups and an apply pass, each split over every thread.
// (Keeping a block of whole groups of one image in L2 for both passes was tried at these sizes: tasks of
// 80-channel columns ran 1.5-3x slower than these full-row passes, and the wider ones no faster.)
void group_norm_nhwc(const GroupNormParams& p) {
  if (group_norm_nhwc_slices(p)) return;
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const int64_t C = p.channels, G = p.groups, cg = C / G, hw = p.hw;
  // Statistics tasks are (image, block of pixels, chunk of channels), so a thin image still gives every
  // thread work.
  constexpr int64_t kChunk = 256;
  const int64_t blocks = (hw + kPixels - 1) / kPixels, chunks = (C + kChunk - 1) / kChunk;
  // Per-channel partial sums of each (image, pixel block), each written by exactly one task.
  std::unique_ptr<double[]> s1(new double[p.batch * blocks * C]), s2(new double[p.batch * blocks * C]);
  at::parallel_for(0, p.batch * blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    float sum[kChunk], sumsq[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bb = task / chunks, c0 = task % chunks * kChunk, nc = std::min(kChunk, C - c0);
      const int64_t b = bb / blocks, p0 = bb % blocks * kPixels, np = std::min(kPixels, hw - p0);
      const float* xb = x + b * hw * C;
      std::fill(sum, sum + nc, 0.0f);
      std::fill(sumsq, sumsq + nc, 0.0f);
      // Around each channel's value at the image's first pixel, so large means don't cancel.
      channel_sums(xb + p0 * C + c0, np, nc, C, xb + c0, sum, sumsq);
      std::copy(sum, sum + nc, &s1[bb * C + c0]);
      std::copy(sumsq, sumsq + nc, &s2[bb * C + c0]);
    }
  });
  // Every image's per-channel affine, [batch, C] each, each group's channels written by exactly one task.
  std::vector<float> center(p.batch * C), scale(p.batch * C), shift(p.batch * C);
  at::parallel_for(0, p.batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cs(cg), cq(cg);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, c0 = bg % G * cg;
      for (int64_t c = 0; c < cg; ++c) {
        cs[c] = cq[c] = 0.0;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          cs[c] += s1[(b * blocks + blk) * C + c0 + c];
          cq[c] += s2[(b * blocks + blk) * C + c0 + c];
        }
      }
      const int64_t at = b * C + c0;
      channel_affine(p, group_from_channel_sums(x + b * hw * C + c0, cs.data(), cq.data(), cg, hw), c0, cg,
                     &center[at], &scale[at], &shift[at]);
    }
  });

  // Apply: one subtract and multiply-add (+ SiLU) per element, runs of pixel rows in parallel.
  at::parallel_for(0, p.batch * hw, 64, [&](int64_t begin, int64_t end) {
    for (int64_t px = begin; px < end;) {
      const int64_t b = px / hw, run = std::min(end, (b + 1) * hw) - px;  // rows of one image
      affine_act_channels(x + px * C, y + px * C, run, C, C, &center[b * C], &scale[b * C], &shift[b * C],
                          p.silu);
      px += run;
    }
  });
}

void group_norm_f32(const GroupNormParams& p) {
  TORCH_INTERNAL_ASSERT(p.affine_float32, "sdcore.group_norm: the CPU kernels read float32 weight and bias");
  if (p.channels_last) {
    group_norm_nhwc(p);
  } else {
    group_norm_nchw(p);
  }
}

at::Tensor group_norm_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps, bool silu) {
  GroupNormCall c = prepare_group_norm(x, num_groups, weight, bias, eps, silu);
  if (c.p.dtype == DType::kFloat32) {
    group_norm_f32(c.p);
    return c.y;
  }
  // Half precision on the CPU: float32 statistics and math, one rounding at the end; .to() keeps the
  // memory format, so channels_last stays channels_last.
  GroupNormCall f = prepare_group_norm(c.x.to(at::kFloat), num_groups, c.gamma, c.beta, eps, silu);
  group_norm_f32(f.p);
  c.y.copy_(f.y);
  return c.y;
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("group_norm", &sdcore::cpu::group_norm_cpu); }
