// Deliberately buggy kernels: each proves that one detector of the emulated backend fires
// (tests/test_emulator.py runs them in CI). Built only with PYLLMOPS_CUDA=emu.
//
// run_selftest(name) launches the named kernel on small guarded buffers and returns what it wrote to
// `out` (a detector that reports raises RuntimeError from the launch instead).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "emu/runtime.h"

namespace pyllmops {
namespace emu {

namespace {

// A barrier that thread 0 never reaches.
__global__ void early_exit_barrier(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A shuffle that lane 5 skips.
__global__ void divergent_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Two halves of a warp name different masks for one shuffle.
__global__ void mask_mismatch(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<float>(threadIdx.x), 1);
}

// A lane's mask does not name the lane itself.
__global__ void mask_without_self(float* out) {
  out[threadIdx.x] = static_cast<float>(__ballot_sync(0xfffffffeu, 1));
}

// The last thread writes one element past the end of `out` (n elements).
__global__ void oob_write(float* out, int n) { out[threadIdx.x + 1 == blockDim.x ? n : threadIdx.x] = 1.0f; }

// The last thread reads 60 bytes past the end of `in` (element n + 15).
__global__ void oob_read(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + 1 == blockDim.x ? n + 15 : threadIdx.x];
}

// Reads past the end of the dynamic shared memory.
__global__ void oob_shared(float* out, int n) {
  PYLLMOPS_DYNAMIC_SHARED(float, smem);
  smem[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x + n];
}

// A 16-byte vector load from an address that is only 4-byte aligned.
__global__ void misaligned_vector(const float* in, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(in + 1);
  out[threadIdx.x] = __uint_as_float(v.x);
}

// ldmatrix with row addresses 2 bytes off 16-byte alignment.
__global__ void misaligned_ldmatrix(float* out) {
  PYLLMOPS_SHARED(uint16_t[8 * 8 * 4 + 8], tile);
  for (int i = threadIdx.x; i < 8 * 8 * 4 + 8; i += 32) tile[i] = static_cast<uint16_t>(i);
  __syncwarp();
  uint32_t r[4];
  ptx::ldmatrix_x4(r, tile + 1 + threadIdx.x * 8);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// Reads shared memory nobody wrote: the poison (NaN) reaches the output.
__global__ void uninitialized_shared(float* out) {
  PYLLMOPS_SHARED(float[32], s);
  if (threadIdx.x < 16) s[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Thread 0 stores a flag that thread 1 reads with no barrier in between: the value read depends on
// which runs first (forward schedule: 1, reverse: 0).
template <bool kBarrier>
__global__ void racy_flag(float* out) {
  PYLLMOPS_SHARED(float, flag);
  if (threadIdx.x == 1) flag = 0.0f;
  __syncthreads();
  if (threadIdx.x == 0) flag = 1.0f;
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 1) out[0] = flag;
}

// cp.async into shared memory, read before (kWait = false) or after (true) cp.async.wait_group.
template <bool kWait>
__global__ void cp_async_read(const float* in, float* out) {
  PYLLMOPS_SHARED(float[128], s);
  ptx::cp_async_cg<16>(&s[threadIdx.x * 4], in + threadIdx.x * 4);
  ptx::cp_async_commit();
  if (kWait) ptx::cp_async_wait<0>();
  out[threadIdx.x] = s[threadIdx.x * 4];
}

// prmt.b32 on known selectors: identity of a (0x3210), of b (0x7654), byte reverse (0x0123), and sign
// replication (0x8888: byte 0's sign bit in every byte).
__global__ void prmt_cases(float* out) {
  const uint32_t a = 0x83221100u, b = 0x77665544u;
  const uint32_t sels[5] = {0x3210u, 0x7654u, 0x0123u, 0x8888u, 0xbbbbu};
  const uint32_t want[5] = {a, b, 0x00112283u, 0x00000000u, 0xffffffffu};
  if (threadIdx.x < 5) out[threadIdx.x] = ptx::prmt(a, b, sels[threadIdx.x]) == want[threadIdx.x] ? 1.0f : 0.0f;
}

// ldmatrix x1 / x2 / x4, plain and .trans, on four 8x8 matrices whose element (m, row, col) holds
// m * 64 + row * 8 + col: lane l must get matrix i's (row l/4, cols 2(l%4), +1), or with .trans (rows 2(l%4),
// +1; col l/4), low half first; only lanes 0-7 (x1) or 0-15 (x2) supply row addresses.
template <int kNum, bool kTrans>
__device__ bool ldmatrix_case(const uint16_t* tile) {
  uint32_t r[kNum];
  const int lane = threadIdx.x;
  const uint16_t* row = tile + (lane < 8 * kNum ? lane : 0) * 8;  // lanes past the used ones: any valid row
  if (kNum == 1 && !kTrans) ptx::ldmatrix_x1(reinterpret_cast<uint32_t(&)[1]>(r), row);
  if (kNum == 1 && kTrans) ptx::ldmatrix_x1_trans(reinterpret_cast<uint32_t(&)[1]>(r), row);
  if (kNum == 2 && !kTrans) ptx::ldmatrix_x2(reinterpret_cast<uint32_t(&)[2]>(r), row);
  if (kNum == 2 && kTrans) ptx::ldmatrix_x2_trans(reinterpret_cast<uint32_t(&)[2]>(r), row);
  if (kNum == 4 && !kTrans) ptx::ldmatrix_x4(reinterpret_cast<uint32_t(&)[4]>(r), row);
  if (kNum == 4 && kTrans) ptx::ldmatrix_x4_trans(reinterpret_cast<uint32_t(&)[4]>(r), row);
  bool ok = true;
  for (int m = 0; m < kNum; ++m) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t lo = kTrans ? m * 64 + (2 * t) * 8 + g : m * 64 + g * 8 + 2 * t;
    const uint32_t hi = kTrans ? m * 64 + (2 * t + 1) * 8 + g : m * 64 + g * 8 + 2 * t + 1;
    ok = ok && r[m] == (lo | (hi << 16));
  }
  return ok;
}

__global__ void ldmatrix_cases(float* out) {
  PYLLMOPS_SHARED(uint16_t[4 * 64], tile);
  for (int i = threadIdx.x; i < 4 * 64; i += 32) tile[i] = static_cast<uint16_t>(i);
  __syncwarp();
  // Every lane runs every case (ldmatrix is a warp collective): no short-circuit between them.
  const bool ok[6] = {ldmatrix_case<1, false>(tile), ldmatrix_case<2, false>(tile), ldmatrix_case<4, false>(tile),
                      ldmatrix_case<1, true>(tile),  ldmatrix_case<2, true>(tile),  ldmatrix_case<4, true>(tile)};
  float v = 1.0f;
  for (bool b : ok) v = b ? v : 0.0f;
  out[threadIdx.x] = v;
}

// Every thread of every block adds 1: atomics are atomic across workers.
__global__ void atomic_count(int* counter) { atomicAdd(counter, 1); }

__global__ void noop(float*) {}

struct Guarded {
  float* p;
  explicit Guarded(size_t n) : p(static_cast<float*>(guarded_alloc(n * sizeof(float)))) {
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<float>(i) + 0.5f;
  }
  ~Guarded() { guarded_free(p); }
};

}  // namespace

std::vector<float> run_selftest(const std::string& name) {
  constexpr int kN = 32;
  Guarded out(kN), in(kN * 4);
  for (int i = 0; i < kN; ++i) out.p[i] = NAN;
  const cudaStream_t s = nullptr;
  if (name == "early_exit_barrier") launch("early_exit_barrier", early_exit_barrier, 1, 64, 0, s, out.p);
  else if (name == "divergent_shuffle") launch("divergent_shuffle", divergent_shuffle, 1, 32, 0, s, out.p);
  else if (name == "mask_mismatch") launch("mask_mismatch", mask_mismatch, 1, 32, 0, s, out.p);
  else if (name == "mask_without_self") launch("mask_without_self", mask_without_self, 1, 32, 0, s, out.p);
  else if (name == "oob_write") launch("oob_write", oob_write, 1, kN, 0, s, out.p, kN);
  else if (name == "oob_write_slack") {  // 30 floats = 120 bytes: element 30 lands in the 8-byte slack
    Guarded small(30);
    launch("oob_write_slack", oob_write, 1, kN, 0, s, small.p, 30);
  }
  else if (name == "oob_read") launch("oob_read", oob_read, 1, kN, 0, s, static_cast<const float*>(in.p), out.p,
                                      kN * 4);
  else if (name == "oob_shared") launch("oob_shared", oob_shared, 1, kN, kN * sizeof(float), s, out.p, kN);
  else if (name == "misaligned_vector")
    launch("misaligned_vector", misaligned_vector, 1, kN, 0, s, static_cast<const float*>(in.p), out.p);
  else if (name == "misaligned_ldmatrix") launch("misaligned_ldmatrix", misaligned_ldmatrix, 1, 32, 0, s, out.p);
  else if (name == "uninitialized_shared") launch("uninitialized_shared", uninitialized_shared, 1, 32, 0, s, out.p);
  else if (name == "racy_flag") launch("racy_flag", racy_flag<false>, 1, 32, 0, s, out.p);
  else if (name == "racy_flag_fixed") launch("racy_flag_fixed", racy_flag<true>, 1, 32, 0, s, out.p);
  else if (name == "cp_async_no_wait")
    launch("cp_async_no_wait", cp_async_read<false>, 1, kN, 0, s, static_cast<const float*>(in.p), out.p);
  else if (name == "cp_async_wait")
    launch("cp_async_wait", cp_async_read<true>, 1, kN, 0, s, static_cast<const float*>(in.p), out.p);
  else if (name == "ldmatrix") launch("ldmatrix_cases", ldmatrix_cases, 1, 32, 0, s, out.p);
  else if (name == "prmt") {
    launch("prmt_cases", prmt_cases, 1, 32, 0, s, out.p);
    return std::vector<float>(out.p, out.p + 5);
  } else if (name == "atomic_count") {
    auto* counter = reinterpret_cast<int*>(out.p);
    *counter = 0;
    launch("atomic_count", atomic_count, 64, 128, 0, s, counter);
    return {static_cast<float>(*counter)};
  } else if (name == "too_many_threads") launch("too_many_threads", noop, 1, 1025, 0, s, out.p);
  else if (name == "grid_y_too_large") launch("grid_y_too_large", noop, dim3(1, 65536), 32, 0, s, out.p);
  else if (name == "smem_without_attribute") launch("smem_without_attribute", noop, 1, 32, 64 * 1024, s, out.p);
  else if (name == "smem_with_attribute") {
    set_max_dynamic_smem(noop, 64 * 1024, "noop");
    launch("smem_with_attribute", noop, 1, 32, 64 * 1024, s, out.p);
  } else if (name == "smem_over_limit") {
    const int bytes = static_cast<int>(max_shared_optin()) + 1024;
    if (cudaFuncSetAttribute(reinterpret_cast<const void*>(&noop), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             bytes) == cudaSuccess)
      return {0.0f};  // the attribute must be refused
    launch("smem_over_limit", noop, 1, 32, static_cast<size_t>(bytes), s, out.p);
  } else {
    throw std::invalid_argument("unknown emulator self-test: " + name);
  }
  return std::vector<float>(out.p, out.p + kN);
}

}  // namespace emu
}  // namespace pyllmops
