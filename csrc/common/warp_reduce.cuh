// Warp-level butterfly reductions for CUDA kernels: every lane of an aligned group of kWidth
// consecutive lanes (kWidth a power of two, at most 32; 32 = the whole warp) gets the group's sum or
// max. All 32 lanes of the warp must call them together (full-mask shuffles).
#pragma once
#include <cuda_runtime.h>

namespace pyllmops {

template <int kWidth = 32>
__device__ __forceinline__ float group_sum(float v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: power of two <= 32");
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kWidth = 32>
__device__ __forceinline__ float group_max(float v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: power of two <= 32");
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace pyllmops
