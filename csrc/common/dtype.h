// Element types shared by the CPU and CUDA kernels.
//
// CPU code stores fp16/bf16 as the 16-bit structs below; their conversions round to nearest even,
// exactly as torch's casts do, so CPU kernels can be compared bit for bit with torch references.
// CUDA code uses __half / __nv_bfloat16 and the same to_float / from_float spelling.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/tensor.h"

#if defined(__CUDACC__) || defined(PYLLMOPS_EMU)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace pyllmops {

struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

PYLLMOPS_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
PYLLMOPS_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16: the top half of a float, rounded to nearest even ------------------------
PYLLMOPS_HD bf16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
PYLLMOPS_HD float bf16_to_float(bf16_t h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

// ---- float16 (IEEE binary16), rounded to nearest even, with subnormals -------------------
PYLLMOPS_HD f16_t float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a >= 0x47800000u) {                      // |f| >= 65536: inf, NaN or overflow
    h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (a < 0x38800000u) {                // |f| < 2^-14: half subnormal (or zero)
    // Adding 0.5 aligns the half-subnormal unit 2^-24 with the float's last mantissa bit, so the
    // FPU's own round-to-nearest-even does the rounding; the low bits are then the half's bits.
    h = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
  } else {                                     // normal: rebias exponent, round 13 dropped bits
    const uint32_t odd = (a >> 13) & 1u;
    h = (a + 0xc8000fffu + odd) >> 13;         // 0xc8000000 = (15 - 127) << 23, mod 2^32
    if (h > 0x7c00u) h = 0x7c00u;
  }
  return f16_t{static_cast<uint16_t>(sign | h)};
}
PYLLMOPS_HD float f16_to_float(f16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu;
  const uint32_t m = h.bits & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return bits_float(sign | float_bits(v));
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// ---- one spelling for kernels: to_float(x), from_float<T>(f) -----------------------------
PYLLMOPS_HD float to_float(float x) { return x; }
PYLLMOPS_HD float to_float(f16_t x) { return f16_to_float(x); }
PYLLMOPS_HD float to_float(bf16_t x) { return bf16_to_float(x); }
template <typename T> PYLLMOPS_HD T from_float(float f);
template <> PYLLMOPS_HD float from_float<float>(float f) { return f; }
template <> PYLLMOPS_HD f16_t from_float<f16_t>(float f) { return float_to_f16(f); }
template <> PYLLMOPS_HD bf16_t from_float<bf16_t>(float f) { return float_to_bf16(f); }

#if defined(__CUDACC__) || defined(PYLLMOPS_EMU)
PYLLMOPS_HD float to_float(__half x) { return __half2float(x); }
PYLLMOPS_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> PYLLMOPS_HD __half from_float<__half>(float f) { return __float2half_rn(f); }
template <> PYLLMOPS_HD __nv_bfloat16 from_float<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
#endif

}  // namespace pyllmops

// Dispatch a floating dtype (f32/f16/bf16) to a type alias `scalar_t`; HALF / BF16 name the
// 16-bit types for the compilation unit (host structs on the CPU, CUDA types in .cu files).
#define PYLLMOPS_DISPATCH_FLOAT_TYPES(DTYPE, NAME, HALF, BF16, ...)                          \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      case ::pyllmops::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }          \
      case ::pyllmops::DType::f16: { using scalar_t = HALF; return __VA_ARGS__(); }           \
      case ::pyllmops::DType::bf16: { using scalar_t = BF16; return __VA_ARGS__(); }          \
      default:                                                                                \
        ::pyllmops::throw_invalid("pyllmops._C: ", NAME, " must be float32, float16 or bfloat16, got ", \
                                  ::pyllmops::dtype_name(DTYPE));                            \
    }                                                                                         \
  }()
