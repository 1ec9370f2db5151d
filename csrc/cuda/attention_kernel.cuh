// Flash attention kernels (forward only): o = softmax(scale * q k^T [+ causal mask]) v per (batch, head),
// streamed over blocks of keys with an online softmax so memory stays O(N*D).
//
//   flash_reg_kernel    fp16/bf16, padded head dim <= 256. FlashAttention-2 layout: each warp owns kMT
//                       16-row m-tiles of queries; S = Q K^T, the softmax and P live in registers (mma
//                       accumulator layout), P is repacked in registers as the A operand of O += P V.
//   flash_split_kernel  fp16/bf16, padded head dim 512 (VAE mid-block). The O accumulator of a 64-row block
//                       is too big for one warp, so warps split S by (rows, keys) and O by (rows, columns);
//                       row maxima, row sums and P are exchanged through shared memory.
//   flash_simt_kernel   fp32 (any head dim), and the fallback when a device lacks the shared memory of the
//                       tensor-core configs. Plain fp32 FMAs on shared-memory tiles.
//
// Tensor-core kernels: mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix from shared tiles whose row pitch
// is padded by 8 elements (16 bytes), which makes every ldmatrix phase hit 8 distinct 16-byte bank groups.
// Head dims are padded to a multiple of 16 with zeros on load; columns >= d are never stored. Keys >= m are
// zero rows in shared memory and -inf in S; query rows >= n are zero rows, computed and never stored.
// Softmax runs in the exp2 domain (scores pre-multiplied by scale * log2 e), the same formula as
// online_softmax_rescale in common/math.h.
//
// Special values, as the reference's softmax(scale * q k^T) v: a NaN score (NaN in q or k, inf * 0) gets
// weight exp2(NaN) = NaN, which reaches the row sum and every output column; a +inf score makes the running
// max +inf and its own weight exp2(inf - inf) = NaN. The row maxima use fmaxf, which skips NaN, and need not
// do more. Every row sees key 0 (causal is top-left aligned), so a row sum of 0 means every score was -inf,
// and the output is 0 * (1 / 0) = NaN there (the reference's softmax of an all -inf row): no `l > 0` guard
// in the normalization, which would also turn a NaN row sum into 0. Keys a causal row can't see are not
// read at all; the glue applies the reference's 0 * NaN-in-v rule for them (mark_unseen_nonfinite_v).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"
#include "attention_ptx.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

struct FlashArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sm;
  int64_t v_sb, v_sh, v_sm;
  int64_t o_sb, o_sh, o_sn;
  int64_t batch_heads;
  int heads, n, m, d;
  int n_qblocks;     // ceil(n / rows per block) of the launched kernel; set by the launcher
  float scale;       // natural-exp domain (SIMT kernel)
  float scale_log2;  // scale * log2(e) (tensor-core kernels)
  bool causal;
  bool vec;  // 16-byte loads/stores are legal: d % 8 == 0, q/k/v/o 16-byte aligned, all strides % 8 == 0
};

constexpr float kLog2e = 1.4426950408889634f;

// Padded head dims of the tensor-core kernels (each has its own instantiation file).
constexpr int padded_head_dim(int d) {
  return d <= 32 ? 32 : d <= 48 ? 48 : d <= 64 ? 64 : d <= 80 ? 80 : d <= 128 ? 128 : d <= 160 ? 160 : d <= 256 ? 256 : 512;
}

// Tensor-core kernel for padded head dims <= 256: kWarps x kMT m-tiles (16 rows each) per block, kBc keys
// per step. Chosen for no register spills at <= 255 registers (sm_80 and sm_90).
template <int kDp>
struct RegConfig;
template <> struct RegConfig<32>  { static constexpr int kWarps = 4, kMT = 2, kBc = 64; };
template <> struct RegConfig<48>  { static constexpr int kWarps = 4, kMT = 2, kBc = 64; };
template <> struct RegConfig<64>  { static constexpr int kWarps = 4, kMT = 2, kBc = 64; };
template <> struct RegConfig<80>  { static constexpr int kWarps = 4, kMT = 2, kBc = 32; };
template <> struct RegConfig<128> { static constexpr int kWarps = 4, kMT = 2, kBc = 32; };
template <> struct RegConfig<160> { static constexpr int kWarps = 4, kMT = 1, kBc = 64; };
template <> struct RegConfig<256> { static constexpr int kWarps = 4, kMT = 1, kBc = 32; };

