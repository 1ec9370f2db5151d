// Runs sdcore's Hopper attention kernels (csrc/cuda/attention_sm90.cuh, never yet run on a card) on the SIMT
// emulator (simt.h), through their own launchers, in every configuration of the tile table's columns, against
// a float64 reference and against the sm_80 kernel (which has run on H100/H200 cards) on the same emulator:
//   - error <= 2x the sm_80 kernel's, and the sm_80 kernel within the dtype's bound (the emulator's own check);
//   - nothing written outside the output view; the emulator fails at once on a deadlock, divergence, a read
//     of shared bytes a copy is still writing, a copy into bytes an issued wgmma may still read, a missing
//     proxy fence, or an access outside shared memory or the tensors.
// tests/test_cuda_emulated.py builds it with g++ (no CUDA toolkit, no GPU) on a scratch copy of csrc/
// (tests/emu/emu_build.py), with device.cpp.
//   attention_emu [eager|late|random] [seed]      prints one line per run and "OK: N runs", or the failure
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "simt.h"
// From the scratch tree:
#include "attention_sm90.cuh"

namespace sdcore {
namespace cuda {
namespace attn {
// The sm_80 launchers are extern templates in attention_launch.cuh (their instantiation files are .cu): the
// ones the comparison runs are instantiated here.
template cudaError_t run_flash<__half, 48>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__half, 64>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__half, 80>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__half, 160>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__nv_bfloat16, 48>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__nv_bfloat16, 64>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__nv_bfloat16, 80>(FlashArgs, cudaStream_t);
template cudaError_t run_flash<__nv_bfloat16, 160>(FlashArgs, cudaStream_t);
template cudaError_t run_simt<__half>(FlashArgs, cudaStream_t);
template cudaError_t run_simt<__nv_bfloat16>(FlashArgs, cudaStream_t);
}  // namespace attn
}  // namespace cuda
}  // namespace sdcore

namespace {

using namespace sdcore::cuda::attn;
using sdcore::AttentionParams;

template <typename T>
constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;

template <typename T>
uint16_t to_bits(float x) {
  if constexpr (kBf16<T>) {
    return __float2bfloat16_rn(x).x;
  } else {
    return __float2half_rn(x).x;
  }
}
template <typename T>
float from_bits(uint16_t h) {
  return emu::bits_to_float(h, kBf16<T>);
}

constexpr uint16_t kSentinel = 0x7E5A;  // a NaN in both dtypes: never a result the kernel may leave

// How q/k/v/o lie in memory, as the UNet hands them to attention.
enum class Layout {
  kContiguous,  // [B, H, N, D] each
  kFusedQkv,    // self-attention: q, k, v views of one [B, N, 3, H, D] projection; o [B, N, H, D]
  kFusedKv,     // cross-attention: q [B, N, H, D], k/v views of one [B, M, 2, H, D]; o [B, N, H, D]
  kExpandedKv,  // k/v of one head expanded over the heads (head stride 0): no tensor map describes it
};
const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kFusedQkv: return "fused qkv";
    case Layout::kFusedKv: return "fused kv";
    default: return "expanded kv";
  }
}

struct Case {
  Layout layout;
  int batch, heads, n, m, d;
  bool causal;
};

// The tensors of one case: storage, the params that view them, and the reference output.
struct Problem {
  std::vector<uint16_t> qs, ks, vs, os;
  AttentionParams p{};
  std::vector<double> ref;  // [B, H, N, d]
};

