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
//     contiguous bytes (core_offset, attention_sm90_mainloop.cuh); every operand is described to wgmma by a
//     matrix descriptor. The tensor maps (tensor_map.h) write that same layout, so both loaders feed one main
//     loop.
//
// Status: written on a machine without a GPU; nothing here has run on a card yet. It runs on a host emulator
// of the CUDA execution model (tests/test_cuda_emulated.py: this code on emulated wgmma, TMA and
// mbarriers, every configuration below, against float64 and the sm_80 kernel, with asynchronous work landing
// early, late or at random), which checks the pipeline, masking and index math but not how a card reads the
// layouts. The dispatch only takes it when asked (SDCORE_CUDA_ATTENTION=sm90, on a cc 9.0 device, from a build
// with 9.0a in TORCH_CUDA_ARCH_LIST). bench/hopper/wgmma_attention.cu tests its layout assumptions on a card
// one by one and times all four configurations;
// bench/gpu_check.sh runs the attention tests with it; the default moves to it once it passes there and beats
// the sm_80 kernel. The TMA kernel also comes with 128-key tiles (setmaxnreg moves the producer's registers to
// the consumers) and with its two consumers taking turns at the MMAs (ping-pong), which the harness times
// beside the table's choice. Not yet in it: swizzled shared layouts; a tuning step for a card that can
// measure it.
#pragma once

#include "attention_sm90_mainloop.cuh"
#include "tensor_map.h"
#include "tma_ptx.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

// The sm_90 tile table, per padded head dim: warpgroups computing per block (64 query rows each), keys per
// step (64 or 128; the TMA kernel's 128-key tiles move the producer's registers to the consumers), whether a
// warpgroup overlaps its softmax with its own P.V (kOverlap), and whether a producer warpgroup loads K/V by
// TMA (kTma: flash_wgmma_tma_kernel) or every thread by cp.async (flash_wgmma_kernel), and whether the TMA
// kernel's two consumer warpgroups take turns issuing MMAs (kPingPong; with the overlap only). bench/hopper
// times the settings of the last four columns, so a card decides them.
template <int kDp>
struct Sm90Config;
template <> struct Sm90Config<48>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true, kPingPong = false; };
template <> struct Sm90Config<64>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true, kPingPong = false; };
template <> struct Sm90Config<80>  { static constexpr int kWarpgroups = 2, kBc = 64; static constexpr bool kOverlap = false, kTma = true, kPingPong = false; };
template <> struct Sm90Config<160> { static constexpr int kWarpgroups = 1, kBc = 64; static constexpr bool kOverlap = false, kTma = true, kPingPong = false; };

// Keys in flight: the cp.async kernel double-buffers K/V, or keeps three stages when P.V of tile j - 1 still
// reads V while tile j + 1 loads; the TMA producer runs up to four tiles ahead, as many as fit in 200 KB
// beside Q (two for 128 keys at D = 160).
__host__ __device__ constexpr int sm90_stages(int dp, int br, int bc, bool overlap, bool tma) {
  if (!tma) return overlap ? 3 : 2;
  const int fit = (200 * 1024 - br * dp * 2) / (2 * bc * dp * 2);
  return fit < 4 ? fit : 4;
}
// Q, then K of every stage, then V of every stage; the TMA kernel's mbarriers follow (full and empty per
// stage, one for Q).
constexpr size_t sm90_smem_bytes(int dp, int br, int bc, bool overlap, bool tma) {
  return size_t(br + 2 * sm90_stages(dp, br, bc, overlap, tma) * bc) * size_t(dp) * 2 +
         (tma ? size_t(2 * sm90_stages(dp, br, bc, overlap, tma) + 1) * 8 : 0);
}

