// pyllmops._C: one def per kernel. The only file that sees Python.
//
// Each tensor arrives as a 5-tuple (data_ptr, dtype code, shape, strides, device index) built by
// pyllmops/ops/_common.py; CUDA kernels also get the caller's stream handle. Every function checks
// what its kernel relies on and throws (ValueError / RuntimeError in Python) before any kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "common/parallel.h"
#include "common/tensor.h"
#include "nf4/nf4.h"

namespace py = pybind11;
using pyllmops::DType;
using pyllmops::TensorView;

namespace pybind11 {
namespace detail {
template <>
struct type_caster<TensorView> {
  PYBIND11_TYPE_CASTER(TensorView, const_name("TensorView"));
  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 5) return false;
    try {
      value.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
      const int code = t[1].cast<int>();
      if (code < 0 || code > static_cast<int>(DType::f64)) return false;
      value.dtype = static_cast<DType>(code);
      value.shape = t[2].cast<std::vector<int64_t>>();
      value.strides = t[3].cast<std::vector<int64_t>>();
      value.device = t[4].cast<int>();
    } catch (const cast_error&) {
      return false;
    }
    return value.shape.size() == value.strides.size();
  }
};
}  // namespace detail
}  // namespace pybind11

namespace {

using OptView = std::optional<TensorView>;

void check_blocksize(int64_t blocksize, const char* name) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  PYLLMOPS_CHECK(pow2 && blocksize >= pyllmops::nf4::kMinBlocksize && blocksize <= pyllmops::nf4::kMaxBlocksize,
                 name, " must be a power of two in [", pyllmops::nf4::kMinBlocksize, ", ",
                 pyllmops::nf4::kMaxBlocksize, "], got ", blocksize);
}

void check_float_dtype(const TensorView& t, const char* name) {
  PYLLMOPS_CHECK(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16, name,
                 " must be float32, float16 or bfloat16, got ", pyllmops::dtype_name(t.dtype));
}

void check_input(const TensorView& t, const TensorView& ref, const char* name, const char* ref_name) {
  pyllmops::check_not_null(t, name);
  pyllmops::check_contiguous(t, name);
  pyllmops::check_same_device(t, ref, name, ref_name);
}

// Builds the scale source of an NF4 tensor with n_blocks blocks, checking every buffer it reads.
pyllmops::nf4::Scales make_scales(const TensorView& absmax, const OptView& nested_absmax, const OptView& nested_code,
                                  const OptView& nested_offset, int64_t nested_blocksize, int64_t n_blocks,
                                  const TensorView& ref) {
  pyllmops::nf4::Scales s;
  check_input(absmax, ref, "absmax", "the output");
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
  check_input(*nested_absmax, ref, "nested_absmax", "the output");
  check_input(*nested_code, ref, "nested_code", "the output");
  check_input(*nested_offset, ref, "nested_offset", "the output");
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
  s.blocksize2 = nested_blocksize;
  return s;
}

#ifdef PYLLMOPS_WITH_CUDA
#define PYLLMOPS_ON_DEVICE(view, fn, cpu_call, cuda_call) \
  do {                                                   \
    if ((view).is_cuda()) { cuda_call; } else { cpu_call; } \
  } while (0)
#else
[[noreturn]] void no_cuda(const char* fn) {
  pyllmops::throw_runtime("pyllmops.", fn, ": got CUDA tensors but this build of pyllmops has no CUDA kernels "
                          "(rebuild with nvcc on PATH, or PYLLMOPS_CUDA=1 to require it)");
}
#define PYLLMOPS_ON_DEVICE(view, fn, cpu_call, cuda_call) \
  do {                                                   \
    if ((view).is_cuda()) no_cuda(fn);                   \
    cpu_call;                                            \
  } while (0)
#endif

// ---- NF4 -----------------------------------------------------------------------------------------
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
                                  pyllmops::ceil_div(out.numel(), blocksize), out);
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(out, "dequantize_nf4", nf4::dequantize_cpu(packed, scales, blocksize, out),
                     nf4::dequantize_cuda(packed, scales, blocksize, out, stream));
}

void nf4_skinny_matmul(const TensorView& x, const TensorView& packed, const TensorView& absmax,
                       const OptView& nested_absmax, const OptView& nested_code, const OptView& nested_offset,
                       int64_t blocksize, int64_t nested_blocksize, const OptView& bias, const TensorView& y,
                       uintptr_t stream) {
  check_blocksize(blocksize, "blocksize");
  check_float_dtype(x, "x");
  check_input(x, y, "x", "y");
  check_input(y, y, "y", "y");
  check_input(packed, y, "packed", "y");
  PYLLMOPS_CHECK(x.dim() == 2 && y.dim() == 2, "x and y must be 2-D, got ", x.dim(), "-D and ", y.dim(), "-D");
  PYLLMOPS_CHECK(x.size(0) == y.size(0), "x has ", x.size(0), " rows but y has ", y.size(0));
  PYLLMOPS_CHECK(x.size(0) >= 1 && x.size(0) <= pyllmops::nf4::kMaxSkinnyRows, "x must have 1..",
                 pyllmops::nf4::kMaxSkinnyRows, " rows, got ", x.size(0));
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
                                  pyllmops::ceil_div(n_weights, blocksize), y);
  const TensorView* b = bias ? &*bias : nullptr;
  namespace nf4 = pyllmops::nf4;
  PYLLMOPS_ON_DEVICE(y, "nf4_linear", nf4::skinny_matmul_cpu(x, packed, scales, blocksize, b, y),
                     nf4::skinny_matmul_cuda(x, packed, scales, blocksize, b, y, stream));
}

py::dict build_info() {
  py::dict d;
#ifdef PYLLMOPS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(PYLLMOPS_CUDA_ARCHS);
  d["cuda_version"] = std::string(PYLLMOPS_CUDA_VERSION);
  d["cpu"] = true;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllmops kernels (CPU and CUDA), called through pyllmops.ops";
  py::dict dtypes;
  for (DType d : {DType::f32, DType::f16, DType::bf16, DType::u8, DType::i32, DType::i64, DType::f64})
    dtypes[pyllmops::dtype_name(d)] = static_cast<int>(d);
  m.attr("DTYPES") = dtypes;
  m.def("build_info", &build_info);
  m.def("num_threads", &pyllmops::num_threads);
  m.def("set_num_threads", &pyllmops::set_num_threads, py::arg("n"));

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("nf4_quantize", &nf4_quantize, nogil);
  m.def("nf4_quantize_sorted_code", &nf4_quantize_sorted_code, nogil);
  m.def("nf4_dequantize", &nf4_dequantize, nogil);
  m.def("nf4_skinny_matmul", &nf4_skinny_matmul, nogil);
}
