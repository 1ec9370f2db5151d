// TMA descriptors (CUtensorMap) for the Hopper attention's tiles, encoded on the host through the driver entry
// point that the CUDA runtime hands out (no link against libcuda). Plain CUDA, no torch headers.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace sdcore {
namespace cuda {

// A [batch, heads, rows, d] tensor of 16-bit elements (strides in elements, d % 8 == 0, 16-byte aligned base
// and strides), read as boxes of box_rows rows x box_cols columns (box_cols % 8 == 0, columns past d and rows
// past `rows` read as zeros) that land in shared memory in wgmma's no-swizzle layout of 8 x 16-byte core
// matrices: down the rows first, then along the columns (attn::core_offset). To get that order the map has
// five dimensions: the 8 elements of a 16-byte chunk, rows, chunks, heads, batch. A box's coordinates are
// {0, row0, 0, head, batch}.
//
// Returns cudaErrorInvalidValue for a layout outside those rules or one the driver refuses, and
// cudaErrorNotSupported where the driver has no cuTensorMapEncodeTiled (the caller then loads without TMA).
cudaError_t encode_head_tile_map(CUtensorMap* map, const void* base, int64_t batch, int64_t heads, int64_t rows,
                                 int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_row, int box_rows,
                                 int box_cols);

// The map's geometry, as handed to the driver: dims and box innermost first, the strides of dims 1-4 in bytes.
struct HeadTileMapLayout {
  uint64_t dims[5];
  uint64_t strides[4];
  uint32_t box[5];
};

// encode_head_tile_map's geometry and its checks, without the driver (tests/tma_layout_check.cu replays the
// copy on the host with it). False for a layout outside the rules above.
inline bool head_tile_map_layout(HeadTileMapLayout* out, const void* base, int64_t batch, int64_t heads,
                                 int64_t rows, int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_row,
                                 int box_rows, int box_cols) {
  constexpr int64_t kMaxDim = int64_t(1) << 32, kMaxStride = int64_t(1) << 40;
  if (batch < 1 || heads < 1 || rows < 1 || d < 8 || d % 8 != 0 || box_rows < 1 || box_rows > 256 ||
      box_cols % 8 != 0 || box_cols < 8 || box_cols / 8 > 256 || batch > kMaxDim || heads > kMaxDim ||
      rows > kMaxDim || (reinterpret_cast<uintptr_t>(base) & 15) != 0) {
    return false;
  }
  // A dimension of extent 1 is never stepped along, and torch may give it any stride: describe it as dense.
  const int64_t dense_h = stride_row * rows, dense_b = dense_h * heads;
  const int64_t strides_el[4] = {stride_row, 8, heads == 1 ? dense_h : stride_h, batch == 1 ? dense_b : stride_b};
  for (int i = 0; i < 4; ++i) {
    const int64_t bytes = strides_el[i] * 2;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= kMaxStride) return false;
    out->strides[i] = static_cast<uint64_t>(bytes);
  }
  const uint64_t dims[5] = {8, static_cast<uint64_t>(rows), static_cast<uint64_t>(d / 8),
                            static_cast<uint64_t>(heads), static_cast<uint64_t>(batch)};
  const uint32_t box[5] = {8, static_cast<uint32_t>(box_rows), static_cast<uint32_t>(box_cols / 8), 1, 1};
  for (int i = 0; i < 5; ++i) out->dims[i] = dims[i], out->box[i] = box[i];
  return true;
}

}  // namespace cuda
}  // namespace sdcore
