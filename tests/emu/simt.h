// A host emulator of the CUDA execution model, as much of it as sdcore's attention kernels use, so that kernels
// written for a GPU this machine lacks (the Hopper wgmma/TMA attention) run here, one block at a time, each
// thread a fiber (ucontext) under a scheduler of our own:
//   - collectives (__syncthreads, __syncwarp, shuffles, bar.sync/bar.arrive, wgmma's .sync.aligned steps) meet
//     at rendezvous; a participant at a different collective is reported as divergence;
//   - mbarriers keep the PTX rules (arrival count, transaction bytes, phase parity);
//   - asynchronous work (cp.async, TMA copies, wgmma) happens at a time the Timing option picks: at issue, at the
//     last moment the program allows (its wait), or at random in between, so that a missing wait shows up as a
//     wrong value; shadow state per 16-byte chunk of shared memory also reports it directly: a wgmma reading bytes
//     a copy is still writing, or a copy writing bytes an issued wgmma may still read;
//   - a round in which no thread can move is a deadlock: the emulator names what every thread waits for.
// It is a test instrument, not a GPU: it runs the kernels' own code (their index math, pipeline, masking and
// tails), and the primitives as the PTX ISA describes them (tests/emu/*.cuh); what the hardware does beyond that
// description (the layouts a card really uses) is bench/hopper's to check on a card.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <map>
#include <memory>
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

// --------------------------------------------------------------------------------------------- shared memory

inline uint32_t smem_offset(const void* p, size_t bytes, const char* what) {
  Block& b = *cur_block();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b.smem.data() || c + bytes > b.smem.data() + b.smem_bytes) {
    fail(std::string(what) + ": address outside the block's " + std::to_string(b.smem_bytes) +
         " bytes of shared memory (offset " + std::to_string(c - b.smem.data()) + ")");
  }
  return static_cast<uint32_t>(c - b.smem.data());
}

inline void check_global(const unsigned char* p, size_t bytes, const char* what) {
  for (const Range& r : global_ranges()) {
    if (p >= r.lo && p + bytes <= r.hi) return;
  }
  fail(std::string(what) + ": global memory access outside every tensor");
}

inline void mark_writes(uint32_t dst, uint32_t bytes, int delta, const char* what) {
  Block& b = *cur_block();
  for (uint32_t c = dst / 16; c < (dst + bytes + 15) / 16; ++c) {
    if (delta > 0 && b.pending_read[c] > 0) {
      fail(std::string(what) + " into shared bytes [" + std::to_string(c * 16) + ", +16) that an issued wgmma " +
           "may still read (no wgmma wait before the stage was refilled)");
    }
    b.inflight_write[c] += delta;
  }
}

// ------------------------------------------------------------------------------------------------- cp.async

inline void land(Copy16& c) {
  Block& b = *cur_block();
  if (c.src != nullptr) {
    std::memcpy(b.smem.data() + c.dst, c.src, 16);
  } else {
    std::memset(b.smem.data() + c.dst, 0, 16);
  }
  c.landed = true;
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) fail("cp.async with a partial source: not emulated");
  const uint32_t off = smem_offset(dst, 16, "cp.async");
  if (off % 16 != 0) fail("cp.async to a shared address that is not 16-byte aligned");
  const auto* s = static_cast<const unsigned char*>(src);
  if (src_bytes == 16) {
    if (reinterpret_cast<uintptr_t>(s) % 16 != 0) fail("cp.async from a global address that is not 16-byte aligned");
    check_global(s, 16, "cp.async");
  }
  mark_writes(off, 16, +1, "cp.async");
  Copy16 c{off, src_bytes == 16 ? s : nullptr, false};
  const Timing t = options().timing;
  if (t == Timing::kEager || (t == Timing::kRandom && coin())) land(c);
  cur_thread()->cp_open.push_back(c);
}

inline void cp_async_commit() {
  Thread& t = *cur_thread();
  t.cp_groups.push_back(std::move(t.cp_open));
  t.cp_open.clear();
}