constexpr size_t reg_smem_bytes(int dp, int br, int bc) { return size_t(br + 2 * bc) * size_t(dp + 8) * 2; }

// Split kernel (padded head dim 512): kBr x kBc block, 8 warps; S split kSWM (rows) x 8/kSWM (keys),
// O split kOWM (rows) x 8/kOWM (columns).
template <int kBr, int kBc>
struct SplitConfig;
template <> struct SplitConfig<64, 64> { static constexpr int kWarps = 8, kSWM = 2, kOWM = 1; };
template <> struct SplitConfig<64, 32> { static constexpr int kWarps = 8, kSWM = 4, kOWM = 1; };

constexpr size_t split_smem_bytes(int dp, int br, int bc, int s_warps_n) {
  return size_t(br + 2 * bc) * size_t(dp + 8) * 2 + size_t(br) * size_t(bc + 8) * 2 + 2 * size_t(s_warps_n) * br * 4;
}

constexpr size_t simt_smem_bytes(int br, int bc, int d) {
  return 4 * (size_t(br + bc) * size_t(d + 1) + size_t(br) * size_t(bc + 1) + 3 * size_t(br));
}

// Fills everything but n_qblocks (which depends on the kernel's block rows).
inline FlashArgs make_flash_args(const AttentionParams& p) {
  FlashArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.o;
  a.q_sb = p.q_stride_b, a.q_sh = p.q_stride_h, a.q_sn = p.q_stride_n;
  a.k_sb = p.k_stride_b, a.k_sh = p.k_stride_h, a.k_sm = p.k_stride_m;
  a.v_sb = p.v_stride_b, a.v_sh = p.v_stride_h, a.v_sm = p.v_stride_m;
  a.o_sb = p.o_stride_b, a.o_sh = p.o_stride_h, a.o_sn = p.o_stride_n;
  a.batch_heads = p.batch * p.heads;
  a.heads = static_cast<int>(p.heads);
  a.n = static_cast<int>(p.n);
  a.m = static_cast<int>(p.m);
  a.d = static_cast<int>(p.d);
  a.n_qblocks = 1;
  a.scale = p.scale;
  a.scale_log2 = p.scale * kLog2e;
  a.causal = p.causal;
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  auto strides8 = [](int64_t x, int64_t y, int64_t z) { return x % 8 == 0 && y % 8 == 0 && z % 8 == 0; };
  a.vec = p.d % 8 == 0 && aligned(p.q) && aligned(p.k) && aligned(p.v) && aligned(p.o) &&
          strides8(p.q_stride_b, p.q_stride_h, p.q_stride_n) && strides8(p.k_stride_b, p.k_stride_h, p.k_stride_m) &&
          strides8(p.v_stride_b, p.v_stride_h, p.v_stride_m) && strides8(p.o_stride_b, p.o_stride_h, p.o_stride_n);
  return a;
}

// ------------------------------------------------------------------------------------------------ device

