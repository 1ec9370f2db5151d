// The Hopper (sm_90a) attention kernels: flash_reg_kernel's algorithm (attention_kernel.cuh: online softmax in
// the exp2 domain, the same masking and special-value rules) on the warpgroup MMA, wgmma.
//
//   - Each computing warpgroup (4 warps, 128 threads) owns 64 query rows; kWarpgroups of them share every K/V
//     tile.
//   - S = Q K^T: wgmma m64n64k16 with Q and K in shared memory, both K-major.
//   - O += P V: wgmma m64nDk16 with P from registers (the S accumulators, rounded to the input dtype, are
//     exactly the register A fragment) and V in shared memory, MN-major: no transposition anywhere.
//   - Loads, two ways (Sm90Config::kTma): flash_wgmma_tma_kernel adds a producer warpgroup whose one thread
//     issues TMA copies of Q and of K/V tiles into a ring of stages, guarded by mbarriers (FlashAttention-3's
//     warp specialization); flash_wgmma_kernel has every thread load by cp.async, double-buffered. Both share
//     the main loop, including the overlapped variant (kOverlap: a warpgroup's softmax of tile j runs during
//     its P.V of tile j - 1).
//   - Shared tiles use wgmma's no-swizzle layout: 8 x 8 "core matrices" of 8 rows x 16 bytes, each 128
//     contiguous bytes (core_offset below); every operand is described to wgmma by a matrix descriptor. The
//     tensor maps (tensor_map.h) write that same layout, so both loaders feed one main loop.
//
// Status: written on a machine without a GPU, so nothing here has run yet. The dispatch only takes it when
// asked (SDCORE_CUDA_ATTENTION=sm90, on a cc 9.0 device, from a build with 9.0a in TORCH_CUDA_ARCH_LIST).
// bench/hopper/wgmma_attention.cu tests its layout assumptions one by one and times all four configurations;
// bench/gpu_check.sh runs the attention tests with it; the default moves to it once it passes there and beats
// the sm_80 kernel. Not yet in it: larger tiles (kBc = 128, with setmaxnreg moving the producer's registers to
// the consumers), two consumers' softmax and MMAs in ping-pong, swizzled shared layouts. Those are tuning
// steps for a card that can measure them.
#pragma once

#include "attention_launch.cuh"
#include "tensor_map.h"
#include "tma_ptx.cuh"
#include "wgmma_ops.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

// Byte offset of row r's 16-byte chunk c (columns 8c..8c+7) in a tile of `rows` rows (a multiple of 8) in the
// no-swizzle layout: core matrices run down the rows first (128 bytes apart), then along the columns (rows * 16
// bytes apart).
__host__ __device__ constexpr int core_offset(int r, int c, int rows) {
  return ((c * (rows / 8)) + (r / 8)) * 128 + (r % 8) * 16;
}

// The two strides of a matrix descriptor, in bytes. In the no-swizzle layout LBO is the step between core
// matrices adjacent along K and SBO the step between ones adjacent along M/N, for either major (CUTLASS's
// canonical GMMA layouts, cute/atom/mma_traits_sm90_gmma.hpp). bench/hopper checks this on a card.
struct DescStrides {
  uint32_t lbo, sbo;
};
// A tile whose rows run along M/N and columns along K (Q and K: K-major).
__host__ __device__ constexpr DescStrides k_major_strides(int rows) { return {static_cast<uint32_t>(rows) * 16, 128}; }
// A tile whose rows run along K and columns along N (V: MN-major).
__host__ __device__ constexpr DescStrides mn_major_strides(int rows) { return {128, static_cast<uint32_t>(rows) * 16}; }

