// Explicit instantiation: __half attention, head dims padded to 512 (see attention_launch.cuh).
#include "attention_launch.cuh"

namespace sdcore {
namespace cuda {
namespace attn {
template cudaError_t run_flash<__half, 512>(FlashArgs, cudaStream_t);
}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
