// Fused CPU kernels of pyllmops.nn.fused (SwiGLU, RMSNorm), float32, contiguous operands: fused_cpu.cpp.
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

}  // namespace fused
}  // namespace pyllmops
