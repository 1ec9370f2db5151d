// Explicit instantiations of the SIMT attention kernel: fp32, and the fp16/bf16 fallback.
#include "attention_launch.cuh"

namespace sdcore {
namespace cuda {
namespace attn {
template cudaError_t run_simt<float>(FlashArgs, cudaStream_t);
template cudaError_t run_simt<__half>(FlashArgs, cudaStream_t);
template cudaError_t run_simt<__nv_bfloat16>(FlashArgs, cudaStream_t);
}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
