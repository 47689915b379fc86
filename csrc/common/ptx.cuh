// Every inline PTX instruction the kernels use, each wrapped once in a named device function.
//
// With nvcc these are the asm statements; with the emulated backend (PYLLMOPS_EMU) they call
// csrc/emu/ptx.cpp, whose lane-to-element maps are written from the PTX ISA's fragment tables. A
// kernel that needs another instruction adds it here and there: `asm` anywhere else fails the
// emulated build at its line.
//
//   mma_m16n8k16<T>(c, a, b0, b1)   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix_x{1,2,4}[_trans](r, p) ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
//   cp_async_{ca,cg}<N>(dst, src, src_bytes)  cp.async.{ca,cg}.shared.global [dst], [src], N, src_bytes
//   cp_async_commit(), cp_async_wait<N>(), cp_async_wait_all()
//   prmt(a, b, sel)                 prmt.b32 (byte permute, default mode)
//   fmax_nan(a, b)                  max.NaN.f32 (NaN if either operand is NaN; fmaxf drops a NaN)
//   ex2_approx(x)                   ex2.approx.ftz.f32 (one MUFU.EX2; exp2f without fast math adds 3 instructions)
//   lg2_approx(x)                   lg2.approx.ftz.f32 (one MUFU.LG2)
//   red_add_f32x2(p, a, b)          red.global.add.v2.f32 (sm_90+; two atomicAdd, i.e. RED.ADD.F32, on sm_80)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "common/ptx.cuh: mma.sync m16n8k16, ldmatrix and cp.async need sm_80 or newer; build with PYLLMOPS_CUDA_ARCHS >= 80"
#endif

#if defined(PYLLMOPS_EMU)
namespace pyllmops {
namespace emu {
enum class MmaType : int { f16, bf16 };
void mma_m16n8k16(MmaType type, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Site site);
void ldmatrix(int num, bool trans, uint32_t* r, const void* smem_row, Site site);
void cp_async(int cp_size, bool cache_global, void* dst, const void* src, int src_size, Site site);
void cp_async_commit();
void cp_async_wait(int n, Site site);
}  // namespace emu
}  // namespace pyllmops
#endif

namespace pyllmops {
namespace ptx {

// D = A . B + C: A 16x16 row-major (4 regs of 2 x 16-bit), B 16x8 column-major (2 regs), C/D 16x8 fp32.
#if defined(PYLLMOPS_EMU)
// Emulated: the default argument records the caller's file and line for deadlock and mask reports.
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, PYLLMOPS_EMU_SITE_ARG) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma: f16 or bf16");
  emu::mma_m16n8k16(std::is_same<T, __half>::value ? emu::MmaType::f16 : emu::MmaType::bf16, c, a, b0, b1, site);
}
#define PYLLMOPS_LDMATRIX(num, qual, trans, name)                                                    \
  inline void name(uint32_t (&r)[num], const void* smem_row, PYLLMOPS_EMU_SITE_ARG) {                \
    emu::ldmatrix(num, trans, r, smem_row, site);                                   \
  }
#else
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#define PYLLMOPS_LDMATRIX_ASM_1(q) "ldmatrix.sync.aligned.m8n8.x1" q ".shared.b16 {%0}, [%1];\n"
#define PYLLMOPS_LDMATRIX_ASM_2(q) "ldmatrix.sync.aligned.m8n8.x2" q ".shared.b16 {%0,%1}, [%2];\n"
#define PYLLMOPS_LDMATRIX_ASM_4(q) "ldmatrix.sync.aligned.m8n8.x4" q ".shared.b16 {%0,%1,%2,%3}, [%4];\n"
#define PYLLMOPS_LDMATRIX_OUT_1 "=r"(r[0])
#define PYLLMOPS_LDMATRIX_OUT_2 "=r"(r[0]), "=r"(r[1])
#define PYLLMOPS_LDMATRIX_OUT_4 "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
#define PYLLMOPS_LDMATRIX(num, qual, trans, name)                                                    \
  __device__ __forceinline__ void name(uint32_t (&r)[num], const void* smem_row) {                   \
    asm volatile(PYLLMOPS_LDMATRIX_ASM_##num(qual) : PYLLMOPS_LDMATRIX_OUT_##num     \
                 : "r"(smem_addr(smem_row)));                                                        \
  }
#endif

