#include "device_info.h"

#include <map>
#include <mutex>
#include <utility>

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

namespace {

std::mutex& attributes_mutex() {
  static std::mutex m;
  return m;
}

// (kernel, device) -> its attributes, with maxDynamicSharedSizeBytes kept current by allow_dynamic_smem.
std::map<std::pair<const void*, int>, cudaFuncAttributes>& attributes_cache() {
  static std::map<std::pair<const void*, int>, cudaFuncAttributes> cache;
  return cache;
}

// The cache entry of (kernel, current device), queried on first use; call with attributes_mutex() held.
cudaError_t cached_attributes(const void* kernel, cudaFuncAttributes** entry) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  auto& cache = attributes_cache();
  const auto key = std::make_pair(kernel, dev);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    it = cache.emplace(key, attr).first;
  }
  *entry = &it->second;
  return cudaSuccess;
}

}  // namespace

cudaError_t kernel_attributes(const void* kernel, cudaFuncAttributes& attr) {
  std::lock_guard<std::mutex> lock(attributes_mutex());
  cudaFuncAttributes* entry = nullptr;
  const cudaError_t err = cached_attributes(kernel, &entry);
  if (err == cudaSuccess) attr = *entry;
  return err;
}

cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(attributes_mutex());
  cudaFuncAttributes* entry = nullptr;
  cudaError_t err = cached_attributes(kernel, &entry);
  if (err != cudaSuccess) return err;
  if (bytes <= static_cast<size_t>(entry->maxDynamicSharedSizeBytes)) return cudaSuccess;
  DeviceInfo d;
  err = current_device_info(d);
  if (err != cudaSuccess) return err;
  const int64_t most = static_cast<int64_t>(d.smem_optin) - static_cast<int64_t>(entry->sharedSizeBytes);
  if (static_cast<int64_t>(bytes) > most) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most));
  if (err == cudaSuccess) entry->maxDynamicSharedSizeBytes = static_cast<int>(most);
  return err;
}

}  // namespace cuda
}  // namespace sdcore