// Matrix descriptor: start address, LBO and SBO (each >> 4, 14 bits), base offset 0, no swizzle.
__device__ __forceinline__ uint64_t make_desc(const void* smem, DescStrides s) {
  const uint32_t addr = smem_addr(smem);
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((s.lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((s.sbo >> 4) & 0x3FFF) << 32);
}

// Shared memory written through the generic proxy (cp.async, st.shared) and read next by wgmma (the async
// proxy) needs this fence between the two, in the writing threads, before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins accumulators in place around asynchronous MMAs: the compiler may not move their reads or writes across
// this point (a wgmma asm statement writes d when issued as far as the compiler knows; the hardware does so by
// the wait).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Rows [row0, row0 + kRows) x columns [0, kDp) of a row-major matrix (row stride `stride`, 16-byte aligned
// rows) into a no-swizzle tile by cp.async. Rows >= row_limit and columns >= d become zeros. Eight consecutive
// threads fill one core matrix (128 contiguous bytes: no bank conflicts), the next eight the next chunk of the
// same rows (so a warp reads 64 contiguous bytes of each of 8 rows).
template <int kRows, int kDp, int kThreads>
__device__ __forceinline__ void load_core_tile(unsigned char* s, const uint16_t* g, int64_t stride, int row0,
                                               int row_limit, int d, int tid) {
  constexpr int kChunks = kDp / 8, kTotal = kRows * kChunks;
  static_assert(kRows % 8 == 0 && kDp % 8 == 0, "core matrices are 8 x 8");
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int rest = idx / 8;
      const int c = rest % kChunks, r = (rest / kChunks) * 8 + idx % 8;
      const int row = row0 + r, col = c * 8;
      const bool ok = row < row_limit && col < d;
      cp_async_16(s + core_offset(r, c, kRows), ok ? g + static_cast<int64_t>(row) * stride + col : g, ok ? 16 : 0);
    }
  }
}

// The sm_90 tile table, per padded head dim: warpgroups computing per block (64 query rows each), keys per
// step, whether a warpgroup overlaps its softmax with its own P.V (kOverlap), and whether a producer
// warpgroup loads K/V by TMA (kTma: flash_wgmma_tma_kernel) or every thread by cp.async (flash_wgmma_kernel).
// bench/hopper times all four settings of the last two columns, so a card decides them.
template <int kDp>
struct Sm90Config;
template <> struct Sm90Config<48>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true; };
template <> struct Sm90Config<64>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true; };
template <> struct Sm90Config<80>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true; };
template <> struct Sm90Config<160> { static constexpr int kWarpgroups = 1, kBc = 64; static constexpr bool kOverlap = false, kTma = true; };

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The per-warpgroup steps of the kernel. Accumulators (s: 64 x 64 scores, o: 64 x kDp) are in wgmma's layout:
// x[4i + e] is row 16 warp + g + 8 (e / 2), column 8i + 2 tg + e % 2 of the warpgroup's block (the m16n8
// accumulator layout, repeated along N).

// Issues S = Q K^T (not committed): kDp / 16 k-steps, Q and K both K-major.
template <typename T, int kDp, int kBr, int kBc>
__device__ __forceinline__ void issue_qk(float (&s)[32], const unsigned char* sQw, const unsigned char* sK) {
  constexpr DescStrides kQStrides = k_major_strides(kBr), kKStrides = k_major_strides(kBc);
#pragma unroll
  for (int kk = 0; kk < kDp / 16; ++kk) {
    wgmma_ss<T, 0, 0>(s, make_desc(sQw + core_offset(0, 2 * kk, kBr), kQStrides),
                      make_desc(sK + core_offset(0, 2 * kk, kBc), kKStrides), kk > 0 ? 1 : 0);
  }
}

// S = Q K^T, waited for: the first step of a tile when nothing else is in flight.
template <typename T, int kDp, int kBr, int kBc>
__device__ __forceinline__ void compute_qk(float (&s)[32], const unsigned char* sQw, const unsigned char* sK) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.0f;
  fence_operands(s);
  wgmma_fence();
  issue_qk<T, kDp, kBr, kBc>(s, sQw, sK);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(s);
}

// Issues O += P V (not committed): P from registers (k-step kk: keys 16kk..), V MN-major.
template <typename T, int kDp, int kBc>
__device__ __forceinline__ void issue_pv(float (&o)[kDp / 2], const uint32_t (&pa)[kBc / 16][4],
                                         const unsigned char* sV) {
  constexpr DescStrides kVStrides = mn_major_strides(kBc);
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    wgmma_rs<T, 1>(o, pa[kk], make_desc(sV + core_offset(16 * kk, 0, kBc), kVStrides), 1);
  }
}

