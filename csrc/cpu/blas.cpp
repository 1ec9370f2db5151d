#include "blas.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

// torch's CPU library carries a BLAS (MKL on x86-64, OpenBLAS elsewhere) and exports its Fortran entry
// point. Bound weakly: where it is missing, calls go through at::addmm instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace sdcore {
namespace cpu {

bool has_native_blas() { return sgemm_ != nullptr; }

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (sgemm_ != nullptr && m <= kIntMax && n <= kIntMax && k <= kIntMax && lda <= kIntMax && ldb <= kIntMax &&
      ldc <= kIntMax) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  // Column-major matrices as strided row-major views: op(A) is m x k, op(B) is k x n, C is m x n.
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor ta = at::from_blob(const_cast<float*>(a), {m, k},
                                trans_a ? at::IntArrayRef{lda, 1} : at::IntArrayRef{1, lda}, opts);
  at::Tensor tb = at::from_blob(const_cast<float*>(b), {k, n},
                                trans_b ? at::IntArrayRef{ldb, 1} : at::IntArrayRef{1, ldb}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {1, ldc}, opts);
  if (beta == 0.0f) {
    tc.copy_(at::mm(ta, tb).mul_(alpha));
  } else {
    tc.copy_(at::addmm(tc, ta, tb, beta, alpha));
  }
}

void sgemm_blocked_k(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc) {
  constexpr int64_t kBlockK = 128;
  int64_t k0 = 0;
  do {  // at least once: k = 0 still sets C to zero
    const int64_t kb = std::min(kBlockK, k - k0);
    sgemm(false, false, m, n, kb, 1.0f, a + k0 * lda, lda, b + k0, ldb, k0 == 0 ? 0.0f : 1.0f, c, ldc);
    k0 += kb;
  } while (k0 < k);
}

}  // namespace cpu
}  // namespace sdcore