inline void cp_async_wait(size_t n) {
  Thread& t = *cur_thread();
  while (t.cp_groups.size() > n) {
    for (Copy16& c : t.cp_groups.front()) {
      if (!c.landed) land(c);
      mark_writes(c.dst, 16, -1, "cp.async");
      cur_block()->unfenced[c.dst / 16] = t.tid + 1;
      t.unfenced.push_back(c.dst / 16);
    }
    t.cp_groups.erase(t.cp_groups.begin());
  }
}

// fence.proxy.async: this thread's generic-proxy writes (cp.async included) become visible to the async proxy.
inline void fence_proxy_async() {
  Thread& t = *cur_thread();
  for (uint32_t c : t.unfenced) {
    if (cur_block()->unfenced[c] == t.tid + 1) cur_block()->unfenced[c] = 0;
  }
  t.unfenced.clear();
}

// ------------------------------------------------------------------------------------------------ mbarriers

inline MBar& mbar_at(const void* bar, const char* what) {
  const uint32_t off = smem_offset(bar, 8, what);
  if (off % 8 != 0) fail(std::string(what) + ": mbarrier not 8-byte aligned");
  auto it = cur_block()->mbars.find(off);
  if (it == cur_block()->mbars.end()) fail(std::string(what) + ": no mbarrier initialized at this address");
  return it->second;
}

inline void mbar_maybe_complete(MBar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
  }
}

inline void mbar_init(void* bar, uint32_t count) {
  const uint32_t off = smem_offset(bar, 8, "mbarrier.init");
  MBar m;
  m.expected = m.pending = static_cast<int>(count);
  cur_block()->mbars[off] = m;
}

inline void mbar_arrive(void* bar, uint32_t expect_bytes) {
  MBar& m = mbar_at(bar, "mbarrier.arrive");
  if (m.pending <= 0) fail("mbarrier.arrive on a barrier with no arrivals pending");
  m.tx += expect_bytes;
  --m.pending;
  mbar_maybe_complete(m);
}

inline bool mbar_phase_done(void* bar, uint32_t parity) {
  return (mbar_at(bar, "mbarrier.try_wait").phase & 1) != (parity & 1);
}

inline void mbar_wait(void* bar, uint32_t parity) {
  mbar_at(bar, "mbarrier.try_wait");
  wait_until([&] { return mbar_phase_done(bar, parity); }, "mbarrier.try_wait.parity");
}

// ------------------------------------------------------------------------------------------------------ TMA

inline void tma_land(TmaJob& j) {
  Block& b = *cur_block();
  const TensorMapRecord& m = j.map;
  unsigned char* out = b.smem.data() + j.dst;
  for (uint32_t i4 = 0; i4 < m.box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < m.box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < m.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < m.box[1]; ++i1)
          for (uint32_t i0 = 0; i0 < m.box[0]; ++i0) {
            const uint32_t idx[5] = {i0, i1, i2, i3, i4};
            bool inside = true;
            int64_t byte = 0;
            for (int k = 0; k < 5; ++k) {
              const int64_t c = j.coord[k] + idx[k];
              inside = inside && c >= 0 && c < static_cast<int64_t>(m.dims[k]);
              byte += c * (k == 0 ? 2 : static_cast<int64_t>(m.strides[k - 1]));
            }
            if (inside) {
              check_global(m.base + byte, 2, "TMA copy");
              std::memcpy(out, m.base + byte, 2);
            } else {
              std::memset(out, 0, 2);
            }
            out += 2;
          }
  mark_writes(j.dst, j.bytes, -1, "TMA copy");
  auto it = b.mbars.find(j.bar);
  if (it == b.mbars.end()) fail("TMA copy completes on an mbarrier that is gone");
  it->second.tx -= j.bytes;
  mbar_maybe_complete(it->second);
}