// The online softmax of one score tile, in place (s becomes the unnormalized P): scale into the exp2 domain,
// -inf for keys >= M and (causal) keys after the row, new row maxima, exp2, row sums. f[hh] is the factor for
// what O accumulated so far (the caller applies it: O may still be in flight).
template <int kBc>
__device__ __forceinline__ void softmax_tile(float (&s)[32], float (&row_max)[2], float (&row_sum)[2],
                                             float (&f)[2], int kv0, int row0, int M, bool causal, float sl2,
                                             int g, int tg) {
  const bool need_mask = kv0 + kBc > M || (causal && kv0 + kBc - 1 > row0);
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    float x = s[i] * sl2;
    if (need_mask) {
      const int row = row0 + g + 8 * ((i % 4) / 2);
      const int col = kv0 + 8 * (i / 4) + 2 * tg + (i % 2);
      if (col >= M || (causal && col > row)) x = -INFINITY;
    }
    s[i] = x;
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {  // a row's 4 quad lanes hold all of its columns
    float mx = -INFINITY;
#pragma unroll
    for (int blk = 0; blk < 8; ++blk) mx = fmaxf(mx, fmaxf(s[4 * blk + 2 * hh], s[4 * blk + 2 * hh + 1]));
    f[hh] = rescale_log2(row_max[hh], quad_max(mx));
    const float base = exp_base(row_max[hh]);
    float sum = 0.0f;
#pragma unroll
    for (int blk = 0; blk < 8; ++blk) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[4 * blk + 2 * hh + e] - base);
        s[4 * blk + 2 * hh + e] = p;
        sum += p;
      }
    }
    row_sum[hh] = row_sum[hh] * f[hh] + sum;
  }
}

template <int kDp>
__device__ __forceinline__ void rescale(float (&o)[kDp / 2], const float (&f)[2]) {
#pragma unroll
  for (int i = 0; i < kDp / 2; ++i) o[i] *= f[(i % 4) / 2];
}

// P as the register A operand of P.V: k-step kk covers keys 16kk.., the accumulator blocks 2kk and 2kk + 1.
template <typename T, int kBc>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kBc / 16][4], const float (&s)[32]) {
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// What the main loop needs to know of its warpgroup's rows: the first query row of its warp, the key count,
// the causal flag, the exp2-domain scale and the thread's accumulator fragment coordinates.
struct RowCtx {
  int row0, M;
  bool causal;
  float sl2;
  int g, tg;
};

// One warpgroup's pass over the key tiles, for either kernel below: O (unnormalized) and this thread's part of
// the row sums. K of stage t is at sKV + t * kTileKV, V at sKV + (kStages + t) * kTileKV; tile j sits in stage
// j % kStages. acquire(j) returns once tile j is in shared memory and visible to wgmma; release(j) says this
// thread is done reading tile j's stage (the kernels hand stages back with a block barrier or an mbarrier).
//
// kOverlap = false: per tile j, S_j = Q K_j^T, wait, softmax, O += P_j V_j, wait. Causal: the warpgroup's
// tiles are the first n_wg (a tile whose first key follows its last row is skipped: a uniform branch per
// warpgroup).
// kOverlap = true (FlashAttention-3's intra-warpgroup overlap): per tile j >= 1, issue S_j and then O +=
// P_{j-1} V_{j-1}; wait for S_j only (groups complete in order), run its softmax while P.V is still on the
// tensor cores, then wait for P.V and rescale O. P stays in registers across the iteration, so tile j - 1's
// stage is released one iteration late. No wgmma sits in a branch: ptxas serializes wgmma around branches it
// can't prove warpgroup-uniform, so causal runs every tile, and the mask zeroes the keys a row can't see.
template <typename T, int kDp, int kBr, int kBc, int kStages, bool kOverlap, typename Acquire, typename Release>
__device__ __forceinline__ void wgmma_mainloop(Acquire&& acquire, Release&& release, const unsigned char* sQw,
                                               const unsigned char* sKV, int n_kv, int n_wg, const RowCtx& c,
                                               float (&o)[kDp / 2], float (&row_sum)[2]) {
  constexpr int kTileKV = kBc * kDp * 2;
  auto sK = [&](int j) { return sKV + (j % kStages) * kTileKV; };
  auto sV = [&](int j) { return sKV + (kStages + j % kStages) * kTileKV; };
#pragma unroll
  for (int i = 0; i < kDp / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8
  row_sum[0] = row_sum[1] = 0.0f;
  float f[2], s[32];
  uint32_t pa[kBc / 16][4];  // P of the last softmax, as the A operand of P.V

  if constexpr (!kOverlap) {
    for (int j = 0; j < n_kv; ++j) {
      acquire(j);
      if (j < n_wg) {
        compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(j));
        softmax_tile<kBc>(s, row_max, row_sum, f, j * kBc, c.row0, c.M, c.causal, c.sl2, c.g, c.tg);
        rescale<kDp>(o, f);
        pack_p<T, kBc>(pa, s);
        fence_operands(o);
        wgmma_fence();  // orders the register writes (pa, o) before the MMAs read them
        issue_pv<T, kDp, kBc>(o, pa, sV(j));
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(o);
      }
      release(j);
    }
  } else {
    (void)n_wg;
    acquire(0);
    compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(0));
    softmax_tile<kBc>(s, row_max, row_sum, f, 0, c.row0, c.M, c.causal, c.sl2, c.g, c.tg);  // O is still zero
    pack_p<T, kBc>(pa, s);
    for (int j = 1; j < n_kv; ++j) {
      acquire(j);
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.0f;
      fence_operands(s);
      fence_operands(o);
      wgmma_fence();  // orders the register writes (s, pa, o) before the MMAs read them
      issue_qk<T, kDp, kBr, kBc>(s, sQw, sK(j));
      wgmma_commit();
      issue_pv<T, kDp, kBc>(o, pa, sV(j - 1));
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(s);
      softmax_tile<kBc>(s, row_max, row_sum, f, j * kBc, c.row0, c.M, c.causal, c.sl2, c.g, c.tg);
      wgmma_wait<0>();
      fence_operands(o);
      release(j - 1);
      rescale<kDp>(o, f);  // O holds tiles < j, relative to the old maxima
      pack_p<T, kBc>(pa, s);
    }
    fence_operands(o);
    wgmma_fence();
    issue_pv<T, kDp, kBc>(o, pa, sV(n_kv - 1));
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    release(n_kv - 1);
  }
}

