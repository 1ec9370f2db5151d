// The Hopper (sm_90a) attention kernel: flash_reg_kernel's algorithm (attention_kernel.cuh: online softmax in
// the exp2 domain, the same masking and special-value rules) on the warpgroup MMA, wgmma.
//
//   - Each warpgroup (4 warps, 128 threads) owns 64 query rows; kWarpgroups of them share every K/V tile.
//   - S = Q K^T: wgmma m64n64k16 with Q and K in shared memory, both K-major.
//   - O += P V: wgmma m64nDk16 with P from registers (the S accumulators, rounded to the input dtype, are
//     exactly the register A fragment) and V in shared memory, MN-major: no transposition anywhere.
//   - K/V tiles are double-buffered with cp.async: tile j + 1 loads while tile j is multiplied (three buffers
//     in the overlapped variant, where a warpgroup's softmax of tile j runs during its P.V of tile j - 1).
//   - Shared tiles use wgmma's no-swizzle layout: 8 x 8 "core matrices" of 8 rows x 16 bytes, each 128
//     contiguous bytes (core_offset below); every operand is described to wgmma by a matrix descriptor.
//
// Status: written on a machine without a GPU, so nothing here has run yet. The dispatch only takes it when
// asked (SDCORE_CUDA_ATTENTION=sm90, on a cc 9.0 device, from a build with 9.0a in TORCH_CUDA_ARCH_LIST).
// bench/hopper/wgmma_attention.cu tests its layout assumptions one by one and bench/gpu_check.sh runs the
// attention tests with it; the default moves to it once it passes there and beats the sm_80 kernel.
// Not yet FlashAttention-3: no TMA, no producer/consumer warp specialization (setmaxnreg), no ping-pong of
// two warpgroups' softmax and MMAs. Those are the next steps, on a card that can measure them.
#pragma once

#include "attention_launch.cuh"
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

// The sm_90 tile table, per padded head dim: warpgroups per block (64 query rows each), keys per step, and
// whether a warpgroup overlaps its softmax with its own P.V (kOverlap, below). bench/hopper times both
// settings of kOverlap, so a card decides the last column.
template <int kDp>
struct Sm90Config;
template <> struct Sm90Config<48>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false; };
template <> struct Sm90Config<64>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false; };
template <> struct Sm90Config<80>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false; };
template <> struct Sm90Config<160> { static constexpr int kWarpgroups = 1, kBc = 64; static constexpr bool kOverlap = false; };

// K/V buffers: double buffering, or three when P.V of tile j - 1 still reads V while tile j + 1 loads.
__host__ __device__ constexpr int sm90_stages(bool overlap) { return overlap ? 3 : 2; }
// Q, then K of every stage, then V of every stage.
constexpr size_t sm90_smem_bytes(int dp, int br, int bc, bool overlap) {
  return size_t(br + 2 * sm90_stages(overlap) * bc) * size_t(dp) * 2;
}

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
#endif

