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

}  // namespace cuda
}  // namespace sdcore
