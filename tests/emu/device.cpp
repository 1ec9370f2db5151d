// The host side of the emulated card (simt.h's emu::device()): what csrc/cuda/device_info.h and tensor_map.h
// declare, answered for the launchers as the real ones answer on that card.
#include "simt.h"
// From the scratch tree:
#include "device_info.h"
#include "tensor_map.h"

namespace sdcore {
namespace cuda {

cudaError_t current_device_info(DeviceInfo& info) {
  const emu::Device& d = emu::device();
  info.sms = d.sms;
  info.cc_major = d.cc_major;
  info.cc_minor = d.cc_minor;
  info.smem_optin = d.smem_optin;
  return cudaSuccess;
}

cudaError_t kernel_attributes(const void*, cudaFuncAttributes& attr) {
  attr = cudaFuncAttributes{};
  attr.maxDynamicSharedSizeBytes = emu::device().smem_optin;
  attr.ptxVersion = emu::device().ptx_version;
  return cudaSuccess;
}

cudaError_t allow_dynamic_smem(const void*, size_t bytes) {
  return bytes <= static_cast<size_t>(emu::device().smem_optin) ? cudaSuccess : cudaErrorInvalidValue;
}

// The geometry checks of the real encoder (head_tile_map_layout), then the map as the emulator's record; as a
// driver without the encoder where the device says so.
cudaError_t encode_head_tile_map(CUtensorMap* map, const void* base, int64_t batch, int64_t heads, int64_t rows,
                                 int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_row, int box_rows,
                                 int box_cols) {
  HeadTileMapLayout l;
  if (!head_tile_map_layout(&l, base, batch, heads, rows, d, stride_b, stride_h, stride_row, box_rows, box_cols)) {
    return cudaErrorInvalidValue;
  }
  if (!emu::device().tma_encoder) return cudaErrorNotSupported;
  emu::TensorMapRecord r{};
  r.magic = emu::kTensorMapMagic;
  r.base = static_cast<const unsigned char*>(base);
  for (int i = 0; i < 5; ++i) r.dims[i] = l.dims[i], r.box[i] = l.box[i];
  for (int i = 0; i < 4; ++i) r.strides[i] = l.strides[i];
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &r, sizeof(r));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace sdcore