__device__ __forceinline__ int imin(int x, int y) { return x < y ? x : y; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// online_softmax_rescale (common/math.h) in the exp2 domain: moves running_max to max(running_max,
// block_max) and returns the factor for what was accumulated so far (1 while everything is masked).
__device__ __forceinline__ float rescale_log2(float& running_max, float block_max) {
  const float new_max = fmaxf(running_max, block_max);
  const float factor = new_max == -INFINITY ? 1.0f : exp2f(running_max - new_max);
  running_max = new_max;
  return factor;
}
// The value subtracted before exp2: a fully masked row uses 0 so that exp2(-inf - 0) = 0, not NaN.
__device__ __forceinline__ float exp_base(float running_max) { return running_max == -INFINITY ? 0.0f : running_max; }

template <typename E>
struct HeadPtrs {
  const E* q;
  const E* k;
  const E* v;
  E* o;
};

template <typename E>
__device__ __forceinline__ HeadPtrs<E> head_ptrs(const FlashArgs& a, int64_t bh) {
  const int64_t b = bh / a.heads, h = bh - b * a.heads;
  HeadPtrs<E> r;
  r.q = static_cast<const E*>(a.q) + b * a.q_sb + h * a.q_sh;
  r.k = static_cast<const E*>(a.k) + b * a.k_sb + h * a.k_sh;
  r.v = static_cast<const E*>(a.v) + b * a.v_sb + h * a.v_sh;
  r.o = static_cast<E*>(a.o) + b * a.o_sb + h * a.o_sh;
  return r;
}

// Rows [row0, row0 + kRows) x columns [0, kDp) of a row-major matrix (row stride `stride`) into shared memory
// with row pitch kDp + 8. Rows >= row_limit and columns >= d are written as zeros. The vector path issues
// cp.async (the caller commits and waits); the scalar path stores synchronously.
template <int kRows, int kDp, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t stride, int row0, int row_limit,
                                          int d, bool vec, int tid) {
  constexpr int kLd = kDp + 8;
  if (vec) {
    constexpr int kChunks = kDp / 8;  // 16-byte chunks per row
    if constexpr (kThreads % kChunks == 0) {
      // Each thread copies one fixed column chunk of rows r0, r0 + kRowStep, ...: one running pointer.
      constexpr int kRowStep = kThreads / kChunks;
      const int col = (tid % kChunks) * 8, r0 = tid / kChunks;
      const bool col_ok = col < d;
      const uint16_t* src = g + (row0 + r0) * stride + col;
      const int64_t step = kRowStep * stride;
#pragma unroll
      for (int i = 0; i < (kRows + kRowStep - 1) / kRowStep; ++i) {
        const int r = r0 + i * kRowStep;
        if (kRows % kRowStep == 0 || r < kRows) {
          const bool ok = col_ok && row0 + r < row_limit;
          cp_async_16(s + r * kLd + col, ok ? src : g, ok ? 16 : 0);
        }
        src += step;
      }
    } else {
      constexpr int kTotal = kRows * kChunks;
#pragma unroll
      for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
        const int c = tid + i * kThreads;
        if (kTotal % kThreads == 0 || c < kTotal) {
          const int r = c / kChunks, col = (c % kChunks) * 8;
          const int row = row0 + r;
          const bool ok = row < row_limit && col < d;
          cp_async_16(s + r * kLd + col, ok ? g + row * stride + col : g, ok ? 16 : 0);
        }
      }
    }
  } else {
    constexpr int kTotal = kRows * kDp;
    for (int e = tid; e < kTotal; e += kThreads) {
      const int r = e / kDp, col = e % kDp;
      const int row = row0 + r;
      s[r * kLd + col] = (row < row_limit && col < d) ? g[row * stride + col] : uint16_t(0);
    }
  }
}

// The inverse for the output: shared rows (pitch kDp + 8) -> global rows [row0, row_limit), columns < d.
template <int kRows, int kDp, int kThreads>
__device__ __forceinline__ void store_tile(uint16_t* g, int64_t stride, const uint16_t* s, int row0, int row_limit,
                                           int d, bool vec, int tid) {
  constexpr int kLd = kDp + 8;
  if (vec) {
    constexpr int kChunks = kDp / 8;
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const int row = row0 + r;
      if (row < row_limit && col < d) {
        *reinterpret_cast<uint4*>(g + row * stride + col) = *reinterpret_cast<const uint4*>(s + r * kLd + col);
      }
    }
  } else {
    for (int e = tid; e < kRows * kDp; e += kThreads) {
      const int r = e / kDp, col = e % kDp;
      const int row = row0 + r;
      if (row < row_limit && col < d) g[row * stride + col] = s[r * kLd + col];
    }
  }
}

