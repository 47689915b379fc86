// Fused CPU kernels of pyllmops.nn.fused (SwiGLU, RMSNorm, rotary), float32, contiguous operands: fused_cpu.cpp.
#pragma once
#include <cstdint>

namespace pyllmops {
namespace fused {

constexpr int64_t kNormChunkRows = 64;  // rows per dw partial sum of rms_norm_backward

void swiglu_forward(const float* g, const float* u, float* h, int64_t n);
// dg / du may be null (that gradient is not computed)
void swiglu_backward(const float* g, const float* u, const float* dh, float* dg, float* du, int64_t n);
void rms_norm_forward(const float* x, const float* w, float eps, float* y, float* rstd, int64_t rows, int64_t d);
// dx / dw_part may be null; dw_part is [ceil(rows / kNormChunkRows), d]
void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw_part,
                       int64_t rows, int64_t d);
// x, out (tokens, heads, 2 half); cos, sin (tokens, half); sign +1 (forward) or -1 (the inverse rotation)
void rotary(const float* x, const float* cos, const float* sin, float sign, float* out, int64_t tokens, int64_t heads,
            int64_t half);

}  // namespace fused
}  // namespace pyllmops
