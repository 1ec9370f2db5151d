// Column-major single-precision GEMM (BLAS convention): C = alpha * op(A) * op(B) + beta * C.
#pragma once

#include <cstdint>

namespace sdcore {
namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Whether sgemm runs on the BLAS that torch links (else on torch's own matmul, slower for small blocks).
bool has_native_blas();

}  // namespace cpu
}  // namespace sdcore
