// Python bindings of the NF4 kernels (csrc/nf4/nf4.h). Checks everything a kernel relies on.
#include "bindings.h"
#include "nf4/nf4.h"
#include "nf4/nf4_bindings.h"

using pyllmops::DType;
using pyllmops::TensorView;
using pyllmops::bind::OptView;
using pyllmops::bind::check_float_dtype;
using pyllmops::bind::check_input;

namespace pyllmops {
namespace nf4 {

void check_blocksize(int64_t blocksize, const char* name) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  PYLLMOPS_CHECK(pow2 && blocksize >= pyllmops::nf4::kMinBlocksize && blocksize <= pyllmops::nf4::kMaxBlocksize,
                 name, " must be a power of two in [", pyllmops::nf4::kMinBlocksize, ", ",
                 pyllmops::nf4::kMaxBlocksize, "], got ", blocksize);
}

// Builds the scale source of an NF4 tensor with n_blocks blocks, checking every buffer it reads.
Scales make_scales(const TensorView& absmax, const OptView& nested_absmax, const OptView& nested_code,
                                  const OptView& nested_offset, int64_t nested_blocksize, int64_t n_blocks,
                   const TensorView& ref, const char* ref_name) {
  Scales s;
  check_input(absmax, ref, "absmax", ref_name);
  pyllmops::check_min_numel(absmax, n_blocks, "absmax");
  const bool nested = nested_absmax.has_value();
  PYLLMOPS_CHECK(nested == nested_code.has_value() && nested == nested_offset.has_value(),
                 "nested_absmax, nested_code and nested_offset must be given together");
  if (!nested) {
    pyllmops::check_dtype(absmax, DType::f32, "absmax");
    s.absmax = absmax.ptr<const float>();
    return s;
  }
  pyllmops::check_dtype(absmax, DType::u8, "absmax (nested: 8-bit codes)");
  check_blocksize(nested_blocksize, "nested_blocksize");
  check_input(*nested_absmax, ref, "nested_absmax", ref_name);
  check_input(*nested_code, ref, "nested_code", ref_name);
  check_input(*nested_offset, ref, "nested_offset", ref_name);
  pyllmops::check_dtype(*nested_absmax, DType::f32, "nested_absmax");
  pyllmops::check_dtype(*nested_code, DType::f32, "nested_code");
  pyllmops::check_dtype(*nested_offset, DType::f32, "nested_offset");
  pyllmops::check_min_numel(*nested_absmax, pyllmops::ceil_div(n_blocks, nested_blocksize), "nested_absmax");
  PYLLMOPS_CHECK(nested_code->numel() == pyllmops::nf4::kNestedCodeSize, "nested_code must have ",
                 pyllmops::nf4::kNestedCodeSize, " entries, got ", nested_code->numel());
  PYLLMOPS_CHECK(nested_offset->numel() == 1, "nested_offset must have 1 element, got ", nested_offset->numel());
  s.qabsmax = absmax.ptr<const uint8_t>();
  s.absmax2 = nested_absmax->ptr<const float>();
  s.code2 = nested_code->ptr<const float>();
  s.offset = nested_offset->ptr<const float>();
  s.blocksize2_log2 = pyllmops::log2_pow2(nested_blocksize);
  return s;
}

}  // namespace nf4
}  // namespace pyllmops