// kOverlap = false: per key tile j, S_j = Q K_j^T, wait, softmax, O += P_j V_j, wait.
// kOverlap = true (FlashAttention-3's intra-warpgroup overlap): per tile j, issue S_j and then O += P_{j-1}
// V_{j-1}, wait for S_j only, run the softmax of S_j while P.V is still on the tensor cores, then wait for it
// and rescale O. P stays in registers across the iteration, and a third K/V stage is needed (V_{j-1} is read
// while tile j + 1 loads).
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap>
__global__ void __launch_bounds__(kWarpgroups * 128) flash_wgmma_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBr = kWarpgroups * 64, kStages = sm90_stages(kOverlap);
  constexpr int kTileQ = kBr * kDp * 2, kTileKV = kBc * kDp * 2;  // bytes
  constexpr int kLdO = kDp + 8;  // row pitch of the output staging tile (the sm_80 kernel's store_tile layout)
  static_assert(kBc == 64, "S = Q K^T is one m64n64 wgmma per k-step");
  static_assert(kDp % 16 == 0, "wgmma's k-step is 16");
  static_assert(size_t(kBr) * kLdO * 2 <= 2 * kStages * size_t(kTileKV), "the output is staged in the K/V stages");

  unsigned char* smem = dyn_smem();
  unsigned char* sQ = smem;
  unsigned char* sKV = smem + kTileQ;  // K of stage t at t * kTileKV, V of stage t at (kStages + t) * kTileKV
  auto sK = [&](int t) { return sKV + t * kTileKV; };
  auto sV = [&](int t) { return sKV + (kStages + t) * kTileKV; };

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, tg = lane % 4;  // accumulator fragment: row in the warp's 8-row half, column pair
  const int64_t bid = blockIdx.x;
  // Heaviest (causal) query blocks first, as the sm_80 kernel.
  const int q0 = (a.n_qblocks - 1 - static_cast<int>(bid % a.n_qblocks)) * kBr;
  const HeadPtrs<uint16_t> ptr = head_ptrs<uint16_t>(a, bid / a.n_qblocks);
  const int N = a.n, M = a.m, D = a.d;
  const bool causal = a.causal;
  const float sl2 = a.scale_log2;
  const int kv_end = causal ? imin(M, q0 + kBr) : M;  // >= 1: key 0 is visible to every row
  const int n_kv = (kv_end + kBc - 1) / kBc;
  const int wg_row0 = q0 + wg * 64;       // this warpgroup's first query row
  const int row0 = wg_row0 + 16 * warp;   // this warp's first row
  // The warpgroup's 64 Q rows start 64 / 8 core matrices down the tile.
  const unsigned char* sQw = sQ + core_offset(wg * 64, 0, kBr);

  load_core_tile<kBr, kDp, kThreads>(sQ, ptr.q, a.q_sn, q0, N, D, tid);
  load_core_tile<kBc, kDp, kThreads>(sK(0), ptr.k, a.k_sm, 0, M, D, tid);
  load_core_tile<kBc, kDp, kThreads>(sV(0), ptr.v, a.v_sm, 0, M, D, tid);
  cp_async_commit();

  float o[kDp / 2];
