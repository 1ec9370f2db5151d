// Development harness for sdcore's Hopper attention kernel (csrc/cuda/attention_sm90.cuh, issue 10), written on
// a machine without a GPU. It needs no torch: bench/gpu_check.sh builds and runs it on an H100/H200, so that the
// first session with a card learns, in one call, which of the kernel's layout assumptions hold, and why not.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/hopper/wgmma_attention.cu \
//        csrc/cuda/device_info.cpp csrc/cuda/tensor_map.cpp -o /tmp/wgmma_attn
//   /tmp/wgmma_attn [OUTDIR]        # OUTDIR: raw accumulator dumps of the layout tests, for reading offline
//
// It checks the blind parts in order, each against a CPU reference, with the kernel's own helpers:
//   1. wgmma with A and B in shared memory, both K-major, in the no-swizzle layout of 8x16-byte core matrices:
//      the matrix-descriptor strides and the accumulator fragment layout. Both readings of the descriptor's two
//      strides are tried: reading 0 is the kernel's (k_major_strides / mn_major_strides: LBO along K), reading
//      1 the other way round, tried only if the first fails.
//   2. wgmma with A from registers (the P of attention) and B MN-major in shared memory (V): the register
//      fragment and the transposed-B descriptor, likewise.
//   3. The kernel itself at SD's head dims (40 padded to 48, 64, 80, 160), fp16, against float64 softmax on
//      sampled rows, then its time and TFLOP/s, in six configurations: loads by cp.async from every thread
//      or by TMA from a producer warpgroup (Sm90Config's kTma column), the latter with 64- or 128-key tiles
//      (kBc), each without and with the softmax overlapped with P.V (kOverlap). Run only if reading 0 passed
//      both tests; cp.async first, so that a TMA pipeline bug (its barrier waits trap after ~9 s instead of
//      hanging) still leaves the other numbers.
// The library's own tests (tests/test_attention.py with SDCORE_CUDA_ATTENTION=sm90) then cover bf16, strides,
// causal masks and awkward sizes. The kernels' pipeline, masking and index math already pass on a host emulator
// (tests/test_cuda_emulated.py), which reads the layouts as steps 1 and 2 assume: a failure there is the place
// to look first.
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

#include "../../csrc/cuda/attention_sm90.cuh"

using namespace sdcore::cuda::attn;  // core_offset, DescStrides, make_desc, wgmma_*, fences, pack2

#define CHECK(expr)                                                                                   \
  do {                                                                                                \
    cudaError_t err_ = (expr);                                                                        \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                   \
    }                                                                                                 \
  } while (0)

