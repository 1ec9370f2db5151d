// What the launchers need to know about the current device (SM count, compute capability, opt-in shared
// memory), queried once per device and process instead of per launch. Plain CUDA runtime, no torch headers.
#pragma once

#include <cuda_runtime_api.h>

namespace sdcore {
namespace cuda {

struct DeviceInfo {
  int sms = 1;
  int cc_major = 0;
  int cc_minor = 0;
  int smem_optin = 48 * 1024;  // the largest dynamic shared memory a block may opt in to, in bytes
};

// The current device's info: cached on the first call per device (thread-safe), cudaGetDevice's cost after.
// On an error `info` is left as it was and the error is returned (and returned again by later calls).
cudaError_t current_device_info(DeviceInfo& info);

// `kernel`'s attributes on the current device (cudaFuncGetAttributes), cached per (kernel, device): its static
// shared memory, its dynamic allowance, and the PTX version of the code the device runs (a card newer than every
// SASS in the build runs the JIT-compiled PTX of the lowest arch, so arch-specific code may be absent).
cudaError_t kernel_attributes(const void* kernel, cudaFuncAttributes& attr);

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. Without an opt-in a block
// may use 48 KiB *including* the kernel's static shared memory, so the check is against the kernel's own
// allowance, not 48 KiB. A raise goes straight to the device's most (opt-in minus static), so it never lowers
// what another caller set. cudaErrorInvalidValue if the device can't give that much.
cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes);

}  // namespace cuda
}  // namespace sdcore
