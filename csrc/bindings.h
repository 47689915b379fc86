// Shared by every <family>_bindings.cpp: the TensorView caster and the argument checks.
// Binding code is the only C++ that sees Python; kernels below it take TensorViews.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "common/tensor.h"

namespace py = pybind11;

namespace pybind11 {
namespace detail {
template <>
struct type_caster<pyllmops::TensorView> {
  PYBIND11_TYPE_CASTER(pyllmops::TensorView, const_name("pyllmops::TensorView"));
  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    // (data_ptr, dtype, shape, strides, device, owner): the owner (the tensor itself) is not read
    // here; it keeps a temporary such as view(x.contiguous()) alive until the kernel has returned.
    if (t.size() != 6) return false;
    try {
      value.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
      const int code = t[1].cast<int>();
      if (code < 0 || code > static_cast<int>(pyllmops::DType::f64)) return false;
      value.dtype = static_cast<pyllmops::DType>(code);
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


namespace pyllmops {
namespace bind {

using OptView = std::optional<TensorView>;

inline void check_float_dtype(const TensorView& t, const char* name) {
  PYLLMOPS_CHECK(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16, name,
                 " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype));
}

// Every kernel input and output: non-null, contiguous, on the reference tensor's device.
inline void check_input(const TensorView& t, const TensorView& ref, const char* name, const char* ref_name) {
  check_not_null(t, name);
  check_contiguous(t, name);
  check_same_device(t, ref, name, ref_name);
}

[[noreturn]] inline void no_cuda(const char* fn) {
  throw_runtime("pyllmops.", fn, ": got CUDA tensors but this build of pyllmops has no CUDA kernels "
                "(rebuild with nvcc on PATH, or PYLLMOPS_CUDA=1 to require it)");
}

}  // namespace bind
}  // namespace pyllmops

// Runs cpu_call or cuda_call by the device of `view`; a CUDA tensor in a CPU-only build throws.
#ifdef PYLLMOPS_WITH_CUDA
#define PYLLMOPS_ON_DEVICE(view, fn, cpu_call, cuda_call) \
  do {                                                   \
    if ((view).is_cuda()) { cuda_call; } else { cpu_call; } \
  } while (0)
#else
#define PYLLMOPS_ON_DEVICE(view, fn, cpu_call, cuda_call) \
  do {                                                   \
    if ((view).is_cuda()) ::pyllmops::bind::no_cuda(fn); \
    cpu_call;                                            \
  } while (0)
#endif

// One per op family, defined in csrc/<family>/<family>_bindings.cpp, called by bindings.cpp.
void register_nf4(py::module_& m);
void register_attention(py::module_& m);
void register_paged(py::module_& m);
void register_lora(py::module_& m);
void register_fused(py::module_& m);
#ifdef PYLLMOPS_EMU
void register_emu(py::module_& m);  // csrc/emu/emu_bindings.cpp
#endif
