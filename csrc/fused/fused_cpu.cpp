// Fused CPU kernels of the decoder's training ops (pyllmops/nn/fused.py): SwiGLU and RMSNorm, float32, forward
// and backward, each one pass over its operands. torch's composition of the same math runs 4-7 element-wise
// passes (silu, mul, silu_backward, ... each reading and writing whole (tokens, features) tensors): in the CPU
// model step (hidden 512, intermediate 1408, 1024 tokens, one thread) SwiGLU was 53 ms of a 911 ms step and
// RMSNorm 30 ms.
//
// swiglu_forward:  h = silu(g) * u = g * sigmoid(g) * u
// swiglu_backward: s = sigmoid(g); du = dh * g * s; dg = dh * u * s * (1 + g * (1 - s))   (either may be skipped)
// rms_norm_forward:  rstd = 1 / sqrt(mean(x^2) + eps) per row, y = x * rstd * w
// rms_norm_backward: dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = x * rstd;
//                    dw_part[c] = sum over the rows of chunk c of dy * xhat (chunks of kNormChunkRows rows; the
//                    caller sums the chunks in order, so dw does not depend on the thread count)
// rotary:            rotate-half RoPE of x (tokens, heads, d) with half-width tables (tokens, d / 2):
//                    out[:h] = x1 cos - sign x2 sin, out[h:] = x2 cos + sign x1 sin (sign -1: the inverse rotation,
//                    the backward)
//
// Vectorization: the loops are straight-line float arithmetic (sigmoid through cpu_math.h's exp2_nonpositive) that
// -O3 vectorizes; target_clones builds AVX-512, AVX2 + FMA and baseline x86-64 copies, picked at load time from
// what the CPU reports. Row sums use 16 partial sums in a fixed order (reproducible, vectorizable without
// -ffast-math). NaN propagates: no max / min / compare drops it.
#include "fused/fused.h"

#include <algorithm>
#include <cmath>

#include "common/cpu_math.h"
#include "common/parallel.h"
#include "common/tensor.h"

namespace pyllmops {
namespace fused {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYLLMOPS_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define PYLLMOPS_CLONES
#endif

constexpr int64_t kElementGrain = 1 << 15;  // elements per parallel chunk (128 KB of each operand)

PYLLMOPS_CLONES void swiglu_fwd_run(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

PYLLMOPS_CLONES void swiglu_bwd_run(const float* g, const float* u, const float* dh, float* dg, float* du,
                                    int64_t n) {
  if (dg != nullptr && du != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float s = sigmoid(g[i]);
      du[i] = dh[i] * (g[i] * s);
      dg[i] = dh[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
    }
  } else if (du != nullptr) {
    for (int64_t i = 0; i < n; ++i) du[i] = dh[i] * (g[i] * sigmoid(g[i]));
  } else if (dg != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float s = sigmoid(g[i]);
      dg[i] = dh[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
    }
  }
}

PYLLMOPS_CLONES void rms_norm_fwd_rows(const float* x, const float* w, float eps, float* y, float* rstd,
                                       int64_t r0, int64_t r1, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float ss = sum16(d, [&](int64_t j) { return xr[j] * xr[j]; });
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[r] = rs;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * rs * w[j];
  }
}

PYLLMOPS_CLONES void rms_norm_bwd_rows(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                       float* dw_part, int64_t r0, int64_t r1, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dyr = dy + r * d;
    const float* xr = x + r * d;
    const float rs = rstd[r];
    if (dx != nullptr) {
      // mean(g * xhat) = rstd * sum(dy * w * x) / d
      const float dot = sum16(d, [&](int64_t j) { return dyr[j] * w[j] * xr[j]; });
      const float c = rs * rs * dot / static_cast<float>(d);  // xhat * mean(g xhat) = x * (rstd^2 dot / d)
      float* dxr = dx + r * d;
      for (int64_t j = 0; j < d; ++j) dxr[j] = rs * (dyr[j] * w[j] - xr[j] * c);
    }
    if (dw_part != nullptr)
      for (int64_t j = 0; j < d; ++j) dw_part[j] += dyr[j] * (xr[j] * rs);
  }
}

PYLLMOPS_CLONES void rotary_tokens(const float* x, const float* cos, const float* sin, float sign, float* out,
                                   int64_t t0, int64_t t1, int64_t heads, int64_t half) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t j = 0; j < heads; ++j) {
      const float* x1 = x + (t * heads + j) * 2 * half;
      const float* x2 = x1 + half;
      float* o1 = out + (t * heads + j) * 2 * half;
      float* o2 = o1 + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i], ss = sign * s[i];
        o1[i] = a * c[i] - b * ss;
        o2[i] = b * c[i] + a * ss;
      }
    }
  }
}

}  // namespace

void rotary(const float* x, const float* cos, const float* sin, float sign, float* out, int64_t tokens, int64_t heads,
            int64_t half) {
  const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(heads * 2 * half, 1));
  parallel_for(tokens, grain, [&](int64_t b, int64_t e) { rotary_tokens(x, cos, sin, sign, out, b, e, heads, half); });
}

void swiglu_forward(const float* g, const float* u, float* h, int64_t n) {
  parallel_for(n, kElementGrain, [&](int64_t b, int64_t e) { swiglu_fwd_run(g + b, u + b, h + b, e - b); });
}

void swiglu_backward(const float* g, const float* u, const float* dh, float* dg, float* du, int64_t n) {
  parallel_for(n, kElementGrain, [&](int64_t b, int64_t e) {
    swiglu_bwd_run(g + b, u + b, dh + b, dg == nullptr ? nullptr : dg + b, du == nullptr ? nullptr : du + b, e - b);
  });
}

void rms_norm_forward(const float* x, const float* w, float eps, float* y, float* rstd, int64_t rows, int64_t d) {
  const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(d, 1));
  parallel_for(rows, grain, [&](int64_t b, int64_t e) { rms_norm_fwd_rows(x, w, eps, y, rstd, b, e, d); });
}

void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw_part,
                       int64_t rows, int64_t d) {
  const int64_t chunks = ceil_div(rows, kNormChunkRows);
  parallel_for(chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      float* part = dw_part == nullptr ? nullptr : dw_part + c * d;
      if (part != nullptr)
        for (int64_t j = 0; j < d; ++j) part[j] = 0.0f;
      rms_norm_bwd_rows(dy, x, w, rstd, dx, part, c * kNormChunkRows, std::min(rows, (c + 1) * kNormChunkRows), d);
    }
  });
}

}  // namespace fused
}  // namespace pyllmops
