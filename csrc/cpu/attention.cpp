// Flash attention on the CPU: per (batch, head, block of query rows), stream over blocks of keys with an
// online softmax, so memory stays O(N*D) (the N x M score matrix never exists). The two block products
// run on the BLAS that torch links (MKL / OpenBLAS) through at::native::cpublas; the softmax runs on the
// vectorized leaf loops of vec.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "../common/math.h"
#include "blas.h"
#include "vec.h"

namespace sdcore {
namespace cpu {
namespace {

// Query rows per task and keys per block. More rows make each block product a bigger GEMM and reuse each
// K/V block longer; fewer keys keep the VAE's 512-wide K/V blocks in L2. Swept on a 2-core AVX-512 (Zen 4) VM
// against SDPA, interleaved in one process: 256 rows x 512 keys for D <= 160 (64 rows, the old choice, was
// 4-10% slower, 12% on 77-key cross-attention), 512 x 256 for D = 512 (128 x 512 was 7% slower). Causal rows
// stay at 64: a block computes every key up to its last row's, and the masked triangle grows with the block
// (CLIP's 77 causal tokens ran 5% slower in one 256-row block). Rows shrink (to a multiple of 16) when the
// full blocks would leave a thread without a task.
struct Blocks {
  int64_t rows, keys;
};
Blocks blocks(int64_t d, int64_t n, int64_t batch_heads, bool causal) {
  const bool wide = d >= 256;
  const int64_t rows = causal ? 64 : wide ? 512 : 256, keys = wide ? 256 : 512;
  const int64_t threads = at::get_num_threads();
  if (batch_heads * ((n + rows - 1) / rows) >= threads) return {rows, keys};
  const int64_t per_head = (threads + batch_heads - 1) / batch_heads;  // tasks each head needs
  return {std::max<int64_t>(16, ((n + per_head - 1) / per_head + 15) / 16 * 16), keys};
}

void attention_f32(const AttentionParams& p) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t D = p.d, N = p.n, M = p.m;
  // BLAS leading dimensions (see blas_rows): a single row's stride is never used, so D stands in for it.
  const int64_t ldq = N == 1 ? D : p.q_stride_n, ldk = M == 1 ? D : p.k_stride_m, ldv = M == 1 ? D : p.v_stride_m;
  // BLAS skips the product when alpha == 0 (C = beta * C), which would turn 0 * inf and 0 * NaN scores into 0;
  // the reference's scale * (q @ k^T) makes them NaN. So scale 0 multiplies the scores afterwards.
  const float alpha = p.scale != 0.0f ? p.scale : 1.0f;
  const Blocks blk = blocks(D, N, p.batch * p.heads, p.causal);
  const int64_t kBlockN = blk.rows, kBlockM = blk.keys;
  const int64_t n_blocks = (N + kBlockN - 1) / kBlockN;
  const int64_t tasks = p.batch * p.heads * n_blocks;

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kBlockN * kBlockM);
    std::vector<float> acc(kBlockN * D);
    std::vector<float> row_max(kBlockN), row_sum(kBlockN), factor(kBlockN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task % n_blocks;
      const int64_t bh = task / n_blocks;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t n0 = nb * kBlockN;
      const int64_t rows = std::min(kBlockN, N - n0);
      const float* qb = q + b * p.q_stride_b + h * p.q_stride_h + n0 * p.q_stride_n;
      const float* kh = k + b * p.k_stride_b + h * p.k_stride_h;
      const float* vh = v + b * p.v_stride_b + h * p.v_stride_h;

      std::fill(acc.begin(), acc.begin() + rows * D, 0.0f);
      std::fill(row_max.begin(), row_max.end(), -INFINITY);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      // Causal: the last row of this block sees keys up to n0 + rows - 1.
      const int64_t m_end = p.causal ? std::min(M, n0 + rows) : M;

      for (int64_t m0 = 0; m0 < m_end; m0 += kBlockM) {
        const int64_t cols = std::min(kBlockM, m_end - m0);
        // scores[r, j] = scale * q[n0+r] . k[m0+j]   (row-major rows x cols; BLAS is column-major, so this
        // is scores^T = K_blk * Q_blk^T)
        sgemm(true, false, cols, rows, D, alpha, kh + m0 * p.k_stride_m, ldk, qb, ldq, 0.0f, scores.data(), cols);
        if (p.scale == 0.0f) scale_row(scores.data(), rows * cols, 0.0f);
        bool rescale = false;
        for (int64_t r = 0; r < rows; ++r) {
          float* s = scores.data() + r * cols;
          // Keys a causal row may not see are dropped from its softmax (their weight is exactly 0).
          const int64_t visible = p.causal ? std::clamp<int64_t>(n0 + r - m0 + 1, 0, cols) : cols;
          float f = 1.0f;
          if (visible > 0) {
            f = online_softmax_rescale(row_max[r], row_sum[r], cpu::row_max(s, visible));
            // While every score so far is -inf, subtract 0 (exp(-inf - -inf) would be NaN): the weights stay 0
            // and a later finite score takes over. NaN scores need no special care: row_max skips them, but
            // their weight exp(NaN) = NaN reaches row_sum and acc, so the row comes out NaN as in the reference.
            row_sum[r] += exp_sub_sum(s, visible, row_max[r] == -INFINITY ? 0.0f : row_max[r]);
          }
          std::fill(s + visible, s + cols, 0.0f);
          factor[r] = f;
          rescale |= f != 1.0f;
        }
        if (rescale) {
          for (int64_t r = 0; r < rows; ++r) {
            if (factor[r] != 1.0f) scale_row(acc.data() + r * D, D, factor[r]);
          }
        }
        // acc += P * V_blk   (acc^T = V_blk^T * P^T in column-major terms)
        sgemm(false, false, D, rows, cols, 1.0f, vh + m0 * p.v_stride_m, ldv, scores.data(), cols, 1.0f, acc.data(), D);
      }
      float* ob = o + b * p.o_stride_b + h * p.o_stride_h + n0 * p.o_stride_n;
      for (int64_t r = 0; r < rows; ++r) {
        // Every row sees key 0, so row_sum is 0 only when all its scores were -inf: 0 * (1 / 0) = NaN, as the
        // reference's softmax of an all -inf row. A NaN row_sum keeps the row NaN.
        const float inv = 1.0f / row_sum[r];
        const float* a = acc.data() + r * D;
        float* dst = ob + r * p.o_stride_n;
        for (int64_t d = 0; d < D; ++d) dst[d] = a[d] * inv;
      }
    }
  });
}

