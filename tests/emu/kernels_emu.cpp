// Runs sdcore's GroupNorm(+SiLU), GEGLU and scheduler-step CUDA kernels (csrc/cuda/group_norm.cu, geglu.cu,
// scheduler_step.cu) on the SIMT emulator (simt.h), through their host entry points (launch.h), against
// float64 references: every path of
// the GroupNorm planner (fused with one block per group, fused over a thread block cluster, the cluster
// refused and the fallback, the split path's NCHW, channels_last tile and wide-C row kernels) on the cards it
// plans for (an H100, an A100, a device with 48 KB of shared memory), fp32/fp16/bf16, weights as float32 or in
// the input's dtype, vectors that cross channel rows; GEGLU with and without bias, vectorized or not, strided
// rows; the step with guidance, 0-4 history terms, noise, clipping, a state output and a tail shorter than a
// vector. Outputs must match within the dtype's rounding, and nothing outside them may change.
// tests/test_cuda_emulated.py builds it with g++ (tests/emu/emu_build.py), no CUDA toolkit, no GPU.
//   kernels_emu [eager|late|random] [seed]    one line per case and "OK: N cases", or the failure
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "simt.h"
// From the scratch tree:
#include "launch.h"

namespace {

using sdcore::DType;

template <typename T>
DType dtype_of() {
  if constexpr (std::is_same<T, float>::value) {
    return DType::kFloat32;
  } else if constexpr (std::is_same<T, __half>::value) {
    return DType::kFloat16;
  } else {
    return DType::kBFloat16;
  }
}
template <typename T>
const char* name_of() {
  return std::is_same<T, float>::value ? "fp32" : std::is_same<T, __half>::value ? "fp16" : "bf16";
}
template <typename T>
T from_double(double x) {
  if constexpr (std::is_same<T, float>::value) {
    return static_cast<float>(x);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
}
template <typename T>
double to_double(T x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}
// The relative error allowed: the output's rounding, a few ulp of fp32 arithmetic before it.
template <typename T>
double tolerance() {
  return std::is_same<T, float>::value ? 2e-5 : std::is_same<T, __half>::value ? 2e-3 : 1.6e-2;
}

constexpr size_t kGuard = 64;  // elements past each output, which must keep their sentinel

// 16-byte aligned storage of `n` elements: an input ends there (so that AddressSanitizer builds see a read past
// it), an output has a guard band after it.
template <typename T>
struct Buffer {
  std::vector<uint4> raw;
  size_t n;
  explicit Buffer(size_t count, bool guard = false)
      : raw(((count + (guard ? kGuard : 0)) * sizeof(T) + 15) / 16), n(count) {}
  T* data() { return reinterpret_cast<T*>(raw.data()); }
  T& operator[](size_t i) { return data()[i]; }
  emu::Range range() {
    const auto* lo = reinterpret_cast<const unsigned char*>(raw.data());
    return {lo, lo + n * sizeof(T)};
  }
};

template <typename T>
void fill_sentinel(Buffer<T>& b) {
  std::memset(b.raw.data(), 0x7f, b.raw.size() * sizeof(uint4));
}
template <typename T>
bool untouched(const T& v) {
  const auto* p = reinterpret_cast<const unsigned char*>(&v);
  return std::all_of(p, p + sizeof(T), [](unsigned char c) { return c == 0x7f; });
}
template <typename T>
void check_guard(Buffer<T>& b, const std::string& what) {
  const auto* p = reinterpret_cast<const unsigned char*>(b.data() + b.n);
  const auto* end = reinterpret_cast<const unsigned char*>(b.raw.data() + b.raw.size());
  for (; p < end; ++p) {
    if (*p != 0x7f) emu::fail(what + ": wrote past the end of its output");
  }
}

// The cards the planners plan for.
emu::Device h100() { return {}; }
emu::Device h100_no_cluster_slots() {
  emu::Device d;
  d.max_active_clusters = 0;
  return d;
}
emu::Device a100() {
  emu::Device d;
  d.sms = 108, d.cc_major = 8, d.smem_optin = 163 * 1024, d.ptx_version = 80;
  return d;
}
emu::Device small_smem() {  // 48 KB per block: mid-sized groups take the split path
  emu::Device d = a100();
  d.smem_optin = 48 * 1024;
  return d;
}
emu::Device two_sms() {  // one wave is 16 blocks of 256 threads: the grid-stride loops go round
  emu::Device d;
  d.sms = 2;
  return d;
}

int g_cases = 0;

enum class Affine { kNone, kFloat32, kInput };

// What the planner must have launched: one fused launch (cluster size k), or the split path's three.
struct Path {
  int launches;
  unsigned cluster;
};
constexpr Path kFused{1, 1}, kSplit{3, 1};
constexpr Path fused_cluster(unsigned k) { return {1, k}; }

template <typename T>
void group_norm_case(const char* device_name, const emu::Device& dev, int B, int C, int H, int W, int G, bool cl,
                     bool silu, Affine affine, Path expect, uint64_t seed) {
  const int HW = H * W, cpg = C / G;
  const size_t n = size_t(B) * C * HW;
  char buf[200];
  std::snprintf(buf, sizeof(buf), "group_norm %s %dx%dx%dx%d G%d %s%s%s on %s", name_of<T>(), B, C, H, W, G,
                cl ? "channels_last" : "NCHW", silu ? " +silu" : "",
                affine == Affine::kNone ? "" : affine == Affine::kFloat32 ? " w:fp32" : " w:dtype", device_name);
  const std::string what = buf;
  emu::case_label() = what;
  emu::device() = dev;

  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-2.0, 2.0);
  Buffer<T> x(n), y(n, true);
  const double offset = 7.0;  // |mean| >> std: the kernels' shifted sums must keep their precision
  for (size_t i = 0; i < n; ++i) x[i] = from_double<T>(offset + dist(gen));
  fill_sentinel(y);
  std::vector<float> gf(C), bf(C);
  std::vector<T> gt(C), bt(C);
  for (int c = 0; c < C; ++c) {
    gt[c] = from_double<T>(1.0 + 0.5 * dist(gen)), bt[c] = from_double<T>(0.5 * dist(gen));
    gf[c] = static_cast<float>(to_double(gt[c])), bf[c] = static_cast<float>(to_double(bt[c]));
  }

  sdcore::GroupNormParams p{};
  p.x = x.data(), p.y = y.data();
  const bool f32 = affine == Affine::kFloat32;
  p.gamma = affine == Affine::kNone ? nullptr : f32 ? static_cast<const void*>(gf.data()) : gt.data();
  p.beta = affine == Affine::kNone ? nullptr : f32 ? static_cast<const void*>(bf.data()) : bt.data();
  p.affine_float32 = f32;
  p.batch = B, p.channels = C, p.hw = HW, p.groups = G;
  p.eps = 1e-5f;
  p.silu = silu;
  p.channels_last = cl;
  p.dtype = dtype_of<T>();
  const int64_t ws_bytes = sdcore::cuda::group_norm_workspace_bytes(p);
  std::vector<uint4> ws(static_cast<size_t>(ws_bytes) / 16 + 1);
  p.workspace = ws_bytes > 0 ? ws.data() : nullptr;
  p.workspace_bytes = ws_bytes;
  const auto* wlo = reinterpret_cast<const unsigned char*>(ws.data());
  emu::global_ranges() = {x.range(), y.range(), {wlo, wlo + ws_bytes}};
  if (p.gamma != nullptr) {
    const auto* g = static_cast<const unsigned char*>(p.gamma);
    const auto* b = static_cast<const unsigned char*>(p.beta);
    const size_t bytes = size_t(C) * (f32 ? 4 : sizeof(T));
    emu::global_ranges().push_back({g, g + bytes});
    emu::global_ranges().push_back({b, b + bytes});
  }
  emu::launch_log().clear();
  const cudaError_t err = sdcore::cuda::group_norm(p, nullptr);
  if (err != cudaSuccess) emu::fail(what + ": group_norm returned " + cudaGetErrorString(err));
  const auto& log = emu::launch_log();
  if (static_cast<int>(log.size()) != expect.launches || log.front().cluster != expect.cluster) {
    emu::fail(what + ": expected " + std::to_string(expect.launches) + " launch(es) with clusters of " +
              std::to_string(expect.cluster) + ", got " + std::to_string(log.size()) + " (clusters of " +
              std::to_string(log.empty() ? 0 : log.front().cluster) + ")");
  }
  check_guard(y, what);

  auto at = [&](int b, int c, int pix) {
    return size_t(b) * C * HW + (cl ? size_t(pix) * C + c : size_t(c) * HW + pix);
  };
  double max_err = 0.0;
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < G; ++g) {
      double sum = 0.0, sq = 0.0;
      for (int c = g * cpg; c < (g + 1) * cpg; ++c)
        for (int pix = 0; pix < HW; ++pix) sum += to_double(x[at(b, c, pix)]);
      const double mean = sum / (double(cpg) * HW);
      for (int c = g * cpg; c < (g + 1) * cpg; ++c)
        for (int pix = 0; pix < HW; ++pix) sq += std::pow(to_double(x[at(b, c, pix)]) - mean, 2);
      const double rstd = 1.0 / std::sqrt(sq / (double(cpg) * HW) + 1e-5);
      for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
        const double ga = affine == Affine::kNone ? 1.0 : gf[c], be = affine == Affine::kNone ? 0.0 : bf[c];
        for (int pix = 0; pix < HW; ++pix) {
          double ref = (to_double(x[at(b, c, pix)]) - mean) * rstd * ga + be;
          if (silu) ref = ref / (1.0 + std::exp(-ref));
          const double got = to_double(y[at(b, c, pix)]);
          const double err = std::fabs(got - ref) / std::max(1.0, std::fabs(ref));
          if (!(err <= tolerance<T>())) {
            emu::fail(what + ": y[b " + std::to_string(b) + ", c " + std::to_string(c) + ", pixel " +
                      std::to_string(pix) + "] = " + std::to_string(got) + ", want " + std::to_string(ref));
          }
          max_err = std::max(max_err, err);
        }
      }
    }
  }
  std::printf("%-86s %zu launch(es), cluster %u, err %.1e\n", what.c_str(), log.size(), log.front().cluster,
              max_err);
  std::fflush(stdout);
  ++g_cases;
}