// Normalizes a warpgroup's rows of O and stages them in sO (row pitch kDp + 8, the sm_80 kernel's store_tile
// layout); the caller syncs and stores the block's tile. wg: the consumer warpgroup's index in the block.
template <typename T, int kDp>
__device__ __forceinline__ void stage_output(uint16_t* sO, const float (&o)[kDp / 2], const float (&row_sum)[2],
                                             int wg, int warp, int g, int tg) {
  constexpr int kLdO = kDp + 8;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float inv = 1.0f / quad_sum(row_sum[hh]);  // NaN-preserving, as the sm_80 kernel
    const int r = wg * 64 + 16 * warp + g + 8 * hh;
#pragma unroll
    for (int blk = 0; blk < kDp / 8; ++blk) {
      *reinterpret_cast<uint32_t*>(sO + r * kLdO + 8 * blk + 2 * tg) =
          pack2<T>(o[4 * blk + 2 * hh] * inv, o[4 * blk + 2 * hh + 1] * inv);
    }
  }
}
#endif

// Keys in flight: the cp.async kernel double-buffers K/V, or keeps three stages when P.V of tile j - 1 still
// reads V while tile j + 1 loads; the TMA producer runs up to four tiles ahead (three at D = 160, whose tiles
// are twice as large).
__host__ __device__ constexpr int sm90_stages(int dp, bool overlap, bool tma) {
  return tma ? (dp >= 160 ? 3 : 4) : overlap ? 3 : 2;
}
// Q, then K of every stage, then V of every stage; the TMA kernel's mbarriers follow (full and empty per
// stage, one for Q).
constexpr size_t sm90_smem_bytes(int dp, int br, int bc, bool overlap, bool tma) {
  return size_t(br + 2 * sm90_stages(dp, overlap, tma) * bc) * size_t(dp) * 2 +
         (tma ? size_t(2 * sm90_stages(dp, overlap, tma) + 1) * 8 : 0);
}

