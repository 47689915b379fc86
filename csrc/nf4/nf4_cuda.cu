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
// skinny matmul, fp16 / bf16 x (decode, m <= 16 rows of x): skinny_mma_kernel, on tensor cores. A warp owns 16 rows
//   of W (the mma's A, m16) and multiplies them with x^T (B: tokens padded to one or two n8 tiles) over its CTA's
//   k range. W is decoded straight into A fragments in registers: 4 packed bytes -> 4 registers of two 16-bit
//   codes by byte-permute (prmt) lookups in a register codebook (two byte planes x 4 words), 22 instructions per
//   8 weights; the block scale multiplies the fp32 mma sum of each 32/64/128-k load (codes are rounded to the
//   16-bit type once; code * scale is never rounded). x is staged once per CTA in shared memory, permuted so that
//   every B fragment is one conflict-free 16-byte load shared by two mmas. CTA = 4 warps x 16 rows; the k axis is
//   split so that ~4 CTAs per SM exist (fp32 partial sums, then skinny_reduce_kernel adds them in split order).
//   W is read once: 0.53 byte per weight at blocksize 64 nested, vs 2 for a bf16 GEMV. SASS at sm_90a (no GPU):
//   472 / 524 / 688 instructions per 2 KB of W for 128 / 64 / 32-k loads, 78% of them prmt / LOP3 / shifts on
//   the half-rate integer pipe, which bounds the kernel at ~2.8 TB/s at 1.98 GHz (docs/nf4.md has the derivation).
//   Needs k % 32 == 0 and 16-byte aligned packed / x (Python checks, else dequantize + matmul).
// skinny matmul, fp32 x (m <= 8): skinny_kernel, SIMT: one warp per output row, lanes walk 32-element chunks
//   (a 16-byte load of W), decode from a shared table and dot with the m rows of x; warp reduction per row.
// Block and segment indices are shifts (blocksizes are powers of two): no integer division in any kernel.
//
// quantize: one warp per quantization block (max |x| by shuffle reduction, then each lane encodes
//   pairs of elements into bytes). Runs once per weight; it is not on a hot path.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/ptx.cuh"
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

// ---- quantize ---------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ w, int64_t n, int blocksize_log2, uint8_t* __restrict__ packed,
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

__global__ void __launch_bounds__(kThreads)
    quantize_sorted_code_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ code,
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
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ packed, Scales scales, int blocksize_log2, int64_t n,
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

// ---- skinny matmul, fp32 x: SIMT ----------------------------------------------------------------
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
// spills 8-16 B inside the loop to fit one more CTA per SM; without it none spills. Launched with
// kSkinnyWarps * 32 threads. Used for fp32 x only (fp16 / bf16 x take skinny_mma_kernel below).
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
  const int64_t chunks = k >> 5;
  const uint4* w_chunk = reinterpret_cast<const uint4*>(packed + row * (k >> 1)) + lane;
  const T* x_chunk = x + lane * 32;
  int64_t flat = row * k + lane * 32;
  // The trip count is the warp's (not the lane's), so the loop needs no divergence handling; lanes past
  // the row's last chunk skip the body.
  for (int64_t c0 = 0; c0 < chunks; c0 += 32, w_chunk += 32, x_chunk += 32 * 32, flat += 32 * 32) {
    if (c0 + lane >= chunks) continue;
    const uint4 q = __ldcs(w_chunk);
    const float scale = scales(flat >> blocksize_log2);
    // One 32-bit word (8 weights) at a time, against 8 elements of each row of x: ~16 + M live values.
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

template <int M>
void launch_skinny_simt(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                        const TensorView* bias, const TensorView& y, cudaStream_t stream) {
  const int64_t n = y.size(1);
  const int grid = static_cast<int>(ceil_div(n, kSkinnyWarps));
  launch("skinny_kernel", skinny_kernel<float, M>, grid, kSkinnyWarps * 32, 0, stream, x.ptr<const float>(),
         x.size(1), packed.ptr<const uint8_t>(), scales, log2_pow2(blocksize), bias ? bias->ptr<const float>() : nullptr,
         n, y.ptr<float>());
}

void dispatch_skinny_simt(int64_t m, const TensorView& x, const TensorView& packed, const Scales& scales,
                          int64_t blocksize, const TensorView* bias, const TensorView& y, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_skinny_simt<1>(x, packed, scales, blocksize, bias, y, stream);
    case 2: return launch_skinny_simt<2>(x, packed, scales, blocksize, bias, y, stream);
    case 3: return launch_skinny_simt<3>(x, packed, scales, blocksize, bias, y, stream);
    case 4: return launch_skinny_simt<4>(x, packed, scales, blocksize, bias, y, stream);
    case 5: return launch_skinny_simt<5>(x, packed, scales, blocksize, bias, y, stream);
    case 6: return launch_skinny_simt<6>(x, packed, scales, blocksize, bias, y, stream);
    case 7: return launch_skinny_simt<7>(x, packed, scales, blocksize, bias, y, stream);
    case 8: return launch_skinny_simt<8>(x, packed, scales, blocksize, bias, y, stream);
    default: throw_invalid("pyllmops._C: nf4 skinny matmul takes 1..", kMaxSkinnyRows, " rows of fp32 x, got ", m);
  }
}

