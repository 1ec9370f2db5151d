// Development harness for sdcore's Hopper attention (issue 10): a flash-attention forward on wgmma (sm_90a),
// written on a machine without a GPU. It is NOT part of the sdcore extension. bench/gpu_check.sh builds and
// runs it on an H100/H200, so that the first session with a card learns, in one call, which layout
// assumptions hold. The kernel moves into csrc/cuda only after it passes here and beats the sm_80 kernel.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/hopper/wgmma_attention.cu -o /tmp/wgmma_attn
//   /tmp/wgmma_attn [OUTDIR]        # OUTDIR: raw accumulator dumps of the layout tests, for reading offline
//
// It checks the blind parts in order, each against a CPU reference:
//   1. wgmma with A and B in shared memory, both K-major, in the interleaved (no-swizzle) layout of 8x16-byte
//      core matrices: the matrix-descriptor strides, the accumulator fragment layout. Both readings of the
//      descriptor's two strides (LBO along K and SBO along M/N, or the other way round) are tried, the second
//      only if the first fails.
//   2. wgmma with A from registers (the P of attention) and B MN-major in shared memory (V): the register
//      fragment and the transposed-B descriptor, likewise.
//   3. The attention kernel itself at SD's head dims (40 padded to 48, 64, 80, 160), fp16, with the readings
//      that passed, against float64 softmax on sampled rows; then its time and TFLOP/s.
// Version 1 is deliberately plain: one warpgroup per 64 query rows, cp.async double buffering of 64-key K/V
// tiles, no TMA, no warp specialization, no swizzle. Those come once this is right.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "wgmma_ops.cuh"

#define CHECK(expr)                                                                                   \
  do {                                                                                                \
    cudaError_t err_ = (expr);                                                                        \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                   \
    }                                                                                                 \
  } while (0)

// ---------------------------------------------------------------------------------------------------------
// Shared-memory layout: a tile of `rows` x C fp16 values (both multiples of 8) as 8x8 core matrices of 128
// contiguous bytes (8 rows of 16 bytes). The 16-byte chunk of row r, columns 8c..8c+7, is at
//   ((c * rows / 8) + r / 8) * 128 + (r % 8) * 16,
// so the next core matrix down the rows is 128 bytes on, the next one along the columns rows * 16 bytes on.
__host__ __device__ constexpr int chunk_offset(int r, int c, int rows) {
  return ((c * (rows / 8)) + (r / 8)) * 128 + (r % 8) * 16;
}

// The two strides of a descriptor, in bytes.
struct Strides {
  uint32_t lbo, sbo;
};

// Reading 0 ("LBO runs along K"): LBO = distance between core matrices adjacent in K, SBO = adjacent in M/N.
// Reading 1: the other way round. For a tile whose rows run along M/N (K-major) or along K (MN-major):
__host__ Strides strides_for(bool k_major, int rows, int reading) {
  const uint32_t along_rows = 128, along_cols = static_cast<uint32_t>(rows) * 16;
  const uint32_t k_dir = k_major ? along_cols : along_rows, mn_dir = k_major ? along_rows : along_cols;
  return reading == 0 ? Strides{k_dir, mn_dir} : Strides{mn_dir, k_dir};
}

// Matrix descriptor: start address, LBO and SBO (all >> 4), base offset 0, swizzle mode 0 (interleaved).
__device__ __forceinline__ uint64_t make_desc(const void* smem, Strides s) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((s.lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((s.sbo >> 4) & 0x3FFF) << 32);
}

// Shared memory written by the generic proxy (st.shared, cp.async) and read next by wgmma (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins the accumulators in place around the asynchronous MMAs: the compiler may not move their reads or
// writes across this point (the wgmma asm statements say they write d when issued; the hardware does so by
// the wait).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The accumulator layout assumed (that of mma.m16n8 repeated along N): thread t of the warpgroup, warp
// w = t / 32, lane l; d[4i + e] holds D[16w + l/4 + 8 (e / 2)][8i + 2 (l % 4) + e % 2].
__host__ __device__ inline void acc_position(int t, int reg, int* row, int* col) {
  const int w = t / 32, l = t % 32, i = reg / 4, e = reg % 4;
  *row = 16 * w + l / 4 + 8 * (e / 2);
  *col = 8 * i + 2 * (l % 4) + (e % 2);
}