double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

template <typename T>
void geglu_case(const emu::Device& dev, int64_t rows, int64_t F, int64_t h_stride, bool bias, uint64_t seed) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "geglu %s rows %lld F %lld stride %lld%s", name_of<T>(), (long long)rows,
                (long long)F, (long long)h_stride, bias ? " +bias" : "");
  const std::string what = buf;
  emu::case_label() = what;
  emu::device() = dev;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-3.0, 3.0);
  Buffer<T> h(size_t(rows) * h_stride), b(2 * size_t(F)), out(size_t(rows) * F, true);
  for (size_t i = 0; i < h.n; ++i) h[i] = from_double<T>(dist(gen));
  for (size_t i = 0; i < b.n; ++i) b[i] = from_double<T>(dist(gen));
  fill_sentinel(out);
  emu::global_ranges() = {h.range(), b.range(), out.range()};
  sdcore::GegluParams p{};
  p.h = h.data(), p.bias = bias ? b.data() : nullptr, p.out = out.data();
  p.rows = rows, p.features = F, p.h_stride = h_stride;
  p.dtype = dtype_of<T>();
  emu::launch_log().clear();
  const cudaError_t err = sdcore::cuda::geglu(p, nullptr);
  if (err != cudaSuccess) emu::fail(what + ": geglu returned " + cudaGetErrorString(err));
  check_guard(out, what);
  double max_err = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < F; ++j) {
      const double bv = bias ? to_double(b[j]) : 0.0, bg = bias ? to_double(b[F + j]) : 0.0;
      const double ref = (to_double(h[r * h_stride + j]) + bv) * gelu(to_double(h[r * h_stride + F + j]) + bg);
      const double got = to_double(out[r * F + j]);
      const double e = std::fabs(got - ref) / std::max(1.0, std::fabs(ref));
      if (!(e <= tolerance<T>())) {
        emu::fail(what + ": out[" + std::to_string(r) + ", " + std::to_string(j) + "] = " + std::to_string(got) +
                  ", want " + std::to_string(ref));
      }
      max_err = std::max(max_err, e);
    }
  }
  std::printf("%-86s %zu launch(es), err %.1e\n", what.c_str(), emu::launch_log().size(), max_err);
  std::fflush(stdout);
  ++g_cases;
}

