// The sm_90 primitives of the Hopper attention's producer/consumer pipeline: shared-memory mbarriers, the TMA
// tensor copy that completes on one, the generic-to-async proxy fence, and a named barrier for a subset of the
// block. One small wrapper each, as attention_ptx.cuh for the sm_80 ones (and, like it, a file that a host
// emulation can stand in for: tests/emu/); the caller compiles them only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL).
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "attention_ptx.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes initialized barriers visible to the async proxy (the TMA unit's complete_tx) before any copy names them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer's arrival for a stage: one arrival, and `bytes` more to come from copies completing on it.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t addr, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(addr), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits for the completion of the barrier's phase of the given parity (a fresh barrier is in phase 0, so
// parity 1 returns at once: the producer's first wait on an empty stage). A wait that lasts ~2^34 cycles (about
// 9 s; no stage legitimately takes a millisecond) means a pipeline bug: trap, so the launch fails with an
// error instead of hanging the process.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  if (mbar_try_wait(addr, parity)) return;
  const long long start = clock64();
  while (!mbar_try_wait(addr, parity)) {
    if (clock64() - start > (1ll << 34)) __trap();
  }
}

// Shared memory written through the generic proxy (cp.async, st.shared) and read next by wgmma (the async
// proxy) needs this fence between the two, in the writing threads, before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// One box of a 5-d tensor map (tensor_map.h) into shared memory; its bytes complete on `bar`. Coordinates are
// element indices, innermost first.
__device__ __forceinline__ void tma_load_5d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, "
      "%7}], [%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}

// Per-thread register budget of the executing warpgroup, down (freeing registers to the block's pool) or up
// (waiting until the pool has them); every warp of the warpgroup executes it. The block must be compiled with a
// fixed register count (__launch_bounds__) that covers the sum of the budgets.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// A barrier for `threads` threads (a multiple of 32) of the block; id 0 is __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts the calling warp towards barrier `id`'s `threads` without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
