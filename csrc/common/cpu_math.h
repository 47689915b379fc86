// Small fp32 vector loops for CPU kernels, written so that -O3 vectorizes them without -ffast-math.
#pragma once
#include <cstdint>
#include <cstring>

namespace pyllmops {

// sum_j term(j) for j < n with 16 partial sums (one AVX-512 vector, two AVX2 vectors), combined as a tree: a fixed
// order that vectorizes without -ffast-math (the fused RMSNorm's sums of squares and dot products).
template <typename Term>
inline float sum16(int64_t n, Term term) {
  float acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int t = 0; t < 16; ++t) acc[t] += term(j + t);
  for (int w = 8; w >= 1; w /= 2)
    for (int t = 0; t < w; ++t) acc[t] += acc[t + w];
  float s = acc[0];
  for (; j < n; ++j) s += term(j);
  return s;
}

// 2^f ~ 1 + c1 f + ... + c6 f^6 on [-1/2, 1/2]: the minimax polynomial for the relative error with float32
// coefficients (a linear program on 3000 Chebyshev points, rounding c1, c2, ... in turn and refitting the rest):
// 3.0e-9 relative error in exact arithmetic; with the 2^n scaling below, at most 0.80 ulp against double exp2 over
// every float t in [-126, 0] (measured). Shared by exp2_nonpositive and the attention kernel's vector exp2v.
inline constexpr float kExp2C1 = 0.6931471824645996f, kExp2C2 = 0.24022647738456726f, kExp2C3 = 0.05550359934568405f,
                       kExp2C4 = 0.009618505835533142f, kExp2C5 = 0.0013390806270763278f,
                       kExp2C6 = 0.00015326471475418657f;
inline constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: t + it holds round(t) in its low mantissa bits

// 2^t for t <= 0, -inf or NaN, as straight-line arithmetic that vectorizes inside a loop (no libm call, no
// branch): 2^n * 2^f with n = round(t) by the 1.5 * 2^23 trick (t clamped to [-127, 0] first), f = t - n in
// [-1/2, 1/2], 2^f by the polynomial above. n = -127 (t < -126.5, -inf too) makes the scale's bit pattern 0, so the
// result is exactly 0; NaN stays NaN through the polynomial (n's bits are then arbitrary, and only unsigned
// arithmetic touches them).
inline float exp2_nonpositive(float t) {
  const float tc = t < -127.0f ? -127.0f : t;  // NaN stays NaN
  const float shifted = tc + kRoundMagic;
  const float f = tc - (shifted - kRoundMagic);
  const float p =
      1.0f + f * (kExp2C1 + f * (kExp2C2 + f * (kExp2C3 + f * (kExp2C4 + f * (kExp2C5 + f * kExp2C6)))));
  uint32_t sbits;
  std::memcpy(&sbits, &shifted, 4);
  const uint32_t scale_bits = (sbits + 127u) << 23;  // the low bits hold n + 0x400000; shifted out with the rest
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

// 1 / (1 + e^-x) from e = e^-|x| in (0, 1] (no overflow for any x): 1 / (1 + e) for x >= 0, e / (1 + e) below.
// e^-|x| below 2^-126.5 is taken as 0 (sigmoid then 1, or 0 for x < -87.7 where the true value is below 8e-39, so
// x * sigmoid(x) at x = -inf is -inf * 0 = NaN, as torch's silu gives). NaN gives NaN.
inline float sigmoid(float x) {
  const float e = exp2_nonpositive((x < 0.0f ? x : -x) * 1.4426950408889634f);
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

}  // namespace pyllmops