// The cp.async kernel: every thread loads (K/V tile j + 1 while tile j is multiplied) and computes; each
// warpgroup owns 64 query rows.
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap>
__global__ void __launch_bounds__(kWarpgroups * 128) flash_wgmma_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = kWarpgroups * 128, kBr = kWarpgroups * 64;
  constexpr int kStages = sm90_stages(kDp, kBr, kBc, kOverlap, false);
  constexpr int kTileQ = kBr * kDp * 2, kTileKV = kBc * kDp * 2;  // bytes
  static_assert(kBc == 64 || kBc == 128, "S = Q K^T is one m64n64 or m64n128 wgmma per k-step");
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
  wgmma_mainloop<T, kDp, kBr, kBc, kStages, kOverlap>(acquire, release, Turns<false>{wg},
                                                      sQ + core_offset(wg * 64, 0, kBr), sKV, n_kv, n_wg, c, o,
                                                      row_sum);
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
// Registers: a 384-thread block has 168 per thread. The consumers of 64-key tiles fit that (ptxas: 101-128);
// for 128-key tiles the producer warpgroup hands its registers over with setmaxnreg, FlashAttention-3's split
// (128 x 24 + 256 x 240 = 384 x 168, so the consumers' raise never waits on registers nobody frees).
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap, bool kPingPong>
__global__ void __launch_bounds__((kWarpgroups + 1) * 128, 1)
    flash_wgmma_tma_kernel(const __grid_constant__ Sm90TmaArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kConsumers = kWarpgroups * 128, kBr = kWarpgroups * 64;
  constexpr int kStages = sm90_stages(kDp, kBr, kBc, kOverlap, true);
  constexpr int kTileQ = kBr * kDp * 2, kTileKV = kBc * kDp * 2;  // bytes
  constexpr bool kMoveRegisters = kWarpgroups == 2 && kBc == 128;
  static_assert(kBc == 64 || kBc == 128, "S = Q K^T is one m64n64 or m64n128 wgmma per k-step");
  static_assert(kStages >= 2, "the producer needs a stage to fill while the consumers read one");
  static_assert(!kPingPong || (kOverlap && kWarpgroups == 2), "ping-pong: two consumers, overlapped loop");
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
    if constexpr (kMoveRegisters) setmaxnreg_dec<24>();
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

  if constexpr (kMoveRegisters) setmaxnreg_inc<240>();
  const int cw = wg - 1, ctid = tid - 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int wg_row0 = q0 + cw * 64;
  const int n_wg = a.causal ? imin(n_kv, (wg_row0 + 63) / kBc + 1) : n_kv;
  const RowCtx c{wg_row0 + 16 * warp, M, a.causal, a.scale_log2, lane / 4, lane % 4};
  mbar_wait(q_full, 0);
  // Data a TMA copy completed on an mbarrier is visible to wgmma (both the async proxy) once the wait returns.
  auto acquire = [&](int j) { mbar_wait(&full[j % kStages], (j / kStages) & 1); };
  auto release = [&](int j) { mbar_arrive(&empty[j % kStages]); };
  if constexpr (kPingPong) {
    if (cw == 1) named_barrier_arrive(2, 256);  // consumer 0 issues first
  }
  float o[kDp / 2], row_sum[2];
  wgmma_mainloop<T, kDp, kBr, kBc, kStages, kOverlap>(acquire, release, Turns<kPingPong>{cw},
                                                      sQ + core_offset(cw * 64, 0, kBr), sKV, n_kv, n_wg, c, o,
                                                      row_sum);
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

// launch_kernel where the device has the shared memory (every sm_90 part has 227 KB; the table needs <= 200 KB).
template <typename Kernel, typename Args>
cudaError_t launch_if_smem_fits(Kernel kernel, const Args& args, int block_rows, int threads, size_t smem,
                                cudaStream_t stream) {
  size_t max_smem = 0;
  const cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if (smem > max_smem) return cudaErrorInvalidConfiguration;
  return launch_kernel(kernel, args, block_rows, threads, smem, stream);
}

// One configuration's launch, without TMA (bench/hopper times every configuration through these).
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap>
cudaError_t launch_flash_sm90(const FlashArgs& a, cudaStream_t stream) {
  return launch_if_smem_fits(flash_wgmma_kernel<T, kDp, kWarpgroups, kBc, kOverlap>, a, kWarpgroups * 64,
                             kWarpgroups * 128, sm90_smem_bytes(kDp, kWarpgroups * 64, kBc, kOverlap, false),
                             stream);
}

// The TMA kernel's arguments: the three tensor maps (16-byte aligned rows and strides, as a.vec promises) with
// kBr-row Q boxes and kBc-row K/V boxes. Fails with the encoder's error for a layout no tensor map describes
// (a zero stride, say) or a driver without the encoder; nothing is launched then.
template <int kDp, int kBr, int kBc>
cudaError_t make_sm90_tma_args(const FlashArgs& a, Sm90TmaArgs* args) {
  args->a = a;
  const int64_t batch = a.batch_heads / a.heads;
  cudaError_t err = encode_head_tile_map(&args->q, a.q, batch, a.heads, a.n, a.d, a.q_sb, a.q_sh, a.q_sn, kBr, kDp);
  if (err == cudaSuccess) {
    err = encode_head_tile_map(&args->k, a.k, batch, a.heads, a.m, a.d, a.k_sb, a.k_sh, a.k_sm, kBc, kDp);
  }
  if (err == cudaSuccess) {
    err = encode_head_tile_map(&args->v, a.v, batch, a.heads, a.m, a.d, a.v_sb, a.v_sh, a.v_sm, kBc, kDp);
  }
  return err;
}

// One configuration's launch with TMA, on arguments make_sm90_tma_args built for it.
template <typename T, int kDp, int kWarpgroups, int kBc, bool kOverlap, bool kPingPong = false>
cudaError_t launch_flash_sm90_tma(const Sm90TmaArgs& args, cudaStream_t stream) {
  return launch_if_smem_fits(flash_wgmma_tma_kernel<T, kDp, kWarpgroups, kBc, kOverlap, kPingPong>, args,
                             kWarpgroups * 64, (kWarpgroups + 1) * 128,
                             sm90_smem_bytes(kDp, kWarpgroups * 64, kBc, kOverlap, true), stream);
}

// Needs a.vec (16-byte aligned rows, d % 8 == 0), an fp16/bf16 T and a cc 9.0 device; attention.cu checks.
// The table's TMA kernel runs where tensor maps describe the inputs, the cp.async one elsewhere (a stride of
// zero, say, or a driver without the tensor-map encoder); a launch error of either is returned as it is.
template <typename T, int kDp>
cudaError_t run_flash_sm90(FlashArgs a, cudaStream_t stream) {
  using C = Sm90Config<kDp>;
  if constexpr (C::kTma) {
    Sm90TmaArgs args;
    if (make_sm90_tma_args<kDp, C::kWarpgroups * 64, C::kBc>(a, &args) == cudaSuccess) {
      return launch_flash_sm90_tma<T, kDp, C::kWarpgroups, C::kBc, C::kOverlap, C::kPingPong>(args, stream);
    }
  }
  // The cp.async kernel keeps 64-key tiles: its block has no producer to take registers from.
  return launch_flash_sm90<T, kDp, C::kWarpgroups, 64, C::kOverlap>(a, stream);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
