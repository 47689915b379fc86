// Small fp32 vector loops for CPU kernels, written so that -O3 vectorizes them without -ffast-math.
#pragma once
#include <cstdint>
#include <cstring>

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

// 2^t for t <= 0, -inf or NaN, as straight-line arithmetic that vectorizes inside a loop (no libm call, no
// branch): 2^n * 2^f with n = round(t) by the 1.5 * 2^23 trick (t + 1.5 * 2^23 holds n in its low mantissa bits;
// t is clamped to [-126, 0] first), f = t - n in [-1/2, 1/2], 2^f = e^(f ln 2) by its degree-7 Taylor series
// (truncation error < 6e-9 relative, below float32's half ulp; the same coefficients as the attention kernel's
// exp2v). t < -126 (-inf too) gives 0; NaN gives NaN (the polynomial carries it; n's bits are then arbitrary but
// only unsigned arithmetic touches them).
inline float exp2_nonpositive(float t) {
  const float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
              c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381608f,
              c7 = 1.525273380405984e-05f, magic = 12582912.0f;
  const float tc = t < -126.0f ? -126.0f : t;  // NaN stays NaN
  const float shifted = tc + magic;
  const float n = shifted - magic;
  const float f = tc - n;
  const float p = 1.0f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * c7))))));
  uint32_t sbits, mbits;
  std::memcpy(&sbits, &shifted, 4);
  std::memcpy(&mbits, &magic, 4);
  const uint32_t scale_bits = (sbits - mbits + 127u) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return t < -126.0f ? 0.0f : p * scale;
}

// 1 / (1 + e^-x) from e = e^-|x| in (0, 1] (no overflow for any x): 1 / (1 + e) for x >= 0, e / (1 + e) below.
// e^-|x| < 2^-126 is taken as 0 (sigmoid then 1, or 0 for x < -87.3 where the true value is below 1.2e-38, so
// x * sigmoid(x) at x = -inf is -inf * 0 = NaN, as torch's silu gives). NaN gives NaN.
inline float sigmoid(float x) {
  const float e = exp2_nonpositive((x < 0.0f ? x : -x) * 1.4426950408889634f);
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

}  // namespace pyllmops
