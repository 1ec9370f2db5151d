// One denoising step as a single elementwise kernel (see StepCoeffs in common/params.h): optional
// classifier-free guidance, up to kMaxStepHistory history terms, optional noise and an optional state
// output, all in fp32 through sdcore::step_element so the CPU and CUDA paths share the formula.
//
// Layout: every tensor is contiguous with numel elements (model_output holds 2*numel under guidance: uncond
// then cond). Each thread handles VEC consecutive elements per iteration of a grid-stride loop, with 16-byte
// loads/stores when every pointer is 16-byte aligned (VEC = 1 otherwise); the < VEC leftover elements are done
// by block 0. The number of history tensors is a template parameter, so unused ones are never touched.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/math.h"
#include "../common/params.h"
#include "device_info.h"
#include "device_utils.cuh"
#include "launch.h"

namespace sdcore {
namespace cuda {
namespace {

using dev::load_vec;
using dev::store_vec;

template <typename T>
struct StepArgs {
  const T* model_output;
  const T* sample;
  const T* history[kMaxStepHistory];
  const T* noise;  // null: z = 0
  T* out;
  T* state;  // null: not written
  int64_t numel;
  bool cfg;
  float guidance_scale;
  StepCoeffs c;
};

// VEC elements starting at element i.
template <typename T, int VEC, int NH>
__device__ __forceinline__ void step_vec(const StepArgs<T>& a, int64_t i) {
  float x[VEC], m[VEC], z[VEC];
  load_vec<T, VEC>(a.sample + i, x);
  load_vec<T, VEC>(a.model_output + i, m);
  if (a.cfg) {
    float cond[VEC];
    load_vec<T, VEC>(a.model_output + a.numel + i, cond);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = guide(m[j], cond[j], a.guidance_scale);
  }
  float h[NH > 0 ? NH : 1][VEC];
#pragma unroll
  for (int k = 0; k < NH; ++k) load_vec<T, VEC>(a.history[k] + i, h[k]);
  if (a.noise != nullptr) {
    load_vec<T, VEC>(a.noise + i, z);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = 0.0f;
  }
  float out[VEC], st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    // Unused history slots have coefficient 0 and take the value 0 (step_element needs them finite).
    const float h0 = NH > 0 ? h[0][j] : 0.0f;
    const float h1 = NH > 1 ? h[NH > 1 ? 1 : 0][j] : 0.0f;
    const float h2 = NH > 2 ? h[NH > 2 ? 2 : 0][j] : 0.0f;
    const float h3 = NH > 3 ? h[NH > 3 ? 3 : 0][j] : 0.0f;
    const StepResult r = step_element(a.c, x[j], m[j], h0, h1, h2, h3, z[j]);
    out[j] = r.out;
    st[j] = r.state;
  }
  store_vec<T, VEC>(a.out + i, out);
  if (a.state != nullptr) store_vec<T, VEC>(a.state + i, st);
}

template <typename T, int VEC, int NH>
__global__ void __launch_bounds__(256) step_kernel(const StepArgs<T> a) {
  const int64_t nvec = a.numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    step_vec<T, VEC, NH>(a, v * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = a.numel - nvec * VEC;  // < VEC
    if (blockIdx.x == 0 && static_cast<int64_t>(threadIdx.x) < tail) {
      step_vec<T, 1, NH>(a, nvec * VEC + threadIdx.x);
    }
  }
}

constexpr int kThreads = 256;

template <typename T, int VEC, int NH>
cudaError_t launch_step(const StepArgs<T>& a, cudaStream_t stream) {
  DeviceInfo d;
  const cudaError_t err = current_device_info(d);
  if (err != cudaSuccess) return err;
  const int sms = d.sms;
  const int64_t nvec = a.numel / VEC;
  int64_t blocks = (nvec + kThreads - 1) / kThreads;
  // One full wave (2048 resident threads per SM on sm_80/sm_90); the grid-stride loop does the rest.
  blocks = std::min<int64_t>(blocks, static_cast<int64_t>(std::max(sms, 1)) * (2048 / kThreads));
  blocks = std::max<int64_t>(blocks, 1);
  step_kernel<T, VEC, NH><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t dispatch_hist(const StepArgs<T>& a, cudaStream_t stream) {
  switch (a.c.n_hist) {
    case 0: return launch_step<T, VEC, 0>(a, stream);
    case 1: return launch_step<T, VEC, 1>(a, stream);
    case 2: return launch_step<T, VEC, 2>(a, stream);
    case 3: return launch_step<T, VEC, 3>(a, stream);
    case 4: return launch_step<T, VEC, 4>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t step_typed(const StepParams& p, cudaStream_t stream) {
  StepArgs<T> a;
  a.model_output = static_cast<const T*>(p.model_output);
  a.sample = static_cast<const T*>(p.sample);
  for (int k = 0; k < kMaxStepHistory; ++k) a.history[k] = static_cast<const T*>(p.history[k]);
  a.noise = static_cast<const T*>(p.noise);
  a.out = static_cast<T*>(p.out);
  a.state = static_cast<T*>(p.state);
  a.numel = p.numel;
  a.cfg = p.cfg;
  a.guidance_scale = p.guidance_scale;
  a.c = p.c;
  if (p.c.n_hist < 0 || p.c.n_hist > kMaxStepHistory) return cudaErrorInvalidValue;
  for (int k = p.c.n_hist; k < kMaxStepHistory; ++k) a.c.hist[k] = 0.0f;  // unused slots contribute 0
  if (a.model_output == nullptr || a.sample == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  for (int k = 0; k < p.c.n_hist; ++k) {
    if (a.history[k] == nullptr) return cudaErrorInvalidValue;
  }

  bool vec_ok = aligned16(a.model_output) && aligned16(a.sample) && aligned16(a.out);
  if (a.cfg) vec_ok = vec_ok && aligned16(a.model_output + a.numel);
  for (int k = 0; k < p.c.n_hist; ++k) vec_ok = vec_ok && aligned16(a.history[k]);
  if (a.noise != nullptr) vec_ok = vec_ok && aligned16(a.noise);
  if (a.state != nullptr) vec_ok = vec_ok && aligned16(a.state);

  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  return vec_ok ? dispatch_hist<T, kVec>(a, stream) : dispatch_hist<T, 1>(a, stream);
}

}  // namespace

cudaError_t scheduler_step(const StepParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return step_typed<float>(p, stream);
    case DType::kFloat16: return step_typed<__half>(p, stream);
    case DType::kBFloat16: return step_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
