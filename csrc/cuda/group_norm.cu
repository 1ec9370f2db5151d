// Group norm (+ optional fused SiLU) on the GPU, host side: picks the fused or the split path for a call,
// plans its geometry (chunks, clusters, tiles, vector widths, workspace) against the device's limits, and
// launches the kernels of group_norm_kernels.cuh, whose header says what each path does and why.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../common/params.h"
#include "device_info.h"
#include "group_norm_kernels.cuh"
#include "launch.h"

namespace sdcore {
namespace cuda {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Widest power-of-two vector (<= 16 bytes) whose length divides `divisor` and whose byte size divides
// the address bits `addr` (the OR of the pointers involved).
inline int pick_vec(int64_t divisor, uintptr_t addr, int esz) {
  int v = 16 / esz;
  while (v > 1 && (divisor % v != 0 || (addr % static_cast<uintptr_t>(v * esz)) != 0)) v /= 2;
  return v;
}

template <typename T, typename F>
cudaError_t with_vec(int vec, F&& f) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return f(std::integral_constant<int, 8>{});
      return cudaErrorInvalidValue;
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return cudaErrorInvalidValue;
  }
}

// Whether the fused kernel's cluster merge is in the code this device runs. It is compiled for sm_90 and up
// only; a card newer than every SASS in the build (TORCH_CUDA_ARCH_LIST="8.0+PTX;9.0a" on a Blackwell) runs the
// JIT-compiled compute_80 PTX, where a group split over a cluster would be normalized chunk by chunk.
bool cluster_merge_available(const DeviceInfo& d) {
  if (d.cc_major < 9) return false;
  cudaFuncAttributes attr{};
  if (kernel_attributes(reinterpret_cast<const void*>(gn_fused_kernel<float, 1, false, true>), attr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 90;
}

// Launches the fused kernel; returns cudaErrorNotSupported (without launching) when a cluster of K blocks
// with this much shared memory can't be scheduled, so the caller can fall back.
template <typename T, int VEC>
cudaError_t launch_fused(const FusedArgs<T>& a, bool cl, int64_t grid, int threads, int64_t smem,
                         cudaStream_t stream) {
  auto run = [&](auto kernel, bool cluster) -> cudaError_t {
    cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(smem));
    if (err != cudaSuccess) return err;
    if (!cluster) {
      kernel<<<static_cast<unsigned>(grid), threads, static_cast<size_t>(smem), stream>>>(a);
      return cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(a.K);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (err != cudaSuccess || clusters < 1) {
      (void)cudaGetLastError();  // clear a non-sticky error from the query
      return cudaErrorNotSupported;
    }
    err = cudaLaunchKernelEx(&cfg, kernel, a);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  };
  const bool cluster = a.K > 1;
  if (cl) {
    return cluster ? run(gn_fused_kernel<T, VEC, true, true>, true) : run(gn_fused_kernel<T, VEC, true, false>, false);
  }
  return cluster ? run(gn_fused_kernel<T, VEC, false, true>, true) : run(gn_fused_kernel<T, VEC, false, false>, false);
}

// The fused path's geometry: a group cut into K chunks staged in shared memory, within the device's budget.
template <typename T>
struct FusedGeometry {
  static constexpr int esz = static_cast<int>(sizeof(T));
  int64_t HW, cpg, N, NG, cpg_pad, coef_bytes, limit, max_k;
  int vec;

  FusedGeometry(const GroupNormParams& p, const DeviceInfo& d) {
    HW = p.hw;
    cpg = p.channels / p.groups;
    N = cpg * HW;
    NG = p.batch * p.groups;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.y);
    vec = pick_vec(p.channels_last ? cpg : N, addr, esz);
    cpg_pad = round_up(cpg, 4);
    coef_bytes = 2 * cpg_pad * static_cast<int64_t>(sizeof(float));
    // Static shared memory (reduction scratch) and a margin stay out of the opt-in budget.
    limit = std::min<int64_t>(kFusedMaxBytes + coef_bytes, static_cast<int64_t>(d.smem_optin) - 1024);
    max_k = cluster_merge_available(d) ? kMaxCluster : 1;
  }
  bool in_range() const { return N <= INT_MAX / 2 && HW <= INT_MAX / 2; }
  int64_t chunk_of(int64_t K) const { return round_up(ceil_div(N, K), vec); }
  int64_t smem_of(int64_t K) const { return round_up(chunk_of(K) * esz, 16) + coef_bytes; }
  // try_fused runs whatever K it picks: one block per group (K = 1, its last resort) fits, and no grid of up
  // to max_k blocks per group overflows. Then the split path, and its workspace, are never needed.
  bool certain() const { return in_range() && smem_of(1) <= limit && NG * max_k <= INT_MAX; }
};

// Runs the fused path if the group (or its K <= 8 chunks) fits in shared memory; cudaErrorNotSupported
// (nothing launched) otherwise.
template <typename T>
cudaError_t try_fused(const GroupNormParams& p, const DeviceInfo& d, cudaStream_t stream) {
  const int64_t C = p.channels, G = p.groups;
  const FusedGeometry<T> f(p, d);
  if (!f.in_range()) return cudaErrorNotSupported;
  const int64_t HW = f.HW, cpg = f.cpg, N = f.N, NG = f.NG, cpg_pad = f.cpg_pad, limit = f.limit;
  const int64_t max_k = f.max_k;
  const int vec = f.vec;
  constexpr int esz = FusedGeometry<T>::esz;

  // Smallest K that fits; then more blocks while there are fewer blocks than SMs and chunks stay large.
  int64_t K = 1;
  while (K < max_k &&
         (f.smem_of(K) > limit || (NG * K < d.sms && f.chunk_of(2 * K) * esz >= kFusedMinChunkBytes))) {
    K *= 2;
  }
  for (;;) {
    if (f.smem_of(K) > limit) return cudaErrorNotSupported;
    const int64_t grid = NG * K;
    if (grid > INT_MAX) return cudaErrorNotSupported;
    const int64_t chunk = f.chunk_of(K);
    const int64_t nvec = chunk / vec;
    const int threads = static_cast<int>(std::min<int64_t>(
        kFusedMaxThreads, std::max<int64_t>(64, round_up(ceil_div(nvec, kUnroll), 32))));

    FusedArgs<T> a;
    a.x = static_cast<const T*>(p.x);
    a.y = static_cast<T*>(p.y);
    a.gamma = p.gamma;
    a.beta = p.beta;
    a.affine_f32 = p.affine_float32;
    a.C = C;
    a.HW = static_cast<int>(HW);
    a.G = static_cast<int>(G);
    a.cpg = static_cast<int>(cpg);
    a.N = static_cast<int>(N);
    a.chunk = static_cast<int>(chunk);
    a.K = static_cast<int>(K);
    a.data_bytes = static_cast<int>(round_up(chunk * esz, 16));
    a.cpg_pad = static_cast<int>(cpg_pad);
    a.eps = p.eps;
    a.silu = p.silu;
    const int64_t smem = f.smem_of(K);
    cudaError_t err = with_vec<T>(vec, [&](auto v) {
      return launch_fused<T, decltype(v)::value>(a, p.channels_last, grid, threads, smem, stream);
    });
    if (err != cudaErrorNotSupported || K == 1) return err;
    K = 1;  // the cluster can't be scheduled: one block per group, if the group fits
  }
}

// Channels_last tile geometry: a thread owns a VEC-channel column; rpar row lanes run side by side.
struct TileShape {
  int ncols, rpar;
};
inline TileShape tile_shape(int64_t C, int vec) {
  TileShape t;
  t.ncols = static_cast<int>(C / vec);
  t.rpar = t.ncols >= kSplitThreads ? 1 : kSplitThreads / t.ncols;
  return t;
}

// The split path's configuration: how the stats pass cuts each group (KT partials per group), the apply
// pass's tiling, and the workspace they need. Pure host arithmetic, shared by the launch and by
// group_norm_workspace_bytes (the caller allocates what this says).
struct SplitPlan {
  bool use_tile = false;
  int vec_s = 1, vec_a = 1;
  TileShape ts{0, 0}, ta{0, 0};
  int64_t KT = 0, L = 0, R = 0, P = 0, tile_smem = 0;
  int64_t apply_tile = 0, Pa = 0, KTa = 0, apply_blocks = 0;
  size_t part_bytes = 0, coef_bytes = 0, ws_bytes = 0;
};

template <typename T>
cudaError_t plan_split(const GroupNormParams& p, SplitPlan& s) {
  constexpr int esz = static_cast<int>(sizeof(T));
  const int64_t B = p.batch, C = p.channels, HW = p.hw, G = p.groups;
  const int64_t cpg = C / G, N = cpg * HW, NG = B * G;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(p.x);
  const uintptr_t axy = ax | reinterpret_cast<uintptr_t>(p.y);
  const bool cl = p.channels_last;
  bool& use_tile = s.use_tile;
  int& vec_s = s.vec_s;
  TileShape& ts = s.ts;
  int64_t &KT = s.KT, &L = s.L, &R = s.R, &P = s.P, &tile_smem = s.tile_smem;
  // Stats configuration (it decides the number of partials per group, KT).
  if (cl) {
    vec_s = pick_vec(C, ax, esz);
    ts = tile_shape(C, vec_s);
    tile_smem = 2 * static_cast<int64_t>(ts.rpar) * C * static_cast<int64_t>(sizeof(float));
    if (tile_smem <= kTileMaxSmem) {
      use_tile = true;
      P = std::max<int64_t>(1, kStatsTileBytes / (C * esz));
      KT = ceil_div(HW, P);
      if (B * KT > INT_MAX) return cudaErrorInvalidValue;
    } else {
      vec_s = pick_vec(cpg, ax, esz);
    }
  } else {
    vec_s = pick_vec(N, ax, esz);
  }
  if (!use_tile) {
    L = static_cast<int64_t>(kSplitThreads) * vec_s * 2 * kUnroll;
    if (cl) {  // whole rows of cpg channels per slice
      R = std::max<int64_t>(1, L / cpg);
      L = R * cpg;
      if (L > (1 << 30)) return cudaErrorInvalidValue;
    }
    KT = ceil_div(N, L);
  }
  if (NG > INT_MAX || NG * KT > INT_MAX) return cudaErrorInvalidValue;

  // Apply configuration.
  s.vec_a = cl ? pick_vec(C, axy, esz) : pick_vec(C * HW, axy, esz);
  s.ta = tile_shape(C, s.vec_a);
  s.apply_tile = static_cast<int64_t>(kSplitThreads) * s.vec_a * kUnroll;  // NCHW
  s.Pa = std::max<int64_t>(1, kApplyTileBytes / (C * esz));               // channels_last
  s.KTa = ceil_div(HW, s.Pa);
  s.apply_blocks = cl ? B * s.KTa : ceil_div(C * HW, s.apply_tile);
  if (s.apply_blocks > INT_MAX) return cudaErrorInvalidValue;

  // Workspace: partials, then mhi, scale, shift.
  s.part_bytes = static_cast<size_t>(round_up(NG * KT * static_cast<int64_t>(sizeof(Partial)), 256));
  s.coef_bytes = static_cast<size_t>(round_up(B * C * static_cast<int64_t>(sizeof(float)), 256));
  s.ws_bytes = s.part_bytes + 3 * s.coef_bytes;
  return cudaSuccess;
}

template <typename T>
cudaError_t run_split(const GroupNormParams& p, cudaStream_t stream) {
  const int64_t B = p.batch, C = p.channels, HW = p.hw, G = p.groups;
  const int64_t cpg = C / G, N = cpg * HW, NG = B * G;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const bool cl = p.channels_last;
  SplitPlan s;
  cudaError_t err = plan_split<T>(p, s);
  if (err != cudaSuccess) return err;
  if (p.workspace == nullptr || p.workspace_bytes < static_cast<int64_t>(s.ws_bytes)) return cudaErrorInvalidValue;
  const bool use_tile = s.use_tile;
  const int vec_s = s.vec_s, vec_a = s.vec_a;
  const TileShape ts = s.ts, ta = s.ta;
  const int64_t KT = s.KT, L = s.L, R = s.R, P = s.P, tile_smem = s.tile_smem;
  const int64_t apply_tile = s.apply_tile, Pa = s.Pa, KTa = s.KTa, apply_blocks = s.apply_blocks;
  const size_t part_bytes = s.part_bytes, coef_bytes = s.coef_bytes;
  void* ws = p.workspace;
  Partial* part = static_cast<Partial*>(ws);
  float* mhi = reinterpret_cast<float*>(static_cast<char*>(ws) + part_bytes);
  float* scale = reinterpret_cast<float*>(static_cast<char*>(ws) + part_bytes + coef_bytes);
  float* shift = reinterpret_cast<float*>(static_cast<char*>(ws) + part_bytes + 2 * coef_bytes);

  // 1. Stats.
  if (use_tile) {
    StatsTileArgs<T> a;
    a.x = x;
    a.part = part;
    a.HW = HW;
    a.C = static_cast<int>(C);
    a.G = static_cast<int>(G);
    a.cpg = static_cast<int>(cpg);
    a.P = static_cast<int>(P);
    a.KT = static_cast<int>(KT);
    a.ncols = ts.ncols;
    a.rpar = ts.rpar;
    err = with_vec<T>(vec_s, [&](auto v) {
      gn_stats_cl_tile_kernel<T, decltype(v)::value>
          <<<static_cast<unsigned>(B * KT), kSplitThreads, static_cast<size_t>(tile_smem), stream>>>(a);
      return cudaGetLastError();
    });
  } else {
    RowsArgs<T> a;
    a.x = x;
    a.part = part;
    a.C = C;
    a.HW = HW;
    a.N = N;
    a.L = L;
    a.R = R;
    a.G = static_cast<int>(G);
    a.cpg = static_cast<int>(cpg);
    a.KT = static_cast<int>(KT);
    err = with_vec<T>(vec_s, [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (cl) {
        gn_stats_rows_kernel<T, V, true><<<static_cast<unsigned>(NG * KT), kSplitThreads, 0, stream>>>(a);
      } else {
        gn_stats_rows_kernel<T, V, false><<<static_cast<unsigned>(NG * KT), kSplitThreads, 0, stream>>>(a);
      }
      return cudaGetLastError();
    });
  }

  // 2. Merge the partials -> per-(b, c) coefficients.
  if (err == cudaSuccess) {
    FinalizeArgs f;
    f.part = part;
    f.mhi = mhi;
    f.scale = scale;
    f.shift = shift;
    f.gamma = p.gamma;
    f.beta = p.beta;
    f.affine_f32 = p.affine_float32;
    f.C = C;
    f.G = static_cast<int>(G);
    f.cpg = static_cast<int>(cpg);
    f.KT = static_cast<int>(KT);
    f.eps = p.eps;
    gn_finalize_kernel<T><<<static_cast<unsigned>(NG), kSplitThreads, 0, stream>>>(f);
    err = cudaGetLastError();
  }

  // 3. Apply.
  if (err == cudaSuccess) {
    if (cl) {
      ApplyTileArgs<T> a;
      a.x = x;
      a.y = y;
      a.mhi = mhi;
      a.scale = scale;
      a.shift = shift;
      a.HW = HW;
      a.C = static_cast<int>(C);
      a.P = static_cast<int>(Pa);
      a.KT = static_cast<int>(KTa);
      a.ncols = ta.ncols;
      a.rpar = ta.rpar;
      a.silu = p.silu;
      err = with_vec<T>(vec_a, [&](auto v) {
        gn_apply_cl_kernel<T, decltype(v)::value><<<static_cast<unsigned>(apply_blocks), kSplitThreads, 0, stream>>>(a);
        return cudaGetLastError();
      });
    } else {
      ApplyArgs<T> a;
      a.x = x;
      a.y = y;
      a.mhi = mhi;
      a.scale = scale;
      a.shift = shift;
      a.B = B;
      a.C = C;
      a.HW = HW;
      a.tile = static_cast<int>(apply_tile);
      a.silu = p.silu;
      const dim3 grid(static_cast<unsigned>(apply_blocks), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
      err = with_vec<T>(vec_a, [&](auto v) {
        gn_apply_nchw_kernel<T, decltype(v)::value><<<grid, kSplitThreads, 0, stream>>>(a);
        return cudaGetLastError();
      });
    }
  }
  return err;
}

template <typename T>
cudaError_t group_norm_typed(const GroupNormParams& p, cudaStream_t stream) {
  DeviceInfo d;
  cudaError_t err = current_device_info(d);
  if (err != cudaSuccess) return err;
  err = try_fused<T>(p, d, stream);
  if (err != cudaErrorNotSupported) return err;
  return run_split<T>(p, stream);
}

template <typename T>
int64_t workspace_bytes_typed(const GroupNormParams& p) {
  DeviceInfo d;
  if (current_device_info(d) == cudaSuccess && FusedGeometry<T>(p, d).certain()) return 0;  // fused: no workspace
  SplitPlan s;
  return plan_split<T>(p, s) == cudaSuccess ? static_cast<int64_t>(s.ws_bytes) : 0;  // bad: group_norm says
}

}  // namespace

int64_t group_norm_workspace_bytes(const GroupNormParams& p) {
  if (p.batch <= 0 || p.channels <= 0 || p.hw <= 0 || p.groups <= 0 || p.channels % p.groups != 0) return 0;
  switch (p.dtype) {
    case DType::kFloat32: return workspace_bytes_typed<float>(p);
    case DType::kFloat16: return workspace_bytes_typed<__half>(p);
    case DType::kBFloat16: return workspace_bytes_typed<__nv_bfloat16>(p);
  }
  return 0;
}

cudaError_t group_norm(const GroupNormParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.channels <= 0 || p.hw <= 0) return cudaSuccess;  // empty: nothing to do
  if (p.groups <= 0 || p.channels % p.groups != 0) return cudaErrorInvalidValue;
  // 32-bit channel / offset arithmetic inside the kernels.
  if (p.hw > INT_MAX - (1 << 20) || p.channels > INT_MAX / 16) return cudaErrorInvalidValue;
  if (p.x == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return group_norm_typed<float>(p, stream);
    case DType::kFloat16: return group_norm_typed<__half>(p, stream);
    case DType::kBFloat16: return group_norm_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
