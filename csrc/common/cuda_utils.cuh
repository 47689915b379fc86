// CUDA helpers: error checks after every call and launch, device guard, stream handle.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/check.h"
#include "common/tensor.h"

#define PYLLMOPS_CUDA_CHECK(expr)                                                              \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      ::pyllmops::throw_runtime("pyllmops: CUDA error in ", #expr, " at ", __FILE__, ":",      \
                                __LINE__, ": ", cudaGetErrorString(err_));                     \
  } while (0)


namespace pyllmops {

// Makes `device` current for the guard's lifetime (kernels launch on the tensors' device).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    PYLLMOPS_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) PYLLMOPS_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Blocks for a grid-stride kernel over work_items items, per_block per block: at least 1, at most 65535 * 8 (the
// strides cover the rest).
inline int grid_for(int64_t work_items, int per_block) {
  const int64_t blocks = ceil_div(work_items, per_block);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace pyllmops