// S = Q K^T for one warp's tile, in the mma accumulator layout: kMT 16-row m-tiles from shared Q row q_row0 and
// kNT 8-key n-tiles from shared K row k_row0 (both tiles with row pitch kDp + 8), over the kDp / 16 k-steps.
// Both tensor-core kernels call it (kUnrollKS: how many k-steps each keeps in flight).
template <typename T, int kDp, int kMT, int kNT, int kUnrollKS>
__device__ __forceinline__ void qk_tile(float (&s)[kMT][kNT][4], const uint16_t* sQ, const uint16_t* sK, int q_row0,
                                        int k_row0, int lane) {
  constexpr int kLd = kDp + 8;
  static_assert(kNT % 2 == 0, "K fragments are loaded 16 keys at a time");
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.0f;
    }
  }
#pragma unroll kUnrollKS
  for (int ks = 0; ks < kDp / 16; ++ks) {
    uint32_t qa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      ldmatrix_x4(qa[mt], sQ + (q_row0 + mt * 16 + (lane & 15)) * kLd + ks * 16 + (lane >> 4) * 8);
    }
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      // matrices: (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)
      uint32_t kb[4];
      ldmatrix_x4(kb, sK + (k_row0 + np * 16 + ((lane >> 4) << 3) + (lane & 7)) * kLd + ks * 16 + (lane & 8));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(s[mt][2 * np], qa[mt], kb[0], kb[1]);
        mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
      }
    }
  }
}

// ------------------------------------------------------------------------------- register (FA2) kernel

