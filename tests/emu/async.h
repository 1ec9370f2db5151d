// The SIMT emulator's asynchronous units (tests/emu/simt.h has the overview): shared memory's shadow state per
// 16-byte chunk, cp.async groups, mbarriers, TMA tensor copies and wgmma, each as the PTX ISA describes it.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "state.h"
#include "tma_box.h"

namespace emu {

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
  for_each_box_element(m.dims, m.strides, m.box, j.coord, [&](int64_t byte) {
    if (byte >= 0) {
      check_global(m.base + byte, 2, "TMA copy");
      std::memcpy(out, m.base + byte, 2);
    } else {
      std::memset(out, 0, 2);
    }
    out += 2;
  });
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

}  // namespace emu
