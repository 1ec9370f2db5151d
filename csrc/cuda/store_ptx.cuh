// Explicit vector stores to global memory (st.global.v4/v2/b32), for device_utils.cuh's store_vec: a plain uint4
// assignment is a member-wise copy that NVVM sometimes leaves as four 32-bit stores. Kept apart as one small
// wrapper each, like attention_ptx.cuh, so that a host emulation (tests/emu/) can stand in for this file.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sdcore {
namespace cuda {
namespace dev {

__device__ __forceinline__ void st_global_v4(void* p, uint4 u) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
}
__device__ __forceinline__ void st_global_v2(void* p, uint2 u) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(u.x), "r"(u.y) : "memory");
}
__device__ __forceinline__ void st_global_b32(void* p, uint32_t u) {
  asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(u) : "memory");
}

}  // namespace dev
}  // namespace cuda
}  // namespace sdcore
