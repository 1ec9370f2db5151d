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

}  // namespace cuda
}  // namespace sdcore