#pragma unroll
  for (int i = 0; i < kDp / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8; sum: this thread's part
  float f[2];
  uint32_t pa[kBc / 16][4];  // P of the last softmax, as the A operand of P.V

  // Tile j: prefetch tile j + 1 into the stage the barrier ending the last iteration released, wait for tile j
  // (and Q), make it visible to wgmma.
  auto arrive_tile = [&](int j) {
    if (j + 1 < n_kv) {
      const int t = (j + 1) % kStages;
      load_core_tile<kBc, kDp, kThreads>(sK(t), ptr.k, a.k_sm, (j + 1) * kBc, M, D, tid);
      load_core_tile<kBc, kDp, kThreads>(sV(t), ptr.v, a.v_sm, (j + 1) * kBc, M, D, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
  };
  float s[32];

  if constexpr (!kOverlap) {
    // Per tile: S_j = Q K_j^T, wait, softmax, O += P_j V_j, wait. Causal: the warpgroup's tiles are the first
    // n_wg (a tile whose first key follows its last row is skipped; a uniform branch per warpgroup).
    const int n_wg = causal ? imin(n_kv, (wg_row0 + 63) / kBc + 1) : n_kv;
    for (int j = 0; j < n_kv; ++j) {
      arrive_tile(j);
      if (j < n_wg) {
        compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(j % kStages));
        softmax_tile<kBc>(s, row_max, row_sum, f, j * kBc, row0, M, causal, sl2, g, tg);
        rescale<kDp>(o, f);
        pack_p<T, kBc>(pa, s);
        fence_operands(o);
        wgmma_fence();  // orders the register writes (pa, o) before the MMAs read them
        issue_pv<T, kDp, kBc>(o, pa, sV(j % kStages));
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(o);
      }
      __syncthreads();  // every thread is done with this stage before a later iteration refills it
    }
  } else {
    // Tile 0: S_0 and its softmax (O is still zero). Then per tile j >= 1: issue S_j, then O += P_{j-1}
    // V_{j-1}; wait for S_j only (groups complete in order), run its softmax while P.V is still on the
    // tensor cores, wait for P.V, rescale O. Last, O += P V of the last tile. No wgmma sits in a branch:
    // ptxas serializes wgmma around branches it can't prove warpgroup-uniform, so causal runs every tile of
    // the block, and the mask zeroes the keys a row can't see.
    arrive_tile(0);
    compute_qk<T, kDp, kBr, kBc>(s, sQw, sK(0));
    softmax_tile<kBc>(s, row_max, row_sum, f, 0, row0, M, causal, sl2, g, tg);
    pack_p<T, kBc>(pa, s);
    __syncthreads();
    for (int j = 1; j < n_kv; ++j) {
      arrive_tile(j);
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.0f;
      fence_operands(s);
      fence_operands(o);
      wgmma_fence();  // orders the register writes (s, pa, o) before the MMAs read them
      issue_qk<T, kDp, kBr, kBc>(s, sQw, sK(j % kStages));
      wgmma_commit();
      issue_pv<T, kDp, kBc>(o, pa, sV((j - 1) % kStages));
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(s);
      softmax_tile<kBc>(s, row_max, row_sum, f, j * kBc, row0, M, causal, sl2, g, tg);
      wgmma_wait<0>();
      fence_operands(o);
      rescale<kDp>(o, f);  // O holds tiles < j, relative to the old maxima
      pack_p<T, kBc>(pa, s);
      __syncthreads();  // V_{j-1} and K_j are free: a later iteration may refill their stages
    }
    fence_operands(o);
    wgmma_fence();
    issue_pv<T, kDp, kBc>(o, pa, sV((n_kv - 1) % kStages));
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    __syncthreads();  // the stages are free for the output staging below
  }

  // Normalize and stage the rows in the K/V stages (free after the loop's last barrier) with row pitch kDp + 8,
  // then store them with 16-byte writes.
  uint16_t* sO = reinterpret_cast<uint16_t*>(sKV);
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
  __syncthreads();
  store_tile<kBr, kDp, kThreads>(ptr.o, a.o_sn, sO, q0, N, D, true, tid);
#elif defined(__CUDA_ARCH__)
  // Compiled for another arch: the host never launches this (run_flash_sm90 is only dispatched on sm_90 from a
  // build with sm_90a code), so reaching here is a dispatch bug; fail loudly rather than return garbage.
  __trap();
#endif
}

// One configuration's launch (bench/hopper times both kOverlap settings through this).
template <typename T, int kDp, int kWarpgroups, bool kOverlap>
cudaError_t launch_flash_sm90(const FlashArgs& a, cudaStream_t stream) {
  constexpr int kBc = Sm90Config<kDp>::kBc, kBr = kWarpgroups * 64;
  constexpr size_t smem = sm90_smem_bytes(kDp, kBr, kBc, kOverlap);
  size_t max_smem = 0;
  const cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if (smem > max_smem) return cudaErrorInvalidConfiguration;  // every sm_90 part has 227 KB; the table needs <= 140 KB
  return launch_kernel(flash_wgmma_kernel<T, kDp, kWarpgroups, kBc, kOverlap>, a, kBr, kWarpgroups * 128, smem,
                       stream);
}

// Needs a.vec (16-byte aligned rows, d % 8 == 0), an fp16/bf16 T and a cc 9.0 device; attention.cu checks.
template <typename T, int kDp>
cudaError_t run_flash_sm90(FlashArgs a, cudaStream_t stream) {
  using C = Sm90Config<kDp>;
  return launch_flash_sm90<T, kDp, C::kWarpgroups, C::kOverlap>(a, stream);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
