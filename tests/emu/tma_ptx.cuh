// Host emulation of csrc/cuda/tma_ptx.cuh (mbarriers, TMA tensor copies, the proxy fence, register
// reallocation, named barriers) for the SIMT emulator (simt.h); see attention_ptx.cuh here.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "attention_ptx.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

inline void mbar_init(uint64_t* bar, uint32_t count) { emu::mbar_init(bar, count); }
inline void fence_barrier_init() {}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { emu::mbar_arrive(bar, bytes); }
inline void mbar_arrive(uint64_t* bar) { emu::mbar_arrive(bar, 0); }
inline void mbar_wait(uint64_t* bar, uint32_t parity) { emu::mbar_wait(bar, parity); }
inline void fence_proxy_async() { emu::fence_proxy_async(); }
inline void tma_load_5d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3, int c4) {
  emu::tma_load(dst, map, bar, {c0, c1, c2, c3, c4});
}
// Every warp of the warpgroup executes it (.sync.aligned); the budget itself is the compiler's business.
template <int N>
inline void setmaxnreg_dec() {
  emu::rendezvous(emu::cur_block()->wgs[emu::cur_thread()->tid / 128].rv, 128, "setmaxnreg.dec", [] {});
}
template <int N>
inline void setmaxnreg_inc() {
  emu::rendezvous(emu::cur_block()->wgs[emu::cur_thread()->tid / 128].rv, 128, "setmaxnreg.inc", [] {});
}
inline void named_barrier_sync(int id, int threads) { emu::named_barrier(id, threads, true); }
inline void named_barrier_arrive(int id, int threads) { emu::named_barrier(id, threads, false); }

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