template <typename T, int kDp, int kWarps, int kMT, int kBc>
__global__ void __launch_bounds__(kWarps * 32) flash_reg_kernel(const FlashArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBr = kWarps * kMT * 16;
  constexpr int kLd = kDp + 8;
  constexpr int kNT = kBc / 8;   // 8-key n-tiles of S
  constexpr int kDT = kDp / 8;   // 8-column n-tiles of O
  static_assert(kDp % 16 == 0 && kBc % 16 == 0, "tiles must be multiples of 16");

  uint16_t* sQ = reinterpret_cast<uint16_t*>(dyn_smem());
  uint16_t* sK = sQ + kBr * kLd;
  uint16_t* sV = sK + kBc * kLd;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tg = lane & 3;  // mma fragment: row group, thread in group
  const int64_t bid = blockIdx.x;
  // Heaviest (causal) query blocks first.
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;
  const HeadPtrs<uint16_t> ptr = head_ptrs<uint16_t>(a, bid / a.n_qblocks);
  const int N = a.n, M = a.m, D = a.d;
  const bool causal = a.causal, vec = a.vec;
  const float sl2 = a.scale_log2;
  const int kv_end = causal ? imin(M, q0 + kBr) : M;  // >= 1: key 0 is visible to every row
  const int n_kv = (kv_end + kBc - 1) / kBc;

  const int wr0 = warp * kMT * 16;                   // first row of this warp within the block
  const int w_last = q0 + wr0 + kMT * 16 - 1;        // last query row of this warp

  load_tile<kBr, kDp, kThreads>(sQ, ptr.q, a.q_sn, q0, N, D, vec, tid);
  load_tile<kBc, kDp, kThreads>(sK, ptr.k, a.k_sm, 0, M, D, vec, tid);
  cp_async_commit();

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];  // per row (g, g + 8) of each m-tile; row_sum is this thread's part
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_o[mt][dt][i] = 0.0f;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[mt][hh] = -INFINITY;
      row_sum[mt][hh] = 0.0f;
    }
  }

  for (int j = 0; j < n_kv; ++j) {
    const int kv0 = j * kBc;
    cp_async_wait_all();
    __syncthreads();  // K_j (and Q) landed for everyone; everyone is done with V_{j-1}
    load_tile<kBc, kDp, kThreads>(sV, ptr.v, a.v_sm, kv0, M, D, vec, tid);
    cp_async_commit();

    // Causal: a warp whose last row precedes this block's first key has nothing left to do.
    const bool active = !causal || kv0 <= w_last;
    float s[kMT][kNT][4];
    if (active) {
      qk_tile<T, kDp, kMT, kNT, 2>(s, sQ, sK, wr0, 0, lane);
      // Scale into the exp2 domain; -inf for keys >= M and (causal) keys after the row.
      const bool need_mask = kv0 + kBc > M || (causal && kv0 + kBc - 1 > q0 + wr0);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float x = s[mt][nt][i] * sl2;
            if (need_mask) {
              const int row = q0 + wr0 + mt * 16 + g + (i >> 1) * 8;
              const int col = kv0 + nt * 8 + tg * 2 + (i & 1);
              if (col >= M || (causal && col > row)) x = -INFINITY;
            }
            s[mt][nt][i] = x;
          }
        }
      }
      // Online softmax; a row's 4 quad lanes hold all of its columns.
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
          mx = quad_max(mx);
          const float f = rescale_log2(row_max[mt][hh], mx);
          const float base = exp_base(row_max[mt][hh]);
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = exp2f(s[mt][nt][2 * hh + e] - base);
              s[mt][nt][2 * hh + e] = p;
              sum += p;
            }
          }
          row_sum[mt][hh] = row_sum[mt][hh] * f + sum;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            acc_o[mt][dt][2 * hh] *= f;
            acc_o[mt][dt][2 * hh + 1] *= f;
          }
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j landed for everyone; everyone is done with K_j
    if (j + 1 < n_kv) {
      load_tile<kBc, kDp, kThreads>(sK, ptr.k, a.k_sm, kv0 + kBc, M, D, vec, tid);
      cp_async_commit();
    }

    if (active) {
      // O += P V. The S accumulators of n-tiles 2ks and 2ks+1 are exactly the A fragment of k-step ks.
#pragma unroll
      for (int ks = 0; ks < kBc / 16; ++ks) {
        uint32_t pa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * ks][0], s[mt][2 * ks][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * ks][2], s[mt][2 * ks][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDT / 2; ++dp) {
          // transposed matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sV + (ks * 16 + (lane & 15)) * kLd + dp * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
            mma_16816<T>(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
  }

  // Normalize, stage this warp's rows in its own (no longer read) Q rows, store with 16-byte writes.
  __syncwarp();
  uint16_t* sO = sQ + wr0 * kLd;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(row_sum[mt][hh]);
      const float inv = 1.0f / l;  // NaN-preserving: see "Special values" in the header comment
      const int r = mt * 16 + g + hh * 8;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(sO + r * kLd + dt * 8 + tg * 2) =
            pack2<T>(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
      }
    }
  }
  __syncwarp();
  store_tile<kMT * 16, kDp, 32>(ptr.o, a.o_sn, sO, q0 + wr0, N, D, vec, lane);
}

// ---------------------------------------------------------------------------------- split (D=512) kernel

