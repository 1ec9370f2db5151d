// Host-side launchers of the attention kernels. run_flash<T, kDp> is explicitly instantiated once per
// (dtype, padded head dim) in the generated attention_sm80_<dtype>_d<dp>.cu and run_simt<T> in attention_simt.cu, so
// ninja compiles them in parallel; every other file sees only the extern declarations at the bottom.
#pragma once

#include <cuda_runtime.h>

#include <climits>

#include "attention_instances.h"
#include "device_info.h"
#include "attention_kernel.cuh"

namespace sdcore {
namespace cuda {
namespace attn {

// Largest dynamic shared memory a block of the current device may opt in to.
inline cudaError_t max_dynamic_smem(size_t* bytes) {
  DeviceInfo d;
  const cudaError_t err = current_device_info(d);
  *bytes = static_cast<size_t>(d.smem_optin);
  return err;
}

inline FlashArgs& flash_args_of(FlashArgs& a) { return a; }

// One block per (query block, batch * head), flattened into grid.x (which allows 2^31 - 1 blocks). Args: the
// kernel's parameter, FlashArgs or a struct holding them (flash_args_of finds them).
template <typename Kernel, typename Args>
cudaError_t launch_kernel(Kernel kernel, Args args, int block_rows, int threads, size_t smem, cudaStream_t stream) {
  FlashArgs& a = flash_args_of(args);
  a.n_qblocks = (a.n + block_rows - 1) / block_rows;
  const int64_t blocks = static_cast<int64_t>(a.n_qblocks) * a.batch_heads;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(threads), smem, stream>>>(args);
  return cudaGetLastError();
}

// fp32 kernel, also the fp16/bf16 fallback on devices with too little shared memory for the tensor-core tiles
// (only the small config there: a rare path, not worth its compile time).
template <typename T>
cudaError_t run_simt(FlashArgs a, cudaStream_t stream) {
  size_t max_smem = 0;
  cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if constexpr (sizeof(T) == 4) {
    const size_t big = simt_smem_bytes(32, 32, a.d);
    if (big <= max_smem) return launch_kernel(flash_simt_kernel<T, 32, 32, 256>, a, 32, 256, big, stream);
  }
  const size_t small = simt_smem_bytes(16, 16, a.d);
  if (small > max_smem) return cudaErrorInvalidConfiguration;
  return launch_kernel(flash_simt_kernel<T, 16, 16, 128>, a, 16, 128, small, stream);
}

template <typename T, int kBr, int kBc>
cudaError_t launch_split(const FlashArgs& a, cudaStream_t stream) {
  using C = SplitConfig<kBr, kBc>;
  constexpr size_t smem = split_smem_bytes(512, kBr, kBc, C::kWarps / C::kSWM);
  return launch_kernel(flash_split_kernel<T, 512, kBr, kBc, C::kWarps, C::kSWM, C::kOWM>, a, kBr, C::kWarps * 32,
                       smem, stream);
}

template <typename T, int kDp>
cudaError_t run_flash(FlashArgs a, cudaStream_t stream) {
  size_t max_smem = 0;
  cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  if constexpr (kDp <= 256) {
    using C = RegConfig<kDp>;
    constexpr int kBr = C::kWarps * C::kMT * 16;
    constexpr size_t smem = reg_smem_bytes(kDp, kBr, C::kBc);
    if (smem > max_smem) return run_simt<T>(a, stream);
    return launch_kernel(flash_reg_kernel<T, kDp, C::kWarps, C::kMT, C::kBc>, a, kBr, C::kWarps * 32,
                         smem, stream);
  } else {
    static_assert(kDp == 512, "padded head dims above 256 use the 512 split kernel");
    if (split_smem_bytes(512, 64, 64, 8 / SplitConfig<64, 64>::kSWM) <= max_smem) {
      return launch_split<T, 64, 64>(a, stream);  // H100: ~206 KB
    }
    if (split_smem_bytes(512, 64, 32, 8 / SplitConfig<64, 32>::kSWM) <= max_smem) {
      return launch_split<T, 64, 32>(a, stream);  // A100: ~136 KB
    }
    return run_simt<T>(a, stream);
  }
}

// Every (dtype, padded head dim) of the sm80 family has its instantiation file (tools/gen_attention_instances.py
// writes them with the list these macros expand).
#define SDCORE_ATTN_EXTERN_FLASH(DP) SDCORE_ATTN_EXTERN_FLASH_T(__half, DP) SDCORE_ATTN_EXTERN_FLASH_T(__nv_bfloat16, DP)
#define SDCORE_ATTN_EXTERN_FLASH_T(T, DP) extern template cudaError_t run_flash<T, DP>(FlashArgs, cudaStream_t);
SDCORE_ATTN_FOR_EACH_HEAD_DIM(SDCORE_ATTN_EXTERN_FLASH)
#undef SDCORE_ATTN_EXTERN_FLASH_T
#undef SDCORE_ATTN_EXTERN_FLASH
extern template cudaError_t run_simt<float>(FlashArgs, cudaStream_t);
extern template cudaError_t run_simt<__half>(FlashArgs, cudaStream_t);
extern template cudaError_t run_simt<__nv_bfloat16>(FlashArgs, cudaStream_t);

// The Hopper kernel's launcher (attention_sm90.cuh), instantiated in the generated attention_sm90_*.cu, compiled
// only into builds with sm_90a code (SDCORE_WITH_SM90A).
template <typename T, int kDp>
cudaError_t run_flash_sm90(FlashArgs a, cudaStream_t stream);
#ifdef SDCORE_WITH_SM90A
#define SDCORE_ATTN_EXTERN_SM90(DP) SDCORE_ATTN_EXTERN_SM90_T(__half, DP) SDCORE_ATTN_EXTERN_SM90_T(__nv_bfloat16, DP)
#define SDCORE_ATTN_EXTERN_SM90_T(T, DP) extern template cudaError_t run_flash_sm90<T, DP>(FlashArgs, cudaStream_t);
SDCORE_ATTN_SM90_FOR_EACH_HEAD_DIM(SDCORE_ATTN_EXTERN_SM90)
#undef SDCORE_ATTN_EXTERN_SM90_T
#undef SDCORE_ATTN_EXTERN_SM90
#endif

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