// ---- skinny matmul, fp16 / bf16 x: tensor cores, W decoded in registers ---------------------------
// How the k axis is cut: span_k = k covered by one load of a 4-lane group (128, 64 or 32: it divides k and the
// blocksize, so a load's bytes share one scale), k_chunk = k per CTA (a multiple of 128), splits = CTAs along k.
struct SkinnyPlan {
  int splits = 1;
  int k_chunk = 0;
  int span_k = 128;
};

// The 16 NF4 codes rounded to T (fp16 / bf16; code 7 is +0), as byte planes: lo[j] holds the low bytes of
// codes 4j .. 4j+3 (code 4j in byte 0), hi[j] their high bytes. Values: tests/test_nf4.py re-derives them.
struct CodePlanes {
  uint32_t lo[4], hi[4];
};

// Built on the host and passed as a kernel argument: the kernel then holds the 8 words in registers for its
// whole life (as literals, ptxas re-materialized one per prmt inside the loop: +8 instructions per word).
template <typename T>
CodePlanes code_planes() {
  if constexpr (std::is_same<T, __half>::value)
    return {{0x52339200u, 0x00d4ea8du, 0x68e02618u, 0x00c9800du}, {0xb6b8b9bcu, 0x00adb1b4u, 0x3533312du, 0x3c393837u}};
  else
    return {{0xca063280u, 0x00ba3d92u, 0xad7c25a3u, 0x803910e2u}, {0xbebfbfbfu, 0x00bdbebeu, 0x3e3e3e3du, 0x3f3f3f3eu}};
}

// One plane of the codes of 4 nibbles: byte i of the result is plane byte (nibble i of sel's low 16 bits).
// A prmt window holds 8 bytes, so codes 0-7 come from (p[0], p[1]) and 8-15 from (p[2], p[3]); m (0xff in
// byte i when nibble i >= 8) picks between them. The first prmt may read a selector with bit 3 set (a sign
// fill, discarded by m); the second gets the nibbles without bit 3 (sel7).
__device__ __forceinline__ uint32_t lookup16(const uint32_t (&p)[4], uint32_t sel, uint32_t sel7, uint32_t m) {
  const uint32_t a = ptx::prmt(p[0], p[1], sel);
  const uint32_t b = ptx::prmt(p[2], p[3], sel7);
  return (a & ~m) | (b & m);  // one LOP3
}

