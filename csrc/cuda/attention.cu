// sdcore::cuda::attention: picks the kernel for the dtype, head dim and device (see attention_kernel.cuh and
// attention_sm90.cuh). The kernels themselves are instantiated in the generated attention_<arch>_<dtype>_d<dp>.cu
// and attention_simt.cu.
#include <climits>

#include "attention_launch.cuh"
#include "device_info.h"
#include "launch.h"

namespace sdcore {
namespace cuda {
namespace {

template <typename T>
cudaError_t run_tensor_core(const attn::FlashArgs& a, bool sm90, cudaStream_t stream) {
#ifdef SDCORE_WITH_SM90A
#define SDCORE_ATTN_SM90_CASE(DP) \
  case DP:                        \
    return attn::run_flash_sm90<T, DP>(a, stream);
  if (sm90) {
    switch (attn::padded_head_dim(a.d)) {
      SDCORE_ATTN_SM90_FOR_EACH_HEAD_DIM(SDCORE_ATTN_SM90_CASE)
      default: break;  // a head dim outside the sm90 table: the sm80 kernel below
    }
  }
#undef SDCORE_ATTN_SM90_CASE
#else
  (void)sm90;
#endif
#define SDCORE_ATTN_CASE(DP) \
  case DP:                   \
    return attn::run_flash<T, DP>(a, stream);
  switch (attn::padded_head_dim(a.d)) {
    SDCORE_ATTN_FOR_EACH_HEAD_DIM(SDCORE_ATTN_CASE)
    default: return cudaErrorInvalidValue;  // padded_head_dim returns a listed dim for every D <= kMaxHeadDim
  }
#undef SDCORE_ATTN_CASE
}

// Whether the Hopper kernel may run this call: asked for, compiled in (sm_90a code), a cc 9.0 device, and
// 16-byte rows (its tiles load by TMA or cp.async, 16 bytes at a time).
cudaError_t sm90_applies(const AttentionParams& p, const attn::FlashArgs& a, bool* yes) {
  *yes = false;
#ifdef SDCORE_WITH_SM90A
  if (!p.use_sm90 || !a.vec || p.dtype == DType::kFloat32) return cudaSuccess;
  DeviceInfo d;
  const cudaError_t err = current_device_info(d);
  if (err != cudaSuccess) return err;
  *yes = d.cc_major == 9 && d.cc_minor == 0;
#else
  (void)p;
  (void)a;
#endif
  return cudaSuccess;
}

}  // namespace

cudaError_t attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  // Row indices are 32-bit in the kernels (with a block of headroom); offsets are 64-bit.
  constexpr int64_t kMaxRows = INT_MAX - 1024;
  if (p.d < 1 || p.d > kMaxHeadDim || p.m < 1 || p.n < 0 || p.batch < 0 || p.heads < 0 || p.n > kMaxRows ||
      p.m > kMaxRows || p.heads > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const attn::FlashArgs a = attn::make_flash_args(p);
  bool sm90 = false;
  const cudaError_t err = sm90_applies(p, a, &sm90);
  if (err != cudaSuccess) return err;
  switch (p.dtype) {
    case DType::kFloat32: return attn::run_simt<float>(a, stream);
    case DType::kFloat16: return run_tensor_core<__half>(a, sm90, stream);
    case DType::kBFloat16: return run_tensor_core<__nv_bfloat16>(a, sm90, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
