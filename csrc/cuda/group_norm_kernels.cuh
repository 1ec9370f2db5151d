// Group norm (+ optional fused SiLU) for NCHW and channels_last inputs.
//
// A group (b, g) is the cpg = C/G channels g*cpg .. g*cpg+cpg-1 of batch item b over all hw pixels:
// N = cpg*hw elements. Its "logical" element e is, in memory (relative to the group's first element):
//   NCHW:          e                                  (the group is one contiguous run)
//   channels_last: (e / cpg) * C + e % cpg            (hw rows of cpg contiguous channels, stride C)
// and belongs to channel g*cpg + e / hw (NCHW) or g*cpg + e % cpg (channels_last).
//
// Numerics: elements are summed in fp32 around a shift taken from the data (so the sums stay well
// conditioned when |mean| >> std), partial states are merged as Welford<double> (Chan), and the mean is kept
// in double: y = (x - mean_hi) * scale + (beta - mean_lo * scale) with mean_hi = float(mean),
// mean_lo = float(mean - mean_hi), scale = gamma * rstd. With a float mean (or a float x*scale + shift) the
// rounding of a mean of 1e4 alone is ~5e-4 absolute, far above the float32 tolerance.
//
// Two paths:
//  * Fused (one launch, x read once): each group is split into K chunks (K = 1, or a thread block cluster
//    of K <= 8 blocks on sm_90) that fit in shared memory. A block copies its chunk into shared memory,
//    takes the chunk's mean and M2 in two exact passes over it, the cluster merges the K chunk states through
//    distributed shared memory, and the block writes y from shared memory.
//  * Split (groups too large for the fused path): a stats kernel writes one partial state per chunk
//    (NCHW: a contiguous slice of the group; channels_last: a tile of pixels x all C channels, read
//    contiguously), a finalize kernel merges each group's partials and writes per-(b, c) coefficients, and
//    an apply kernel writes y (+ SiLU). Both walk the tensor so that the apply pass starts where the stats
//    pass ended (its first reads hit L2). The caller passes the workspace (group_norm_workspace_bytes; the
//    torch glue takes it from PyTorch's caching allocator): no allocation or sync here, so graph capture works.
// All paths use 16-byte (or the widest aligned) vector accesses where the shape and pointers allow.
//
// This header holds the device side: the kernels, their argument structs and the tile constants they are
// built for. group_norm.cu (its only includer) holds the host side: which path, its geometry, the launches.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../common/math.h"
#include "../common/params.h"
#include "device_utils.cuh"

