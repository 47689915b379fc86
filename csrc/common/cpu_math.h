// Small fp32 vector loops for CPU kernels, written so that -O3 vectorizes them without -ffast-math.
#pragma once
#include <cstdint>

namespace pyllmops {

// sum_j a[j] * b[j] with 8 independent partial sums (a fixed, reproducible summation order).
inline float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] += a[j + t] * b[j + t];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y[j] += a * x[j]
inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

}  // namespace pyllmops
