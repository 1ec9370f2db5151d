// The SIMT emulator's state (tests/emu/simt.h has the overview): options, the blocks, threads and the records of
// their asynchronous work, and the core of the scheduler's cooperation: whose turn it is, waits, rendezvous of
// collectives, and failure reports.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "include/emu_cuda.h"

namespace emu {

// When asynchronous work takes effect, between its issue and the wait that the program relies on.
enum class Timing { kEager, kLate, kRandom };

struct Options {
  Timing timing = Timing::kRandom;
};
inline Options& options() {
  static Options o;
  return o;
}
inline std::string& case_label() {
  static std::string s;
  return s;
}

// ------------------------------------------------------------------------------------------- global memory

// The tensors a kernel may read (the driver registers each allocation): a read outside all of them is a bug.
struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};
inline std::vector<Range>& global_ranges() {
  static std::vector<Range> r;
  return r;
}

// ------------------------------------------------------------------------------------------- threads, blocks

struct Copy16 {  // one cp.async: 16 bytes into shared memory, from global memory or zeros
  uint32_t dst;
  const unsigned char* src;  // nullptr: zero fill
  bool landed;
};

struct Block;
struct Thread {
  ucontext_t ctx;
  Block* block = nullptr;
  unsigned tid = 0;
  bool done = false;
  bool progressed = false;        // since the scheduler last resumed it: passed a wait, started or finished
  const char* waiting = nullptr;  // what it waits for, while it does
  std::vector<std::vector<Copy16>> cp_groups;  // committed cp.async groups, oldest first
  std::vector<Copy16> cp_open;
  std::vector<uint32_t> unfenced;  // chunks its completed cp.async wrote (generic proxy) since its last fence
};

struct Rendezvous {
  int arrived = 0;
  int expected = 0;
  uint64_t gen = 0;
  const char* what = nullptr;
};

struct MBar {
  int expected = 0, pending = 0;
  int64_t tx = 0;      // transaction bytes still to come in the current phase
  uint64_t phase = 0;  // completed phases
};

// A TMA tensor map as the emulator's encode_head_tile_map records it in the CUtensorMap's opaque bytes.
struct TensorMapRecord {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[5];
  uint64_t strides[4];  // bytes, of dims 1..4
  uint32_t box[5];
};
constexpr uint64_t kTensorMapMagic = 0x5344434f52454d55ull;
static_assert(sizeof(TensorMapRecord) <= sizeof(CUtensorMap), "the record lives in the map's opaque bytes");

struct TmaJob {
  uint32_t dst;
  TensorMapRecord map;
  int64_t coord[5];
  uint32_t bar;
  uint32_t bytes;
};

// One wgmma.mma_async of a warpgroup: m64 x n x k16, fp32 accumulators.
struct WgmmaOp {
  int n = 0;
  bool bf16 = false, a_in_regs = false, scale_d = false;
  int ta = 0, tb = 0;
  uint64_t desc_a = 0, desc_b = 0;
  float* d[128] = {};
  const uint32_t* a[128] = {};
  bool executed = false;
  bool counted = false;          // its chunks are counted in Block::pending_read until it executes
  std::vector<uint32_t> chunks;  // the 16-byte shared chunks it reads
};

struct Warpgroup {
  Rendezvous rv;
  WgmmaOp staging;
  std::vector<WgmmaOp> open;              // issued, not committed
  std::deque<std::vector<WgmmaOp>> groups;  // committed, not waited for
};

struct Cluster;
struct Block {
  uint3 id{};
  unsigned nthreads = 0;
  std::vector<unsigned char> smem;  // the block's dynamic shared memory, then a guard band
  size_t smem_bytes = 0;
  std::vector<unsigned char> statics;  // its static __shared__ arrays (block_static)
  Cluster* cluster = nullptr;
  unsigned rank = 0;  // in the cluster
  std::vector<Thread> threads;
  Rendezvous block_rv;
  std::vector<Rendezvous> warp_rv;
  std::vector<float> shfl_in, shfl_out;
  std::vector<uint32_t> u32_in[6];  // warp collectives' staged registers (ldmatrix addresses, mma fragments)
  std::vector<float> f32_in[4];
  std::vector<uint32_t> u32_out[4];
  std::vector<float> f32_out[4];
  std::vector<unsigned> unfenced;  // per 16-byte chunk: 1 + the thread whose cp.async wrote it, until it fences
  Rendezvous named[16];
  std::map<uint32_t, MBar> mbars;
  std::vector<TmaJob> tma;  // issued, not landed
  std::vector<Warpgroup> wgs;
  std::vector<int> inflight_write, pending_read;  // per 16-byte chunk of shared memory
};

// The blocks of a thread block cluster run together; one cluster (or one block) at a time.
struct Cluster {
  std::vector<Block*> blocks;
  Rendezvous rv;
};

inline Block*& cur_block() {
  static Block* b = nullptr;
  return b;
}
inline Thread*& cur_thread() {
  static Thread* t = nullptr;
  return t;
}
inline ucontext_t& scheduler_ctx() {
  static ucontext_t c;
  return c;
}
inline std::mt19937_64& rng() {
  static std::mt19937_64 r;
  return r;
}
inline bool coin() { return (rng()() & 1) != 0; }

[[noreturn]] inline void fail(const std::string& msg) {
  std::printf("EMULATION FAILURE: %s\n  case: %s\n", msg.c_str(), case_label().c_str());
  if (cur_block() != nullptr) std::printf("  block (%u, %u)", cur_block()->id.x, cur_block()->id.y);
  if (cur_thread() != nullptr) std::printf(", thread %u", cur_thread()->tid);
  std::printf("\n");
  std::fflush(stdout);
  std::_Exit(1);
}

inline void trap() { fail("__trap() (the kernel's own check failed)"); }

inline void yield() { swapcontext(&cur_thread()->ctx, &scheduler_ctx()); }

template <typename F>
void wait_until(F&& cond, const char* what) {
  while (!cond()) {
    cur_thread()->waiting = what;
    yield();
  }
  cur_thread()->waiting = nullptr;
  cur_thread()->progressed = true;
}

// All `count` participants arrive; the last runs `once` and releases the others. `what` names the collective:
// participants at different ones diverged.
template <typename F>
void rendezvous(Rendezvous& r, int count, const char* what, F&& once) {
  if (r.arrived == 0) {
    r.what = what;
    r.expected = count;
  } else if (std::strcmp(r.what, what) != 0 || r.expected != count) {
    fail(std::string("divergence: threads meet at ") + r.what + " and at " + what);
  }
  const uint64_t gen = r.gen;
  if (++r.arrived == count) {
    once();
    r.arrived = 0;
    ++r.gen;
    return;
  }
  wait_until([&] { return r.gen != gen; }, what);
}

inline void sync_block() {
  Block& b = *cur_block();
  rendezvous(b.block_rv, static_cast<int>(b.nthreads), "__syncthreads", [] {});
}
inline void sync_warp() { rendezvous(cur_block()->warp_rv[cur_thread()->tid / 32], 32, "__syncwarp", [] {}); }

inline float shfl_xor(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) fail("shuffle with a partial mask: not emulated");
  Block& b = *cur_block();
  const unsigned warp = cur_thread()->tid / 32, lane = cur_thread()->tid % 32;
  b.shfl_in[warp * 32 + lane] = v;
  rendezvous(b.warp_rv[warp], 32, "__shfl_xor_sync", [&] {
    std::copy_n(b.shfl_in.begin() + warp * 32, 32, b.shfl_out.begin() + warp * 32);
  });
  return b.shfl_out[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
}

}  // namespace emu