namespace {

using pyllmops::nf4::check_blocksize;
using pyllmops::nf4::make_scales;

void nf4_quantize(const TensorView& w, int64_t blocksize, const TensorView& packed, const TensorView& absmax,
                  uintptr_t stream) {
  check_blocksize(blocksize, "blocksize");
  check_float_dtype(w, "w");
  check_input(w, w, "w", "w");
  check_input(packed, w, "packed", "w");
  check_input(absmax, w, "absmax", "w");
  pyllmops::check_dtype(packed, DType::u8, "packed");
  pyllmops::check_dtype(absmax, DType::f32, "absmax");
  pyllmops::check_min_numel(packed, (w.numel() + 1) / 2, "packed");
  pyllmops::check_min_numel(absmax, pyllmops::ceil_div(w.numel(), blocksize), "absmax");
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(w, "quantize_nf4", nf4::quantize_cpu(w, blocksize, packed, absmax),
                     nf4::quantize_cuda(w, blocksize, packed, absmax, stream));
}

void nf4_quantize_sorted_code(const TensorView& x, const TensorView& code, int64_t blocksize, const TensorView& q,
                              const TensorView& absmax, uintptr_t stream) {
  check_blocksize(blocksize, "blocksize");
  check_input(x, x, "x", "x");
  check_input(code, x, "code", "x");
  check_input(q, x, "q", "x");
  check_input(absmax, x, "absmax", "x");
  pyllmops::check_dtype(x, DType::f32, "x");
  pyllmops::check_dtype(code, DType::f32, "code");
  pyllmops::check_dtype(q, DType::u8, "q");
  pyllmops::check_dtype(absmax, DType::f32, "absmax");
  PYLLMOPS_CHECK(code.numel() >= 2 && code.numel() <= pyllmops::nf4::kNestedCodeSize, "code must have 2..",
                 pyllmops::nf4::kNestedCodeSize, " entries, got ", code.numel());
  pyllmops::check_min_numel(q, x.numel(), "q");
  pyllmops::check_min_numel(absmax, pyllmops::ceil_div(x.numel(), blocksize), "absmax");
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(x, "quantize_nf4", nf4::quantize_sorted_code_cpu(x, code, blocksize, q, absmax),
                     nf4::quantize_sorted_code_cuda(x, code, blocksize, q, absmax, stream));
}

void nf4_dequantize(const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
                    const OptView& nested_code, const OptView& nested_offset, int64_t blocksize,
                    int64_t nested_blocksize, const TensorView& out, uintptr_t stream) {
  check_blocksize(blocksize, "blocksize");
  check_float_dtype(out, "out");
  check_input(out, out, "out", "out");
  check_input(packed, out, "packed", "out");
  pyllmops::check_dtype(packed, DType::u8, "packed");
  pyllmops::check_min_numel(packed, (out.numel() + 1) / 2, "packed");
  const auto scales = make_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize,
                                  pyllmops::ceil_div(out.numel(), blocksize), out, "out");
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(out, "dequantize_nf4", nf4::dequantize_cpu(packed, scales, blocksize, out),
                     nf4::dequantize_cuda(packed, scales, blocksize, out, stream));
}

void nf4_skinny_matmul(const TensorView& x, const TensorView& packed, const TensorView& absmax,
                       const OptView& nested_absmax, const OptView& nested_code, const OptView& nested_offset,
                       int64_t blocksize, int64_t nested_blocksize, const OptView& bias, const TensorView& y,
                       const OptView& workspace, uintptr_t stream) {
  check_blocksize(blocksize, "blocksize");
  check_float_dtype(x, "x");
  check_input(x, y, "x", "y");
  check_input(y, y, "y", "y");
  check_input(packed, y, "packed", "y");
  PYLLMOPS_CHECK(x.dim() == 2 && y.dim() == 2, "x and y must be 2-D, got ", x.dim(), "-D and ", y.dim(), "-D");
  PYLLMOPS_CHECK(x.size(0) == y.size(0), "x has ", x.size(0), " rows but y has ", y.size(0));
  const int64_t max_rows = !y.is_cuda() ? pyllmops::nf4::kMaxSkinnyRowsCpu
                           : x.dtype == DType::f32 ? pyllmops::nf4::kMaxSkinnyRows
                                                   : pyllmops::nf4::kMaxSkinnyRowsCuda;
  PYLLMOPS_CHECK(x.size(0) >= 1 && x.size(0) <= max_rows, "x must have 1..", max_rows, " rows on ",
                 y.device_str(), ", got ", x.size(0));
  PYLLMOPS_CHECK(y.dtype == x.dtype, "y must have x's dtype ", pyllmops::dtype_name(x.dtype), ", got ",
                 pyllmops::dtype_name(y.dtype));
  pyllmops::check_dtype(packed, DType::u8, "packed");
  const int64_t n_weights = y.size(1) * x.size(1);
  pyllmops::check_min_numel(packed, (n_weights + 1) / 2, "packed");
  if (bias) {
    check_input(*bias, y, "bias", "y");
    PYLLMOPS_CHECK(bias->dtype == x.dtype, "bias must have x's dtype ", pyllmops::dtype_name(x.dtype), ", got ",
                   pyllmops::dtype_name(bias->dtype));
    PYLLMOPS_CHECK(bias->numel() == y.size(1), "bias must have ", y.size(1), " elements, got ", bias->numel());
  }
  const auto scales = make_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize,
                                  pyllmops::ceil_div(n_weights, blocksize), y, "y");
  if (workspace) check_input(*workspace, y, "workspace", "y");
  const TensorView* b = bias ? &*bias : nullptr;
  const TensorView* ws = workspace ? &*workspace : nullptr;
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(y, "nf4_linear", nf4::skinny_matmul_cpu(x, packed, scales, blocksize, b, y),
                     nf4::skinny_matmul_cuda(x, packed, scales, blocksize, b, y, ws, stream));
}

}  // namespace

void register_nf4(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("nf4_quantize", &nf4_quantize, nogil);
  m.def("nf4_quantize_sorted_code", &nf4_quantize_sorted_code, nogil);
  m.def("nf4_dequantize", &nf4_dequantize, nogil);
  m.def("nf4_skinny_matmul", &nf4_skinny_matmul, nogil);
}