// 4 packed bytes (8 weights, little endian) -> 4 registers of two T: out[b] = {code[hi nibble of byte b] in
// the low half (the even element, first in the format), code[lo nibble] in the high half}. 22 instructions:
// 2 shifts, 2 ANDs, 2 prmt for the window masks, 4 x (2 prmt + LOP3) lookups, 4 prmt interleaving the planes.
__device__ __forceinline__ void decode_word(uint32_t w, const CodePlanes& tab, uint32_t (&out)[4]) {
  const uint32_t w4 = w << 4, wh = w >> 16;
  // byte i of m_lo / m_hi = bit 3 of nibble i / i + 4, replicated (prmt's sign-fill mode on w << 4 and w)
  const uint32_t m_lo = ptx::prmt(w4, w, 0xD9C8u), m_hi = ptx::prmt(w4, w, 0xFBEAu);
  const uint32_t s_lo = w & 0x7777u, s_hi = wh & 0x7777u;
  const uint32_t pl0 = lookup16(tab.lo, w, s_lo, m_lo), ph0 = lookup16(tab.hi, w, s_lo, m_lo);
  const uint32_t pl1 = lookup16(tab.lo, wh, s_hi, m_hi), ph1 = lookup16(tab.hi, wh, s_hi, m_hi);
  // pl0 = low bytes of codes (lo0, hi0, lo1, hi1) of bytes 0, 1; interleave to {hi0, lo0} and {hi1, lo1}
  out[0] = ptx::prmt(pl0, ph0, 0x4051u);
  out[1] = ptx::prmt(pl0, ph0, 0x6273u);
  out[2] = ptx::prmt(pl1, ph1, 0x4051u);
  out[3] = ptx::prmt(pl1, ph1, 0x6273u);
}

constexpr int kMmaWarps = 4;               // warps per CTA; a warp owns 16 rows of W (one m16 tile)
constexpr int kMmaRows = 16 * kMmaWarps;  // rows of W per CTA
constexpr int kSegK = 128;                // k per segment: a warp's 4 lanes of a row read 64 bytes
constexpr int kSegUnroll = 2;             // segments whose loads are in flight together (2 KB per warp)
constexpr int kTileSmem = 2048;           // bytes of x per segment and n8 tile: 8 tokens x 128 k x 2 B

template <int kL>
__device__ __forceinline__ void load_w(const uint8_t* p, uint32_t (&w)[kL / 4]) {
  if constexpr (kL == 16) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (kL == 8) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = __ldcs(reinterpret_cast<const uint32_t*>(p));
  }
}

