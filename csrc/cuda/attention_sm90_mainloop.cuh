// The pieces of the Hopper attention kernels (attention_sm90.cuh) that both loaders share: wgmma's no-swizzle
// shared-memory layout and its matrix descriptors, the cp.async tile loader, and one warpgroup's steps and main
// loop over the key tiles (S = Q K^T, the online softmax, O += P V, the normalized output).
#pragma once

#include "attention_launch.cuh"
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

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The per-warpgroup steps of the kernel. Accumulators (s: 64 x kBc scores, o: 64 x kDp) are in wgmma's layout:
// x[4i + e] is row 16 warp + g + 8 (e / 2), column 8i + 2 tg + e % 2 of the warpgroup's block (the m16n8
// accumulator layout, repeated along N).

// Issues S = Q K^T (not committed): kDp / 16 k-steps, Q and K both K-major.
template <typename T, int kDp, int kBr, int kBc>
__device__ __forceinline__ void issue_qk(float (&s)[kBc / 2], const unsigned char* sQw, const unsigned char* sK) {
  constexpr DescStrides kQStrides = k_major_strides(kBr), kKStrides = k_major_strides(kBc);
#pragma unroll
  for (int kk = 0; kk < kDp / 16; ++kk) {
    wgmma_ss<T, 0, 0>(s, make_desc(sQw + core_offset(0, 2 * kk, kBr), kQStrides),
                      make_desc(sK + core_offset(0, 2 * kk, kBc), kKStrides), kk > 0 ? 1 : 0);
  }
}

// Whose turn it is to issue MMAs. With kPingPong (the TMA kernel's two consumers, FlashAttention-3's
// ping-pong): named barriers 2 and 3, one per consumer warpgroup `me`, each counting both warpgroups' 256
// threads; take() waits at its own for this warpgroup's turn, pass() arrives at the other's once its MMAs are
// issued, so one runs its softmax while the other's MMAs occupy the tensor cores. Without, both are no-ops.
template <bool kPingPong>
struct Turns {
  int me;  // 0 or 1: the consumer warpgroup
  __device__ __forceinline__ void take() const {
    if constexpr (kPingPong) named_barrier_sync(2 + me, 256);
  }
  __device__ __forceinline__ void pass() const {
    if constexpr (kPingPong) named_barrier_arrive(3 - me, 256);
  }
};