template <typename T>
Problem make_problem(const Case& c, uint64_t seed) {
  Problem pr;
  const int64_t B = c.batch, H = c.heads, N = c.n, M = c.m, D = c.d;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> qk(-2.0f, 2.0f), val(-1.0f, 1.0f);
  AttentionParams& p = pr.p;
  p.batch = B, p.heads = H, p.n = N, p.m = M, p.d = D;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.causal = c.causal;
  p.dtype = kBf16<T> ? sdcore::DType::kBFloat16 : sdcore::DType::kFloat16;
  auto fill = [&](std::vector<uint16_t>& s, size_t count, auto& dist) {
    s.resize(count);
    for (auto& x : s) x = to_bits<T>(dist(gen));
  };
  switch (c.layout) {
    case Layout::kContiguous:
      fill(pr.qs, B * H * N * D, qk), fill(pr.ks, B * H * M * D, qk), fill(pr.vs, B * H * M * D, val);
      p.q = pr.qs.data(), p.k = pr.ks.data(), p.v = pr.vs.data();
      p.q_stride_b = H * N * D, p.q_stride_h = N * D, p.q_stride_n = D;
      p.k_stride_b = p.v_stride_b = H * M * D, p.k_stride_h = p.v_stride_h = M * D, p.k_stride_m = p.v_stride_m = D;
      break;
    case Layout::kFusedQkv:
      fill(pr.qs, B * N * 3 * H * D, qk);
      p.q = pr.qs.data(), p.k = pr.qs.data() + H * D, p.v = pr.qs.data() + 2 * H * D;
      p.q_stride_b = p.k_stride_b = p.v_stride_b = N * 3 * H * D;
      p.q_stride_h = p.k_stride_h = p.v_stride_h = D;
      p.q_stride_n = p.k_stride_m = p.v_stride_m = 3 * H * D;
      break;
    case Layout::kFusedKv:
    case Layout::kExpandedKv: {
      fill(pr.qs, B * N * H * D, qk);
      p.q = pr.qs.data();
      p.q_stride_b = N * H * D, p.q_stride_h = D, p.q_stride_n = H * D;
      const bool fused = c.layout == Layout::kFusedKv;
      const int64_t kv_heads = fused ? H : 1;
      fill(pr.ks, B * M * 2 * kv_heads * D, qk);
      p.k = pr.ks.data(), p.v = pr.ks.data() + kv_heads * D;
      p.k_stride_b = p.v_stride_b = M * 2 * kv_heads * D;
      p.k_stride_h = p.v_stride_h = fused ? D : 0;
      p.k_stride_m = p.v_stride_m = 2 * kv_heads * D;
      break;
    }
  }
  // The output: [B, N, H, D] rows with 8 spare elements each (contiguous: [B, H, N, D] with them), which must
  // keep the sentinel.
  if (c.layout == Layout::kContiguous) {
    p.o_stride_n = D + 8, p.o_stride_h = N * (D + 8), p.o_stride_b = H * N * (D + 8);
  } else {
    p.o_stride_h = D, p.o_stride_n = H * D + 8, p.o_stride_b = N * (H * D + 8);
  }
  pr.os.assign(B * p.o_stride_b, kSentinel);
  p.o = pr.os.data();

  auto q_at = [&](int64_t b, int64_t h, int64_t i, int64_t e) {
    return from_bits<T>(static_cast<const uint16_t*>(p.q)[b * p.q_stride_b + h * p.q_stride_h + i * p.q_stride_n + e]);
  };
  auto k_at = [&](int64_t b, int64_t h, int64_t j, int64_t e) {
    return from_bits<T>(static_cast<const uint16_t*>(p.k)[b * p.k_stride_b + h * p.k_stride_h + j * p.k_stride_m + e]);
  };
  auto v_at = [&](int64_t b, int64_t h, int64_t j, int64_t e) {
    return from_bits<T>(static_cast<const uint16_t*>(p.v)[b * p.v_stride_b + h * p.v_stride_h + j * p.v_stride_m + e]);
  };
  pr.ref.assign(B * H * N * D, 0.0);
  std::vector<double> w(M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) {
        const int64_t keys = c.causal ? std::min(M, i + 1) : M;
        double mx = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < keys; ++j) {
          double dot = 0.0;
          for (int64_t e = 0; e < D; ++e) dot += double(q_at(b, h, i, e)) * k_at(b, h, j, e);
          w[j] = dot * p.scale;
          mx = std::max(mx, w[j]);
        }
        for (int64_t j = 0; j < keys; ++j) sum += (w[j] = std::exp(w[j] - mx));
        for (int64_t e = 0; e < D; ++e) {
          double acc = 0.0;
          for (int64_t j = 0; j < keys; ++j) acc += w[j] * v_at(b, h, j, e);
          pr.ref[((b * H + h) * N + i) * D + e] = acc / sum;
        }
      }
  return pr;
}

