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
//
// state.h holds the state and the scheduler's core (waits, rendezvous, failure reports), async.h the
// asynchronous units (cp.async, mbarriers, TMA, wgmma), and this file the rest: named barriers, static shared
// memory, clusters, the emulated device, launches and the CUDA runtime calls the launchers make.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "async.h"

namespace emu {

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

// A driver's command line, `[eager|late|random] [seed]`: sets the timing and seeds the scheduler. Returns the
// seed (the drivers draw their inputs from it too), or -1 after printing the usage.
inline int64_t init(int argc, char** argv) {
  const std::string timing = argc > 1 ? argv[1] : "random";
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  if (timing != "eager" && timing != "late" && timing != "random") {
    std::fprintf(stderr, "usage: %s [eager|late|random] [seed]\n", argv[0]);
    return -1;
  }
  options().timing = timing == "eager" ? Timing::kEager : timing == "late" ? Timing::kLate : Timing::kRandom;
  rng().seed(seed);
  std::printf("timing %s, seed %llu\n", timing.c_str(), static_cast<unsigned long long>(seed));
  return static_cast<int64_t>(seed);
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