// y[m, n] = x[m, k] . W[n, k]^T with the mma's A = 16 rows of W (decoded in registers), B = x^T (kNT n8 tiles of
// tokens), C = y^T. Layout (docs/nf4.md "Skinny matmul on tensor cores"): per segment of 128 k, lane (g, t) of a
// warp reads kL bytes at a time (kL = 16, 8 or 4: the k-span 8 * kL its 4 lanes cover must lie in one quantization
// block) of rows g and g + 8, 16 bytes of each per segment. The reduction order inside an mma is free, so mma
// column c of load i, byte pair j stands for k = 8 i kL + 2 t kL + 4 j + {0, 1, 2, 3}; x is staged in shared
// memory in exactly that order, 16 bytes per lane per slot, so every B fragment is one conflict-free LDS.128 for
// two mmas. The scale of a kL-byte load is one fp32 per row, applied to the load's fp32 mma sum (no rounding of
// code * scale to 16 bits); lane t of each group decodes some of them once and shares them by shuffles.
// grid = (ceil(n / 64), splits): CTA (x, z) owns rows [64 x, 64 x + 64) and k in [z k_chunk, (z + 1) k_chunk);
// with splits > 1 it writes fp32 partial sums, summed in split order by skinny_reduce_kernel.
template <typename T, int kNT, int kL>
__global__ void __launch_bounds__(kMmaWarps * 32)
    skinny_mma_kernel(const T* __restrict__ x, int m, int k, const uint8_t* __restrict__ packed,
                      Scales scales, int blocksize_log2, const T* __restrict__ bias, int n, int k_chunk,
                      CodePlanes tab, T* __restrict__ y, float* __restrict__ partial) {
  constexpr int kLoads = 16 / kL;    // loads of kL bytes per row and segment
  constexpr int kLoadsLog2 = kL == 16 ? 0 : kL == 8 ? 1 : 2;
  constexpr int kWords = kL / 4;     // 32-bit words per load
  constexpr int kSpanK = 8 * kL;     // k covered by one load of the 4 lanes of a group
  constexpr int kUnits = 2 * kLoads * kSegUnroll;  // scales per group and unrolled step (rows x loads x segments)
  PYLLMOPS_DYNAMIC_SHARED(uint4, xs);
  const int k_begin = blockIdx.y * k_chunk;
  const int k_len = min(k_chunk, k - k_begin);  // > 0, a multiple of kSpanK (checked on the host)
  const int n_seg = (k_len + kSegK - 1) >> 7;

  // Stage x[:, k_begin : k_begin + k_len) once, permuted into fragment order (zeros past m and k).
  for (int tok = 0; tok < kNT * 8; ++tok) {
    for (int p = threadIdx.x; p < n_seg * 16; p += blockDim.x) {  // p: 8 elements of one token
      const int kk = p * 8, seg = p >> 4, q = p & 15;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (tok < m && kk < k_len) v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * k + k_begin + kk));
      // q = 8 consecutive k of the segment -> lane t and 16-byte slot s (the order the loads and mmas use)
      const int t = kL == 16 ? q >> 2 : kL == 8 ? (q >> 1) & 3 : q & 3;
      const int s = kL == 16 ? q & 3 : kL == 8 ? ((q >> 3) << 1) | (q & 1) : q >> 2;
      xs[((seg * kNT + (tok >> 3)) * 4 + s) * 32 + (tok & 7) * 4 + t] = v;
    }
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_a = blockIdx.x * kMmaRows + (threadIdx.x >> 5) * 16 + g, row_b = row_a + 8;
  // Rows past n read row n - 1 (in bounds, finite) and are never stored: no predicates in the loop.
  const int64_t ld_a = min(row_a, n - 1), ld_b = min(row_b, n - 1);
  // Row r's bytes of this CTA's k range start at r * k / 2 + k_begin / 2 (k is a multiple of 32: 16-byte aligned).
  const uint8_t* pa = packed + ld_a * (k >> 1) + (k_begin >> 1) + t * kL;
  const uint8_t* pb = packed + ld_b * (k >> 1) + (k_begin >> 1) + t * kL;
  const int64_t flat_a = ld_a * k + k_begin, flat_b = ld_b * k + k_begin;
  const uint4* xl = xs + lane;
  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  for (int seg0 = 0; seg0 < n_seg; seg0 += kSegUnroll) {
    // 1. every load of the step in flight: W of rows g and g + 8, and this lane's share of the scales
    uint32_t wa[kSegUnroll][kLoads][kWords], wb[kSegUnroll][kLoads][kWords];
#pragma unroll
    for (int u = 0; u < kSegUnroll; ++u)
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int kk = (seg0 + u) * kSegK + i * kSpanK;  // warp-uniform; a dead load's words are never used
        if (kk < k_len) {
          load_w<kL>(pa + (kk >> 1), wa[u][i]);
          load_w<kL>(pb + (kk >> 1), wb[u][i]);
        }
      }
    float mine[(kUnits + 3) / 4];
#pragma unroll
    for (int j = 0; j < (kUnits + 3) / 4; ++j) {
      const int unit = t + 4 * j;  // unit = ((u * kLoads) + i) * 2 + row (0: g, 1: g + 8)
      const int u = unit >> (kLoadsLog2 + 1), i = (unit >> 1) & (kLoads - 1), r = unit & 1;
      const int kk = (seg0 + u) * kSegK + i * kSpanK;
      mine[j] = 0.0f;
      if (unit < kUnits && kk < k_len) mine[j] = scales(((r ? flat_b : flat_a) + kk) >> blocksize_log2);
    }
    // 2. decode and multiply, one load (one scale per row) at a time
#pragma unroll
    for (int u = 0; u < kSegUnroll; ++u)
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int unit = (u * kLoads + i) * 2;
        const float sa = __shfl_sync(0xffffffffu, mine[unit >> 2], (lane & ~3) | (unit & 3));
        const float sb = __shfl_sync(0xffffffffu, mine[(unit + 1) >> 2], (lane & ~3) | ((unit + 1) & 3));
        if ((seg0 + u) * kSegK + i * kSpanK >= k_len) continue;  // warp-uniform: past this CTA's k range
        const int seg = seg0 + u;
        float c[kNT][4];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
