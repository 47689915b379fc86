// Online softmax (Milakov & Gimelshein 2018; FlashAttention): the row statistics every attention
// kernel keeps while it walks key tiles, and the LSE merge split-KV kernels use to combine partials.
//
// Domain: scores are kept pre-multiplied by softmax_scale * log2(e), so exponentials are exp2
// (one MUFU.EX2 on the GPU) and the statistics are in base 2. lse_natural() converts the final
// log-sum-exp back to natural log, the unit of the LSE tensors the ops return.
//
// Rows that have seen no key (every score masked, i.e. -inf) keep m = -inf and l = 0: the rescale
// factor is then 0, never NaN, the row's output is 0 and its LSE is -inf. NaN is never dropped: a
// NaN score makes m (nan_max) and l NaN, and lse_natural() NaN.
#pragma once
#include <cmath>

#include "common/macros.h"

namespace pyllmops {
namespace softmax {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

PYLLMOPS_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// exp2(x - m) that is 0 when m is -inf (a fully masked row), instead of NaN.
PYLLMOPS_HD float exp2_shifted(float x, float m) { return m == -INFINITY ? 0.0f : fast_exp2(x - m); }

// exp2((x - m) * scale) for scores kept unscaled (x <= m, so no finite scale overflows), 0 when m
// is -inf (nothing seen yet); NaN when x or m is NaN, or x = m = +inf (as exp(inf - inf) in float64).
PYLLMOPS_HD float exp2_scaled(float x, float m, float scale) {
  return m == -INFINITY ? 0.0f : fast_exp2((x - m) * scale);
}

// max that propagates NaN (std::max / fmaxf drop it, which would make a NaN row look masked).
PYLLMOPS_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

struct RowState {
  float m = -INFINITY;  // running max of scaled scores (base-2 domain)
  float l = 0.0f;       // running sum of exp2(score - m)

  // Moves the max to include tile_max; returns the factor the row's accumulator must be multiplied
  // by (and l already has been). Call before adding the tile's exp2(score - m) terms to l.
  PYLLMOPS_HD float rescale_to(float tile_max) {
    const float m_new = nan_max(tile_max, m);
    const float factor = exp2_shifted(m, m_new);  // m == -inf -> 0 (and acc is 0 then anyway)
    l *= factor;
    m = m_new;
    return factor;
  }

  // Final normalizer for the accumulator: 1 / l, or 0 for a row that saw no key.
  PYLLMOPS_HD float inv_l() const { return l > 0.0f ? 1.0f / l : 0.0f; }

  // log-sum-exp of the raw (unscaled by log2e) scores in natural log; -inf for an empty row, NaN
  // for a NaN row (a NaN input must reach the LSE and every output it touches, never become -inf).
  PYLLMOPS_HD float lse_natural() const {
    if (l != l || m != m) return NAN;
    if (!(l > 0.0f)) return -INFINITY;
#if defined(__CUDA_ARCH__)
    return (m + log2f(l)) * kLn2;
#else
    return (m + std::log2(l)) * kLn2;
#endif
  }
};

// Split-KV combine: weight of a partial result with natural-log LSE `lse_i` in a merge whose
// overall LSE is `lse_max`-shifted. Use as: lse = lse_max + log(sum_i exp(lse_i - lse_max)),
// out = sum_i exp(lse_i - lse) * out_i. Empty partials (lse_i = -inf) get weight 0.
PYLLMOPS_HD float merge_weight(float lse_i, float lse_total) {
  if (lse_i == -INFINITY || lse_total == -INFINITY) return 0.0f;
  return fast_exp2((lse_i - lse_total) * kLog2e);
}

}  // namespace softmax
}  // namespace pyllmops