// Each lane passes the address of one 16-byte row: lanes 0-7 matrix 0, 8-15 matrix 1, ... (x1: lanes
// 0-7 only, x2: 0-15); register i of lane l gets matrix i's row l/4, columns 2(l%4), 2(l%4)+1 (.trans:
// the transposed matrix's).
PYLLMOPS_LDMATRIX(1, "", false, ldmatrix_x1)
PYLLMOPS_LDMATRIX(2, "", false, ldmatrix_x2)
PYLLMOPS_LDMATRIX(4, "", false, ldmatrix_x4)
PYLLMOPS_LDMATRIX(1, ".trans", true, ldmatrix_x1_trans)
PYLLMOPS_LDMATRIX(2, ".trans", true, ldmatrix_x2_trans)
PYLLMOPS_LDMATRIX(4, ".trans", true, ldmatrix_x4_trans)
#undef PYLLMOPS_LDMATRIX

// prmt.b32 (default mode): byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes {b, a} (a: bytes 0-3,
// b: bytes 4-7), or, when bit 3 of that selector nibble is set, that byte's sign bit replicated (PTX ISA,
// "Data Movement and Conversion Instructions: prmt"). The same as CUDA's __byte_perm(a, b, sel).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(PYLLMOPS_EMU)
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (sel >> (4 * i)) & 15u;
    uint32_t byte = static_cast<uint32_t>(src >> (8 * (nib & 7u))) & 0xffu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    d |= byte << (8 * i);
  }
  return d;
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#endif
}

// max.NaN.f32 (sm_80+): the larger of a and b, or NaN when either is NaN (PTX ISA, "Floating Point
// Instructions: max"). Row maxima of attention scores use it so that a NaN score is never dropped
// (fmaxf returns the other operand) and the row then reads as NaN instead of as fully masked.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(PYLLMOPS_EMU)
  return (a != a || b != b) ? NAN : (a > b ? a : b);
#else
  float d;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(d) : "f"(a), "f"(b));
  return d;
#endif
}

// ex2.approx.ftz.f32: 2^x in one MUFU.EX2, max relative error 2^-22 (PTX ISA), subnormal results flushed to 0;
// 2^-inf = 0, NaN stays NaN. Without --use_fast_math exp2f compiles to the same MUFU plus a range fix-up for
// subnormal results (FSETP and two predicated FMUL), which softmax probabilities below 2^-126 do not need.
// Emulated: exp2f (the hardware's last-bit error is not modelled, as for mma; docs/emulator.md).
__device__ __forceinline__ float ex2_approx(float x) {
#if defined(PYLLMOPS_EMU)
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// lg2.approx.ftz.f32: log2 x in one MUFU.LG2, max absolute error 2^-22 on [0.5, 2], relative elsewhere
// (PTX ISA); log2 0 = -inf, NaN stays NaN. Emulated: log2f.
__device__ __forceinline__ float lg2_approx(float x) {
#if defined(PYLLMOPS_EMU)
  return log2f(x);
#else
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// p[0] += a, p[1] += b in global memory, atomically per element, result unused (p 8-byte aligned). sm_90+: one
// red.global.add.v2.f32 (PTX ISA 8.1, "Parallel Synchronization and Communication Instructions: red"; SASS
// REDG.E.ADD.F32x2: half the reduction instructions); sm_80: two atomicAdd, which nvcc compiles to RED.E.ADD.F32
// when the result is unused. Emulated: two atomicAdd (real atomics).
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(PYLLMOPS_EMU)
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Asynchronous global -> shared copies of kBytes (4, 8 or 16; .cg: 16 only, bypasses L1). Bytes past
// src_bytes (0..kBytes) are zero-filled. Nothing is visible until cp_async_wait covers its group.
template <int kBytes>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, int src_bytes = kBytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(PYLLMOPS_EMU)
  emu::cp_async(kBytes, false, dst, src, src_bytes, {__builtin_FILE(), __builtin_LINE()});
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes),
               "r"(src_bytes));
#endif
}
template <int kBytes = 16>
__device__ __forceinline__ void cp_async_cg(void* dst, const void* src, int src_bytes = kBytes) {
  static_assert(kBytes == 16, "cp.async.cg copies 16 bytes");
#if defined(PYLLMOPS_EMU)
  emu::cp_async(kBytes, true, dst, src, src_bytes, {__builtin_FILE(), __builtin_LINE()});
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes),
               "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(PYLLMOPS_EMU)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending of this thread's most recent committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(PYLLMOPS_EMU)
  emu::cp_async_wait(kPending, {__builtin_FILE(), __builtin_LINE()});
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(PYLLMOPS_EMU)
  emu::cp_async_commit();
  emu::cp_async_wait(0, {__builtin_FILE(), __builtin_LINE()});
#else
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

}  // namespace ptx
}  // namespace pyllmops
