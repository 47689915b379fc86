// The emulated CUDA backend: what a kernel source sees when the host compiler builds it
// (PYLLMOPS_CUDA=emu; docs/emulator.md).
//
// The project's .cu files are compiled as C++ with csrc/emu/include first on the include path, so
// `#include <cuda_runtime.h>` reads the toolkit's header (types, half/bfloat16 in host mode) and then
// this one, which supplies what nvcc would: the CUDA keywords, the builtin variables (per fiber), the
// warp collectives and barriers (real rendezvous, runtime.cpp), atomics, and the device math the
// kernels use. Inline PTX lives only in common/ptx.cuh, whose emulated half is in ptx.cpp; any other
// `asm` or a raw `__shared__` fails the build at its line.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- keywords --------------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __constant__
#undef __shared__
#undef __restrict__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __constant__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A raw __shared__ declaration would be one copy per fiber (thread), not per block: kernels declare
// shared memory with PYLLMOPS_SHARED / PYLLMOPS_DYNAMIC_SHARED (common/launch.cuh).
#define __shared__ _Pragma("GCC error \"raw __shared__ is not emulated: use PYLLMOPS_SHARED or PYLLMOPS_DYNAMIC_SHARED (common/launch.cuh)\"")
// Inline PTX is emulated only through the wrappers of common/ptx.cuh.
#define asm _Pragma("GCC error \"inline asm is not emulated: wrap the instruction in common/ptx.cuh (and csrc/emu/ptx.cpp)\"") __asm__

namespace pyllmops {
namespace emu {

// Source position of a barrier or collective, for deadlock and mask reports.
struct Site {
  const char* file;
  int line;
};
#define PYLLMOPS_EMU_SITE_ARG ::pyllmops::emu::Site site = {__builtin_FILE(), __builtin_LINE()}

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int lane;   // linear thread index % 32
  int warp;   // linear thread index / 32
};

extern thread_local ThreadState* t_current;
inline ThreadState& current() { return *t_current; }

// Barriers and warp collectives (runtime.cpp). Every lane named in `mask` must call the same
// collective with the same mask; the last to arrive runs `combine` over every lane's payload.
enum class Collective : int { syncwarp, shfl, ballot, vote_any, vote_all, mma, ldmatrix };
using CombineFn = void (*)(void* const* payloads, unsigned mask, const void* ctx);
void warp_collective(Collective kind, unsigned mask, void* payload, CombineFn combine, const void* ctx, Site site);
void sync_block(Site site);

// Shared memory of the running block (runtime.cpp): static declarations are keyed by a tag unique
// to the declaration; the dynamic region is the launch's, ending against a guard page.
void* shared_static(const void* tag, size_t bytes, size_t align, const char* name, Site site);
void* shared_dynamic();
bool in_shared(const void* p, size_t bytes);

// A detected error inside a kernel: reported (with the thread and block) by the launch, as a
// RuntimeError naming the kernel. Never returns.
[[noreturn]] void kernel_error(const char* what, Site site);

template <typename T>
T* shared_static_as(const void* tag, const char* name, Site site) {
  return static_cast<T*>(shared_static(tag, sizeof(T), alignof(T) < 16 ? 16 : alignof(T), name, site));
}

// ---- shuffles ---------------------------------------------------------------------------------
enum class ShflMode : int { idx, up, down, bfly };
struct ShflPayload {
  uint64_t in, out;
  int arg;
  ShflMode mode;  // every lane of one shuffle must use the same variant and width
  int width;
};
void shfl_combine(void* const* payloads, unsigned mask, const void* ctx);

template <typename T>
T shfl(ShflMode mode, unsigned mask, T v, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
  ShflPayload p{0, 0, arg, mode, width};
  std::memcpy(&p.in, &v, sizeof(T));
  warp_collective(Collective::shfl, mask, &p, &shfl_combine, nullptr, site);
  T out;
  std::memcpy(&out, &p.out, sizeof(T));
  return out;
}

struct VotePayload {
  int pred;
  unsigned out;
};
void vote_combine(void* const* payloads, unsigned mask, const void* ctx);
unsigned vote(Collective kind, unsigned mask, int pred, Site site);

// ---- break switches for the negative controls (runtime.cpp; docs/emulator.md) ----------------
enum Break : unsigned { kBreakNone = 0, kBreakMma = 1, kBreakLdmatrix = 2, kBreakBarrier = 4 };
unsigned broken();

}  // namespace emu
}  // namespace pyllmops