// Runs `launch` on a fresh output and returns its largest error against the reference (fails on a NaN, a
// launch error, or a write outside the output view).
template <typename T, typename Launch>
double run(Problem& pr, const char* what, Launch&& launch, bool finite_only = true) {
  std::fill(pr.os.begin(), pr.os.end(), kSentinel);
  const AttentionParams& p = pr.p;
  auto range = [](const std::vector<uint16_t>& s) {
    const auto* lo = reinterpret_cast<const unsigned char*>(s.data());
    return emu::Range{lo, lo + 2 * s.size()};
  };
  emu::global_ranges() = {range(pr.qs), range(pr.ks), range(pr.vs)};
  const FlashArgs a = make_flash_args(p);
  if (!a.vec) emu::fail("the case is not a.vec (16-byte rows): the sm90 kernels need it");
  const cudaError_t err = launch(a);
  if (err != cudaSuccess) emu::fail(std::string(what) + ": launch returned " + cudaGetErrorString(err));
  double max_err = 0.0;
  size_t written = 0;
  const auto* o = pr.os.data();
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = 0; i < p.n; ++i)
        for (int64_t e = 0; e < p.d; ++e) {
          const uint16_t bits = o[b * p.o_stride_b + h * p.o_stride_h + i * p.o_stride_n + e];
          const float got = from_bits<T>(bits);
          if (bits == kSentinel || (finite_only && !std::isfinite(got))) {
            emu::fail(std::string(what) + ": output (b " + std::to_string(b) + ", h " + std::to_string(h) + ", row " +
                      std::to_string(i) + ", col " + std::to_string(e) + ") is " +
                      (bits == kSentinel ? "not written" : "not finite"));
          }
          max_err = std::max(max_err, std::fabs(got - pr.ref[((b * p.heads + h) * p.n + i) * p.d + e]));
          ++written;
        }
  size_t untouched = 0;
  for (uint16_t x : pr.os) untouched += x == kSentinel;
  if (untouched != pr.os.size() - written) emu::fail(std::string(what) + ": wrote outside the output view");
  return max_err;
}

// One configuration of the sm90 kernels: the table's (run_flash_sm90, as sdcore dispatches), or a named one
// through the launchers bench/hopper times.
template <typename T, int DP, int kBc, bool kOverlap, bool kTma, bool kPingPong>
cudaError_t launch_config(const FlashArgs& a) {
  constexpr int kWG = Sm90Config<DP>::kWarpgroups;
  if constexpr (kTma) {
    Sm90TmaArgs args;
    const cudaError_t err = make_sm90_tma_args<DP, kWG * 64, kBc>(a, &args);
    if (err != cudaSuccess) return err;
    return launch_flash_sm90_tma<T, DP, kWG, kBc, kOverlap, kPingPong>(args, nullptr);
  } else {
    return launch_flash_sm90<T, DP, kWG, kBc, kOverlap>(a, nullptr);
  }
}

int g_runs = 0;

// The sm90 error must be within 2x the sm_80 kernel's on the same inputs (the FlashAttention rule, with the
// kernel proven on cards as the same-precision peer), and the sm_80 kernel within the dtype's bound.
template <typename T>
void check(const std::string& what, double err, double err80) {
  const double bound80 = kBf16<T> ? 2e-2 : 3e-3;
  if (err80 > bound80) {
    emu::fail("the sm_80 kernel's error " + std::to_string(err80) + " exceeds " + std::to_string(bound80) +
              ": the emulator itself is wrong");
  }
  const double bound = std::max(2.0 * err80, kBf16<T> ? 8e-3 : 1e-3);
  std::printf("%-72s err %.2e (sm_80 %.2e)%s\n", what.c_str(), err, err80, err <= bound ? "" : "  FAIL");
  std::fflush(stdout);
  if (err > bound) emu::fail(what + ": error " + std::to_string(err) + " > " + std::to_string(bound));
  ++g_runs;
}

