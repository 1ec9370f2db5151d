// Column-major single-precision GEMM (BLAS convention): C = alpha * op(A) * op(B) + beta * C.
#pragma once

#include <cstdint>

namespace sdcore {
namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// C = A * B (no transposes, alpha 1, beta 0), summed over blocks of 128 of the k dimension, each block's GEMM
// added to C. This bounds each output's rounding chain whatever the BLAS kernel does inside one call. On an Intel
// Xeon (Emerald Rapids), MKL's AVX-512 kernel measured a relative RMS error of 3.2e-7 at k = 320, against 2.3e-7
// for its AVX2 kernel (MKL_CBWR=AVX2) and 2.0e-7 in blocks of 128. Winograd's output transform adds up 9 such
// results: there, blocks of 128 took conv3x3's error from 1.3-2.15x PyTorch's to 0.84-1.51x, at -3% to +12% of
// its time per layer and no change beyond noise in the UNet step (blocks of 64: up to +23%).
void sgemm_blocked_k(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc);

// Whether sgemm runs on the BLAS that torch links (else on torch's own matmul, slower for small blocks).
bool has_native_blas();

}  // namespace cpu
}  // namespace sdcore