// The cp.async kernel: every thread loads (K/V tile j + 1 while tile j is multiplied) and computes; each
// warpgroup owns 64 query rows.
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap>
__global__ void __launch_bounds__(kWarpgroups * 128) flash_wgmma_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBr = kWarpgroups * 64;
  constexpr int kStages = sm90_stages(kDp, kOverlap, false);
  constexpr int kTileQ = kBr * kDp * 2, kTileKV = kBc * kDp * 2;  // bytes
  static_assert(kBc == 64, "S = Q K^T is one m64n64 wgmma per k-step");
  static_assert(kDp % 16 == 0, "wgmma's k-step is 16");
  static_assert(size_t(kBr) * (kDp + 8) * 2 <= 2 * kStages * size_t(kTileKV), "the output is staged in the K/V stages");

  unsigned char* smem = dyn_smem();
  unsigned char* sQ = smem;
  unsigned char* sKV = smem + kTileQ;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int64_t bid = blockIdx.x;
  // Heaviest (causal) query blocks first, as the sm_80 kernel.
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;
  const HeadPtrs<uint16_t> ptr = head_ptrs<uint16_t>(a, bid / a.n_qblocks);
  const int N = a.n, M = a.m, D = a.d;
  const int kv_end = a.causal ? imin(M, q0 + kBr) : M;  // >= 1: key 0 is visible to every row
  const int n_kv = (kv_end + kBc - 1) / kBc;
  const int wg_row0 = q0 + wg * 64;  // this warpgroup's first query row
  const int n_wg = a.causal ? imin(n_kv, (wg_row0 + 63) / kBc + 1) : n_kv;
  const RowCtx c{wg_row0 + 16 * warp, M, a.causal, a.scale_log2, lane / 4, lane % 4};

  load_core_tile<kBr, kDp, kThreads>(sQ, ptr.q, a.q_sn, q0, N, D, tid);
  load_core_tile<kBc, kDp, kThreads>(sKV, ptr.k, a.k_sm, 0, M, D, tid);
  load_core_tile<kBc, kDp, kThreads>(sKV + kStages * kTileKV, ptr.v, a.v_sm, 0, M, D, tid);
  cp_async_commit();

  // Tile j: prefetch tile j + 1 into the stage that the last release's barrier freed, wait for tile j (and Q),
  // make it visible to wgmma.
  auto acquire = [&](int j) {
    if (j + 1 < n_kv) {
      const int t = (j + 1) % kStages;
      load_core_tile<kBc, kDp, kThreads>(sKV + t * kTileKV, ptr.k, a.k_sm, (j + 1) * kBc, M, D, tid);
      load_core_tile<kBc, kDp, kThreads>(sKV + (kStages + t) * kTileKV, ptr.v, a.v_sm, (j + 1) * kBc, M, D, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
  };
  // Every thread is done with the stage before a later acquire refills it.
  auto release = [](int) { __syncthreads(); };
  float o[kDp / 2], row_sum[2];
  wgmma_mainloop<T, kDp, kBr, kBc, kStages, kOverlap>(acquire, release, sQ + core_offset(wg * 64, 0, kBr), sKV,
                                                      n_kv, n_wg, c, o, row_sum);
  // The stages are free (the last release was a block barrier): stage the output there.
  uint16_t* sO = reinterpret_cast<uint16_t*>(sKV);
  stage_output<T, kDp>(sO, o, row_sum, wg, warp, c.g, c.tg);
  __syncthreads();
  store_tile<kBr, kDp, kThreads>(ptr.o, a.o_sn, sO, q0, N, D, true, tid);
#elif defined(__CUDA_ARCH__)
  // Compiled for another arch: the host never launches this (run_flash_sm90 is only dispatched on sm_90 from a
  // build with sm_90a code), so reaching here is a dispatch bug; fail loudly rather than return garbage.
  __trap();
#endif
}

// The TMA kernel's parameters: one tensor map per input (tensor_map.h) beside the plain arguments. Passed as a
// __grid_constant__ kernel parameter, so the maps' addresses are what cp.async.bulk.tensor reads.
struct Sm90TmaArgs {
  CUtensorMap q, k, v;
  FlashArgs a;
};
inline FlashArgs& flash_args_of(Sm90TmaArgs& args) { return args.a; }

// The warp-specialized kernel (FlashAttention-3's producer/consumer split): warpgroup 0 is the producer, one of
// its threads issuing every TMA copy (Q once, then K and V of each tile into a ring of kStages stages, each
// guarded by a "full" mbarrier that the copies complete and an "empty" one that the consumers arrive on);
// warpgroups 1..kWarpgroups are consumers, 64 query rows each, running the same main loop as the cp.async
// kernel. No thread waits on a copy it issued, and the loads of the next tiles need no thread's time.
// No setmaxnreg: the consumers fit the 168-register cap of a 384-thread block (ptxas: see tests/test_build.py),
// so moving registers from the producer would buy nothing until the tiles grow.
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap>
__global__ void __launch_bounds__((kWarpgroups + 1) * 128, 1) flash_wgmma_tma_kernel(const __grid_constant__ Sm90TmaArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kConsumers = kWarpgroups * 128, kBr = kWarpgroups * 64;
  constexpr int kStages = sm90_stages(kDp, kOverlap, true);
  constexpr int kTileQ = kBr * kDp * 2, kTileKV = kBc * kDp * 2;  // bytes
  static_assert(kBc == 64, "S = Q K^T is one m64n64 wgmma per k-step");
  static_assert(kDp % 16 == 0, "wgmma's k-step is 16");
  static_assert(size_t(kBr) * (kDp + 8) * 2 <= 2 * kStages * size_t(kTileKV), "the output is staged in the K/V stages");
  const FlashArgs& a = args.a;

  unsigned char* smem = dyn_smem();
  unsigned char* sQ = smem;
  unsigned char* sKV = smem + kTileQ;
  uint64_t* full = reinterpret_cast<uint64_t*>(sKV + 2 * kStages * kTileKV);  // 128-byte aligned offset
  uint64_t* empty = full + kStages;
  uint64_t* q_full = empty + kStages;

  const int tid = threadIdx.x, wg = tid / 128;
  const int64_t bid = blockIdx.x, bh = bid / a.n_qblocks;
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;  // heaviest (causal) first
  const int M = a.m;
  const int kv_end = a.causal ? imin(M, q0 + kBr) : M;
  const int n_kv = (kv_end + kBc - 1) / kBc;

  if (tid == 0) {
    for (int t = 0; t < kStages; ++t) {
      mbar_init(&full[t], 1);            // the producer's arrive.expect_tx; the copies complete the bytes
      mbar_init(&empty[t], kConsumers);  // every consumer thread, once done reading the stage
    }
    mbar_init(q_full, 1);
    fence_barrier_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer may finish long before the consumers

  if (wg == 0) {
    if (tid == 0) {
      const int b = static_cast<int>(bh / a.heads), h = static_cast<int>(bh - int64_t(b) * a.heads);
      mbar_arrive_expect_tx(q_full, kTileQ);
      tma_load_5d(sQ, &args.q, q_full, 0, q0, 0, h, b);
      for (int j = 0; j < n_kv; ++j) {
        const int t = j % kStages;
        mbar_wait(&empty[t], ((j / kStages) & 1) ^ 1);  // round 0: a fresh barrier's "previous" phase, at once
        mbar_arrive_expect_tx(&full[t], 2 * kTileKV);   // whole boxes count, zero-filled rows and columns too
        tma_load_5d(sKV + t * kTileKV, &args.k, &full[t], 0, j * kBc, 0, h, b);
        tma_load_5d(sKV + (kStages + t) * kTileKV, &args.v, &full[t], 0, j * kBc, 0, h, b);
      }
    }
    return;
  }

  const int cw = wg - 1, ctid = tid - 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int wg_row0 = q0 + cw * 64;
  const int n_wg = a.causal ? imin(n_kv, (wg_row0 + 63) / kBc + 1) : n_kv;
  const RowCtx c{wg_row0 + 16 * warp, M, a.causal, a.scale_log2, lane / 4, lane % 4};
  mbar_wait(q_full, 0);
  // Data a TMA copy completed on an mbarrier is visible to wgmma (both the async proxy) once the wait returns.
  auto acquire = [&](int j) { mbar_wait(&full[j % kStages], (j / kStages) & 1); };
  auto release = [&](int j) { mbar_arrive(&empty[j % kStages]); };
  float o[kDp / 2], row_sum[2];
  wgmma_mainloop<T, kDp, kBr, kBc, kStages, kOverlap>(acquire, release, sQ + core_offset(cw * 64, 0, kBr), sKV,
                                                      n_kv, n_wg, c, o, row_sum);
  // Every tile's copies have landed and every consumer is past its last read once all consumers reach this
  // barrier (the producer issues no more): the stages are free for the output.
  named_barrier_sync(1, kConsumers);
  uint16_t* sO = reinterpret_cast<uint16_t*>(sKV);
  stage_output<T, kDp>(sO, o, row_sum, cw, warp, c.g, c.tg);
  named_barrier_sync(1, kConsumers);
  const HeadPtrs<uint16_t> ptr = head_ptrs<uint16_t>(a, bh);
  store_tile<kBr, kDp, kConsumers>(ptr.o, a.o_sn, sO, q0, a.n, a.d, true, ctid);
#elif defined(__CUDA_ARCH__)
  __trap();  // as flash_wgmma_kernel
#endif
}

// One configuration's launch, without TMA (bench/hopper times every configuration through these).
template <typename T, int kDp, int kWarpgroups, bool kOverlap>
cudaError_t launch_flash_sm90(const FlashArgs& a, cudaStream_t stream) {
  constexpr int kBc = Sm90Config<kDp>::kBc, kBr = kWarpgroups * 64;
  constexpr size_t smem = sm90_smem_bytes(kDp, kBr, kBc, kOverlap, false);
  size_t max_smem = 0;
  const cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if (smem > max_smem) return cudaErrorInvalidConfiguration;  // every sm_90 part has 227 KB; the table needs <= 140 KB
  return launch_kernel(flash_wgmma_kernel<T, kDp, kWarpgroups, kBc, kOverlap>, a, kBr, kWarpgroups * 128, smem,
                       stream);
}

// With TMA: encodes the three tensor maps (16-byte aligned rows and strides, as a.vec promises), then launches.
// A layout the driver's tensor maps can't describe returns the encoder's error before anything is launched.
template <typename T, int kDp, int kWarpgroups, bool kOverlap>
cudaError_t launch_flash_sm90_tma(const FlashArgs& a, cudaStream_t stream) {
  constexpr int kBc = Sm90Config<kDp>::kBc, kBr = kWarpgroups * 64;
  constexpr size_t smem = sm90_smem_bytes(kDp, kBr, kBc, kOverlap, true);
  Sm90TmaArgs args;
  args.a = a;
  const int64_t batch = a.batch_heads / a.heads;
  cudaError_t err = encode_head_tile_map(&args.q, a.q, batch, a.heads, a.n, a.d, a.q_sb, a.q_sh, a.q_sn, kBr, kDp);
  if (err == cudaSuccess) err = encode_head_tile_map(&args.k, a.k, batch, a.heads, a.m, a.d, a.k_sb, a.k_sh, a.k_sm, kBc, kDp);
  if (err == cudaSuccess) err = encode_head_tile_map(&args.v, a.v, batch, a.heads, a.m, a.d, a.v_sb, a.v_sh, a.v_sm, kBc, kDp);
  if (err != cudaSuccess) return err;
  size_t max_smem = 0;
  err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if (smem > max_smem) return cudaErrorInvalidConfiguration;
  return launch_kernel(flash_wgmma_tma_kernel<T, kDp, kWarpgroups, kBc, kOverlap>, args, kBr,
                       (kWarpgroups + 1) * 128, smem, stream);
}

// Needs a.vec (16-byte aligned rows, d % 8 == 0), an fp16/bf16 T and a cc 9.0 device; attention.cu checks.
// The table's TMA kernel falls back to the cp.async one where no tensor map describes the inputs (a stride of
// zero, say) or the driver has no tensor-map encoder.
template <typename T, int kDp>
cudaError_t run_flash_sm90(FlashArgs a, cudaStream_t stream) {
  using C = Sm90Config<kDp>;
  if constexpr (C::kTma) {
    const cudaError_t err = launch_flash_sm90_tma<T, kDp, C::kWarpgroups, C::kOverlap>(a, stream);
    if (err != cudaErrorInvalidValue && err != cudaErrorNotSupported) return err;
  }
  return launch_flash_sm90<T, kDp, C::kWarpgroups, C::kOverlap>(a, stream);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
