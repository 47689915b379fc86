// NF4 CUDA kernels: quantize, nested 8-bit quantize, dequantize, fused skinny (decode) matmul.
//
// Math lives in nf4.h (shared with nf4_cpu.cpp); here are the launch shapes.
//
// dequantize: one thread owns one 32-element chunk = 16 packed bytes (one 16-byte load) and writes
//   32 outputs with 16-byte stores (4 for bf16/fp16, 8 for fp32). blocksize >= 32, so a chunk lies in
//   one quantization block: one scale per thread. Bytes per element: 0.5 in + 4/blocksize of absmax
//   + 2 out (bf16) -> 4096x4096 moves ~41 MB; at ~3 TB/s that is ~14 us, so the kernel must be pure
//   streaming: no shared memory beyond the 16-entry code, no reuse to exploit.
//   Misaligned views or a partial last chunk take the scalar path (same math, one element at a time).
//
// skinny matmul (decode, m <= 8 rows of x): one warp per output row; lane j walks 32-element chunks
//   j, j+32, ... of the row: 16-byte load of W, decode its 32 codes 8 at a time (one 32-bit word) from
//   the shared code table, dot with the m rows of x (read through the read-only cache; x is at most
//   8*k elements and stays in L1/L2), scale once per chunk, then a warp reduction per row of y. Block
//   indices are shifts (blocksizes are powers of two): no 64-bit division in the loop. W is read exactly once and never
//   written: 4096x4096 reads 8 MiB + 1 MiB absmax vs 32 MiB for a bf16 GEMV, so the bound is ~3.5x
//   below the bf16 GEMV at equal bandwidth. Needs k % 32 == 0 and 16-byte aligned packed/x; the
//   Python layer checks and otherwise dequantizes + matmuls.
//
// quantize: one warp per quantization block (max |x| by shuffle reduction, then each lane encodes
//   pairs of elements into bytes). Runs once per weight; it is not on a hot path.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/dtype.h"
#include "common/warp_reduce.cuh"
#include "nf4/nf4.h"

namespace pyllmops {
namespace nf4 {

namespace {

__constant__ float c_code[16] = {PYLLMOPS_NF4_CODE_VALUES};

constexpr int kThreads = 256;
constexpr int kSkinnyWarps = 4;

__device__ __forceinline__ void load_code(float* s_code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = c_code[threadIdx.x];
  __syncthreads();
}

__device__ __forceinline__ void load_midpoints(float* s_mid) {
  if (threadIdx.x < 15) s_mid[threadIdx.x] = midpoint(c_code, threadIdx.x);
  __syncthreads();
}

int grid_for(int64_t work_items, int per_block) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(ceil_div(work_items, per_block), 1), 65535 * 8));
}

// ---- quantize ---------------------------------------------------------------------------------
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ w, int64_t n, int blocksize_log2, uint8_t* __restrict__ packed,
                                float* __restrict__ absmax) {
  const int64_t blocksize = int64_t{1} << blocksize_log2;
  PYLLMOPS_SHARED(float[15], s_mid);
  load_midpoints(s_mid);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t n_blocks = (n + blocksize - 1) >> blocksize_log2;  // a shift: no 64-bit division
  for (int64_t b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; b < n_blocks; b += warps) {
    const int64_t start = b * blocksize, end = min(n, start + blocksize);
    float amax = 0.0f;
    for (int64_t i = start + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(to_float(w[i])));
    amax = group_max(amax);
    if (lane == 0) absmax[b] = amax;
    const float rcp = block_reciprocal(amax);
    for (int64_t i = start + 2 * lane; i < end; i += 64) {
      const uint32_t hi = encode(s_mid, __fmul_rn(to_float(w[i]), rcp));
      const uint32_t lo = i + 1 < end ? encode(s_mid, __fmul_rn(to_float(w[i + 1]), rcp)) : 7u;
      packed[i >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

__global__ void quantize_sorted_code_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ code,
                                            int code_size, int blocksize_log2, uint8_t* __restrict__ q,
                                            float* __restrict__ absmax) {
  const int64_t blocksize = int64_t{1} << blocksize_log2;
  PYLLMOPS_SHARED(float[kNestedCodeSize], s_code);
  for (int i = threadIdx.x; i < code_size; i += blockDim.x) s_code[i] = code[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t n_blocks = (n + blocksize - 1) >> blocksize_log2;  // a shift: no 64-bit division
  for (int64_t b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; b < n_blocks; b += warps) {
    const int64_t start = b * blocksize, end = min(n, start + blocksize);
    float amax = 0.0f;
    for (int64_t i = start + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(x[i]));
    amax = group_max(amax);
    if (lane == 0) absmax[b] = amax;
    // bitsandbytes' CUDA rule (nf4.h); an all-zero block is code 0
    const float rcp = amax == 0.0f ? 0.0f : __frcp_rn(amax);
    for (int64_t i = start + lane; i < end; i += 32)
      q[i] = amax == 0.0f ? uint8_t{0}
                          : static_cast<uint8_t>(encode_sorted_cuda_rule(s_code, code_size, __fmul_rn(x[i], rcp)));
  }
}

// ---- dequantize -------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void store_chunk32(T* dst, const float (&v)[32]) {
  // 32 values -> 16-byte stores; T is 2 or 4 bytes.
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int s = 0; s < 32 / kPerVec; ++s) {
    union {
      uint4 vec;
      T elems[kPerVec];
    } u;
#pragma unroll
    for (int e = 0; e < kPerVec; ++e) u.elems[e] = from_float<T>(v[s * kPerVec + e]);
    reinterpret_cast<uint4*>(dst)[s] = u.vec;
  }
}

template <typename T, bool kVec>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, Scales scales, int blocksize_log2, int64_t n,
                                  T* __restrict__ out) {
  PYLLMOPS_SHARED(float[16], s_code);
  load_code(s_code);
  const int64_t chunks = (n + 31) >> 5;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks; c += stride) {
    const int64_t start = c * 32;
    const float scale = scales(start >> blocksize_log2);
    if (kVec && start + 32 <= n) {
      const uint4 q = __ldcs(reinterpret_cast<const uint4*>(packed + start / 2));  // read once: stream
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
      float v[32];
#pragma unroll
      for (int wi = 0; wi < 4; ++wi)
#pragma unroll
        for (int bi = 0; bi < 4; ++bi) {
          const uint32_t byte = (words[wi] >> (8 * bi)) & 0xffu;  // little endian: byte 0 first
          v[wi * 8 + bi * 2] = __fmul_rn(s_code[byte >> 4], scale);
          v[wi * 8 + bi * 2 + 1] = __fmul_rn(s_code[byte & 15u], scale);
        }
      store_chunk32(out + start, v);
    } else {
      const int64_t end = min(n, start + 32);
      for (int64_t i = start; i < end; ++i) {
        const uint8_t byte = packed[i >> 1];
        out[i] = from_float<T>(__fmul_rn(s_code[(i & 1) ? (byte & 15u) : (byte >> 4)], scale));
      }
    }
  }
}

