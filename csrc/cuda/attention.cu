// sdcore::cuda::attention: picks the kernel for the dtype and head dim (see attention_kernel.cuh). The
// kernels themselves are instantiated in the generated attention_<dtype>_d<dp>.cu and attention_simt.cu.
#include <climits>

#include "attention_launch.cuh"
#include "launch.h"

namespace sdcore {
namespace cuda {
namespace {

template <typename T>
cudaError_t run_tensor_core(const attn::FlashArgs& a, cudaStream_t stream) {
#define SDCORE_ATTN_CASE(DP) \
  case DP:                   \
    return attn::run_flash<T, DP>(a, stream);
  switch (attn::padded_head_dim(a.d)) {
    SDCORE_ATTN_FOR_EACH_HEAD_DIM(SDCORE_ATTN_CASE)
    default: return cudaErrorInvalidValue;  // padded_head_dim returns a listed dim for every D <= kMaxHeadDim
  }
#undef SDCORE_ATTN_CASE
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
  switch (p.dtype) {
    case DType::kFloat32: return attn::run_simt<float>(a, stream);
    case DType::kFloat16: return run_tensor_core<__half>(a, stream);
    case DType::kBFloat16: return run_tensor_core<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