#pragma unroll
        for (int w = 0; w < kWords; ++w) {
          uint32_t da[4], db[4];
          decode_word(wa[u][i][w], tab, da);
          decode_word(wb[u][i][w], tab, db);
          const int slot = i * kWords + w;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            const uint4 bx = xl[(seg * kNT + nt) * 128 + slot * 32];
            const uint32_t a0[4] = {da[0], db[0], da[1], db[1]};  // bytes 0, 1 of the word: k + 0..3
            const uint32_t a1[4] = {da[2], db[2], da[3], db[3]};  // bytes 2, 3: k + 4..7
            ptx::mma_m16n8k16<T>(c[nt], a0, bx.x, bx.y);
            ptx::mma_m16n8k16<T>(c[nt], a1, bx.z, bx.w);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          acc[nt][0] = fmaf(c[nt][0], sa, acc[nt][0]);
          acc[nt][1] = fmaf(c[nt][1], sa, acc[nt][1]);
          acc[nt][2] = fmaf(c[nt][2], sb, acc[nt][2]);
          acc[nt][3] = fmaf(c[nt][3], sb, acc[nt][3]);
        }
      }
  }

  // C fragment: c[0], c[1] = row g, tokens 2t, 2t + 1 of the n8 tile; c[2], c[3] = row g + 8.
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = nt * 8 + 2 * t + (e & 1), row = e < 2 ? row_a : row_b;
      if (tok >= m || row >= n) continue;
      if (partial != nullptr)
        partial[(static_cast<int64_t>(blockIdx.y) * m + tok) * n + row] = acc[nt][e];
      else
        y[static_cast<int64_t>(tok) * n + row] = from_float<T>(acc[nt][e] + (bias ? to_float(bias[row]) : 0.0f));
    }
}

// y[tok, row] = sum over splits (in split order) of partial[split, tok, row] + bias[row]; grid (rows / 256, m).
template <typename T>
__global__ void __launch_bounds__(256)
    skinny_reduce_kernel(const float* __restrict__ partial, int splits, int m, int n,
                         const T* __restrict__ bias, T* __restrict__ y) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x, tok = blockIdx.y;
  if (row >= n) return;
  const int64_t stride = static_cast<int64_t>(m) * n;
  const float* p = partial + static_cast<int64_t>(tok) * n + row;
  float s = 0.0f;
  for (int z = 0; z < splits; ++z) s += p[z * stride];
  y[static_cast<int64_t>(tok) * n + row] = from_float<T>(s + (bias ? to_float(bias[row]) : 0.0f));
}

SkinnyPlan plan_skinny(int64_t m, int64_t n, int64_t k, int64_t blocksize, int sms) {
  SkinnyPlan p;
  const int64_t low_bit = k & -k;
  p.span_k = static_cast<int>(std::min<int64_t>({blocksize, kSkinnySpanK, low_bit}));
  const int64_t kc_max = m > 8 ? 1024 : 2048;  // x tile <= 32 KB of shared memory
  const int64_t row_groups = (n + 63) >> 6;
  int64_t splits = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + row_groups - 1) / row_groups);
  splits = std::min(splits, std::max<int64_t>(1, k >> 9));  // >= 512 k (8 KB of W per 64 rows) per CTA
  const int64_t per_split = (k + splits - 1) / splits;
  const int64_t k_chunk = std::min(((per_split + 127) >> 7) << 7, kc_max);
  p.k_chunk = static_cast<int>(k_chunk);
  p.splits = static_cast<int>((k + k_chunk - 1) / k_chunk);
  return p;
}

int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  PYLLMOPS_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  v = std::max(v, 1);
  if (cached) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

