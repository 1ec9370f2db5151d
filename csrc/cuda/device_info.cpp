#include "device_info.h"

#include <mutex>

namespace sdcore {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Slot {
  std::once_flag once;
  DeviceInfo info;
  cudaError_t error = cudaSuccess;
};

Slot slots[kMaxDevices];

cudaError_t query(int dev, DeviceInfo& d) {
  cudaError_t err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return err;
}

}  // namespace

cudaError_t current_device_info(DeviceInfo& info) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) {  // beyond the cache (no such machine yet): ask every time
    DeviceInfo d;
    err = query(dev, d);
    if (err == cudaSuccess) info = d;
    return err;
  }
  Slot& s = slots[dev];
  std::call_once(s.once, [&] { s.error = query(dev, s.info); });
  if (s.error == cudaSuccess) info = s.info;
  return s.error;
}

}  // namespace cuda
}  // namespace sdcore