// One denoising step (StepCoeffs in common/params.h), in float64 from the same inputs.
template <typename T>
void step_case(const emu::Device& dev, int64_t numel, size_t misalign, bool cfg, int n_hist, bool noise, bool state,
               float clip, uint64_t seed) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "scheduler_step %s numel %lld%s%s hist %d%s%s%s", name_of<T>(), (long long)numel,
                misalign ? " misaligned" : "", cfg ? " cfg" : "", n_hist, noise ? " noise" : "",
                state ? " state" : "", clip > 0 ? " clip" : "");
  const std::string what = buf;
  emu::case_label() = what;
  emu::device() = dev;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-2.0, 2.0);
  auto coef = [&] { return static_cast<float>(dist(gen)); };
  // Inputs start `misalign` elements into their buffers: off 16 bytes, the kernel must take VEC = 1.
  std::vector<Buffer<T>> in;
  const int n_in = 3 + sdcore::kMaxStepHistory;  // model output (2 x numel), sample, noise, history
  for (int i = 0; i < n_in; ++i) in.emplace_back((i == 0 ? 2 : 1) * size_t(numel) + misalign);
  for (auto& b : in)
    for (size_t i = 0; i < b.n; ++i) b[i] = from_double<T>(dist(gen));
  Buffer<T> out(size_t(numel) + misalign, true), st(size_t(numel) + misalign, true);
  fill_sentinel(out);
  fill_sentinel(st);
  emu::global_ranges() = {out.range(), st.range()};
  for (auto& b : in) emu::global_ranges().push_back(b.range());

  sdcore::StepParams p{};
  p.model_output = in[0].data() + misalign;
  p.sample = in[1].data() + misalign;
  p.noise = noise ? in[2].data() + misalign : nullptr;
  for (int k = 0; k < sdcore::kMaxStepHistory; ++k) p.history[k] = k < n_hist ? in[3 + k].data() + misalign : nullptr;
  p.out = out.data() + misalign;
  p.state = state ? st.data() + misalign : nullptr;
  p.numel = numel;
  p.cfg = cfg;
  p.guidance_scale = 7.5f;
  sdcore::StepCoeffs& c = p.c;
  c.x0_x = coef(), c.x0_m = coef(), c.clip = clip;
  c.out_x = coef(), c.out_m = coef(), c.out_x0 = coef(), c.out_noise = noise ? coef() : 0.0f;
  c.st_x = coef(), c.st_m = coef(), c.st_x0 = coef();
  for (int k = 0; k < sdcore::kMaxStepHistory; ++k) c.hist[k] = k < n_hist ? coef() : 0.0f;
  c.n_hist = n_hist;
  p.dtype = dtype_of<T>();
  emu::launch_log().clear();
  const cudaError_t err = sdcore::cuda::scheduler_step(p, nullptr);
  if (err != cudaSuccess) emu::fail(what + ": scheduler_step returned " + cudaGetErrorString(err));
  check_guard(out, what);
  check_guard(st, what);
  for (size_t i = 0; i < misalign; ++i) {
    if (!untouched(out[i]) || !untouched(st[i])) emu::fail(what + ": wrote before the start of its output");
  }
  auto v = [&](int buffer, int64_t i) { return to_double(in[buffer][misalign + i]); };
  double max_err = 0.0;
  for (int64_t i = 0; i < numel; ++i) {
    const double m = cfg ? v(0, i) + 7.5 * (v(0, numel + i) - v(0, i)) : v(0, i), x = v(1, i);
    double x0 = double(c.x0_x) * x + double(c.x0_m) * m;
    if (clip > 0) x0 = std::clamp(x0, -double(clip), double(clip));
    double o = double(c.out_x) * x + double(c.out_m) * m + double(c.out_x0) * x0;
    if (noise) o += double(c.out_noise) * v(2, i);
    for (int k = 0; k < n_hist; ++k) o += double(c.hist[k]) * v(3 + k, i);
    const double s = double(c.st_x) * x + double(c.st_m) * m + double(c.st_x0) * x0;
    // The kernel works in fp32 on terms up to ~100: relative to the largest term, not to the result.
    const double scale = std::max({1.0, std::fabs(m) * 4, std::fabs(x0) * 2});
    const double e = std::max(std::fabs(to_double(out[misalign + i]) - o) / std::max(scale, std::fabs(o)),
                              state ? std::fabs(to_double(st[misalign + i]) - s) / std::max(scale, std::fabs(s)) : 0.0);
    if (!(e <= tolerance<T>())) {
      emu::fail(what + ": element " + std::to_string(i) + " out " + std::to_string(to_double(out[misalign + i])) +
                ", want " + std::to_string(o));
    }
    max_err = std::max(max_err, e);
  }
  if (!state) {
    for (size_t i = 0; i < st.n; ++i) {
      if (!untouched(st[i])) emu::fail(what + ": wrote a state nobody asked for");
    }
  }
  std::printf("%-86s %zu launch(es), err %.1e\n", what.c_str(), emu::launch_log().size(), max_err);
  std::fflush(stdout);
  ++g_cases;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t arg = emu::init(argc, argv);
  if (arg < 0) return 2;
  const uint64_t seed = static_cast<uint64_t>(arg);

  const Affine none = Affine::kNone, f32 = Affine::kFloat32, own = Affine::kInput;
  // Fused, one block per group: the UNet's shapes in small.
  group_norm_case<float>("H100", h100(), 2, 64, 8, 8, 32, false, true, f32, kFused, seed);
  group_norm_case<__half>("H100", h100(), 1, 320, 16, 16, 32, true, true, own, kFused, seed);
  group_norm_case<__nv_bfloat16>("H100", h100(), 1, 96, 7, 9, 3, false, false, own, kFused, seed);  // hw 63
  group_norm_case<__half>("H100", h100(), 2, 48, 5, 5, 4, true, false, none, kFused, seed);        // cpg 12
  // A group over a cluster of blocks (sm_90): 576 KB groups over 8 blocks; and the fallbacks where no cluster
  // can be scheduled or built (the split path: one block can't hold the group).
  group_norm_case<float>("H100", h100(), 1, 64, 96, 96, 4, false, true, f32, fused_cluster(8), seed);
  // 40 KB groups: they fit one block, but the planner spreads each over 4 while chunks stay >= 8 KB.
  group_norm_case<__half>("H100", h100(), 1, 32, 40, 64, 4, true, false, own, fused_cluster(4), seed);
  group_norm_case<float>("H100, no cluster slot", h100_no_cluster_slots(), 1, 64, 96, 96, 4, false, true, f32,
                         kSplit, seed);
  group_norm_case<float>("A100", a100(), 1, 64, 96, 96, 4, false, true, f32, kSplit, seed);
  // The split path: NCHW rows, the channels_last tile, and rows of a channels_last group too wide for a tile.
  group_norm_case<float>("48 KB smem", small_smem(), 1, 32, 40, 40, 4, false, true, own, kSplit, seed);
  group_norm_case<__half>("48 KB smem", small_smem(), 1, 64, 64, 64, 8, true, true, f32, kSplit, seed);
  group_norm_case<__nv_bfloat16>("48 KB smem", small_smem(), 2, 48, 31, 33, 2, false, false, none, kSplit, seed);
  group_norm_case<float>("48 KB smem", small_smem(), 1, 8192, 8, 8, 32, true, false, f32, kSplit, seed);

  geglu_case<float>(h100(), 37, 40, 80, true, seed);
  geglu_case<__half>(h100(), 19, 64, 136, true, seed);  // rows 136 apart: a strided view of a wider GEMM output
  geglu_case<__nv_bfloat16>(h100(), 7, 24, 48, false, seed);
  geglu_case<__half>(h100(), 5, 13, 26, true, seed);  // F odd: one element per thread
  geglu_case<float>(two_sms(), 1100, 64, 128, true, seed);

  // Vectors of 16 bytes need every pointer aligned, the conditional half of a guided model output included.
  step_case<float>(h100(), 1003, 0, false, 2, true, true, 1.0f, seed);  // 3 elements past the last vector of 4
  step_case<__half>(h100(), 517, 1, false, 4, false, true, 0.0f, seed);  // misaligned: one element per thread
  step_case<__nv_bfloat16>(h100(), 4104, 0, true, 0, true, false, 0.0f, seed);  // guided, vectors of 8
  step_case<__half>(h100(), 1001, 0, true, 1, false, true, 0.0f, seed);  // guided, cond half misaligned
  step_case<float>(two_sms(), 70001, 0, false, 3, false, true, 0.0f, seed);
  std::printf("OK: %d cases\n", g_cases);
  return 0;
}
