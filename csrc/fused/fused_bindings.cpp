// Bindings of the fused kernels (fused_cpu.cpp, fused_cuda.cu), called by pyllmops/ops/fused.py. Every operand is
// re-checked here: contiguous, on the first operand's device, with the element counts the kernels walk; the data
// operands float32 on the CPU and float32 / float16 / bfloat16 (all one dtype) on CUDA; rstd, the dweight partial
// sums and the rotary tables float32.
#include <cmath>

#include "bindings.h"
#include "fused/fused.h"

namespace {

using pyllmops::DType;
using pyllmops::TensorView;
using OptView = pyllmops::bind::OptView;

// A data operand: ref's dtype (float32 on the CPU), or float32 for the float32-only operands (ref == nullptr).
void check_operand(const TensorView& t, int64_t numel, const char* name, const TensorView& dev_ref,
                   const TensorView* dtype_ref) {
  pyllmops::check_not_null(t, name);
  pyllmops::check_contiguous(t, name);
  pyllmops::check_same_device(t, dev_ref, name, "the first operand");
  if (dtype_ref == nullptr || !t.is_cuda()) {
    pyllmops::check_dtype(t, DType::f32, name);
  } else {
    pyllmops::bind::check_float_dtype(t, name);
    pyllmops::check_dtype(t, dtype_ref->dtype, name);
  }
  PYLLMOPS_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got shape ",
                 pyllmops::shape_str(t.shape));
}

const float* in(const TensorView& t) { return t.ptr<const float>(); }
float* out(const OptView& t) { return t ? t->ptr<float>() : nullptr; }
const TensorView* opt(const OptView& t) { return t ? &*t : nullptr; }

// (rows, d) of an RMSNorm operand: its last dim and the product of the others
std::pair<int64_t, int64_t> rows_and_dim(const TensorView& x) {
  PYLLMOPS_CHECK(x.dim() >= 1, "x must have at least 1 dim, got shape ", pyllmops::shape_str(x.shape));
  const int64_t d = x.size(-1);
  PYLLMOPS_CHECK(d >= 1, "x's last dim must be >= 1, got shape ", pyllmops::shape_str(x.shape));
  return {x.numel() / d, d};
}

void check_eps(double eps) {
  PYLLMOPS_CHECK(std::isfinite(eps) && eps > 0 && static_cast<float>(eps) > 0.0f,
                 "eps must be positive and finite in float32, got ", eps);
}

}  // namespace

void register_fused(py::module_& m) {
  namespace fz = pyllmops::fused;
  m.def("fused_swiglu_forward", [](const TensorView& g, const TensorView& u, const TensorView& h, uintptr_t stream) {
    const int64_t n = g.numel();
    check_operand(g, n, "gate", g, &g);
    check_operand(u, n, "up", g, &g);
    check_operand(h, n, "out", g, &g);
    py::gil_scoped_release release;
    PYLLMOPS_ON_DEVICE(g, "swiglu", fz::swiglu_forward(in(g), in(u), h.ptr<float>(), n),
                       fz::swiglu_forward_cuda(g, u, h, stream));
  });
  m.def("fused_swiglu_backward", [](const TensorView& g, const TensorView& u, const TensorView& dh,
                                    const OptView& dg, const OptView& du, uintptr_t stream) {
    const int64_t n = g.numel();
    check_operand(g, n, "gate", g, &g);
    check_operand(u, n, "up", g, &g);
    check_operand(dh, n, "dout", g, &g);
    if (dg) check_operand(*dg, n, "dgate", g, &g);
    if (du) check_operand(*du, n, "dup", g, &g);
    py::gil_scoped_release release;
    PYLLMOPS_ON_DEVICE(g, "swiglu (backward)", fz::swiglu_backward(in(g), in(u), in(dh), out(dg), out(du), n),
                       fz::swiglu_backward_cuda(g, u, dh, opt(dg), opt(du), stream));
  });
  m.def("fused_rms_norm_forward", [](const TensorView& x, const TensorView& w, double eps, const TensorView& y,
                                     const TensorView& rstd, uintptr_t stream) {
    const auto [rows, d] = rows_and_dim(x);
    check_operand(x, rows * d, "x", x, &x);
    check_operand(w, d, "weight", x, &x);
    check_operand(y, rows * d, "out", x, &x);
    check_operand(rstd, rows, "rstd", x, nullptr);
    check_eps(eps);
    const float e = static_cast<float>(eps);
    py::gil_scoped_release release;
    PYLLMOPS_ON_DEVICE(x, "rms_norm", fz::rms_norm_forward(in(x), in(w), e, y.ptr<float>(), rstd.ptr<float>(), rows, d),
                       fz::rms_norm_forward_cuda(x, w, e, y, rstd, rows, d, stream));
  });
  m.def("fused_rms_norm_backward", [](const TensorView& dy, const TensorView& x, const TensorView& w,
                                      const TensorView& rstd, const OptView& dx, const OptView& dw_part,
                                      uintptr_t stream) {
    const auto [rows, d] = rows_and_dim(x);
    check_operand(x, rows * d, "x", x, &x);
    check_operand(dy, rows * d, "dout", x, &x);
    check_operand(w, d, "weight", x, &x);
    check_operand(rstd, rows, "rstd", x, nullptr);
    if (dx) check_operand(*dx, rows * d, "dx", x, &x);
    if (dw_part) check_operand(*dw_part, pyllmops::ceil_div(rows, fz::kNormChunkRows) * d, "dw_part", x, nullptr);
    py::gil_scoped_release release;
    PYLLMOPS_ON_DEVICE(x, "rms_norm (backward)",
                       fz::rms_norm_backward(in(dy), in(x), in(w), in(rstd), out(dx), out(dw_part), rows, d),
                       fz::rms_norm_backward_cuda(dy, x, w, rstd, opt(dx), opt(dw_part), rows, d, stream));
  });
  m.def("fused_rotary", [](const TensorView& x, const TensorView& cos, const TensorView& sin, double sign,
                           const TensorView& o, uintptr_t stream) {
    PYLLMOPS_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be (tokens, heads, head_dim) with an even head_dim, "
                   "got shape ", pyllmops::shape_str(x.shape));
    PYLLMOPS_CHECK(sign == 1.0 || sign == -1.0, "sign must be 1 or -1, got ", sign);
    const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
    check_operand(x, tokens * heads * 2 * half, "x", x, &x);
    check_operand(cos, tokens * half, "cos", x, nullptr);
    check_operand(sin, tokens * half, "sin", x, nullptr);
    check_operand(o, tokens * heads * 2 * half, "out", x, &x);
    const float sg = static_cast<float>(sign);
    py::gil_scoped_release release;
    PYLLMOPS_ON_DEVICE(x, "rotary", fz::rotary(in(x), in(cos), in(sin), sg, o.ptr<float>(), tokens, heads, half),
                       fz::rotary_cuda(x, cos, sin, sg, o, tokens, heads, half, stream));
  });
  m.attr("FUSED_NORM_CHUNK_ROWS") = fz::kNormChunkRows;
}