// ---- builtin variables -------------------------------------------------------------------------
#define threadIdx (::pyllmops::emu::current().thread_idx)
#define blockIdx (::pyllmops::emu::current().block_idx)
#define blockDim (::pyllmops::emu::current().block_dim)
#define gridDim (::pyllmops::emu::current().grid_dim)
static constexpr int warpSize = 32;

// ---- barriers and collectives ----------------------------------------------------------------
inline void __syncthreads(PYLLMOPS_EMU_SITE_ARG) { ::pyllmops::emu::sync_block(site); }
inline void __syncwarp(unsigned mask = 0xffffffffu, PYLLMOPS_EMU_SITE_ARG) {
  ::pyllmops::emu::warp_collective(::pyllmops::emu::Collective::syncwarp, mask, nullptr, nullptr, nullptr, site);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, PYLLMOPS_EMU_SITE_ARG) {
  return ::pyllmops::emu::shfl(::pyllmops::emu::ShflMode::idx, mask, v, src, width, site);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, PYLLMOPS_EMU_SITE_ARG) {
  return ::pyllmops::emu::shfl(::pyllmops::emu::ShflMode::up, mask, v, static_cast<int>(delta), width, site);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, PYLLMOPS_EMU_SITE_ARG) {
  return ::pyllmops::emu::shfl(::pyllmops::emu::ShflMode::down, mask, v, static_cast<int>(delta), width, site);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, PYLLMOPS_EMU_SITE_ARG) {
  return ::pyllmops::emu::shfl(::pyllmops::emu::ShflMode::bfly, mask, v, lane_mask, width, site);
}
inline unsigned __ballot_sync(unsigned mask, int pred, PYLLMOPS_EMU_SITE_ARG) {
  return ::pyllmops::emu::vote(::pyllmops::emu::Collective::ballot, mask, pred, site);
}
inline int __any_sync(unsigned mask, int pred, PYLLMOPS_EMU_SITE_ARG) {
  return static_cast<int>(::pyllmops::emu::vote(::pyllmops::emu::Collective::vote_any, mask, pred, site));
}
inline int __all_sync(unsigned mask, int pred, PYLLMOPS_EMU_SITE_ARG) {
  return static_cast<int>(::pyllmops::emu::vote(::pyllmops::emu::Collective::vote_all, mask, pred, site));
}

// ---- atomics (blocks run on several OS threads) ------------------------------------------------
template <typename T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_floating_point<T>::value) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);  // the generic form: __atomic_load_n takes integers and pointers only
    for (T sum = old + v; !__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
         sum = old + v) {
    }
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <typename T> inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T> inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}

// ---- device math and conversions the kernels use ---------------------------------------------
// Correctly rounded, as the _rn intrinsics are (the build uses -ffp-contract=off: no FMA).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// The approximate intrinsics are computed exactly here: the emulator does not model their error.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __ffsll(unsigned long long x) { return __builtin_ffsll(static_cast<long long>(x)); }
// Cache-hinted loads and stores (read-only path, streaming, L2-only): plain accesses here.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
// CUDA's device min/max overloads (any matching arithmetic types).
using std::fmaxf;
using std::fminf;
template <typename A, typename B>
inline auto min(A a, B b) -> std::common_type_t<A, B> { return b < a ? b : a; }
template <typename A, typename B>
inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
