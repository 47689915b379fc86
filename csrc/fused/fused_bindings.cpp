// Bindings of the fused CPU kernels (fused_cpu.cpp), called by pyllmops/nn/fused.py for float32 CPU tensors
// (other dtypes and devices run the torch composition there). Every operand is re-checked here: float32,
// contiguous, on the CPU, with the element counts the kernel walks.
#include <cmath>

#include "bindings.h"
#include "fused/fused.h"

namespace {

using pyllmops::DType;
using pyllmops::TensorView;
using OptView = pyllmops::bind::OptView;

void check_operand(const TensorView& t, int64_t numel, const char* name) {
  pyllmops::check_not_null(t, name);
  pyllmops::check_dtype(t, DType::f32, name);
  pyllmops::check_contiguous(t, name);
  PYLLMOPS_CHECK(!t.is_cuda(), name, " must be a CPU tensor (the fused kernels are CPU only), got ", t.device_str());
  PYLLMOPS_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got shape ",
                 pyllmops::shape_str(t.shape));
}

const float* in(const TensorView& t) { return t.ptr<const float>(); }
float* out(const OptView& t) { return t ? t->ptr<float>() : nullptr; }

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
  m.def("fused_swiglu_forward", [](const TensorView& g, const TensorView& u, const TensorView& h) {
    const int64_t n = g.numel();
    check_operand(g, n, "gate");
    check_operand(u, n, "up");
    check_operand(h, n, "out");
    py::gil_scoped_release release;
    pyllmops::fused::swiglu_forward(in(g), in(u), h.ptr<float>(), n);
  });
  m.def("fused_swiglu_backward", [](const TensorView& g, const TensorView& u, const TensorView& dh,
                                    const OptView& dg, const OptView& du) {
    const int64_t n = g.numel();
    check_operand(g, n, "gate");
    check_operand(u, n, "up");
    check_operand(dh, n, "dout");
    if (dg) check_operand(*dg, n, "dgate");
    if (du) check_operand(*du, n, "dup");
    py::gil_scoped_release release;
    pyllmops::fused::swiglu_backward(in(g), in(u), in(dh), out(dg), out(du), n);
  });
  m.def("fused_rms_norm_forward", [](const TensorView& x, const TensorView& w, double eps, const TensorView& y,
                                     const TensorView& rstd) {
    const auto [rows, d] = rows_and_dim(x);
    check_operand(x, rows * d, "x");
    check_operand(w, d, "weight");
    check_operand(y, rows * d, "out");
    check_operand(rstd, rows, "rstd");
    check_eps(eps);
    py::gil_scoped_release release;
    pyllmops::fused::rms_norm_forward(in(x), in(w), static_cast<float>(eps), y.ptr<float>(), rstd.ptr<float>(),
                                      rows, d);
  });
  m.def("fused_rms_norm_backward", [](const TensorView& dy, const TensorView& x, const TensorView& w,
                                      const TensorView& rstd, const OptView& dx, const OptView& dw_part) {
    const auto [rows, d] = rows_and_dim(x);
    check_operand(x, rows * d, "x");
    check_operand(dy, rows * d, "dout");
    check_operand(w, d, "weight");
    check_operand(rstd, rows, "rstd");
    if (dx) check_operand(*dx, rows * d, "dx");
    if (dw_part) check_operand(*dw_part, pyllmops::ceil_div(rows, pyllmops::fused::kNormChunkRows) * d, "dw_part");
    py::gil_scoped_release release;
    pyllmops::fused::rms_norm_backward(in(dy), in(x), in(w), in(rstd), out(dx), out(dw_part), rows, d);
  });
  m.def("fused_rotary", [](const TensorView& x, const TensorView& cos, const TensorView& sin, double sign,
                           const TensorView& out) {
    PYLLMOPS_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be (tokens, heads, head_dim) with an even head_dim, "
                   "got shape ", pyllmops::shape_str(x.shape));
    PYLLMOPS_CHECK(sign == 1.0 || sign == -1.0, "sign must be 1 or -1, got ", sign);
    const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
    check_operand(x, tokens * heads * 2 * half, "x");
    check_operand(cos, tokens * half, "cos");
    check_operand(sin, tokens * half, "sin");
    check_operand(out, tokens * heads * 2 * half, "out");
    py::gil_scoped_release release;
    pyllmops::fused::rotary(in(x), in(cos), in(sin), static_cast<float>(sign), out.ptr<float>(), tokens, heads, half);
  });
  m.attr("FUSED_NORM_CHUNK_ROWS") = pyllmops::fused::kNormChunkRows;
}