template <typename T, int DP>
void run_case(const Case& c, bool all_configs, uint64_t seed) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s d%d (D%d) b%d h%d n%d m%d%s %s", kBf16<T> ? "bf16" : "fp16", c.d, DP, c.batch,
                c.heads, c.n, c.m, c.causal ? " causal" : "", layout_name(c.layout));
  const std::string name = buf;
  emu::case_label() = name + ", sm_80 kernel";
  Problem pr = make_problem<T>(c, seed);
  const double err80 = run<T>(pr, "sm_80", [](const FlashArgs& a) { return run_flash<T, DP>(a, nullptr); });
  auto one = [&](const char* config, auto&& launch) {
    emu::case_label() = name + ", " + config;
    check<T>(emu::case_label(), run<T>(pr, config, launch), err80);
  };
  one("table (run_flash_sm90)", [](const FlashArgs& a) { return run_flash_sm90<T, DP>(a, nullptr); });
  if (!all_configs) return;
  if (c.layout == Layout::kExpandedKv) return;  // no tensor map: every configuration is the cp.async kernel
  one("cp.async bc64", launch_config<T, DP, 64, false, false, false>);
  one("cp.async bc64 overlap", launch_config<T, DP, 64, true, false, false>);
  one("tma bc64", launch_config<T, DP, 64, false, true, false>);
  one("tma bc64 overlap", launch_config<T, DP, 64, true, true, false>);
  one("tma bc128", launch_config<T, DP, 128, false, true, false>);
  one("tma bc128 overlap", launch_config<T, DP, 128, true, true, false>);
  if constexpr (Sm90Config<DP>::kWarpgroups == 2) {
    one("tma bc64 overlap pingpong", launch_config<T, DP, 64, true, true, true>);
    one("tma bc128 overlap pingpong", launch_config<T, DP, 128, true, true, true>);
  }
  // A driver without the tensor-map encoder: the table falls back to the cp.async kernel.
  emu::device().tma_encoder = false;
  one("table, no TMA encoder in the driver", [](const FlashArgs& a) { return run_flash_sm90<T, DP>(a, nullptr); });
  emu::device().tma_encoder = true;
}