namespace sdcore {
namespace cuda {
namespace {

using dev::block_sum;
using dev::load_raw;
using dev::load_vec;
using dev::Raw;
using dev::raw_to_floats;
using dev::silu_fast;
using dev::store_raw;
using dev::store_vec;
using dev::to_float;

constexpr int kUnroll = 4;                         // vectors in flight per thread in the streaming loops
constexpr int kFusedMaxThreads = 512;              // with <= 64 registers: at least two fused blocks per SM
constexpr int64_t kFusedMaxBytes = 96 * 1024;      // data staged in shared memory per fused block
constexpr int64_t kFusedMinChunkBytes = 8 * 1024;  // don't split a group into chunks smaller than this
constexpr int kMaxCluster = 8;                     // portable cluster size
constexpr int kSplitThreads = 256;                 // split-path kernels (a power of two)
constexpr int64_t kStatsTileBytes = 64 * 1024;     // channels_last stats tile (pixels x all channels)
constexpr int64_t kApplyTileBytes = 32 * 1024;     // channels_last apply tile
constexpr int64_t kTileMaxSmem = 48 * 1024;

// Offset of group-logical element e from the group's first element (see the header comment).
template <bool CL>
__device__ __forceinline__ int64_t group_offset(int e, int cpg, int64_t C) {
  if constexpr (CL) {
    const int r = e / cpg;
    return static_cast<int64_t>(r) * C + (e - r * cpg);
  } else {
    return static_cast<int64_t>(e);
  }
}

__device__ __forceinline__ float finish(float v, bool silu) { return silu ? silu_fast(v) : v; }

// Chan merge (Welford::merge, common/math.h) on scalars, so merge loops keep their state in registers.
__device__ __forceinline__ void chan_merge(double& mean, double& m2, double& n, double om, double om2, double on) {
  Welford<double> w, o;
  w.mean = mean;
  w.m2 = m2;
  w.count = n;
  o.mean = om;
  o.m2 = om2;
  o.count = on;
  w.merge(o);
  mean = w.mean;
  m2 = w.m2;
  n = w.count;
}

// mean -> (mean_hi, mean_lo), var -> rstd. See the header comment.
__device__ __forceinline__ void group_coefs(double mean, double var, float eps, float& mhi, float& mlo,
                                            float& rstd) {
  mhi = static_cast<float>(mean);
  mlo = static_cast<float>(mean - static_cast<double>(mhi));
  rstd = static_cast<float>(rsqrt(var + static_cast<double>(eps)));
}

// Channel c's weight or bias (see GroupNormParams), `absent` when there is none. The branch on the dtype is
// uniform across the grid; each block reads a group's cpg values once.
template <typename T>
__device__ __forceinline__ float affine_value(const void* p, int64_t c, bool f32, float absent) {
  if (p == nullptr) return absent;
  return f32 ? static_cast<const float*>(p)[c] : to_float(static_cast<const T*>(p)[c]);
}

// Partial statistics of one chunk of a group.
struct Partial {
  double mean, m2, count;
};

// ---------------------------------------------------------------------------------------------------------
// Fused path.
template <typename T>
struct FusedArgs {
  const T* x;
  T* y;
  const void* gamma;  // [C] or null, float32 or T (see GroupNormParams)
  const void* beta;   // [C] or null
  bool affine_f32;
  int64_t C;
  int HW;
  int G;
  int cpg;
  int N;           // elements per group, cpg * HW
  int chunk;       // elements per block, a multiple of VEC; the group's last block may get fewer (or none)
  int K;           // blocks per group (the cluster size when > 1)
  int data_bytes;  // shared-memory offset of the scale/shift arrays: chunk * sizeof(T) rounded up to 16
  int cpg_pad;     // cpg rounded up to 4 (keeps the shift array 16-byte aligned)
  float eps;
  bool silu;
};

template <typename T, int VEC, bool CL, bool CLUSTER>
__global__ void __launch_bounds__(kFusedMaxThreads, 2) gn_fused_kernel(const FusedArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[32];
  T* sx = reinterpret_cast<T*>(smem);
  float* s_scale = reinterpret_cast<float*>(smem + a.data_bytes);
  float* s_shift = s_scale + a.cpg_pad;

  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int grp = static_cast<int>(blockIdx.x) / a.K;  // b * G + g (grid < 2^31)
  const int rank = static_cast<int>(blockIdx.x) - grp * a.K;
  const int b = grp / a.G;
  const int g = grp - b * a.G;
  const int e0 = rank * a.chunk;
  const int n_loc = max(0, min(a.N - e0, a.chunk));
  const int nv = n_loc / VEC;  // N and chunk are multiples of VEC
  const int64_t base = CL ? static_cast<int64_t>(b) * a.HW * a.C + static_cast<int64_t>(g) * a.cpg
                          : static_cast<int64_t>(grp) * a.N;
  const T* __restrict__ gx = a.x + base;
  T* __restrict__ gy = a.y + base;

  // 1. Global -> shared, kUnroll independent loads in flight per thread.
  for (int v0 = tid; v0 < nv; v0 += kUnroll * nthr) {
    Raw<T, VEC> r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < nv) r[u] = load_raw<T, VEC>(gx + group_offset<CL>(e0 + v * VEC, a.cpg, a.C));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < nv) store_raw<T, VEC>(sx + v * VEC, r[u]);
    }
  }
  __syncthreads();

