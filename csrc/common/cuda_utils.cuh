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

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

}  // namespace pyllmops
