// Host/device portability macros shared by every kernel family.
#pragma once

#if defined(__CUDACC__)
#define PYLLMOPS_HD __host__ __device__ __forceinline__
#else
#define PYLLMOPS_HD inline
#endif

// Exactly-rounded multiply and add with no fused multiply-add: nvcc contracts a*b+c into an FMA
// by default, which rounds once instead of twice and breaks bit-exactness with bitsandbytes.
#if defined(__CUDA_ARCH__)
#define PYLLMOPS_MUL_RN(a, b) __fmul_rn((a), (b))
#define PYLLMOPS_ADD_RN(a, b) __fadd_rn((a), (b))
#else
#define PYLLMOPS_MUL_RN(a, b) ((a) * (b))
#define PYLLMOPS_ADD_RN(a, b) ((a) + (b))
#endif