// BLAS reads each block of q, k and v rows as a matrix whose leading dimension is the row stride, and
// requires it to be >= D: MKL rejects the call otherwise (printing "Parameter 8 was incorrect") and leaves
// the scores unwritten. Rows that overlap (stride 0 from expand(), as_strided views) fail that; a single row
// is fine whatever its stride (attention_f32 passes D for it).
bool blas_rows(const at::Tensor& t) { return t.size(2) == 1 || t.stride(2) >= t.size(3); }

// float32 rows BLAS can read: no copy for float32 input that already qualifies.
at::Tensor blas_operand(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  return blas_rows(f) ? f : f.contiguous();
}

// Whether every element of v is finite, from the float32 v the kernel read (one pass, no allocation).
bool values_finite(const AttentionParams& p) {
  const float* v = static_cast<const float*>(p.v);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      if (!all_finite(v + b * p.v_stride_b + h * p.v_stride_h, p.m, p.d, p.v_stride_m)) return false;
    }
  }
  return true;
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                         std::optional<double> scale) {
  AttentionCall c = prepare_attention(q, k, v, causal, scale);
  bool finite_v;
  if (c.p.dtype == DType::kFloat32 && blas_rows(c.q) && blas_rows(c.k) && blas_rows(c.v)) {
    attention_f32(c.p);
    finite_v = !causal || values_finite(c.p);
  } else {
    // Half precision, or rows BLAS can't read: compute on float32 copies (float32 is the accumulation
    // precision anyway), round once.
    AttentionCall f = prepare_attention(blas_operand(c.q), blas_operand(c.k), blas_operand(c.v), causal, scale);
    attention_f32(f.p);
    c.out.copy_(f.out);
    finite_v = !causal || values_finite(f.p);
  }
  // The usual causal call (finite v) skips the ATen ops of mark_unseen_nonfinite_v.
  if (!finite_v) mark_unseen_nonfinite_v(c);
  return c.out;
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("attention", &sdcore::cpu::attention_cpu); }