inline void tma_load(void* dst, const CUtensorMap* map, void* bar, const int64_t (&coord)[5]) {
  TmaJob j;
  std::memcpy(&j.map, map, sizeof(TensorMapRecord));
  if (j.map.magic != kTensorMapMagic) fail("TMA copy with a tensor map the emulator did not encode");
  j.bytes = 2;
  for (uint32_t x : j.map.box) j.bytes *= x;
  j.dst = smem_offset(dst, j.bytes, "TMA copy");
  if (j.dst % 128 != 0) fail("TMA copy to a shared address that is not 128-byte aligned");
  mbar_at(bar, "TMA copy");
  j.bar = smem_offset(bar, 8, "TMA copy");
  for (int k = 0; k < 5; ++k) j.coord[k] = coord[k];
  mark_writes(j.dst, j.bytes, +1, "TMA copy");
  if (options().timing == Timing::kEager) {
    tma_land(j);
  } else {
    cur_block()->tma.push_back(j);
  }
}

// ---------------------------------------------------------------------------------------------------- wgmma

inline float bits_to_float(uint16_t h, bool bf16) { return bf16 ? __bfloat162float({h}) : __half2float({h}); }

// Byte offset of element (r, k) of a no-swizzle operand: r along M (A) or N (B), k along K. Core matrices of
// 8 x 16 bytes; LBO steps between core matrices along K, SBO along M/N (the canonical layouts of the PTX ISA's
// matrix descriptors, which CUTLASS's GMMA traits spell out); K-major: a core matrix row is 8 k's, MN-major: 8 r's.
inline uint32_t operand_offset(uint64_t desc, bool mn_major, int r, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t core = start + (r / 8) * sbo + (k / 8) * lbo;
  return mn_major ? core + (k % 8) * 16 + (r % 8) * 2 : core + (r % 8) * 16 + (k % 8) * 2;
}

inline void check_desc(uint64_t desc) {
  if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
    fail("wgmma descriptor with a swizzle or base offset: the emulator reads the no-swizzle layout only");
  }
}

inline void wgmma_chunks(WgmmaOp& op) {
  std::vector<uint32_t> c;
  for (int k = 0; k < 16; ++k) {
    if (!op.a_in_regs) {
      for (int m = 0; m < 64; ++m) c.push_back(operand_offset(op.desc_a, op.ta != 0, m, k) / 16);
    }
    for (int n = 0; n < op.n; ++n) c.push_back(operand_offset(op.desc_b, op.tb != 0, n, k) / 16);
  }
  std::sort(c.begin(), c.end());
  c.erase(std::unique(c.begin(), c.end()), c.end());
  const size_t limit = cur_block()->smem_bytes / 16;
  if (!c.empty() && c.back() >= limit) fail("wgmma operand outside the block's shared memory");
  op.chunks = std::move(c);
}

inline void wgmma_execute(WgmmaOp& op) {
  Block& b = *cur_block();
  for (uint32_t c : op.chunks) {
    if (b.inflight_write[c] > 0) {
      fail("wgmma reads shared bytes [" + std::to_string(c * 16) + ", +16) while a copy into them is in flight " +
           "(no wait for it, or no fence and barrier after it)");
    }
    if (b.unfenced[c] != 0) {
      fail("wgmma reads shared bytes [" + std::to_string(c * 16) + ", +16) that thread " +
           std::to_string(b.unfenced[c] - 1) + " wrote by cp.async without fence.proxy.async after its wait");
    }
  }
  auto smem16 = [&](uint32_t off) {
    uint16_t h;
    std::memcpy(&h, b.smem.data() + off, 2);
    return bits_to_float(h, op.bf16);
  };
  for (int m = 0; m < 64; ++m) {
    const int w = m / 16, g = m % 8, hi = (m % 16) / 8;
    float a_row[16];
    for (int k = 0; k < 16; ++k) {
      if (op.a_in_regs) {  // the m16n8k16 A fragment of warp w: a[hi + 2 (k / 8)], half (k % 2)
        const int tg = (k % 8) / 2;
        const uint32_t reg = op.a[32 * w + 4 * g + tg][hi + 2 * (k / 8)];
        a_row[k] = bits_to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), op.bf16);
      } else {
        a_row[k] = smem16(operand_offset(op.desc_a, op.ta != 0, m, k));
      }
    }
    for (int n = 0; n < op.n; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < 16; ++k) acc += a_row[k] * smem16(operand_offset(op.desc_b, op.tb != 0, n, k));
      // Accumulator (m, n): warp w, lane 4 g + (n % 8) / 2, register 4 (n / 8) + 2 hi + n % 2.
      float& d = op.d[32 * w + 4 * g + (n % 8) / 2][4 * (n / 8) + 2 * hi + n % 2];
      d = (op.scale_d ? d : 0.0f) + acc;
    }
  }
  if (op.counted) {
    for (uint32_t c : op.chunks) --b.pending_read[c];
    op.counted = false;
  }
  op.executed = true;
}

