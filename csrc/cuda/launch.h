// Host entry points of the CUDA kernels. Plain C++ (no torch headers): the .cu files implement these and
// the torch glue in csrc/cuda/ops_cuda.cpp calls them on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/params.h"

namespace sdcore {
namespace cuda {

// Each returns the first CUDA error it met (cudaSuccess otherwise); the glue turns it into an exception.
cudaError_t attention(const AttentionParams& p, cudaStream_t stream);
cudaError_t group_norm(const GroupNormParams& p, cudaStream_t stream);
// The device workspace group_norm needs for ``p`` (its shape, dtype, layout and pointers' alignment), in bytes;
// the caller sets p.workspace / p.workspace_bytes to at least that much. 0 when none is needed.
int64_t group_norm_workspace_bytes(const GroupNormParams& p);
cudaError_t geglu(const GegluParams& p, cudaStream_t stream);
cudaError_t scheduler_step(const StepParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace sdcore
