// Qualifiers that let one helper serve both the CPU and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define SDCORE_HD __host__ __device__ __forceinline__
#else
#define SDCORE_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define SDCORE_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define SDCORE_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define SDCORE_UNROLL _Pragma("GCC unroll 8")
#else
#define SDCORE_UNROLL
#endif