inline Warpgroup& my_warpgroup() {
  Block& b = *cur_block();
  const unsigned wg = cur_thread()->tid / 128;
  if (b.nthreads % 128 != 0 || wg >= b.wgs.size()) fail("wgmma in a block that is not whole warpgroups");
  return b.wgs[wg];
}

inline void wgmma_issue(const WgmmaOp& params, float* d, const uint32_t* a) {
  Warpgroup& w = my_warpgroup();
  const unsigned t = cur_thread()->tid % 128;
  if (w.rv.arrived == 0) {
    w.staging = params;
  } else if (w.staging.n != params.n || w.staging.bf16 != params.bf16 || w.staging.a_in_regs != params.a_in_regs ||
             w.staging.ta != params.ta || w.staging.tb != params.tb || w.staging.desc_a != params.desc_a ||
             w.staging.desc_b != params.desc_b || w.staging.scale_d != params.scale_d) {
    fail("wgmma.mma_async with operands that differ across the warpgroup");
  }
  w.staging.d[t] = d;
  w.staging.a[t] = a;
  rendezvous(w.rv, 128, "wgmma.mma_async", [&] {
    WgmmaOp op = w.staging;
    if (!op.a_in_regs) check_desc(op.desc_a);
    check_desc(op.desc_b);
    wgmma_chunks(op);
    Block& b = *cur_block();
    for (uint32_t c : op.chunks) {
      if (b.inflight_write[c] > 0) {
        fail("wgmma issued on shared bytes [" + std::to_string(c * 16) + ", +16) that a copy is still writing");
      }
      ++b.pending_read[c];
    }
    op.counted = true;
    w.open.push_back(std::move(op));
    // The tensor cores run a warpgroup's MMAs in issue order: executing now means executing every earlier one.
    const Timing tm = options().timing;
    if (tm == Timing::kEager || (tm == Timing::kRandom && coin())) {
      for (auto& g : w.groups) {
        for (WgmmaOp& o : g) {
          if (!o.executed) wgmma_execute(o);
        }
      }
      for (WgmmaOp& o : w.open) {
        if (!o.executed) wgmma_execute(o);
      }
    }
  });
}

inline void wgmma_fence() { rendezvous(my_warpgroup().rv, 128, "wgmma.fence", [] {}); }

inline void wgmma_commit() {
  Warpgroup& w = my_warpgroup();
  rendezvous(w.rv, 128, "wgmma.commit_group", [&] {
    w.groups.push_back(std::move(w.open));
    w.open.clear();
  });
}

inline void wgmma_wait(size_t n) {
  Warpgroup& w = my_warpgroup();
  rendezvous(w.rv, 128, "wgmma.wait_group", [&] {
    while (w.groups.size() > n) {
      for (WgmmaOp& op : w.groups.front()) {
        if (!op.executed) wgmma_execute(op);
      }
      w.groups.pop_front();
    }
  });
}

// ---------------------------------------------------------------------------------------------- named barriers

inline void named_barrier(int id, int count, bool wait) {
  if (id < 0 || id >= 16 || count % 32 != 0) fail("bar.sync/bar.arrive with a bad id or thread count");
  Rendezvous& r = cur_block()->named[id];
  if (r.arrived == 0) {
    r.expected = count;
  } else if (r.expected != count) {
    fail("named barrier " + std::to_string(id) + " used with thread counts " + std::to_string(r.expected) +
         " and " + std::to_string(count));
  }
  const uint64_t gen = r.gen;
  if (++r.arrived == count) {
    r.arrived = 0;
    ++r.gen;
    return;
  }
  if (wait) wait_until([&] { return r.gen != gen; }, "bar.sync");
}