// The two readings of a descriptor's strides for a tile whose rows run along M/N (K-major) or along K
// (MN-major): reading 0 is the kernel's, reading 1 swaps LBO and SBO.
DescStrides strides_for(bool k_major, int rows, int reading) {
  const DescStrides s = k_major ? k_major_strides(rows) : mn_major_strides(rows);
  return reading == 0 ? s : DescStrides{s.sbo, s.lbo};
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
                                                   DescStrides sa, DescStrides sb) {
  // 4x the tiles' size: under a wrong reading of the strides the MMA reads past a tile, and must stay inside
  // this block's shared memory (an illegal address would end the whole run).
  __shared__ __align__(128) __half s_a[4 * 64 * 32];
  __shared__ __align__(128) __half s_b[4 * 64 * 32];
  const int t = threadIdx.x;
  char* pa = reinterpret_cast<char*>(s_a);
  char* pb = reinterpret_cast<char*>(s_b);
  for (int idx = t; idx < 64 * 4; idx += 128) {  // A: 64 rows x 4 chunks
    const int r = idx / 4, c = idx % 4;
    *reinterpret_cast<uint4*>(pa + core_offset(r, c, 64)) = *reinterpret_cast<const uint4*>(a + r * 32 + c * 8);
  }
  if (!kRegA) {
    for (int idx = t; idx < 64 * 4; idx += 128) {  // Bt: 64 rows (N) x 4 chunks (K)
      const int r = idx / 4, c = idx % 4;
      *reinterpret_cast<uint4*>(pb + core_offset(r, c, 64)) = *reinterpret_cast<const uint4*>(b + r * 32 + c * 8);
    }
  } else {
    for (int idx = t; idx < 32 * 8; idx += 128) {  // B: 32 rows (K) x 8 chunks (N)
      const int r = idx / 8, c = idx % 8;
      *reinterpret_cast<uint4*>(pb + core_offset(r, c, 32)) = *reinterpret_cast<const uint4*>(b + r * 64 + c * 8);
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
      frag[kk][0] = pack2<__half>(at(r0, c0), at(r0, c0 + 1));
      frag[kk][1] = pack2<__half>(at(r0 + 8, c0), at(r0 + 8, c0 + 1));
      frag[kk][2] = pack2<__half>(at(r0, c0 + 8), at(r0, c0 + 9));
      frag[kk][3] = pack2<__half>(at(r0 + 8, c0 + 8), at(r0 + 8, c0 + 9));
    }
  }
  fence_operands(d);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    if (!kRegA) {
      wgmma_ss<__half, 0, 0>(d, make_desc(pa + core_offset(0, 2 * kk, 64), sa),
                             make_desc(pb + core_offset(0, 2 * kk, 64), sb), kk > 0);
    } else {
      wgmma_rs<__half, 1>(d, frag[kk], make_desc(pb + core_offset(16 * kk, 0, 32), sb), kk > 0);
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
  const DescStrides sa = strides_for(true, 64, reading);
  const DescStrides sb = reg_a ? strides_for(false, 32, reading) : strides_for(true, 64, reading);
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

// One call of the kernel on contiguous [bh, n, d] fp16 tensors (batch 1, bh heads), in the tile table's
// warpgroup count, with the given key tile, kOverlap and kTma (the table's own choice is what sdcore runs).
template <int DP, int kBc, bool kOverlap, bool kTma, bool kPingPong = false>
cudaError_t launch(const __half* q, const __half* k, const __half* v, __half* o, int bh, int n, int m, int d) {
  sdcore::AttentionParams p{};
  p.q = q, p.k = k, p.v = v, p.o = o;
  p.batch = 1, p.heads = bh, p.n = n, p.m = m, p.d = d;
  p.q_stride_b = p.o_stride_b = int64_t(bh) * n * d, p.q_stride_h = p.o_stride_h = int64_t(n) * d;
  p.k_stride_b = p.v_stride_b = int64_t(bh) * m * d, p.k_stride_h = p.v_stride_h = int64_t(m) * d;
  p.q_stride_n = p.k_stride_m = p.v_stride_m = p.o_stride_n = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.causal = false;
  p.dtype = sdcore::DType::kFloat16;
  const FlashArgs a = make_flash_args(p);
  if (!a.vec) return cudaErrorInvalidValue;  // the kernel loads 16-byte rows only
  if constexpr (kTma) {
    constexpr int kWG = Sm90Config<DP>::kWarpgroups;
    Sm90TmaArgs args;
    const cudaError_t err = make_sm90_tma_args<DP, kWG * 64, kBc>(a, &args);
    if (err != cudaSuccess) {
      std::fprintf(stderr, "the driver refused the TMA tensor maps (%s): csrc/cuda/tensor_map.cpp's 5-d map (8-element "
                   "chunks, rows, chunks, heads, batch) needs another shape; sdcore falls back to cp.async there\n",
                   cudaGetErrorString(err));
      return err;
    }
    return launch_flash_sm90_tma<__half, DP, kWG, kBc, kOverlap, kPingPong>(args, nullptr);
  } else {
    return launch_flash_sm90<__half, DP, Sm90Config<DP>::kWarpgroups, kBc, kOverlap>(a, nullptr);
  }
}

template <int DP, int kBc, bool kOverlap, bool kTma, bool kPingPong = false>
AttnResult run_attention(int bh, int n, int m, int d) {
  std::mt19937 gen(1000 + DP + n);
  const auto q = random_halves(static_cast<size_t>(bh) * n * d, gen);
  const auto k = random_halves(static_cast<size_t>(bh) * m * d, gen);
  const auto v = random_halves(static_cast<size_t>(bh) * m * d, gen);
  __half *dq = to_device(q), *dk = to_device(k), *dv = to_device(v), *dout = nullptr;
  CHECK(cudaMalloc(&dout, static_cast<size_t>(bh) * n * d * sizeof(__half)));
  CHECK(cudaMemset(dout, 0xFF, static_cast<size_t>(bh) * n * d * sizeof(__half)));  // NaN
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  CHECK((launch<DP, kBc, kOverlap, kTma, kPingPong>(dq, dk, dv, dout, bh, n, m, d)));
  CHECK(cudaDeviceSynchronize());
  std::vector<__half> out(static_cast<size_t>(bh) * n * d);
  CHECK(cudaMemcpy(out.data(), dout, out.size() * sizeof(__half), cudaMemcpyDeviceToHost));

  // float64 reference on sampled rows of the first and last head.
  AttnResult res;
  double max_err = 0.0, max_ref = 0.0;
  std::vector<int> rows;
  for (int r : {0, 1, 7, 63, 64, n / 2, n - 1})
    if (r < n) rows.push_back(r);
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
  for (int i = 0; i < 3; ++i) CHECK((launch<DP, kBc, kOverlap, kTma, kPingPong>(dq, dk, dv, dout, bh, n, m, d)));
  constexpr int kReps = 20;
  CHECK(cudaEventRecord(start));
  for (int i = 0; i < kReps; ++i) CHECK((launch<DP, kBc, kOverlap, kTma, kPingPong>(dq, dk, dv, dout, bh, n, m, d)));
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
  // Line-buffered even into a pipe (gpu_check.sh tees it): a run that `timeout` kills still leaves every line
  // printed before.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string dir = argc > 1 ? argv[1] : "";
  int dev = 0, major = 0, minor = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) {
    std::printf("wgmma_attention: needs an sm_90 GPU (H100/H200), this one is sm_%d%d; nothing run\n", major, minor);
    return 0;
  }
  // Reading 0 (the kernel's) first; the other only if it fails, to say what would have to change.
  int k_reading = -1, mn_reading = -1;
  for (int reading = 0; reading < 2 && k_reading < 0; ++reading)
    if (run_layout_test(false, reading, dir)) k_reading = reading;
  for (int reading = 0; reading < 2 && mn_reading < 0; ++reading)
    if (run_layout_test(true, reading, dir)) mn_reading = reading;
  if (k_reading != 0 || mn_reading != 0) {
    std::printf("wgmma_attention: the kernel's descriptor strides are wrong for %s%s%s; the attention kernel is "
                "not run\n", k_reading != 0 ? "K-major" : "", k_reading != 0 && mn_reading != 0 ? " and " : "",
                mn_reading != 0 ? "MN-major" : "");
    if (k_reading == 1) std::printf("  fix: k_major_strides must swap LBO and SBO (reading 1 passed)\n");
    if (mn_reading == 1) std::printf("  fix: mn_major_strides must swap LBO and SBO (reading 1 passed)\n");
    return 1;
  }
  std::printf("%-36s %10s %10s %10s\n", "attention fp16 (B*H, N, M, D)", "rel err", "ms", "TFLOP/s");
  bool ok = true;
  auto report = [&](const char* name, AttnResult r) {
    const bool pass = r.rel_err < 4e-3;
    ok = ok && pass;
    std::printf("%-36s %10.2e %10.3f %10.1f  %s\n", name, r.rel_err, r.ms, r.tflops, pass ? "PASS" : "FAIL");
  };
  // Per configuration, smallest first: one K/V tile, then two tiles and both warpgroups, then SD's sizes.
#define SDCORE_SIZES(SUFFIX, ...)                                                                 \
  report("1 64 64 64 (one tile)" SUFFIX, run_attention<64, __VA_ARGS__>(1, 64, 64, 64));         \
  report("1 128 128 64 (two tiles)" SUFFIX, run_attention<64, __VA_ARGS__>(1, 128, 128, 64));    \
  report("16 4096 4096 40 (pad 48)" SUFFIX, run_attention<48, __VA_ARGS__>(16, 4096, 4096, 40)); \
  report("16 4096 4096 64" SUFFIX, run_attention<64, __VA_ARGS__>(16, 4096, 4096, 64));          \
  report("16 4096 4096 80" SUFFIX, run_attention<80, __VA_ARGS__>(16, 4096, 4096, 80));          \
  report("16 1024 1024 160" SUFFIX, run_attention<160, __VA_ARGS__>(16, 1024, 1024, 160));       \
  report("16 1000 77 64 (tails)" SUFFIX, run_attention<64, __VA_ARGS__>(16, 1000, 77, 64));      \
  report("2 4096 77 40 (cross)" SUFFIX, run_attention<48, __VA_ARGS__>(2, 4096, 77, 40));
  // Template arguments: keys per tile, kOverlap, kTma, and (last, as the riskiest: a named-barrier mismatch
  // would hang, not trap) kPingPong, which needs two consumer warpgroups, so not D = 160.
  SDCORE_SIZES("", 64, false, false)
  SDCORE_SIZES(" overlap", 64, true, false)
  SDCORE_SIZES(" tma", 64, false, true)
  SDCORE_SIZES(" tma overlap", 64, true, true)
  SDCORE_SIZES(" tma k128", 128, false, true)
  SDCORE_SIZES(" tma k128 overlap", 128, true, true)
#define SDCORE_PINGPONG_SIZES(SUFFIX, BC)                                                                        \
  report("1 128 128 64 (two tiles)" SUFFIX, run_attention<64, BC, true, true, true>(1, 128, 128, 64));          \
  report("16 4096 4096 40 (pad 48)" SUFFIX, run_attention<48, BC, true, true, true>(16, 4096, 4096, 40));       \
  report("16 4096 4096 64" SUFFIX, run_attention<64, BC, true, true, true>(16, 4096, 4096, 64));                \
  report("16 4096 4096 80" SUFFIX, run_attention<80, BC, true, true, true>(16, 4096, 4096, 80));                \
  report("16 1000 77 64 (tails)" SUFFIX, run_attention<64, BC, true, true, true>(16, 1000, 77, 64));
  SDCORE_PINGPONG_SIZES(" tma overlap pingpong", 64)
  SDCORE_PINGPONG_SIZES(" tma k128 overlap pingpong", 128)
#undef SDCORE_PINGPONG_SIZES
#undef SDCORE_SIZES
  return ok ? 0 : 1;
}