// S = Q K^T, waited for: the first step of a tile when nothing else is in flight.
template <typename T, int kDp, int kBr, int kBc, bool kPingPong>
__device__ __forceinline__ void compute_qk(float (&s)[kBc / 2], const unsigned char* sQw, const unsigned char* sK,
                                           const Turns<kPingPong>& turn) {
#pragma unroll
  for (int i = 0; i < kBc / 2; ++i) s[i] = 0.0f;
  fence_operands(s);
  wgmma_fence();
  turn.take();
  issue_qk<T, kDp, kBr, kBc>(s, sQw, sK);
  wgmma_commit();
  turn.pass();
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
__device__ __forceinline__ void softmax_tile(float (&s)[kBc / 2], float (&row_max)[2], float (&row_sum)[2],
                                             float (&f)[2], int kv0, int row0, int M, bool causal, float sl2,
                                             int g, int tg) {
  const bool need_mask = kv0 + kBc > M || (causal && kv0 + kBc - 1 > row0);
#pragma unroll
  for (int i = 0; i < kBc / 2; ++i) {
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
    for (int blk = 0; blk < kBc / 8; ++blk) mx = fmaxf(mx, fmaxf(s[4 * blk + 2 * hh], s[4 * blk + 2 * hh + 1]));
    f[hh] = rescale_log2(row_max[hh], quad_max(mx));
    const float base = exp_base(row_max[hh]);
    float sum = 0.0f;
#pragma unroll
    for (int blk = 0; blk < kBc / 8; ++blk) {
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
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kBc / 16][4], const float (&s)[kBc / 2]) {
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

// One warpgroup's pass over the key tiles, for either kernel (attention_sm90.cuh): O (unnormalized) and this
// thread's part of the row sums. K of stage t is at sKV + t * kTileKV, V at sKV + (kStages + t) * kTileKV;
// tile j sits in stage j % kStages. acquire(j) returns once tile j is in shared memory and visible to wgmma;
// release(j) says this thread is done reading tile j's stage (the kernels hand stages back with a block
// barrier or an mbarrier).
//
// kOverlap = false: per tile j, S_j = Q K_j^T, wait, softmax, O += P_j V_j, wait. Causal: the warpgroup's
// tiles are the first n_wg (a tile whose first key follows its last row is skipped: a uniform branch per
// warpgroup).
// kOverlap = true (FlashAttention-3's intra-warpgroup overlap): per tile j >= 1, issue S_j and then O +=
// P_{j-1} V_{j-1}; wait for S_j only (groups complete in order), run its softmax while P.V is still on the
// tensor cores, then wait for P.V and rescale O. P stays in registers across the iteration, so tile j - 1's
// stage is released one iteration late. No wgmma sits in a branch: ptxas serializes wgmma around branches it
// can't prove warpgroup-uniform, so causal runs every tile, and the mask zeroes the keys a row can't see.
// turn (overlap only): every issue of MMAs sits between turn.take() and turn.pass(), n_kv + 1 of them, the
// same count in every warpgroup of the block, so warpgroups that take turns (FlashAttention-3's ping-pong:
// one's softmax while the other's MMAs run) stay in step.
template <typename T, int kDp, int kBr, int kBc, int kStages, bool kOverlap, bool kPingPong, typename Acquire,
          typename Release>
__device__ __forceinline__ void wgmma_mainloop(Acquire&& acquire, Release&& release, const Turns<kPingPong>& turn,
                                               const unsigned char* sQw, const unsigned char* sKV, int n_kv,
                                               int n_wg, const RowCtx& c, float (&o)[kDp / 2],
                                               float (&row_sum)[2]) {
  constexpr int kTileKV = kBc * kDp * 2;
  auto sK = [&](int j) { return sKV + (j % kStages) * kTileKV; };
  auto sV = [&](int j) { return sKV + (kStages + j % kStages) * kTileKV; };
#pragma unroll
  for (int i = 0; i < kDp / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8
  row_sum[0] = row_sum[1] = 0.0f;
  float f[2], s[kBc / 2];
  uint32_t pa[kBc / 16][4];  // P of the last softmax, as the A operand of P.V

  if constexpr (!kOverlap) {
    // A warpgroup skips causal tiles here, so the warpgroups' issue counts differ: no turn-taking.
    static_assert(!kPingPong, "warpgroups take turns only in the overlapped loop");
    for (int j = 0; j < n_kv; ++j) {
      acquire(j);
      if (j < n_wg) {
        compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(j), turn);
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
    compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(0), turn);
    softmax_tile<kBc>(s, row_max, row_sum, f, 0, c.row0, c.M, c.causal, c.sl2, c.g, c.tg);  // O is still zero
    pack_p<T, kBc>(pa, s);
    for (int j = 1; j < n_kv; ++j) {
      acquire(j);
#pragma unroll
      for (int i = 0; i < kBc / 2; ++i) s[i] = 0.0f;
      fence_operands(s);
      fence_operands(o);
      wgmma_fence();  // orders the register writes (s, pa, o) before the MMAs read them
      turn.take();
      issue_qk<T, kDp, kBr, kBc>(s, sQw, sK(j));
      wgmma_commit();
      issue_pv<T, kDp, kBc>(o, pa, sV(j - 1));
      wgmma_commit();
      turn.pass();
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
    turn.take();
    issue_pv<T, kDp, kBc>(o, pa, sV(n_kv - 1));
    wgmma_commit();
    turn.pass();
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

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
