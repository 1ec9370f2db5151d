// linear_add on CUDA: one cuBLASLt GEMM, D = x @ weight^T + bias + residual. The residual is the GEMM's C
// (beta = 1) and the bias its epilogue, both applied to the float32 accumulators before the one rounding to
// the output dtype. The unfused layer writes the GEMM's output, then reads it back with the residual in a
// separate add kernel: a launch and two passes over an activation-sized tensor per residual.
//
// Row-major operands are column-major transposes to cuBLAS, so this computes D^T[n, m] = W[n, k] . x^T[k, m]
// + bias[n] + R^T[n, m]: A = weight (transposed), B = x, C = residual, D = out, and the bias runs along D's
// rows as the BIAS epilogue wants. The workspace is torch's per-stream cuBLASLt workspace (graph-capture safe,
// the one torch's own matmuls use).
//
// setup.py adds no -lcublasLt: libtorch_cuda, a dependency of this library, loads libcublasLt, and the loader
// resolves these calls in it, so they always reach the cuBLASLt that torch itself runs on.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/checks.h"

namespace sdcore {
namespace {

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;  // prepare_linear_add admits only these three
  }
}

// The largest power of two up to 16 dividing the address: cuBLASLt's heuristics pick vectorized kernels by the
// alignment the caller promises.
uint32_t alignment_bytes(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t a = 1;
  while (a < 16 && address % (2 * a) == 0) a *= 2;
  return a;
}

// Owners of the cuBLASLt descriptors (destroyed on every path out, an error's included).
struct MatmulDesc {
  cublasLtMatmulDesc_t d = nullptr;
  MatmulDesc(cublasComputeType_t compute) { TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&d, compute, CUDA_R_32F)); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(d); }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof(value)));
  }
};

struct Layout {
  cublasLtMatrixLayout_t d = nullptr;
  // A column-major rows x cols matrix whose columns are ld elements apart.
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&d, type, rows, cols, ld));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(d); }
};

struct Preference {
  cublasLtMatmulPreference_t d = nullptr;
  Preference() { TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&d)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(d); }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d, attr, &value, sizeof(value)));
  }
};

// The leading dimension of a [rows, cols] row-major operand with unit column stride (a single row's stride is
// arbitrary in torch, while cuBLASLt wants ld >= cols).
int64_t leading_dim(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1); }

at::Tensor linear_add_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& residual) {
  c10::cuda::CUDAGuard guard(x.device());
  LinearAddCall c = prepare_linear_add(x, weight, bias, residual);
  if (c.out.numel() == 0) return c.out;
  if (c.k == 0) {  // no product to compute: residual + bias
    linear_add_aten(c);
    return c.out;
  }
  const cudaDataType_t type = cuda_type(x.scalar_type());
  const bool tf32 = x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();  // as torch's matmul
  MatmulDesc desc(tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (c.bias.defined()) {
    // The epilogue loads the bias in 16-byte pieces, and no preference tells the heuristic otherwise: a bias
    // that is a slice at an odd offset gets a fresh (aligned) copy of its n elements.
    if (alignment_bytes(c.bias.const_data_ptr()) < 16) c.bias = c.bias.clone();
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, c.bias.const_data_ptr());  // in D's dtype, cuBLASLt's default
  }
  Layout a(type, c.k, c.n, leading_dim(c.weight));
  Layout b(type, c.k, c.m, leading_dim(c.x));
  Layout cl(type, c.n, c.m, leading_dim(c.residual));
  Layout d(type, c.n, c.m, c.n);

  const size_t workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  Preference pref;
  pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_bytes));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_bytes(c.weight.const_data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_bytes(c.x.const_data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_bytes(c.residual.const_data_ptr()));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_bytes(c.out.const_data_ptr()));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  // The heuristic sees layouts, not pointers, so it may offer algorithms that only write D in place over C;
  // D here is a new tensor. Take the best-ranked of its offers that writes out of place.
  constexpr int kOffers = 8;
  cublasLtMatmulHeuristicResult_t offers[kOffers] = {};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, desc.d, a.d, b.d, cl.d, d.d, pref.d, kOffers, offers, &found);
  const cublasLtMatmulAlgo_t* algo = nullptr;
  for (int i = 0; status == CUBLAS_STATUS_SUCCESS && i < found && algo == nullptr; ++i) {
    int32_t out_of_place = 0;
    size_t written = 0;
    if (offers[i].state == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoCapGetAttribute(&offers[i].algo, CUBLASLT_ALGO_CAP_OUT_OF_PLACE_RESULT_SUPPORT,
                                          &out_of_place, sizeof(out_of_place), &written) == CUBLAS_STATUS_SUCCESS &&
        out_of_place != 0) {
      algo = &offers[i].algo;
    }
  }
  if (algo == nullptr) {
    // cuBLASLt has no kernel for these operands (e.g. 2-byte-aligned rows of an odd k): torch's GEMM does.
    linear_add_aten(c);
    return c.out;
  }
  const float one = 1.0f;
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle, desc.d, &one, c.weight.const_data_ptr(), a.d, c.x.const_data_ptr(), b.d,
                                      &one, c.residual.const_data_ptr(), cl.d, c.out.data_ptr(), d.d, algo,
                                      at::cuda::getCUDABlasLtWorkspace(), workspace_bytes,
                                      c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  return c.out;
}

}  // namespace
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CUDA, m) { m.impl("linear_add", &sdcore::linear_add_cuda); }