// NaN and infinities in q, k and v: the sm90 kernels must give what the sm_80 kernel gives (whose special-value
// rules tests/test_attention.py checks against the reference on cards): NaN in the same places, the same values
// elsewhere, once the op's glue has run. Three configurations, causal and not.
template <int DP>
void special_values_case(bool causal, uint64_t seed) {
  using T = __half;
  const Case c{Layout::kContiguous, 1, 2, 130, 130, DP, causal};
  const std::string name = std::string("fp16 special values d") + std::to_string(DP) + (causal ? " causal" : "");
  Problem pr = make_problem<T>(c, seed);
  const uint16_t nan = 0x7E00, inf = 0x7C00, ninf = 0xFC00;
  const int64_t D = DP, rows = c.n;
  auto put = [&](std::vector<uint16_t>& s, int64_t head, int64_t row, int64_t col, uint16_t bits) {
    s[(head * rows + row) * D + col] = bits;
  };
  put(pr.qs, 0, 3, 1, nan);      // row 3's scores all NaN
  put(pr.ks, 0, 70, 2, inf);     // key 70: +inf or -inf scores, by the sign of q's column 2
  put(pr.ks, 1, 5, 0, ninf);     // head 1, key 5
  put(pr.vs, 0, 100, 7, nan);    // a NaN value: every row that sees key 100, column 7
  put(pr.vs, 1, 129, 0, inf);    // the last key's value, head 1
  // The op's glue (mark_unseen_nonfinite_v, csrc/common/checks.cpp) then sets NaN where a causal row can't see
  // a non-finite v (the reference's 0 * inf): kernels that skip those keys and kernels that multiply them by 0
  // agree after it, and only after it.
  auto mark_unseen_nonfinite_v = [&](std::vector<uint16_t>& o) {
    if (!causal) return;
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t e = 0; e < D; ++e) {
        int64_t last = -1;
        for (int64_t j = 0; j < c.m; ++j) {
          if (!std::isfinite(from_bits<T>(pr.vs[(h * rows + j) * D + e]))) last = j;
        }
        for (int64_t i = 0; i < std::min<int64_t>(c.n, c.m - 1) && i < last; ++i) {
          o[h * pr.p.o_stride_h + i * pr.p.o_stride_n + e] = nan;
        }
      }
    }
  };
  auto capture = [&](const char* what, auto&& launch) {
    emu::case_label() = name + ", " + what;
    run<T>(pr, what, launch, /*finite_only=*/false);
    mark_unseen_nonfinite_v(pr.os);
    return pr.os;
  };
  std::vector<uint16_t> want;
  want = capture("sm_80", [](const FlashArgs& a) { return run_flash<T, DP>(a, nullptr); });
  auto same = [&](const char* what, auto&& launch) {
    const std::vector<uint16_t> got = capture(what, launch);
    size_t nans = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const float g = from_bits<T>(got[i]), w = from_bits<T>(want[i]);
      nans += std::isnan(w);
      if (std::isnan(g) != std::isnan(w) || (!std::isnan(w) && !(std::fabs(g - w) <= 2e-3f || g == w))) {
        emu::fail(emu::case_label() + ": element " + std::to_string(i) + " is " + std::to_string(g) +
                  ", the sm_80 kernel's " + std::to_string(w));
      }
    }
    std::printf("%-72s same as sm_80 (%zu NaN)\n", emu::case_label().c_str(), nans);
    std::fflush(stdout);
    ++g_runs;
  };
  same("table (run_flash_sm90)", [](const FlashArgs& a) { return run_flash_sm90<T, DP>(a, nullptr); });
  same("cp.async bc64 overlap", launch_config<T, DP, 64, true, false, false>);
  same("tma bc128 overlap pingpong", launch_config<T, DP, 128, true, true, true>);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t arg = emu::init(argc, argv);
  if (arg < 0) return 2;
  const uint64_t seed = static_cast<uint64_t>(arg);

  // Awkward sizes: query and key counts off the tiles (one row past a 128-row block, a 65-key tail, 77 CLIP
  // tokens, one of each), causal masks, the UNet's fused layouts, and a layout no tensor map describes.
  using L = Layout;
  run_case<__half, 48>({L::kFusedQkv, 1, 2, 129, 129, 40, false}, true, seed);   // SD 1.x self-attention
  run_case<__half, 48>({L::kFusedKv, 2, 1, 70, 77, 40, false}, true, seed);      // SD 1.x cross-attention
  run_case<__half, 64>({L::kContiguous, 1, 2, 100, 65, 64, true}, true, seed);   // causal, a 1-key tail
  run_case<__half, 64>({L::kExpandedKv, 1, 3, 64, 50, 64, false}, true, seed);   // cp.async fallback
  run_case<__half, 80>({L::kContiguous, 2, 1, 65, 200, 80, false}, true, seed);  // SDXL's head dim
  run_case<__half, 160>({L::kFusedQkv, 1, 1, 130, 130, 160, true}, true, seed);  // one warpgroup per block
  run_case<__nv_bfloat16, 48>({L::kFusedQkv, 1, 1, 70, 70, 40, true}, false, seed);
  run_case<__nv_bfloat16, 64>({L::kFusedKv, 1, 2, 64, 77, 64, false}, false, seed);
  run_case<__nv_bfloat16, 80>({L::kContiguous, 1, 1, 129, 64, 80, false}, false, seed);
  run_case<__nv_bfloat16, 160>({L::kContiguous, 1, 1, 65, 129, 160, false}, false, seed);
  run_case<__nv_bfloat16, 64>({L::kContiguous, 1, 1, 1, 1, 64, true}, false, seed);  // one query, one key
  special_values_case<64>(false, seed);
  special_values_case<64>(true, seed);
  std::printf("OK: %d runs\n", g_runs);
  return 0;
}
