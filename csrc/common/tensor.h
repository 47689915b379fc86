// TensorView: what Python passes down for each tensor (no libtorch below bindings.cpp).
// A view is (data pointer, dtype code, shape, strides in elements, device index; -1 = CPU).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/check.h"

namespace pyllmops {

// Codes are exported to Python as _C.DTYPES, so there is one table of them.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, u8 = 3, i32 = 4, i64 = 5, f64 = 6 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::u8: return "uint8";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::f64: return "float64";
  }
  return "unknown";
}

inline int64_t dtype_size(DType d) {
  switch (d) {
    case DType::f16: case DType::bf16: return 2;
    case DType::u8: return 1;
    case DType::f32: case DType::i32: return 4;
    case DType::i64: case DType::f64: return 8;
  }
  return 0;
}

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int device = -1;               // -1: CPU, >= 0: CUDA device index

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int64_t size(int64_t i) const { return shape.at(i < 0 ? i + dim() : i); }
  int64_t stride(int64_t i) const { return strides.at(i < 0 ? i + dim() : i); }
  bool is_cuda() const { return device >= 0; }
  // Row-major dense, as torch's is_contiguous(): sizes-1 dims may have any stride, and a tensor with no
  // elements is contiguous whatever its strides (torch gives (0, 3) strides (3, 1) but (4, 0) strides (1, 1)).
  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  std::string device_str() const { return device < 0 ? "cpu" : "cuda:" + std::to_string(device); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// log2 of a power of two (callers check that it is one): kernels shift instead of dividing by it.
inline int log2_pow2(int64_t v) { return __builtin_ctzll(static_cast<unsigned long long>(v)); }

// A shape as Python prints a tuple, for error messages: (2, 3), (5,), ().
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Checks the C++ layer repeats before relying on a view (Python has checked them already).
inline void check_dtype(const TensorView& t, DType d, const char* name) {
  PYLLMOPS_CHECK(t.dtype == d, name, " must be ", dtype_name(d), ", got ", dtype_name(t.dtype));
}
inline void check_contiguous(const TensorView& t, const char* name) {
  PYLLMOPS_CHECK(t.is_contiguous(), name, " must be contiguous");
}
inline void check_min_numel(const TensorView& t, int64_t n, const char* name) {
  PYLLMOPS_CHECK(t.numel() >= n, name, " has ", t.numel(), " elements, expected at least ", n);
}
inline void check_same_device(const TensorView& a, const TensorView& b, const char* na, const char* nb) {
  PYLLMOPS_CHECK(a.device == b.device, na, " is on ", a.device_str(), " but ", nb, " is on ",
                 b.device_str());
}
inline void check_not_null(const TensorView& t, const char* name) {
  PYLLMOPS_CHECK(t.data != nullptr || t.numel() == 0, name, " has a null data pointer");
}

}  // namespace pyllmops