template <typename T, int kDp, int kBr, int kBc, int kWarps, int kSWM, int kOWM>
__global__ void __launch_bounds__(kWarps * 32, 1) flash_split_kernel(const FlashArgs a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kLd = kDp + 8, kLdP = kBc + 8;
  constexpr int kSWN = kWarps / kSWM;  // S: warps split rows kSWM ways and keys kSWN ways
  constexpr int kMTs = kBr / 16 / kSWM;
  constexpr int kNTs = kBc / 8 / kSWN;
  constexpr int kOWN = kWarps / kOWM;  // O: warps split rows kOWM ways and columns kOWN ways
  constexpr int kMTo = kBr / 16 / kOWM;
  constexpr int kDTo = kDp / 8 / kOWN;
  static_assert(kDp % 16 == 0 && kBc % 16 == 0 && kBr % 16 == 0, "tiles must be multiples of 16");
  static_assert(kSWM * kSWN == kWarps && kMTs * 16 * kSWM == kBr && kNTs * 8 * kSWN == kBc && kNTs % 2 == 0,
                "S warp split");
  static_assert(kOWM * kOWN == kWarps && kMTo * 16 * kOWM == kBr && kDTo * 8 * kOWN == kDp && kDTo % 2 == 0,
                "O warp split");

  uint16_t* sQ = reinterpret_cast<uint16_t*>(dyn_smem());
  uint16_t* sK = sQ + kBr * kLd;
  uint16_t* sV = sK + kBc * kLd;
  uint16_t* sP = sV + kBc * kLd;                              // [kBr][kBc + 8] probabilities
  float* sMax = reinterpret_cast<float*>(sP + kBr * kLdP);    // [kSWN][kBr] partial row maxima
  float* sSum = sMax + kSWN * kBr;                            // [kSWN][kBr] partial row sums

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tg = lane & 3;
  const int64_t bid = blockIdx.x;
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;
  const HeadPtrs<uint16_t> ptr = head_ptrs<uint16_t>(a, bid / a.n_qblocks);
  const int N = a.n, M = a.m, D = a.d;
  const bool causal = a.causal, vec = a.vec;
  const float sl2 = a.scale_log2;
  const int kv_end = causal ? imin(M, q0 + kBr) : M;
  const int n_kv = (kv_end + kBc - 1) / kBc;

  const int sr0 = (warp % kSWM) * kMTs * 16, swn = warp / kSWM, sc0 = swn * kNTs * 8;
  const int or0 = (warp % kOWM) * kMTo * 16, oc0 = (warp / kOWM) * kDTo * 8;

  load_tile<kBr, kDp, kThreads>(sQ, ptr.q, a.q_sn, q0, N, D, vec, tid);
  load_tile<kBc, kDp, kThreads>(sK, ptr.k, a.k_sm, 0, M, D, vec, tid);
  cp_async_commit();

  // Every thread tracks the running max of the rows it touches in each phase; all copies of a row's max
  // see the same block maxima, so they agree bit for bit.
  float m_s[kMTs][2];
  float acc_o[kMTo][kDTo][4], m_o[kMTo][2], l_o[kMTo][2];
#pragma unroll
  for (int mt = 0; mt < kMTs; ++mt) m_s[mt][0] = m_s[mt][1] = -INFINITY;
#pragma unroll
  for (int mt = 0; mt < kMTo; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDTo; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_o[mt][dt][i] = 0.0f;
    }
    m_o[mt][0] = m_o[mt][1] = -INFINITY;
    l_o[mt][0] = l_o[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_kv; ++j) {
    const int kv0 = j * kBc;
    cp_async_wait_all();
    __syncthreads();  // (A) K_j landed; everyone is done with V_{j-1}, P_{j-1} and the partials of j-1
    load_tile<kBc, kDp, kThreads>(sV, ptr.v, a.v_sm, kv0, M, D, vec, tid);
    cp_async_commit();

    // S tile of this warp: rows sr0 + [0, 16 kMTs), keys sc0 + [0, 8 kNTs).
    float s[kMTs][kNTs][4];
    qk_tile<T, kDp, kMTs, kNTs, 4>(s, sQ, sK, sr0, sc0, lane);
    const bool need_mask = kv0 + kBc > M || (causal && kv0 + kBc - 1 > q0);
#pragma unroll
    for (int mt = 0; mt < kMTs; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = sr0 + mt * 16 + g + hh * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTs; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[mt][nt][2 * hh + e] * sl2;
            if (need_mask) {
              const int col = kv0 + sc0 + nt * 8 + tg * 2 + e;
              if (col >= M || (causal && col > q0 + r)) x = -INFINITY;
            }
            s[mt][nt][2 * hh + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = quad_max(mx);
        if (tg == 0) sMax[swn * kBr + r] = mx;
      }
    }
    __syncthreads();  // (B) partial maxima visible

    // P = exp2(S - new max) -> shared (as T), partial row sums -> shared.
#pragma unroll
    for (int mt = 0; mt < kMTs; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = sr0 + mt * 16 + g + hh * 8;
        float bm = -INFINITY;
#pragma unroll
        for (int p = 0; p < kSWN; ++p) bm = fmaxf(bm, sMax[p * kBr + r]);
        rescale_log2(m_s[mt][hh], bm);
        const float base = exp_base(m_s[mt][hh]);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTs; ++nt) {
          const float p0 = exp2f(s[mt][nt][2 * hh] - base);
          const float p1 = exp2f(s[mt][nt][2 * hh + 1] - base);
          sum += p0 + p1;
          *reinterpret_cast<uint32_t*>(sP + r * kLdP + sc0 + nt * 8 + tg * 2) = pack2<T>(p0, p1);
        }
        sum = quad_sum(sum);
        if (tg == 0) sSum[swn * kBr + r] = sum;
      }
    }
    cp_async_wait_all();
    __syncthreads();  // (C) V_j, P and partial sums visible; everyone is done with K_j and Q
    if (j + 1 < n_kv) {
      load_tile<kBc, kDp, kThreads>(sK, ptr.k, a.k_sm, kv0 + kBc, M, D, vec, tid);
      cp_async_commit();
    }

    // O tile of this warp: rows or0 + [0, 16 kMTo), columns oc0 + [0, 8 kDTo).
