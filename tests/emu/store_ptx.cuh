// Host emulation of csrc/cuda/store_ptx.cuh (explicit vector stores to global memory) for the SIMT emulator
// (simt.h): each store checked against the tensors the driver registered, and against its alignment.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace sdcore {
namespace cuda {
namespace dev {

inline void st_global(void* p, const void* v, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) emu::fail("st.global to a misaligned address");
  emu::check_global(static_cast<const unsigned char*>(p), bytes, "st.global");
  std::memcpy(p, v, bytes);
}
inline void st_global_v4(void* p, uint4 u) { st_global(p, &u, 16); }
inline void st_global_v2(void* p, uint2 u) { st_global(p, &u, 8); }
inline void st_global_b32(void* p, uint32_t u) { st_global(p, &u, 4); }

}  // namespace dev
}  // namespace cuda
}  // namespace sdcore