// ---- skinny matmul ----------------------------------------------------------------------------
// N consecutive elements of x (16-byte aligned, N a multiple of a 16-byte vector) as floats.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* src, float (&v)[N]) {
  constexpr int kPerVec = 16 / sizeof(T);
  static_assert(N % kPerVec == 0, "whole 16-byte vectors");
#pragma unroll
  for (int s = 0; s < N / kPerVec; ++s) {
    union {
      uint4 vec;
      T elems[kPerVec];
    } u;
    u.vec = __ldg(reinterpret_cast<const uint4*>(src) + s);
#pragma unroll
    for (int e = 0; e < kPerVec; ++e) v[s * kPerVec + e] = to_float(u.elems[e]);
  }
}

// No __launch_bounds__(128): with it, ptxas (CUDA 13.0) settles some instantiations at 64-72 registers and
// spills 8-16 B inside the loop to fit one more CTA per SM; without it none spills (42-90 registers,
// benchmarks/results/static/). Launched with kSkinnyWarps * 32 threads.
template <typename T, int M>
__global__ void skinny_kernel(const T* __restrict__ x, int64_t k, const uint8_t* __restrict__ packed, Scales scales,
                              int blocksize_log2, const T* __restrict__ bias, int64_t n, T* __restrict__ y) {
  PYLLMOPS_SHARED(float[16], s_code);
  load_code(s_code);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSkinnyWarps + threadIdx.x / 32;
  if (row >= n) return;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  // Pointers advance by a lane stride of 32 chunks; only the scale index needs the flat element index.
  const int64_t chunks = k / 32;
  const uint4* w_chunk = reinterpret_cast<const uint4*>(packed + row * k / 2) + lane;
  const T* x_chunk = x + lane * 32;
  int64_t flat = row * k + lane * 32;
  // The trip count is the warp's (not the lane's), so the loop needs no divergence handling; lanes past
  // the row's last chunk skip the body.
  for (int64_t c0 = 0; c0 < chunks; c0 += 32, w_chunk += 32, x_chunk += 32 * 32, flat += 32 * 32) {
    if (c0 + lane >= chunks) continue;
    const uint4 q = __ldcs(w_chunk);
    const float scale = scales(flat >> blocksize_log2);
    // One 32-bit word (8 weights) at a time, against 8 elements of each row of x: ~16 + M live values
    // instead of 64 (a whole chunk of W and of x), so no variant spills. Each row's partial sum still
    // runs over the chunk's 32 elements in order, as before.
    float part[M];
#pragma unroll
    for (int m = 0; m < M; ++m) part[m] = 0.0f;
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      const uint32_t word = wi == 0 ? q.x : wi == 1 ? q.y : wi == 2 ? q.z : q.w;
      float wv[8];
#pragma unroll
      for (int bi = 0; bi < 4; ++bi) {
        const uint32_t byte = (word >> (8 * bi)) & 0xffu;
        wv[bi * 2] = s_code[byte >> 4];
        wv[bi * 2 + 1] = s_code[byte & 15u];
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        load_floats(x_chunk + m * k + wi * 8, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) part[m] = fmaf(wv[e], xv[e], part[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = fmaf(part[m], scale, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = group_sum(acc[m]);
    if (lane == 0) y[m * n + row] = from_float<T>(s + (bias ? to_float(bias[row]) : 0.0f));
  }
}

template <typename T, int M>
void launch_skinny(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                   const TensorView* bias, const TensorView& y, cudaStream_t stream) {
  const int64_t n = y.size(1);
  const int grid = static_cast<int>(ceil_div(n, kSkinnyWarps));
  launch("skinny_kernel", skinny_kernel<T, M>, grid, kSkinnyWarps * 32, 0, stream, x.ptr<const T>(), x.size(1),
         packed.ptr<const uint8_t>(), scales, log2_pow2(blocksize), bias ? bias->ptr<const T>() : nullptr, n,
         y.ptr<T>());
}

template <typename T>
void dispatch_skinny(int64_t m, const TensorView& x, const TensorView& packed, const Scales& scales,
                     int64_t blocksize, const TensorView* bias, const TensorView& y, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_skinny<T, 1>(x, packed, scales, blocksize, bias, y, stream);
    case 2: return launch_skinny<T, 2>(x, packed, scales, blocksize, bias, y, stream);
    case 3: return launch_skinny<T, 3>(x, packed, scales, blocksize, bias, y, stream);
    case 4: return launch_skinny<T, 4>(x, packed, scales, blocksize, bias, y, stream);
    case 5: return launch_skinny<T, 5>(x, packed, scales, blocksize, bias, y, stream);
    case 6: return launch_skinny<T, 6>(x, packed, scales, blocksize, bias, y, stream);
    case 7: return launch_skinny<T, 7>(x, packed, scales, blocksize, bias, y, stream);
    case 8: return launch_skinny<T, 8>(x, packed, scales, blocksize, bias, y, stream);
    default: throw_invalid("pyllmops._C: nf4 skinny matmul takes 1..", kMaxSkinnyRows, " rows of x, got ", m);
  }
}

}  // namespace

void quantize_cuda(const TensorView& w, int64_t blocksize, const TensorView& packed, const TensorView& absmax,
                   uintptr_t stream) {
  const int64_t n = w.numel();
  if (n == 0) return;
  CudaDeviceGuard guard(w.device);
  const int grid = grid_for(ceil_div(n, blocksize), kThreads / 32);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(w.dtype, "w", __half, __nv_bfloat16, [&] {
    launch("quantize_kernel", quantize_kernel<scalar_t>, grid, kThreads, 0, as_stream(stream), w.ptr<const scalar_t>(),
           n, log2_pow2(blocksize), packed.ptr<uint8_t>(), absmax.ptr<float>());
  });
}

void quantize_sorted_code_cuda(const TensorView& x, const TensorView& code, int64_t blocksize, const TensorView& q,
                               const TensorView& absmax, uintptr_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  CudaDeviceGuard guard(x.device);
  const int grid = grid_for(ceil_div(n, blocksize), kThreads / 32);
  launch("quantize_sorted_code_kernel", quantize_sorted_code_kernel, grid, kThreads, 0, as_stream(stream),
         x.ptr<const float>(), n, code.ptr<const float>(), static_cast<int>(code.numel()), log2_pow2(blocksize), q.ptr<uint8_t>(),
         absmax.ptr<float>());
}

void dequantize_cuda(const TensorView& packed, const Scales& scales, int64_t blocksize, const TensorView& out,
                     uintptr_t stream) {
  const int64_t n = out.numel();
  if (n == 0) return;
  CudaDeviceGuard guard(out.device);
  const bool vec = is_aligned(packed.data, 16) && is_aligned(out.data, 16);
  const int grid = grid_for(ceil_div(n, 32), kThreads);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(out.dtype, "out", __half, __nv_bfloat16, [&] {
    if (vec)
      launch("dequantize_kernel", dequantize_kernel<scalar_t, true>, grid, kThreads, 0, as_stream(stream),
             packed.ptr<const uint8_t>(), scales, log2_pow2(blocksize), n, out.ptr<scalar_t>());
    else
      launch("dequantize_kernel", dequantize_kernel<scalar_t, false>, grid, kThreads, 0, as_stream(stream),
             packed.ptr<const uint8_t>(), scales, log2_pow2(blocksize), n, out.ptr<scalar_t>());
  });
}

void skinny_matmul_cuda(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                        const TensorView* bias, const TensorView& y, uintptr_t stream) {
  const int64_t m = x.size(0), k = x.size(1);
  PYLLMOPS_CHECK(k % 32 == 0, "nf4 skinny matmul on CUDA needs in_features % 32 == 0, got ", k);
  PYLLMOPS_CHECK(is_aligned(packed.data, 16) && is_aligned(x.data, 16),
                 "nf4 skinny matmul on CUDA needs 16-byte aligned packed weight and x");
  if (y.numel() == 0) return;
  CudaDeviceGuard guard(x.device);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(x.dtype, "x", __half, __nv_bfloat16, [&] {
    dispatch_skinny<scalar_t>(m, x, packed, scales, blocksize, bias, y, as_stream(stream));
  });
}

}  // namespace nf4
}  // namespace pyllmops