#pragma unroll
    for (int mt = 0; mt < kMTo; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = or0 + mt * 16 + g + hh * 8;
        float bm = -INFINITY, ps = 0.0f;
#pragma unroll
        for (int p = 0; p < kSWN; ++p) {
          bm = fmaxf(bm, sMax[p * kBr + r]);
          ps += sSum[p * kBr + r];
        }
        const float f = rescale_log2(m_o[mt][hh], bm);
        l_o[mt][hh] = l_o[mt][hh] * f + ps;
#pragma unroll
        for (int dt = 0; dt < kDTo; ++dt) {
          acc_o[mt][dt][2 * hh] *= f;
          acc_o[mt][dt][2 * hh + 1] *= f;
        }
      }
    }
#pragma unroll
    for (int ks = 0; ks < kBc / 16; ++ks) {
      uint32_t pa[kMTo][4];
#pragma unroll
      for (int mt = 0; mt < kMTo; ++mt) {
        ldmatrix_x4(pa[mt], sP + (or0 + mt * 16 + (lane & 15)) * kLdP + ks * 16 + (lane >> 4) * 8);
      }
#pragma unroll
      for (int dp = 0; dp < kDTo / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + (ks * 16 + (lane & 15)) * kLd + oc0 + dp * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < kMTo; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Q is no longer read (the last S phase ended before barrier (C)): stage O there, then store.
#pragma unroll
  for (int mt = 0; mt < kMTo; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float inv = 1.0f / l_o[mt][hh];  // NaN-preserving: see "Special values" in the header comment
      const int r = or0 + mt * 16 + g + hh * 8;
#pragma unroll
      for (int dt = 0; dt < kDTo; ++dt) {
        *reinterpret_cast<uint32_t*>(sQ + r * kLd + oc0 + dt * 8 + tg * 2) =
            pack2<T>(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
      }
    }
  }
  __syncthreads();
  store_tile<kBr, kDp, kThreads>(ptr.o, a.o_sn, sQ, q0, N, D, vec, tid);
}

// ------------------------------------------------------------------------------------------ SIMT kernel

// kBr query rows x kBc keys per step, fp32 tiles in shared memory with pitch d + 1. Each thread owns a fixed
// set of output elements (kPer registers cover d up to kMaxHeadDim).
template <typename T, int kBr, int kBc, int kThreads>
__global__ void __launch_bounds__(kThreads) flash_simt_kernel(const FlashArgs a) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kPer = (kBr * static_cast<int>(kMaxHeadDim) + kThreads - 1) / kThreads;
  constexpr int kLdS = kBc + 1;
  static_assert(kBc <= 32, "one key per lane in the softmax");

  const int N = a.n, M = a.m, D = a.d, ld = D + 1;
  float* sQ = reinterpret_cast<float*>(dyn_smem());
  float* sKV = sQ + kBr * ld;   // K, then V, of the current key block
  float* sS = sKV + kBc * ld;   // [kBr][kBc + 1] scores, then probabilities
  float* sM = sS + kBr * kLdS;  // running row max (natural-exp domain)
  float* sL = sM + kBr;         // running row sum
  float* sF = sL + kBr;         // this step's rescale factor

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bid = blockIdx.x;
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;
  const HeadPtrs<T> ptr = head_ptrs<T>(a, bid / a.n_qblocks);
  const bool causal = a.causal;
  const float scale = a.scale;
  const int kv_end = causal ? imin(M, q0 + kBr) : M;

  for (int r = warp; r < kBr; r += kWarps) {
    const int row = q0 + r;
    for (int c = lane; c < D; c += 32) sQ[r * ld + c] = row < N ? to_float(ptr.q[row * a.q_sn + c]) : 0.0f;
  }
  if (tid < kBr) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.0f;
  }
  float acc[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) acc[k] = 0.0f;

  for (int kv0 = 0; kv0 < kv_end; kv0 += kBc) {
    __syncthreads();  // everyone is done with the previous V and probabilities
    for (int r = warp; r < kBc; r += kWarps) {
      const int key = kv0 + r;
      for (int c = lane; c < D; c += 32) sKV[r * ld + c] = key < M ? to_float(ptr.k[key * a.k_sm + c]) : 0.0f;
    }
    __syncthreads();
    for (int e = tid; e < kBr * kBc; e += kThreads) {
      const int r = e / kBc, c = e % kBc;
      const float* qr = sQ + r * ld;
      const float* kr = sKV + c * ld;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
      const int key = kv0 + c;
      sS[r * kLdS + c] = (key < M && (!causal || key <= q0 + r)) ? dot * scale : -INFINITY;
    }
    __syncthreads();
    for (int r = warp; r < kBr; r += kWarps) {
      const float x = lane < kBc ? sS[r * kLdS + lane] : -INFINITY;
      float mx = x;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float m = sM[r], l = sL[r];
      const float f = online_softmax_rescale(m, l, mx);
      const float p = x == -INFINITY ? 0.0f : expf(x - m);
      if (lane < kBc) sS[r * kLdS + lane] = p;
      float sum = p;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        sM[r] = m;
        sL[r] = l + sum;
        sF[r] = f;
      }
    }
    // K is no longer read (the score loop ended before the last barrier): load V over it.
    for (int r = warp; r < kBc; r += kWarps) {
      const int key = kv0 + r;
      for (int c = lane; c < D; c += 32) sKV[r * ld + c] = key < M ? to_float(ptr.v[key * a.v_sm + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int e = tid + k * kThreads;
      if (e < kBr * D) {
        const int r = e / D, c = e - r * D;
        const float* pr = sS + r * kLdS;
        float o = acc[k] * sF[r];
#pragma unroll 8
        for (int cc = 0; cc < kBc; ++cc) o = fmaf(pr[cc], sKV[cc * ld + c], o);
        acc[k] = o;
      }
    }
  }
  // sL was last written before the final barrier of the loop.
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int e = tid + k * kThreads;
    if (e < kBr * D) {
      const int r = e / D, c = e - r * D;
      const int row = q0 + r;
      if (row < N) {
        const float l = sL[r];
        ptr.o[row * a.o_sn + c] = from_float<T>(acc[k] / l);  // see "Special values" in the header comment
      }
    }
  }
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
