// Device pieces shared by the two CUDA main loops (lora_cuda.cu: SIMT fp32, lora_cuda_mma.cu:
// tensor cores): one element of each staged tile, and the epilogue. See lora.h for the product.
#pragma once
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "lora/lora.h"

namespace pyllmops {
namespace lora {

// Row `row`, reduction index `red` of `in` (v) and of the adapter's input in * in_scale (vd); 0 outside.
template <typename T>
__device__ __forceinline__ void load_in(const FusedArgs& a, int64_t row, int64_t red, float* v, float* vd) {
  *v = *vd = 0.0f;
  if (row < a.m && red < a.n_red) {
    const int64_t idx = row * a.n_red + red;
    *v = to_float(static_cast<const T*>(a.in)[idx]);
    *vd = a.in_scale ? *v * to_float(static_cast<const T*>(a.in_scale)[idx]) : *v;
  }
}

// Wop(j, red) decoded to fp32 (0 outside); `code` is the NF4 table in shared memory.
template <WeightKind K, typename T>
__device__ __forceinline__ float load_w(const FusedArgs& a, const Weight& w, int64_t j, int64_t red,
                                        const float* code) {
  return (j < a.n_cols && red < a.n_red) ? base<K, T>(a, w, j, red, code) : 0.0f;
}

// D(q, red), 0 for ranks >= r and outside.
template <typename T>
__device__ __forceinline__ float load_d(const FusedArgs& a, int q, int64_t red) {
  return (q < a.r && red < a.n_red) ? down<T>(a, q, red) : 0.0f;
}

// Us[jj * (ranks + 1) + q] = U(j0 + jj, q) for n_tile columns and `ranks` ranks (zero past r); all threads.
template <typename T>
__device__ __forceinline__ void load_up(const FusedArgs& a, int64_t j0, int n_tile, int ranks, float* Us) {
  for (int e = threadIdx.x; e < n_tile * ranks; e += blockDim.x) {
    const int jj = e / ranks, q = e % ranks;
    const int64_t j = j0 + jj;
    Us[jj * (ranks + 1) + q] = (q < a.r && j < a.n_cols) ? up<T>(a, j, q) : 0.0f;
  }
}

// out[row, j] = acc + bias[j] + scaling * out_scale[row, j] * lr, lr = t_row . u_row (the adapter's
// unscaled term, summed over ranks in order); in range only.
template <typename T>
__device__ __forceinline__ void store_out_lr(const FusedArgs& a, int64_t row, int64_t j, float acc, float lr) {
  if (row >= a.m || j >= a.n_cols) return;
  lr *= a.scaling;
  if (a.out_scale) lr *= to_float(static_cast<const T*>(a.out_scale)[row * a.n_cols + j]);
  float v = acc + lr;
  if (a.bias) v += to_float(static_cast<const T*>(a.bias)[j]);
  static_cast<T*>(a.out)[row * a.n_cols + j] = from_float<T>(v);
}

// store_out_lr with lr = t_row . u_row over the r ranks.
template <typename T>
__device__ __forceinline__ void store_out(const FusedArgs& a, int64_t row, int64_t j, float acc, const float* t_row,
                                          const float* u_row) {
  if (row >= a.m || j >= a.n_cols) return;
  float lr = 0.0f;
  for (int q = 0; q < a.r; ++q) lr = fmaf(t_row[q], u_row[q], lr);
  store_out_lr<T>(a, row, j, acc, lr);
}

}  // namespace lora
}  // namespace pyllmops