  // 2. The chunk's mean and M2: two passes over shared memory, around the chunk's first element.
  const float shift = n_loc > 0 ? to_float(sx[0]) : 0.0f;
  float sum = 0.0f;
  for (int v = tid; v < nv; v += nthr) {
    float f[VEC];
    load_vec<T, VEC>(sx + v * VEC, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += f[j] - shift;
  }
  sum = block_sum(sum, red);
  const float dm = n_loc > 0 ? sum / static_cast<float>(n_loc) : 0.0f;  // chunk mean = shift + dm
  float m2 = 0.0f;
  for (int v = tid; v < nv; v += nthr) {
    float f[VEC];
    load_vec<T, VEC>(sx + v * VEC, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = (f[j] - shift) - dm;
      m2 = fmaf(d, d, m2);
    }
  }
  m2 = block_sum(m2, red);

  double mean = static_cast<double>(shift) + static_cast<double>(dm);
  double var = n_loc > 0 ? static_cast<double>(m2 / static_cast<float>(n_loc)) : 0.0;
  if constexpr (CLUSTER) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Merge the K chunk states of the group in rank order (every block gets the same result).
    __shared__ double part[3];
    __shared__ double stat[2];
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    if (tid == 0) {
      part[0] = mean;
      part[1] = static_cast<double>(m2);
      part[2] = static_cast<double>(n_loc);
    }
    cluster.sync();
    if (tid == 0) {
      double wm = 0.0, wm2 = 0.0, wn = 0.0;
#pragma unroll
      for (int r = 0; r < kMaxCluster; ++r) {
        if (r < a.K) {
          const double* q = cluster.map_shared_rank(part, static_cast<unsigned>(r));
          chan_merge(wm, wm2, wn, q[0], q[1], q[2]);
        }
      }
      stat[0] = wm;
      stat[1] = wn > 0.0 ? wm2 / wn : 0.0;
    }
    cluster.sync();  // also keeps every block's `part` alive until all ranks have read it
    mean = stat[0];
    var = stat[1];
#elif defined(__CUDA_ARCH__)
    __trap();  // no cluster merge in this code: the host never launches it (cluster_merge_available)
#endif
  }

  // 3. Per-channel scale/shift of this group, then y from shared memory.
  float mhi, mlo, rstd;
  group_coefs(mean, var, a.eps, mhi, mlo, rstd);
  for (int i = tid; i < a.cpg; i += nthr) {
    const int64_t c = static_cast<int64_t>(g) * a.cpg + i;
    const float ga = affine_value<T>(a.gamma, c, a.affine_f32, 1.0f);
    const float be = affine_value<T>(a.beta, c, a.affine_f32, 0.0f);
    const float sc = ga * rstd;
    s_scale[i] = sc;
    s_shift[i] = group_norm_shift(be, mlo, sc);
  }
  __syncthreads();

