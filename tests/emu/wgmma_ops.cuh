// Host emulation of csrc/cuda/wgmma_ops.cuh for the SIMT emulator (simt.h): wgmma.mma_async m64nNk16 (fp16 or
// bf16 in, fp32 accumulators) with A from shared memory or registers, its fence, commit and wait, as
// warpgroup collectives; see attention_ptx.cuh here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "simt.h"

namespace sdcore {
namespace cuda {
namespace attn {

inline void wgmma_fence() { emu::wgmma_fence(); }
inline void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
  emu::wgmma_wait(N);
}

// The compiler-level pin of the real header: the emulator's calls are opaque to the compiler already.
template <int N>
inline void fence_operands(float (&)[N]) {}

template <typename T, int L>
inline emu::WgmmaOp wgmma_params(int scale_d) {
  static_assert(L % 4 == 0 && 2 * L >= 8 && 2 * L <= 256, "m64nNk16: N a multiple of 8, at most 256");
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16 inputs");
  emu::WgmmaOp p;
  p.n = 2 * L;
  p.bf16 = std::is_same<T, __nv_bfloat16>::value;
  p.scale_d = scale_d != 0;
  return p;
}

// D[64 x 2L] = (scale_d ? D : 0) + A[64 x 16] . B[16 x 2L], A and B in shared memory (descriptors).
template <typename T, int TA, int TB, int L>
inline void wgmma_ss(float (&d)[L], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  emu::WgmmaOp p = wgmma_params<T, L>(scale_d);
  p.ta = TA, p.tb = TB, p.desc_a = desc_a, p.desc_b = desc_b;
  emu::wgmma_issue(p, d, nullptr);
}

// The same with A from registers: the m16n8k16 A fragment of the thread's warp's 16 rows.
template <typename T, int TB, int L>
inline void wgmma_rs(float (&d)[L], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  emu::WgmmaOp p = wgmma_params<T, L>(scale_d);
  p.a_in_regs = true, p.tb = TB, p.desc_b = desc_b;
  emu::wgmma_issue(p, d, a);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
