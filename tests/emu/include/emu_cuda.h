// What sdcore's CUDA sources need of the CUDA toolkit, for a host compiler (g++) running the kernels on the SIMT
// emulator (../simt.h): the qualifiers as no-ops, the few runtime types and error codes, the built-in index
// variables, warp/block intrinsics routed to the emulator, device math, and 16-bit float types with the
// toolkit's round-to-nearest-even conversions. The files named cuda.h, cuda_runtime.h, ... in this folder
// include the emulator (which includes this), so that the kernels' own #include lines find it instead of the
// toolkit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <bit>
#include <cstring>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The built-in index variables: the scheduler sets them before it resumes a thread (tests/emu/simt.h).
inline uint3 threadIdx{}, blockIdx{};
inline dim3 blockDim, gridDim;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
};
typedef struct CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
  int ptxVersion = 90;
};
// Launches with attributes (the thread block cluster dimension is the one sdcore sets).
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  struct {
    struct {
      unsigned x, y, z;
    } clusterDim;
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
// Opaque to the kernels, as in the toolkit; the emulator's encode_head_tile_map stores its own record here.
struct alignas(64) CUtensorMap {
  uint64_t opaque[16];
};

namespace emu {
float shfl_xor(unsigned mask, float v, int lane_mask);
void sync_block();
void sync_warp();
[[noreturn]] void trap();
}  // namespace emu

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) { return emu::shfl_xor(mask, v, lane_mask); }
inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
[[noreturn]] inline void __trap() { emu::trap(); }

// Device math the kernels call by their CUDA names: the fast forms as their exact counterparts (the emulator
// checks logic, not the last ulp), and CUDA's global min/max overloads.
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
using std::max;
using std::min;

// 16-bit floats: storage plus the conversions the kernels use, rounding to nearest even as the toolkit's _rn.
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

// IEEE binary16 <-> binary32 by hand (no _Float16: older g++ lacks it), rounding to nearest even.
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, mant = h.x & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {                                                                  // zero, subnormal
    const float f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xff) return {static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u))};
  const int e = static_cast<int>(exp) - 112;  // the half's biased exponent
  if (e >= 31) return {static_cast<uint16_t>(sign | 0x7c00u)};
  int shift = 13;
  uint32_t base = static_cast<uint32_t>(e) << 10;
  if (e <= 0) {  // a subnormal half (or zero): the implicit bit joins the mantissa
    if (e < -10) return {sign};
    mant |= 0x800000u;
    shift = 14 - e;
    base = 0;
  }
  uint32_t h = base | (mant >> shift);
  const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // a carry may step into the exponent: right
  return {static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(uint32_t(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits = std::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return {static_cast<uint16_t>((bits >> 16) | 0x40)};  // quiet NaN, sign kept
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(bits >> 16)};
}