  for (int v = tid; v < nv; v += nthr) {
    const int e = e0 + v * VEC;
    float f[VEC], sc[VEC], sh[VEC];
    load_vec<T, VEC>(sx + v * VEC, f);
    if constexpr (CL) {
      // VEC divides cpg, so the vector lies in one pixel row: channels ch0 .. ch0+VEC-1, ch0 % VEC == 0.
      const int ch0 = e % a.cpg;
      load_vec<float, VEC>(s_scale + ch0, sc);
      load_vec<float, VEC>(s_shift + ch0, sh);
    } else {
      int ch = e / a.HW;
      int col = e - ch * a.HW;
      if (col + VEC <= a.HW) {
        const float s0 = s_scale[ch], h0 = s_shift[ch];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sc[j] = s0;
          sh[j] = h0;
        }
      } else {  // the vector crosses into the next channel(s) (hw % VEC != 0 or hw < VEC)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sc[j] = s_scale[ch];
          sh[j] = s_shift[ch];
          if (++col == a.HW) {
            col = 0;
            ++ch;
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = finish(fmaf(f[j] - mhi, sc[j], sh[j]), a.silu);
    store_vec<T, VEC>(gy + group_offset<CL>(e, a.cpg, a.C), f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Split path, stats: one partial per (group, slice) of group-logical elements. Used for NCHW (slices are
// contiguous) and as the channels_last fallback for very wide C (slices of R whole rows, strided).
template <typename T>
struct RowsArgs {
  const T* x;
  Partial* part;  // [B*G][KT]
  int64_t C, HW, N;
  int64_t L;  // elements per slice, a multiple of VEC (< 2^30); channels_last: R whole rows, L = R * cpg
  int64_t R;
  int G, cpg, KT;
};

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSplitThreads) gn_stats_rows_kernel(const RowsArgs<T> a) {
  __shared__ float red[32];
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int blk = static_cast<int>(blockIdx.x);  // grid = B*G*KT < 2^31
  const int grp = blk / a.KT;
  const int k = blk - grp * a.KT;
  const int b = grp / a.G;
  const int g = grp - b * a.G;
  const int64_t base = CL ? static_cast<int64_t>(b) * a.HW * a.C + static_cast<int64_t>(g) * a.cpg
                          : static_cast<int64_t>(grp) * a.N;
  const int64_t e0 = static_cast<int64_t>(k) * a.L;
  const int n = static_cast<int>(min(a.L, a.N - e0));
  const int nv = n / VEC;
  // channels_last: the slice starts at row k*R; its element t is at row t / cpg, column t % cpg.
  const T* __restrict__ sx = a.x + base + (CL ? static_cast<int64_t>(k) * a.R * a.C : e0);

  // Sums around the slice's first element (one shift for every thread, so the sums just add up).
  const float shift = to_float(sx[0]);
  float s = 0.0f, q = 0.0f;
  for (int v0 = tid; v0 < nv; v0 += kUnroll * nthr) {
    float f[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthr;
      if (v < nv) {
        load_vec<T, VEC>(sx + group_offset<CL>(v * VEC, a.cpg, a.C), f[u]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[u][j] = shift;  // contributes 0
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = f[u][j] - shift;
        s += d;
        q = fmaf(d, d, q);
      }
    }
  }
  s = block_sum(s, red);
  q = block_sum(q, red);
  if (tid == 0) {
    const Welford<double> w = welford_from_shifted_sums<double>(shift, s, q, static_cast<double>(n));
    a.part[blk] = Partial{w.mean, w.m2, w.count};
  }
}

// Split path, channels_last stats: block b*KT + tile reads P pixels x all C channels (contiguous memory)
// and writes one partial per (group, tile). Threads own a VEC-channel column and stride over the rows,
// summing around a per-group shift (the tile's first pixel, the group's first channel), so the sums of a
// group's channels and row lanes just add up.
template <typename T>
struct StatsTileArgs {
  const T* x;
  Partial* part;  // [B*G][KT]
  int64_t HW;
  int C, G, cpg;
  int P;      // pixels per tile
  int KT;     // tiles per batch item
  int ncols;  // C / VEC
  int rpar;   // row lanes: max(1, blockDim / ncols)
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kSplitThreads) gn_stats_cl_tile_kernel(const StatsTileArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* S = reinterpret_cast<float*>(smem);  // [rpar][C]
  float* Q = S + a.rpar * a.C;                // [rpar][C]
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int b = static_cast<int>(blockIdx.x) / a.KT;  // grid = B*KT < 2^31
  const int tile = static_cast<int>(blockIdx.x) - b * a.KT;
  const int64_t p0 = static_cast<int64_t>(tile) * a.P;
  const int np = static_cast<int>(min(static_cast<int64_t>(a.P), a.HW - p0));  // >= 1
  const int jobs = a.ncols * a.rpar;
  const T* __restrict__ tb = a.x + (static_cast<int64_t>(b) * a.HW + p0) * a.C;

  for (int job = tid; job < jobs; job += nthr) {
    const int col = job % a.ncols;
    const int r = job / a.ncols;
    const int c0 = col * VEC;
    float k[VEC], s[VEC], q[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      k[j] = to_float(tb[((c0 + j) / a.cpg) * a.cpg]);  // the shift of channel c0+j's group
      s[j] = 0.0f;
      q[j] = 0.0f;
    }
    for (int p = r; p < np; p += kUnroll * a.rpar) {
      float f[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int pp = p + u * a.rpar;
        if (pp < np) {
          load_vec<T, VEC>(tb + static_cast<int64_t>(pp) * a.C + c0, f[u]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) f[u][j] = k[j];  // contributes 0
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = f[u][j] - k[j];
          s[j] += d;
          q[j] = fmaf(d, d, q[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      S[r * a.C + c0 + j] = s[j];
      Q[r * a.C + c0 + j] = q[j];
    }
  }
  __syncthreads();
  for (int g = tid; g < a.G; g += nthr) {
    double ss = 0.0, qq = 0.0;  // up to cpg * rpar terms: add them in double
    for (int r = 0; r < a.rpar; ++r) {
      for (int i = 0; i < a.cpg; ++i) {
        ss += S[r * a.C + g * a.cpg + i];
        qq += Q[r * a.C + g * a.cpg + i];
      }
    }
    const float shift = to_float(tb[g * a.cpg]);
    const Welford<double> w =
        welford_from_shifted_sums<double>(shift, ss, qq, static_cast<double>(np) * static_cast<double>(a.cpg));
    a.part[(static_cast<int64_t>(b) * a.G + g) * a.KT + tile] = Partial{w.mean, w.m2, w.count};
  }
}

// Split path, finalize: block per group merges its KT partials (a fixed order: strided per thread, then a
// tree) and writes the group's per-channel coefficients: y = (x - mhi) * scale + shift.
struct FinalizeArgs {
  const Partial* part;
  float* mhi;    // [B*C]
  float* scale;  // [B*C]
  float* shift;  // [B*C]
  const void* gamma;  // [C] or null, float32 or T (see GroupNormParams)
  const void* beta;
  bool affine_f32;
  int64_t C;
  int G, cpg, KT;
  float eps;
};

template <typename T>
__global__ void __launch_bounds__(kSplitThreads) gn_finalize_kernel(const FinalizeArgs a) {
  __shared__ double s_mean[kSplitThreads], s_m2[kSplitThreads], s_cnt[kSplitThreads];
  const int tid = threadIdx.x;
  const int grp = static_cast<int>(blockIdx.x);
  double wm = 0.0, wm2 = 0.0, wn = 0.0;
  for (int k = tid; k < a.KT; k += kSplitThreads) {
    const Partial p = a.part[static_cast<int64_t>(grp) * a.KT + k];
    chan_merge(wm, wm2, wn, p.mean, p.m2, p.count);
  }
  s_mean[tid] = wm;
  s_m2[tid] = wm2;
  s_cnt[tid] = wn;
  __syncthreads();
  for (int s = kSplitThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      double m = s_mean[tid], m2 = s_m2[tid], n = s_cnt[tid];
      chan_merge(m, m2, n, s_mean[tid + s], s_m2[tid + s], s_cnt[tid + s]);
      s_mean[tid] = m;
      s_m2[tid] = m2;
      s_cnt[tid] = n;
    }
    __syncthreads();
  }
  const double var = s_cnt[0] > 0.0 ? s_m2[0] / s_cnt[0] : 0.0;
  float mhi, mlo, rstd;
  group_coefs(s_mean[0], var, a.eps, mhi, mlo, rstd);
  const int b = grp / a.G;
  const int g = grp - b * a.G;
  for (int i = tid; i < a.cpg; i += kSplitThreads) {
    const int64_t c = static_cast<int64_t>(g) * a.cpg + i;
    const float ga = affine_value<T>(a.gamma, c, a.affine_f32, 1.0f);
    const float be = affine_value<T>(a.beta, c, a.affine_f32, 0.0f);
    const float sc = ga * rstd;
    const int64_t bc = static_cast<int64_t>(b) * a.C + c;
    a.mhi[bc] = mhi;
    a.scale[bc] = sc;
    a.shift[bc] = group_norm_shift(be, mlo, sc);
  }
}

// Split path, NCHW apply: block (tile, b) handles `tile` consecutive elements of batch item b, walking the
// tensor from its end. Channel bookkeeping is 32-bit from the block's start (hw < 2^31 - 2^20).
template <typename T>
struct ApplyArgs {
  const T* x;
  T* y;
  const float* mhi;    // [B*C]
  const float* scale;  // [B*C]
  const float* shift;  // [B*C]
  int64_t B, C, HW;
  int tile;  // elements per block, a multiple of VEC
  bool silu;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kSplitThreads) gn_apply_nchw_kernel(const ApplyArgs<T> a) {
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int64_t per_b = a.C * a.HW;
  const int64_t s = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * a.tile;
  const int n = static_cast<int>(min(static_cast<int64_t>(a.tile), per_b - s));
  const int nv = n / VEC;  // C*HW % VEC == 0
  const unsigned HW = static_cast<unsigned>(a.HW);
  const int64_t c_start = s / a.HW;  // channel of the block's first element, at offset r_start in its row
  const unsigned r_start = static_cast<unsigned>(s - c_start * a.HW);

  for (int64_t bb = blockIdx.y; bb < a.B; bb += gridDim.y) {
    const int64_t b = a.B - 1 - bb;
    const T* __restrict__ xb = a.x + b * per_b + s;
    T* __restrict__ yb = a.y + b * per_b + s;
    const float* __restrict__ mhb = a.mhi + b * a.C;
    const float* __restrict__ scb = a.scale + b * a.C;
    const float* __restrict__ shb = a.shift + b * a.C;
    for (int v0 = tid; v0 < nv; v0 += kUnroll * nthr) {
      Raw<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * nthr;
        if (v < nv) raw[u] = load_raw<T, VEC>(xb + v * VEC);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * nthr;
        if (v >= nv) continue;
        float f[VEC];
        raw_to_floats<T, VEC>(raw[u], f);
        const unsigned t = r_start + static_cast<unsigned>(v * VEC);
        int64_t c = c_start + t / HW;
        unsigned col = t % HW;
        if (col + VEC <= HW) {
          const float m0 = mhb[c], s0 = scb[c], h0 = shb[c];
#pragma unroll
          for (int j = 0; j < VEC; ++j) f[j] = finish(fmaf(f[j] - m0, s0, h0), a.silu);
        } else {  // the vector crosses into the next channel(s)
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            f[j] = finish(fmaf(f[j] - mhb[c], scb[c], shb[c]), a.silu);
            if (++col == HW) {
              col = 0;
              ++c;
            }
          }
        }
        store_vec<T, VEC>(yb + v * VEC, f);
      }
    }
  }
}

// Split path, channels_last apply: block (b, tile) handles P pixels x all C channels; like the stats tile
// kernel, a thread owns a VEC-channel column (its coefficients stay in registers) and strides over rows.
// Blocks run in reverse memory order.
template <typename T>
struct ApplyTileArgs {
  const T* x;
  T* y;
  const float* mhi;    // [B*C]
  const float* scale;  // [B*C]
  const float* shift;  // [B*C]
  int64_t HW;
  int C;
  int P, KT, ncols, rpar;
  bool silu;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kSplitThreads) gn_apply_cl_kernel(const ApplyTileArgs<T> a) {
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int blk = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // grid = B*KT < 2^31
  const int b = blk / a.KT;
  const int tile = blk - b * a.KT;
  const int64_t p0 = static_cast<int64_t>(tile) * a.P;
  const int np = static_cast<int>(min(static_cast<int64_t>(a.P), a.HW - p0));
  const int jobs = a.ncols * a.rpar;
  const int64_t off = (static_cast<int64_t>(b) * a.HW + p0) * a.C;
  const T* __restrict__ tx = a.x + off;
  T* __restrict__ ty = a.y + off;

  for (int job = tid; job < jobs; job += nthr) {
    const int col = job % a.ncols;
    const int r = job / a.ncols;
    const int64_t c0 = static_cast<int64_t>(b) * a.C + col * VEC;  // C % VEC == 0: aligned
    float mh[VEC], sc[VEC], sh[VEC];
    load_vec<float, VEC>(a.mhi + c0, mh);
    load_vec<float, VEC>(a.scale + c0, sc);
    load_vec<float, VEC>(a.shift + c0, sh);
    for (int p = r; p < np; p += kUnroll * a.rpar) {
      Raw<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int pp = p + u * a.rpar;
        if (pp < np) raw[u] = load_raw<T, VEC>(tx + static_cast<int64_t>(pp) * a.C + col * VEC);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int pp = p + u * a.rpar;
        if (pp >= np) continue;
        float f[VEC];
        raw_to_floats<T, VEC>(raw[u], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = finish(fmaf(f[j] - mh[j], sc[j], sh[j]), a.silu);
        store_vec<T, VEC>(ty + static_cast<int64_t>(pp) * a.C + col * VEC, f);
      }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sdcore
