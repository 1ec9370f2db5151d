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
  constexpr int64_t kMaxDim = int64_t(1) << 32, kMaxStride = int64_t(1) << 40;
  if (batch < 1 || heads < 1 || rows < 1 || d < 8 || d % 8 != 0 || box_rows < 1 || box_rows > 256 ||
      box_cols % 8 != 0 || box_cols < 8 || box_cols / 8 > 256 || batch > kMaxDim || heads > kMaxDim ||
      rows > kMaxDim || (reinterpret_cast<uintptr_t>(base) & 15) != 0) {
    return cudaErrorInvalidValue;
  }
  // A dimension of extent 1 is never stepped along, and torch may give it any stride: describe it as dense.
  const int64_t dense_h = stride_row * rows, dense_b = dense_h * heads;
  const int64_t strides_el[4] = {stride_row, 8, heads == 1 ? dense_h : stride_h, batch == 1 ? dense_b : stride_b};
  cuuint64_t dims[5] = {8, static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(d / 8),
                        static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  cuuint64_t strides[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t bytes = strides_el[i] * 2;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= kMaxStride) return cudaErrorInvalidValue;
    strides[i] = static_cast<cuuint64_t>(bytes);
  }
  cuuint32_t box[5] = {8, static_cast<cuuint32_t>(box_rows), static_cast<cuuint32_t>(box_cols / 8), 1, 1};
  cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const auto fn = encode_fn();
  if (fn == nullptr) return cudaErrorNotSupported;
  // 16-bit elements as UINT16: the copy moves bits, and out-of-bounds elements are zeros either way.
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 5, const_cast<void*>(base), dims, strides, box,
                        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdcore
