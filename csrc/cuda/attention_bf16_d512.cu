// Explicit instantiation: __nv_bfloat16 attention, head dims padded to 512 (see attention_launch.cuh).
#include "attention_launch.cuh"

namespace sdcore {
namespace cuda {
namespace attn {
template cudaError_t run_flash<__nv_bfloat16, 512>(FlashArgs, cudaStream_t);
}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