// ---------------------------------------------------------------------------------------- static shared memory

constexpr size_t kStaticBytes = 48 * 1024;

// A kernel's `__shared__ T name[count];` (emu_build.py rewrites each declaration into a call of this, keyed by
// its text): one array per block, at the same offset in every block (so a cluster peer's copy is at that offset
// in its arena).
inline size_t static_offset(const char* key, size_t bytes) {
  static std::map<std::string, size_t> offsets;
  static size_t used = 0;
  auto it = offsets.find(key);
  if (it == offsets.end()) {
    const size_t off = (used + 15) / 16 * 16;
    used = off + bytes;
    if (used > kStaticBytes) fail("static shared arrays beyond the emulator's arena");
    it = offsets.emplace(key, off).first;
  }
  return it->second;
}
template <typename T>
T* block_static(const char* key, size_t count) {
  return reinterpret_cast<T*>(cur_block()->statics.data() + static_offset(key, count * sizeof(T)));
}

// ------------------------------------------------------------------------------------------ thread block clusters

// cooperative_groups::this_cluster()'s sync and map_shared_rank, over the blocks that run together.
inline Cluster& my_cluster() {
  if (cur_block()->cluster == nullptr) fail("a cluster operation in a launch without clusters");
  return *cur_block()->cluster;
}

inline void cluster_sync() {
  Cluster& c = my_cluster();
  rendezvous(c.rv, static_cast<int>(c.blocks.size() * cur_block()->nthreads), "cluster.sync", [] {});
}

template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  Cluster& c = my_cluster();
  if (rank >= c.blocks.size()) fail("map_shared_rank: rank outside the cluster");
  Block& me = *cur_block();
  Block& peer = *c.blocks[rank];
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  if (b >= me.smem.data() && b < me.smem.data() + me.smem_bytes) {
    return reinterpret_cast<T*>(peer.smem.data() + (b - me.smem.data()));
  }
  if (b >= me.statics.data() && b < me.statics.data() + me.statics.size()) {
    return reinterpret_cast<T*>(peer.statics.data() + (b - me.statics.data()));
  }
  fail("map_shared_rank of an address outside the block's shared memory");
}

// ---------------------------------------------------------------------------------------------------- device

// The card the launchers plan for (an H100 unless a driver says otherwise; tests/emu/device.cpp answers their
// queries from it), and how many clusters of a launch fit on it at once (0: none, so the launcher falls back).
struct Device {
  int sms = 132, cc_major = 9, cc_minor = 0, smem_optin = 227 * 1024, ptx_version = 90, max_active_clusters = 16;
  bool tma_encoder = true;  // the driver has cuTensorMapEncodeTiled
};
inline Device& device() {
  static Device d;
  return d;
}

// -------------------------------------------------------------------------------------------------- launches

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;

inline std::vector<std::unique_ptr<char[]>>& stacks() {
  static std::vector<std::unique_ptr<char[]>> s;
  return s;
}
inline std::function<void()>& block_body() {  // what every thread of the running launch executes
  static std::function<void()> f;
  return f;
}

inline void fiber_main() {
  cur_thread()->progressed = true;
  block_body()();
  cur_thread()->done = true;
  cur_thread()->progressed = true;
  cur_thread()->waiting = nullptr;
  swapcontext(&cur_thread()->ctx, &scheduler_ctx());
}

// Lands one of the block's in-flight TMA copies (a random one, or the oldest); false if none is.
inline bool land_one_tma(Block& b, bool random_pick) {
  if (b.tma.empty()) return false;
  Block* const saved = cur_block();
  cur_block() = &b;
  const size_t i = random_pick ? rng()() % b.tma.size() : 0;
  TmaJob j = b.tma[i];
  b.tma.erase(b.tma.begin() + static_cast<std::ptrdiff_t>(i));
  tma_land(j);
  cur_block() = saved;
  return true;
}

