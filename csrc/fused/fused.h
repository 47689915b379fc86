// Fused kernels of pyllmops.nn.fused (SwiGLU, RMSNorm, rotary), contiguous operands: fused_cpu.cpp (float32),
// fused_cuda.cu.
#pragma once
#include <cstdint>

#include "common/tensor.h"

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

// CUDA (fused_cuda.cu): the same math on float32 / float16 / bfloat16 operands of one dtype (rstd, dw_part and the
// rotary tables float32), on the caller's stream; checked by the bindings first
void swiglu_forward_cuda(const TensorView& g, const TensorView& u, const TensorView& h, uintptr_t stream);
void swiglu_backward_cuda(const TensorView& g, const TensorView& u, const TensorView& dh, const TensorView* dg,
                          const TensorView* du, uintptr_t stream);
void rms_norm_forward_cuda(const TensorView& x, const TensorView& w, float eps, const TensorView& y,
                           const TensorView& rstd, int64_t rows, int64_t d, uintptr_t stream);
void rms_norm_backward_cuda(const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& rstd,
                            const TensorView* dx, const TensorView* dw_part, int64_t rows, int64_t d,
                            uintptr_t stream);
void rotary_cuda(const TensorView& x, const TensorView& cos, const TensorView& sin, float sign, const TensorView& out,
                 int64_t tokens, int64_t heads, int64_t half, uintptr_t stream);

}  // namespace fused
}  // namespace pyllmops
