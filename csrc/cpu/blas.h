// Column-major single-precision GEMM (BLAS convention): C = alpha * op(A) * op(B) + beta * C.
#pragma once

#include <cstdint>

namespace sdcore {
namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// C = A * B (no transposes, alpha 1, beta 0), summed over blocks of 128 of the k dimension, each block's GEMM
// added to C: each output's rounding then does not depend on how one BLAS kernel accumulates a long k. MKL's
// AVX-512 kernel on an Intel Xeon is less accurate than its others, enough to take Winograd past the 2x rule
// (conv3x3.cpp; docs/PERF.md has the measurements and the cost of the block size).
void sgemm_blocked_k(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc);

// Whether sgemm runs on the BLAS that torch links (else on torch's own matmul, slower for small blocks).
bool has_native_blas();

}  // namespace cpu
}  // namespace sdcore