[[noreturn]] inline void deadlock(std::vector<std::unique_ptr<Block>>& blocks) {
  std::string msg = "deadlock: no thread can move. Waiting:";
  for (auto& b : blocks) {
    std::map<std::string, std::vector<unsigned>> by;
    for (Thread& t : b->threads) {
      if (!t.done) by[t.waiting ? t.waiting : "?"].push_back(t.tid);
    }
    for (auto& [what, tids] : by) {
      msg += "\n    block (" + std::to_string(b->id.x) + ", " + std::to_string(b->id.y) + ") " + what + ": " +
             std::to_string(tids.size()) + " threads (" + std::to_string(tids.front()) + ".." +
             std::to_string(tids.back()) + ")";
    }
  }
  cur_thread() = nullptr;
  cur_block() = nullptr;
  fail(msg);
}

inline void resume(Thread& th) {
  cur_thread() = &th;
  cur_block() = th.block;
  threadIdx = {th.tid, 0, 0};
  blockIdx = th.block->id;
  th.progressed = false;
  swapcontext(&scheduler_ctx(), &th.ctx);
}

// Runs the blocks `ids` together (one block, or the blocks of one cluster) to completion, then checks what
// each left behind.
inline void run_blocks(const std::vector<uint3>& ids, unsigned nthreads, size_t smem_bytes, bool cluster) {
  std::vector<std::unique_ptr<Block>> blocks;
  Cluster c;
  for (const uint3& id : ids) {
    auto b = std::make_unique<Block>();
    b->id = id;
    b->nthreads = nthreads;
    b->smem_bytes = smem_bytes;
    b->smem.assign(smem_bytes + kGuardBytes, 0xA5);  // garbage, not zeros: the kernel must write what it reads
    b->statics.assign(kStaticBytes, 0xA5);
    b->threads.resize(nthreads);
    b->warp_rv.resize((nthreads + 31) / 32);
    b->shfl_in.resize(b->warp_rv.size() * 32);
    b->shfl_out.resize(b->warp_rv.size() * 32);
    for (auto& v : b->u32_in) v.resize(b->warp_rv.size() * 32);
    for (int i = 0; i < 4; ++i) {
      b->u32_out[i].resize(b->warp_rv.size() * 32);
      b->f32_in[i].resize(b->warp_rv.size() * 32);
      b->f32_out[i].resize(b->warp_rv.size() * 32);
    }
    b->wgs.resize(nthreads / 128);
    b->inflight_write.assign((smem_bytes + 15) / 16 + 1, 0);
    b->pending_read.assign((smem_bytes + 15) / 16 + 1, 0);
    b->unfenced.assign((smem_bytes + 15) / 16 + 1, 0);
    if (cluster) {
      b->cluster = &c;
      b->rank = static_cast<unsigned>(c.blocks.size());
      c.blocks.push_back(b.get());
    }
    blocks.push_back(std::move(b));
  }
  const size_t total = blocks.size() * nthreads;
  while (stacks().size() < total) stacks().emplace_back(new char[kStackBytes]);
  std::vector<Thread*> all;
  for (auto& b : blocks) {
    for (unsigned t = 0; t < nthreads; ++t) {
      Thread& th = b->threads[t];
      th.tid = t;
      th.block = b.get();
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = stacks()[all.size()].get();
      th.ctx.uc_stack.ss_size = kStackBytes;
      th.ctx.uc_link = nullptr;
      makecontext(&th.ctx, fiber_main, 0);
      all.push_back(&th);
    }
  }
  const Timing timing = options().timing;
  size_t live = all.size();
  bool full_round = true;  // every live thread gets resumed (a round that moves nothing then is a deadlock)
  std::vector<int> stall(blocks.size() * ((nthreads + 31) / 32));  // rounds each warp still sits out
  while (live > 0) {
    if (timing == Timing::kRandom) {
      std::shuffle(all.begin(), all.end(), rng());
      // Warps run at their own pace on a card: under kRandom a warp now and then sits out up to 16 rounds, so
      // others run far ahead of it (a missing barrier shows up as a stale or clobbered value).
      for (int& s : stall) s = full_round ? 0 : s > 0 ? s - 1 : rng()() % 4 == 0 ? int(rng()() % 16) : 0;
    }
    bool moved = false;
    for (Thread* th : all) {
      if (th->done || stall[th->block->rank * ((nthreads + 31) / 32) + th->tid / 32] > 0) continue;
      resume(*th);
      moved = moved || th->progressed;
      if (th->done) --live;
      if (timing == Timing::kRandom && rng()() % 8 == 0) land_one_tma(*th->block, true);
    }
    cur_thread() = nullptr;
    cur_block() = nullptr;
    if (!moved && live > 0) {
      bool landed = false;
      for (auto& b : blocks) landed = landed || land_one_tma(*b, timing == Timing::kRandom);
      if (!landed && full_round) deadlock(blocks);
      full_round = !landed;
    } else {
      full_round = false;
    }
  }
  for (auto& b : blocks) {
    cur_block() = b.get();
    if (!b->tma.empty()) fail("the block exited with TMA copies in flight");
    for (Warpgroup& w : b->wgs) {
      if (!w.open.empty() || !w.groups.empty()) fail("the block exited with wgmma operations not waited for");
    }
    for (size_t i = b->smem_bytes; i < b->smem.size(); ++i) {
      if (b->smem[i] != 0xA5) fail("the block wrote past its dynamic shared memory");
    }
  }
  cur_block() = nullptr;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

// A launch's configuration, from kernel<<<grid, block, smem, stream>>> (the test rewrites each such launch into
// a call of launch()) or from cudaLaunchKernelEx's config.
struct Config {
  dim3 grid, block;
  size_t smem;
  unsigned cluster = 1;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

// Every launch since the driver last cleared it: the path a launcher took shows in its launches.
inline std::vector<Config>& launch_log() {
  static std::vector<Config> log;
  return log;
}

// Every block of the grid, in turn (in random order under kRandom), a cluster's blocks together. The kernel's
// parameters are copied per thread, as a launch copies them to the device.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), Config c, A&&... args) {
  launch_log().push_back(c);
  if (c.block.y != 1 || c.block.z != 1 || c.grid.z != 1) fail("only 1-d blocks and 2-d grids are emulated");
  if (c.block.x == 0 || c.block.x > 1024 || c.grid.x == 0 || c.grid.y == 0) fail("a launch with a bad shape");
  if (c.cluster == 0 || c.grid.x % c.cluster != 0) fail("a grid that is not whole clusters");
  gridDim = c.grid;
  blockDim = c.block;
  std::vector<std::vector<uint3>> units;
  for (unsigned y = 0; y < c.grid.y; ++y) {
    for (unsigned x = 0; x < c.grid.x; x += c.cluster) {
      std::vector<uint3> ids;
      for (unsigned k = 0; k < c.cluster; ++k) ids.push_back({x + k, y, 0});
      units.push_back(std::move(ids));
    }
  }
  if (options().timing == Timing::kRandom) std::shuffle(units.begin(), units.end(), rng());
  for (const auto& ids : units) {
    block_body() = [&] { kernel(args...); };
    run_blocks(ids, c.block.x, c.smem, c.cluster > 1);
  }
  last_error() = cudaSuccess;
}

}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "error";
  }
}

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  emu::Config c(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream);
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      if (cfg->attrs[i].val.clusterDim.y != 1 || cfg->attrs[i].val.clusterDim.z != 1) {
        emu::fail("only 1-d clusters are emulated");
      }
      c.cluster = cfg->attrs[i].val.clusterDim.x;
    }
  }
  emu::launch(kernel, c, std::forward<A>(args)...);
  return cudaSuccess;
}

template <typename K>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, K, const cudaLaunchConfig_t*) {
  *n = emu::device().max_active_clusters;
  return cudaSuccess;
}

namespace cooperative_groups {
struct cluster_group {
  void sync() const { emu::cluster_sync(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return emu::map_shared_rank(p, rank);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