template <typename T, int kNT, int kL>
void launch_skinny_mma(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                       const TensorView* bias, const TensorView& y, const SkinnyPlan& plan, float* partial,
                       cudaStream_t stream) {
  const int m = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1)), n = static_cast<int>(y.size(1));
  const dim3 grid(static_cast<unsigned>((n + kMmaRows - 1) / kMmaRows), static_cast<unsigned>(plan.splits));
  const size_t smem = static_cast<size_t>(plan.k_chunk / kSegK) * kNT * kTileSmem;
  const T* b = bias ? bias->ptr<const T>() : nullptr;
  launch("skinny_mma_kernel", skinny_mma_kernel<T, kNT, kL>, grid, kMmaWarps * 32, smem, stream, x.ptr<const T>(), m,
         k, packed.ptr<const uint8_t>(), scales, log2_pow2(blocksize), plan.splits > 1 ? nullptr : b, n, plan.k_chunk,
         code_planes<T>(), y.ptr<T>(), plan.splits > 1 ? partial : nullptr);
  if (plan.splits > 1)
    launch("skinny_reduce_kernel", skinny_reduce_kernel<T>, dim3(static_cast<unsigned>((n + 255) / 256), m), 256, 0,
           stream, static_cast<const float*>(partial), plan.splits, m, n, b, y.ptr<T>());
}

template <typename T>
void dispatch_skinny_mma(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                         const TensorView* bias, const TensorView& y, const SkinnyPlan& plan, float* partial,
                         cudaStream_t stream) {
  const bool two_tiles = x.size(0) > 8;
  const int span = plan.span_k;  // 128, 64 or 32 -> kL = 16, 8, 4 bytes
#define PYLLMOPS_NF4_MMA(NT, L) return launch_skinny_mma<T, NT, L>(x, packed, scales, blocksize, bias, y, plan, partial, stream)
  if (two_tiles) {
    if (span == 128) PYLLMOPS_NF4_MMA(2, 16);
    if (span == 64) PYLLMOPS_NF4_MMA(2, 8);
    PYLLMOPS_NF4_MMA(2, 4);
  }
  if (span == 128) PYLLMOPS_NF4_MMA(1, 16);
  if (span == 64) PYLLMOPS_NF4_MMA(1, 8);
  PYLLMOPS_NF4_MMA(1, 4);
#undef PYLLMOPS_NF4_MMA
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
                        const TensorView* bias, const TensorView& y, const TensorView* workspace, uintptr_t stream) {
  const int64_t m = x.size(0), k = x.size(1), n = y.size(1);
  PYLLMOPS_CHECK(k % 32 == 0, "nf4 skinny matmul on CUDA needs in_features % 32 == 0, got ", k);
  PYLLMOPS_CHECK(is_aligned(packed.data, 16) && is_aligned(x.data, 16),
                 "nf4 skinny matmul on CUDA needs 16-byte aligned packed weight and x");
  if (y.numel() == 0) return;
  CudaDeviceGuard guard(x.device);
  if (x.dtype == DType::f32) return dispatch_skinny_simt(m, x, packed, scales, blocksize, bias, y, as_stream(stream));
  // The tensor-core kernel indexes rows, k and tokens in 32 bits (byte and flat offsets in 64).
  PYLLMOPS_CHECK(m >= 1 && m <= kMaxSkinnyRowsCuda, "nf4 skinny matmul on CUDA takes 1..", kMaxSkinnyRowsCuda,
                 " rows of x, got ", m);
  PYLLMOPS_CHECK(k <= kMaxSkinnyK, "nf4 skinny matmul on CUDA takes in_features <= ", kMaxSkinnyK, ", got ", k);
  PYLLMOPS_CHECK(n <= (int64_t{1} << 30), "nf4 skinny matmul on CUDA takes out_features <= 2**30, got ", n);
  const SkinnyPlan plan = plan_skinny(m, n, k, blocksize, sm_count(x.device));
  float* partial = nullptr;
  if (plan.splits > 1) {
    PYLLMOPS_CHECK(workspace != nullptr && workspace->dtype == DType::f32 &&
                       workspace->numel() >= static_cast<int64_t>(plan.splits) * m * n,
                   "nf4 skinny matmul on CUDA needs a float32 workspace of at least ", plan.splits, " x ", m, " x ", n,
                   " elements here (ceil(in_features / 512) x rows x out_features always suffices)");
    partial = workspace->ptr<float>();
  }
  if (x.dtype == DType::f16)
    dispatch_skinny_mma<__half>(x, packed, scales, blocksize, bias, y, plan, partial, as_stream(stream));
  else
    dispatch_skinny_mma<__nv_bfloat16>(x, packed, scales, blocksize, bias, y, plan, partial, as_stream(stream));
}

}  // namespace nf4
}  // namespace pyllmops
