// Device helpers shared by the group_norm and scheduler_step kernels: float <-> storage conversions for
// float / __half / __nv_bfloat16 (explicit intrinsics only: torch compiles .cu files with
// __CUDA_NO_HALF_CONVERSIONS__ and friends), vector loads/stores of VEC elements as floats, raw vector
// copies, warp/block sums and a fast SiLU. CUDA headers and ../common only: no torch headers here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "store_ptx.cuh"

namespace sdcore {
namespace cuda {
namespace dev {

// ---------------------------------------------------------------------------------------------------------
// Scalar conversions.
template <typename T>
struct Conv;

template <>
struct Conv<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
  // One 32-bit word holds one element.
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) { f[0] = __uint_as_float(w); }
  static __device__ __forceinline__ uint32_t pack(const float* f) { return __float_as_uint(f[0]); }
};

template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // One 32-bit word holds two elements, the lower-addressed one in the low 16 bits (little endian).
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) {
    f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(const float* f) {
    const uint32_t lo = __half_as_ushort(__float2half_rn(f[0]));
    const uint32_t hi = __half_as_ushort(__float2half_rn(f[1]));
    return lo | (hi << 16);
  }
};

template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) {
    f[0] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu)));
    f[1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(const float* f) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[1]));
    return lo | (hi << 16);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Conv<T>::to_float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Conv<T>::from_float(v);
}

// ---------------------------------------------------------------------------------------------------------
// Vector access: VEC consecutive elements at p, which must be aligned to min(VEC * sizeof(T), 16) bytes
// when VEC * sizeof(T) >= 4 (it is a single element otherwise). load_vec works on global and shared
// pointers; store_vec is for global memory only (explicit st.global.v4/v2: a plain uint4 assignment is a
// member-wise copy that NVVM sometimes leaves as four 32-bit stores).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  if constexpr (kBytes >= 16) {
    static_assert(kBytes % 16 == 0, "vector of more than 16 bytes must be a multiple of 16");
    constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + k * kPer16);
      Conv<T>::unpack(u.x, f + k * kPer16 + 0 * kPerWord);
      Conv<T>::unpack(u.y, f + k * kPer16 + 1 * kPerWord);
      Conv<T>::unpack(u.z, f + k * kPer16 + 2 * kPerWord);
      Conv<T>::unpack(u.w, f + k * kPer16 + 3 * kPerWord);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    Conv<T>::unpack(u.x, f);
    Conv<T>::unpack(u.y, f + kPerWord);
  } else if constexpr (kBytes == 4) {
    Conv<T>::unpack(*reinterpret_cast<const uint32_t*>(p), f);
  } else {
    static_assert(VEC == 1, "sub-word vectors hold one element");
    f[0] = to_float(p[0]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  if constexpr (kBytes >= 16) {
    static_assert(kBytes % 16 == 0, "vector of more than 16 bytes must be a multiple of 16");
    constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) {
      uint4 u;
      u.x = Conv<T>::pack(f + k * kPer16 + 0 * kPerWord);
      u.y = Conv<T>::pack(f + k * kPer16 + 1 * kPerWord);
      u.z = Conv<T>::pack(f + k * kPer16 + 2 * kPerWord);
      u.w = Conv<T>::pack(f + k * kPer16 + 3 * kPerWord);
      st_global_v4(p + k * kPer16, u);
    }
  } else if constexpr (kBytes == 8) {
    uint2 u;
    u.x = Conv<T>::pack(f);
    u.y = Conv<T>::pack(f + kPerWord);
    st_global_v2(p, u);
  } else if constexpr (kBytes == 4) {
    st_global_b32(p, Conv<T>::pack(f));
  } else {
    static_assert(VEC == 1, "sub-word vectors hold one element");
    p[0] = from_float<T>(f[0]);
  }
}

// Raw (bit-exact) vector of VEC elements of T, for staging data without converting it.
template <int kBytes>
struct RawWord;
template <>
struct RawWord<2> {
  using type = unsigned short;
};
template <>
struct RawWord<4> {
  using type = uint32_t;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<16> {
  using type = uint4;
};

template <typename T, int VEC>
using Raw = typename RawWord<VEC * static_cast<int>(sizeof(T))>::type;

// Raw vector -> VEC floats (the conversion half of load_vec, for loops that issue all loads first).
template <typename T, int VEC>
__device__ __forceinline__ void raw_to_floats(const Raw<T, VEC>& r, float (&f)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  if constexpr (kBytes == 16) {
    Conv<T>::unpack(r.x, f);
    Conv<T>::unpack(r.y, f + kPerWord);
    Conv<T>::unpack(r.z, f + 2 * kPerWord);
    Conv<T>::unpack(r.w, f + 3 * kPerWord);
  } else if constexpr (kBytes == 8) {
    Conv<T>::unpack(r.x, f);
    Conv<T>::unpack(r.y, f + kPerWord);
  } else if constexpr (kBytes == 4) {
    Conv<T>::unpack(r, f);
  } else {  // one 16-bit element
    float two[2];
    Conv<T>::unpack(static_cast<uint32_t>(r), two);
    f[0] = two[0];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> load_raw(const T* p) {
  return *reinterpret_cast<const Raw<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* p, Raw<T, VEC> v) {
  *reinterpret_cast<Raw<T, VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------------------
// Reductions.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024) and every
// thread of the block must call it. scratch: 32 floats of shared memory, may be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  __syncthreads();  // a previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(t);  // every warp forms the same total, in the same order
}

// SiLU with the fast exponential and division (a few ulp from sdcore::silu in common/math.h): the exact
// expf + IEEE division would make the fp16 group norm compute bound. Large negative x gives -0 (the limit),
// +inf gives +inf, -inf gives NaN (as the exact formula does).
__device__ __forceinline__ float silu_fast(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

}  // namespace dev
}  // namespace cuda
}  // namespace sdcore