// ---------------------------------------------------------------------------------------------------------
// Tests 1 and 2: D[64 x 64] = A[64 x 32] . B[32 x 64] in two k16 steps.
//   kRegA = false: A in shared memory (K-major), B K-major (given as Bt[64 x 32], B's transpose, row-major).
//   kRegA = true:  A from registers, B MN-major (given as B[32 x 64] row-major).
template <bool kRegA>
__global__ void __launch_bounds__(128) layout_test(const __half* a, const __half* b, float* raw, float* d_out,
                                                   Strides sa, Strides sb) {
  // 4x the tiles' size: under a wrong reading of the strides the MMA reads past a tile, and must stay inside
  // this block's shared memory (an illegal address would end the whole run).
  __shared__ __align__(128) __half s_a[4 * 64 * 32];
  __shared__ __align__(128) __half s_b[4 * 64 * 32];
  const int t = threadIdx.x;
  char* pa = reinterpret_cast<char*>(s_a);
  char* pb = reinterpret_cast<char*>(s_b);
  for (int idx = t; idx < 64 * 4; idx += 128) {  // A: 64 rows x 4 chunks
    const int r = idx / 4, c = idx % 4;
    *reinterpret_cast<uint4*>(pa + chunk_offset(r, c, 64)) = *reinterpret_cast<const uint4*>(a + r * 32 + c * 8);
  }
  if (!kRegA) {
    for (int idx = t; idx < 64 * 4; idx += 128) {  // Bt: 64 rows (N) x 4 chunks (K)
      const int r = idx / 4, c = idx % 4;
      *reinterpret_cast<uint4*>(pb + chunk_offset(r, c, 64)) = *reinterpret_cast<const uint4*>(b + r * 32 + c * 8);
    }
  } else {
    for (int idx = t; idx < 32 * 8; idx += 128) {  // B: 32 rows (K) x 8 chunks (N)
      const int r = idx / 8, c = idx % 8;
      *reinterpret_cast<uint4*>(pb + chunk_offset(r, c, 32)) = *reinterpret_cast<const uint4*>(b + r * 64 + c * 8);
    }
  }
  fence_proxy_async();
  __syncthreads();

  float d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0.0f;
  const int w = t / 32, l = t % 32;
  uint32_t frag[2][4];
  if (kRegA) {  // the m16n8k16 A fragment of rows 16w.., for each k16 step
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int r0 = 16 * w + l / 4, c0 = 16 * kk + 2 * (l % 4);
      auto at = [&](int r, int c) { return __half2float(a[r * 32 + c]); };
      frag[kk][0] = pack_half2(at(r0, c0), at(r0, c0 + 1));
      frag[kk][1] = pack_half2(at(r0 + 8, c0), at(r0 + 8, c0 + 1));
      frag[kk][2] = pack_half2(at(r0, c0 + 8), at(r0, c0 + 9));
      frag[kk][3] = pack_half2(at(r0 + 8, c0 + 8), at(r0 + 8, c0 + 9));
    }
  }
  fence_operands(d);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    if (!kRegA) {
      wgmma_ss_n64<0, 0>(d, make_desc(pa + chunk_offset(0, 2 * kk, 64), sa),
                         make_desc(pb + chunk_offset(0, 2 * kk, 64), sb), kk > 0);
    } else {
      wgmma_rs_n64<1>(d, frag[kk], make_desc(pb + chunk_offset(16 * kk, 0, 32), sb), kk > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(d);
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    raw[t * 32 + i] = d[i];
    int row, col;
    acc_position(t, i, &row, &col);
    d_out[row * 64 + col] = d[i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Test 3: attention. q: [bh, n, d], k/v: [bh, m, d], o: [bh, n, d], all contiguous fp16; d <= DP, d % 8 == 0.
struct AttnParams {
  const __half *q, *k, *v;
  __half* o;
  int n, m, d;
  float scale_log2;  // softmax scale * log2(e)
  Strides k_major, mn_major;
};

constexpr int kBr = 64, kBc = 64;

template <int DP>
__device__ __forceinline__ void load_tile(char* tile, const __half* src, int row0, int rows_total, int d, int t) {
  constexpr int kChunks = DP / 8;
  for (int idx = t; idx < kBr * kChunks; idx += 128) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < rows_total && c * 8 < d;
    const __half* g = valid ? src + static_cast<int64_t>(row0 + r) * d + c * 8 : src;
    cp_async16(tile + chunk_offset(r, c, kBr), g, valid);
  }
}

template <int DP>
__global__ void __launch_bounds__(128) attention_kernel(AttnParams p) {
  extern __shared__ __align__(128) char smem[];
  constexpr int kTile = kBr * DP * 2;  // bytes of one 64 x DP tile
  // Q, then K of buffers 0 and 1, then V of buffers 0 and 1 (addresses computed, not an array indexed at run
  // time, which would live in local memory).
  char* s_q = smem;
  auto s_k = [&](int b) { return smem + (1 + b) * kTile; };
  auto s_v = [&](int b) { return smem + (3 + b) * kTile; };
  const int t = threadIdx.x, w = t / 32, l = t % 32;
  const int bh = blockIdx.y, q0 = blockIdx.x * kBr;
  const __half* q = p.q + static_cast<int64_t>(bh) * p.n * p.d;
  const __half* k = p.k + static_cast<int64_t>(bh) * p.m * p.d;
  const __half* v = p.v + static_cast<int64_t>(bh) * p.m * p.d;

  load_tile<DP>(s_q, q, q0, p.n, p.d, t);
  cp_async_commit();
  load_tile<DP>(s_k(0), k, 0, p.m, p.d, t);
  load_tile<DP>(s_v(0), v, 0, p.m, p.d, t);
  cp_async_commit();

  float o[DP / 2];
#pragma unroll
  for (int i = 0; i < DP / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int tiles = (p.m + kBc - 1) / kBc;
  for (int j = 0; j < tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < tiles) {  // the other buffer was released by the barrier that ended the last iteration
      load_tile<DP>(s_k(buf ^ 1), k, (j + 1) * kBc, p.m, p.d, t);
      load_tile<DP>(s_v(buf ^ 1), v, (j + 1) * kBc, p.m, p.d, t);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();

    // S = Q K^T (64 x 64), K-major both.
    float s[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.0f;
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      wgmma_ss_n64<0, 0>(s, make_desc(s_q + chunk_offset(0, 2 * kk, kBr), p.k_major),
                         make_desc(s_k(buf) + chunk_offset(0, 2 * kk, kBc), p.k_major), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);

    // Online softmax over this thread's two rows (16w + l/4 and 8 below), shared by the 4 lanes of a quad.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int col = j * kBc + 8 * (i / 4) + 2 * (l % 4) + (i % 2);
      s[i] = col < p.m ? s[i] * p.scale_log2 : -INFINITY;
      tile_max[(i % 4) / 2] = fmaxf(tile_max[(i % 4) / 2], s[i]);
    }
    float corr[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      base[h] = new_max == -INFINITY ? 0.0f : new_max;  // a row with no key yet: keep exp2 away from -inf - -inf
      corr[h] = exp2f(row_max[h] - base[h]);
      row_max[h] = new_max;
      row_sum[h] *= corr[h];
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      s[i] = exp2f(s[i] - base[(i % 4) / 2]);
      row_sum[(i % 4) / 2] += s[i];
    }
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] *= corr[(i % 4) / 2];

    // P as the register A operand: k16 step kk covers columns 16kk.. = accumulator blocks 2kk and 2kk + 1.
    uint32_t a[kBc / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      a[kk][0] = pack_half2(s[8 * kk + 0], s[8 * kk + 1]);
      a[kk][1] = pack_half2(s[8 * kk + 2], s[8 * kk + 3]);
      a[kk][2] = pack_half2(s[8 * kk + 4], s[8 * kk + 5]);
      a[kk][3] = pack_half2(s[8 * kk + 6], s[8 * kk + 7]);
    }
    // O += P V (64 x DP), V MN-major.
    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      const uint64_t desc_v = make_desc(s_v(buf) + chunk_offset(16 * kk, 0, kBc), p.mn_major);
      if constexpr (DP == 48) wgmma_rs_n48<1>(o, a[kk], desc_v, 1);
      if constexpr (DP == 64) wgmma_rs_n64<1>(o, a[kk], desc_v, 1);
      if constexpr (DP == 80) wgmma_rs_n80<1>(o, a[kk], desc_v, 1);
      if constexpr (DP == 160) wgmma_rs_n160<1>(o, a[kk], desc_v, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    __syncthreads();  // every thread is done with this buffer before the next iteration refills it
  }

  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    inv[h] = 1.0f / row_sum[h];
  }
#pragma unroll
  for (int i = 0; i < DP / 2; ++i) {
    const int row = q0 + 16 * w + l / 4 + 8 * ((i % 4) / 2);
    const int col = 8 * (i / 4) + 2 * (l % 4) + (i % 2);
    if (row < p.n && col < p.d) {
      p.o[(static_cast<int64_t>(bh) * p.n + row) * p.d + col] = __float2half(o[i] * inv[(i % 4) / 2]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.
std::vector<__half> random_halves(size_t count, std::mt19937& gen, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<__half> out(count);
  for (auto& x : out) x = __float2half(dist(gen));
  return out;
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* dev = nullptr;
  CHECK(cudaMalloc(&dev, host.size() * sizeof(T)));
  CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

void dump(const std::string& dir, const std::string& name, const std::vector<float>& values) {
  if (dir.empty()) return;
  FILE* f = std::fopen((dir + "/" + name).c_str(), "w");
  if (f == nullptr) return;
  for (size_t i = 0; i < values.size(); ++i) std::fprintf(f, "%.6g%c", values[i], (i + 1) % 32 ? ' ' : '\n');
  std::fclose(f);
}

// Runs one layout test under one reading; returns whether D matched (and says how it failed if not).
bool run_layout_test(bool reg_a, int reading, const std::string& dir) {
  std::mt19937 gen(reg_a ? 11 : 7);
  const auto a = random_halves(64 * 32, gen);
  const auto b = random_halves(64 * 32, gen);  // Bt[64 x 32] (test 1) or B[32 x 64] (test 2)
  std::vector<double> ref(64 * 64, 0.0);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c)
      for (int kk = 0; kk < 32; ++kk) {
        const float bv = reg_a ? __half2float(b[kk * 64 + c]) : __half2float(b[c * 32 + kk]);
        ref[r * 64 + c] += static_cast<double>(__half2float(a[r * 32 + kk])) * bv;
      }
  __half *da = to_device(a), *db = to_device(b);
  float *raw = nullptr, *dout = nullptr;
  CHECK(cudaMalloc(&raw, 128 * 32 * sizeof(float)));
  CHECK(cudaMalloc(&dout, 64 * 64 * sizeof(float)));
  CHECK(cudaMemset(dout, 0xFF, 64 * 64 * sizeof(float)));  // NaN: an element no thread wrote fails
  const Strides sa = strides_for(true, 64, reading);
  const Strides sb = reg_a ? strides_for(false, 32, reading) : strides_for(true, 64, reading);
  if (reg_a) {
    layout_test<true><<<1, 128>>>(da, db, raw, dout, sa, sb);
  } else {
    layout_test<false><<<1, 128>>>(da, db, raw, dout, sa, sb);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> h_raw(128 * 32), h_out(64 * 64);
  CHECK(cudaMemcpy(h_raw.data(), raw, h_raw.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(h_out.data(), dout, h_out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(da), cudaFree(db), cudaFree(raw), cudaFree(dout);
  double max_err = 0.0, max_ref = 0.0;
  for (int i = 0; i < 64 * 64; ++i) {
    max_err = std::max(max_err, std::fabs(h_out[i] - ref[i]));
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    if (std::isnan(h_out[i])) max_err = INFINITY;
  }
  const bool ok = max_err <= 1e-4 * max_ref;
  // A diagnosis for a failure: the same values in other places (the accumulator layout is wrong) or other
  // values (the operands were read from the wrong places).
  std::vector<float> got(h_raw), want(ref.begin(), ref.end());
  std::sort(got.begin(), got.end());
  std::sort(want.begin(), want.end());
  double set_err = 0.0;
  for (size_t i = 0; i < got.size(); ++i) set_err = std::max(set_err, static_cast<double>(std::fabs(got[i] - want[i])));
  const char* what = reg_a ? "A registers, B MN-major" : "A, B K-major smem";
  std::printf("layout %-24s reading %d: %s (rel err %.2e; as a set of values %s)\n", what, reading,
              ok ? "PASS" : "FAIL", max_err / max_ref, set_err <= 1e-4 * max_ref ? "equal" : "different");
  dump(dir, std::string("layout_") + (reg_a ? "rs" : "ss") + "_reading" + std::to_string(reading) + ".txt", h_raw);
  return ok;
}

struct AttnResult {
  double rel_err = INFINITY, ms = 0.0, tflops = 0.0;
};

template <int DP>
AttnResult run_attention(int bh, int n, int m, int d, Strides k_major, Strides mn_major) {
  std::mt19937 gen(1000 + DP + n);
  const auto q = random_halves(static_cast<size_t>(bh) * n * d, gen);
  const auto k = random_halves(static_cast<size_t>(bh) * m * d, gen);
  const auto v = random_halves(static_cast<size_t>(bh) * m * d, gen);
  __half *dq = to_device(q), *dk = to_device(k), *dv = to_device(v), *dout = nullptr;
  CHECK(cudaMalloc(&dout, static_cast<size_t>(bh) * n * d * sizeof(__half)));
  CHECK(cudaMemset(dout, 0xFF, static_cast<size_t>(bh) * n * d * sizeof(__half)));  // NaN
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  AttnParams p{dq, dk, dv, dout, n, m, d, scale * 1.4426950408889634f, strides_for(true, 64, 0),
               strides_for(false, 64, 0)};
  p.k_major = k_major;
  p.mn_major = mn_major;
  const int smem = 5 * kBr * DP * 2;
  CHECK(cudaFuncSetAttribute(attention_kernel<DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((n + kBr - 1) / kBr, bh);
  attention_kernel<DP><<<grid, 128, smem>>>(p);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<__half> out(static_cast<size_t>(bh) * n * d);
  CHECK(cudaMemcpy(out.data(), dout, out.size() * sizeof(__half), cudaMemcpyDeviceToHost));

  // float64 reference on sampled rows of the first and last head.
  AttnResult res;
  double max_err = 0.0, max_ref = 0.0;
  std::vector<int> rows = {0, 1, 7, 63, 64, n / 2, n - 1};
  for (int extra = 0; extra < 9; ++extra) rows.push_back(static_cast<int>(gen() % n));
  for (int head : {0, bh - 1}) {
    for (int r : rows) {
      std::vector<double> logits(m);
      double mx = -INFINITY;
      for (int j = 0; j < m; ++j) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c)
          dot += static_cast<double>(__half2float(q[(static_cast<size_t>(head) * n + r) * d + c])) *
                 __half2float(k[(static_cast<size_t>(head) * m + j) * d + c]);
        logits[j] = dot * scale;
        mx = std::max(mx, logits[j]);
      }
      double sum = 0.0;
      for (double& x : logits) sum += (x = std::exp(x - mx));
      for (int c = 0; c < d; ++c) {
        double acc = 0.0;
        for (int j = 0; j < m; ++j) acc += logits[j] * __half2float(v[(static_cast<size_t>(head) * m + j) * d + c]);
        acc /= sum;
        const float got = __half2float(out[(static_cast<size_t>(head) * n + r) * d + c]);
        max_err = std::isnan(got) ? INFINITY : std::max(max_err, std::fabs(got - acc));
        max_ref = std::max(max_ref, std::fabs(acc));
        if (std::isinf(max_err)) break;
      }
    }
  }
  res.rel_err = max_err / max_ref;

  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) attention_kernel<DP><<<grid, 128, smem>>>(p);
  constexpr int kReps = 20;
  CHECK(cudaEventRecord(start));
  for (int i = 0; i < kReps; ++i) attention_kernel<DP><<<grid, 128, smem>>>(p);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  res.ms = ms / kReps;
  res.tflops = 4.0 * bh * static_cast<double>(n) * m * d / (res.ms * 1e-3) / 1e12;
  cudaEventDestroy(start), cudaEventDestroy(stop);
  cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(dout);
  return res;
}

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "";
  int dev = 0, major = 0, minor = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) {
    std::printf("wgmma_attention: needs an sm_90 GPU (H100/H200), this one is sm_%d%d; nothing run\n", major, minor);
    return 0;
  }
  // Reading 0 first (the one the kernel is written for); the other only if it fails.
  int k_reading = -1, mn_reading = -1;
  for (int reading = 0; reading < 2 && k_reading < 0; ++reading)
    if (run_layout_test(false, reading, dir)) k_reading = reading;
  for (int reading = 0; reading < 2 && mn_reading < 0; ++reading)
    if (run_layout_test(true, reading, dir)) mn_reading = reading;
  if (k_reading < 0 || mn_reading < 0) {
    std::printf("wgmma_attention: a layout test failed under both readings; the attention kernel is not run\n");
    return 1;
  }
  const Strides km = strides_for(true, 64, k_reading), mn = strides_for(false, 64, mn_reading);
  std::printf("%-28s %10s %10s %10s\n", "attention fp16 (B*H, N, M, D)", "rel err", "ms", "TFLOP/s");
  bool ok = true;
  auto report = [&](const char* name, AttnResult r) {
    const bool pass = r.rel_err < 4e-3;
    ok = ok && pass;
    std::printf("%-28s %10.2e %10.3f %10.1f  %s\n", name, r.rel_err, r.ms, r.tflops, pass ? "PASS" : "FAIL");
  };
  report("16 4096 4096 40 (pad 48)", run_attention<48>(16, 4096, 4096, 40, km, mn));
  report("16 4096 4096 64", run_attention<64>(16, 4096, 4096, 64, km, mn));
  report("16 4096 4096 80", run_attention<80>(16, 4096, 4096, 80, km, mn));
  report("16 1024 1024 160", run_attention<160>(16, 1024, 1024, 160, km, mn));
  report("16 1000 77 64 (tails)", run_attention<64>(16, 1000, 77, 64, km, mn));
  report("2 4096 77 40 (cross)", run_attention<48>(2, 4096, 77, 40, km, mn));
  return ok ? 0 : 1;
}
