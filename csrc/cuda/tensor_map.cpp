#include "tensor_map.h"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <mutex>

namespace sdcore {
namespace cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found);
#endif
    if (err == cudaSuccess && found == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }
  });
  return fn;
}

}  // namespace

cudaError_t encode_head_tile_map(CUtensorMap* map, const void* base, int64_t batch, int64_t heads, int64_t rows,
                                 int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_row, int box_rows,
                                 int box_cols) {
  HeadTileMapLayout l;
  if (!head_tile_map_layout(&l, base, batch, heads, rows, d, stride_b, stride_h, stride_row, box_rows, box_cols)) {
    return cudaErrorInvalidValue;
  }
  const auto fn = encode_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5], element_strides[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < 5; ++i) dims[i] = l.dims[i], box[i] = l.box[i];
  for (int i = 0; i < 4; ++i) strides[i] = l.strides[i];
  // 16-bit elements as UINT16: the copy moves bits, and out-of-bounds elements are zeros either way.
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 5, const_cast<void*>(base), dims, strides, box,
                        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
