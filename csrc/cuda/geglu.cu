// GEGLU's epilogue on the GPU (see GegluParams): the projection's bias, the exact GELU of the gate half and
// the gate product in one elementwise pass over the bias-free GEMM output, in fp32 through sdcore::gelu so
// the CPU and CUDA paths share the formula. Each thread handles VEC consecutive features of a row per
// iteration of a grid-stride loop, with 16-byte loads/stores where F, the row stride and every pointer allow
// them (VEC = 1 otherwise). The bias is read in the input's dtype: no conversion launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"
#include "device_info.h"
#include "device_utils.cuh"
#include "launch.h"

namespace sdcore {
namespace cuda {
namespace {

using dev::load_vec;
using dev::store_vec;

constexpr int kThreads = 256;

template <typename T, int VEC, bool kBias>
__global__ void __launch_bounds__(kThreads)
    geglu_kernel(const T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ out, int64_t rows,
                 int64_t f, int64_t h_stride) {
  const int64_t per_row = f / VEC, total = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < total; v += stride) {
    const int64_t r = v / per_row, j = (v - r * per_row) * VEC;
    const T* row = h + r * h_stride;
    float value[VEC], gate[VEC], o[VEC];
    load_vec<T, VEC>(row + j, value);
    load_vec<T, VEC>(row + f + j, gate);
    if constexpr (kBias) {
      float bias_value[VEC], bias_gate[VEC];  // 2F values, served from L1/L2 after the first rows
      load_vec<T, VEC>(bias + j, bias_value);
      load_vec<T, VEC>(bias + f + j, bias_gate);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = (value[i] + bias_value[i]) * gelu(gate[i] + bias_gate[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = value[i] * gelu(gate[i]);
    }
    store_vec<T, VEC>(out + r * f + j, o);
  }
}

template <typename T, int VEC>
cudaError_t launch_geglu(const GegluParams& p, cudaStream_t stream) {
  DeviceInfo d;
  const cudaError_t err = current_device_info(d);
  if (err != cudaSuccess) return err;
  const int sms = d.sms;
  const T* h = static_cast<const T*>(p.h);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * (p.features / VEC);
  int64_t blocks = (total + kThreads - 1) / kThreads;
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(std::max(sms, 1)) * (2048 / kThreads)));
  if (bias != nullptr) {
    geglu_kernel<T, VEC, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(h, bias, out, p.rows,
                                                                                        p.features, p.h_stride);
  } else {
    geglu_kernel<T, VEC, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(h, bias, out, p.rows,
                                                                                         p.features, p.h_stride);
  }
  return cudaGetLastError();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t geglu_typed(const GegluParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec_ok = p.features % kVec == 0 && p.h_stride % kVec == 0 && aligned16(p.h) && aligned16(p.out) &&
                      (p.bias == nullptr || aligned16(p.bias));
  return vec_ok ? launch_geglu<T, kVec>(p, stream) : launch_geglu<T, 1>(p, stream);
}

}  // namespace

cudaError_t geglu(const GegluParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.features <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return geglu_typed<float>(p, stream);
    case DType::kFloat16: return geglu_typed<__half>(p, stream);
    case DType::kBFloat16: return geglu_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
