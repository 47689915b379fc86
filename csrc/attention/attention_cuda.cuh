// Warp-level tile primitives of the sm80+ flash attention kernels (attention_fwd.cu, attention_bwd.cu).
//
// A warp owns kTiles m16 row tiles (16 kTiles rows); every matmul of the forward and backward is one of two
// shapes on them (mma.sync.m16n8k16, fp16 or bf16 in, fp32 accumulate):
//   gemm_abt: acc(16 kTiles x N) += A(16 kTiles x K) . B(N x K)^T, B in shared memory row-major, K contiguous,
//             read by ldmatrix.x4 (S = Q K^T, dP = dO V^T; in the dk/dv pass S^T = K Q^T, dP^T = V dO^T);
//   gemm_ab:  acc(16 kTiles x N) += A(16 kTiles x K) . B(K x N), B in shared memory row-major, N contiguous,
//             read transposed by ldmatrix.x4.trans (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q).
// A comes from shared memory (SmemA: one ldmatrix.x4 per m16 x k16 fragment) or from registers (RegA: Q kept
// across key tiles, or a converted accumulator P / dS). Each B fragment (one ldmatrix.x4 = two n8 x k16
// fragments) feeds 2 kTiles mma: with kTiles = 2 the shared-memory traffic per mma is half that of one m16 tile.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"); g = lane / 4, t = lane % 4:
//   A 16x16: reg0 = (row g, cols 2t, 2t+1), reg1 = (row g+8, same), reg2 = (row g, cols 2t+8, 2t+9), reg3 = (g+8, +8)
//   B 16x8 : reg0 = (k 2t, 2t+1; col g), reg1 = (k 2t+8, 2t+9; col g)
//   C 16x8 : c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// so a C accumulator over 16 columns (two n8 tiles) is exactly an A fragment (acc_to_a). A lane holds
// 2 kTiles accumulator rows: row index r = 2 mt + half is row 16 mt + g + 8 half of the warp's slice.
//
// Shared tiles are row-major with a row stride of kD + 8 elements: rows stay 16-byte aligned and the 8
// row addresses of one ldmatrix phase fall in 8 distinct 16-byte bank groups (no conflicts). Tiles come from
// global memory by cp.async (16 bytes per thread and instruction, zero-filled past the valid rows and the
// head dim), so a tile's load overlaps the math of the previous one until cp_async_wait.
// Register arrays are indexed only with compile-time constants (fully unrolled loops).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "attention/attention.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "common/online_softmax.h"

namespace pyllmops {
namespace attention {
namespace cuda {

constexpr int kWarpSize = 32;

// Two floats -> one register of two 16-bit values, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ---- tiles ----------------------------------------------------------------------------------
// Issues the cp.async copies of a kRows x kD tile from global (row r at g + r * row_stride, d contiguous) into
// shared (row stride kD + 8); rows >= valid_rows and columns >= d are zero-filled (src-size 0), so padded head
// dims and ragged tiles add nothing. The caller commits and waits. Thread t copies chunk t % (kD / 8) of rows
// t / (kD / 8) + n * kRowStep: one 64-bit row offset per thread, advanced by a constant. 16-byte chunks: the
// caller guarantees 16-byte aligned rows (check_cuda_params).
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void cp_async_tile(T* s, const T* g, int64_t row_stride, int64_t valid_rows, int64_t d) {
  constexpr int kChunks = kD / 8, kStride = kD + 8, kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowStep == 0, "cp_async_tile: tile and block do not divide");
  const int cc = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const bool col_ok = cc * 8 < d;
  const T* src = g + r0 * row_stride + cc * 8;
  T* dst = s + r0 * kStride + cc * 8;
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it) {
    const bool ok = col_ok && r0 + it * kRowStep < valid_rows;
    ptx::cp_async_cg<16>(dst + it * kRowStep * kStride, ok ? src : g, ok ? 16 : 0);
    src += kRowStep * row_stride;
  }
}

// A-operand sources of gemm_abt / gemm_ab: fragment (m16 tile mt, k16 step ks).
template <typename T, int kStride>
struct SmemA {  // rows in shared memory (row-major, K contiguous), tile mt = rows 16 mt .. 16 mt + 15 from s
  const T* s;
  __device__ __forceinline__ void operator()(int mt, int ks, uint32_t (&a)[4]) const {
    const int lane = threadIdx.x % kWarpSize;
    ptx::ldmatrix_x4(a, s + (mt * 16 + lane % 16) * kStride + ks * 16 + (lane / 16) * 8);
  }
};
template <int kTiles, int kK>
struct RegA {  // fragments already in registers
  const uint32_t (&f)[kTiles][kK / 16][4];
  __device__ __forceinline__ void operator()(int mt, int ks, uint32_t (&a)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = f[mt][ks][i];
  }
};

// acc(16 kTiles x kN) += A(16 kTiles x kK) . B(kN x kK)^T; sB: the first B row.
template <typename T, int kTiles, int kN, int kK, int kStride, typename ASrc>
__device__ __forceinline__ void gemm_abt(float (&acc)[kTiles][kN / 8][4], const ASrc& a_src, const T* sB) {
  const int lane = threadIdx.x % kWarpSize;
  const T* b_lane = sB + (lane % 8 + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kTiles][4];
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt) a_src(mt, ks, a[mt]);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ptx::ldmatrix_x4(b, b_lane + np * 16 * kStride + ks * 16);
#pragma unroll
      for (int mt = 0; mt < kTiles; ++mt) {
        ptx::mma_m16n8k16<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        ptx::mma_m16n8k16<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc(16 kTiles x kN) += A(16 kTiles x kK) . B(kK x kN); sB: row k0 of B (row-major, N contiguous).
template <typename T, int kTiles, int kN, int kK, int kStride, typename ASrc>
__device__ __forceinline__ void gemm_ab(float (&acc)[kTiles][kN / 8][4], const ASrc& a_src, const T* sB) {
  const int lane = threadIdx.x % kWarpSize;
  const T* b_lane = sB + (lane % 8 + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kTiles][4];
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt) a_src(mt, ks, a[mt]);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, b_lane + ks * 16 * kStride + np * 16);
#pragma unroll
      for (int mt = 0; mt < kTiles; ++mt) {
        ptx::mma_m16n8k16<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        ptx::mma_m16n8k16<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// A (16 kTiles) x kK fp32 accumulator -> A fragments in T (rounded to nearest).
template <typename T, int kTiles, int kK>
__device__ __forceinline__ void acc_to_a(const float (&acc)[kTiles][kK / 8][4], uint32_t (&a)[kTiles][kK / 16][4]) {
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      a[mt][ks][0] = pack2<T>(acc[mt][2 * ks][0], acc[mt][2 * ks][1]);
      a[mt][ks][1] = pack2<T>(acc[mt][2 * ks][2], acc[mt][2 * ks][3]);
      a[mt][ks][2] = pack2<T>(acc[mt][2 * ks + 1][0], acc[mt][2 * ks + 1][1]);
      a[mt][ks][3] = pack2<T>(acc[mt][2 * ks + 1][2], acc[mt][2 * ks + 1][3]);
    }
}

template <int kTiles, int kN>
__device__ __forceinline__ void zero(float (&acc)[kTiles][kN][4]) {
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int i = 0; i < kN; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][i][j] = 0.0f;
}

// Row / column coordinates of accumulator element (n8 tile nt, register e) inside a warp's m16 tile.
__device__ __forceinline__ int acc_row(int e) { return (threadIdx.x % kWarpSize) / 4 + (e >= 2 ? 8 : 0); }
__device__ __forceinline__ int acc_col(int nt, int e) { return nt * 8 + (threadIdx.x % 4) * 2 + (e & 1); }

// Stores one m16 tile's 16 x kD fp32 accumulator * mul[row half] to global rows [0, valid_rows), cols [0, d).
template <typename T, int kD>
__device__ __forceinline__ void store_acc(const float (&acc)[kD / 8][4], const float (&mul)[2], T* g,
                                          int64_t row_stride, int64_t valid_rows, int64_t d) {
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = acc_row(2 * half), c = acc_col(nt, 0);
      if (r < valid_rows && c < d)
        *reinterpret_cast<uint32_t*>(g + r * row_stride + c) =
            pack2<T>(acc[nt][2 * half] * mul[half], acc[nt][2 * half + 1] * mul[half]);
    }
}

// Reductions over the 4 lanes that share an accumulator row. quad_max propagates NaN (a NaN score makes the
// row NaN, as in the float64 reference, instead of being dropped into a "fully masked" row).
__device__ __forceinline__ float quad_max(float v) {
  v = ptx::fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return ptx::fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): one ex2, one approximate reciprocal and three FMA-class instructions instead of
// tanhf's ~20. Absolute error ~1e-7 (near 0 the cancellation costs relative, not absolute, accuracy: the score it
// feeds is softcap * tanh, so absolute error is what counts). |x| > 9 gives +-1 (tanh(9) = 1 - 3e-8 rounds to 1 in
// fp32) and keeps e^{2x} finite; a NaN x fails both comparisons and stays NaN.
__device__ __forceinline__ float fast_tanh(float x) {
  x = x > 9.0f ? 9.0f : (x < -9.0f ? -9.0f : x);
  return 1.0f - __fdividef(2.0f, ptx::ex2_approx(x * (2.0f * softmax::kLog2e)) + 1.0f);
}

// Scores of one tile before the softmax, in place.
// softcap_scores: the logit softcap (Params::softcap = c > 0; c tanh(scale s / c) replaces the scaled score
// scale s). Here s -> tanh(s pre), pre = scale / c (softcap_pre): the factor c joins the softmax's base-2 multiplier (c log2 e instead of
// scale log2 e), so the capped and uncapped kernels share everything after this step.
template <int kTiles, int kN>
__device__ __forceinline__ void softcap_scores(float (&s)[kTiles][kN / 8][4], float pre) {
#pragma unroll
  for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
    for (int n8 = 0; n8 < kN / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][n8][e] = fast_tanh(s[mt][n8][e] * pre);
}
// scale / softcap without IEEE division's slow path (a called subroutine: a stack frame in the kernel). Params
// bounds both to (0, 1e30), where __fdividef's 2-ulp error is all there is.
__device__ __forceinline__ float softcap_pre(const Params& p) { return __fdividef(p.scale, p.softcap); }

// mask_scores: element (accumulator row r, column c) outside row r's visible columns [lo, hi] (visible_cols of
// query row row_of(r)) becomes -inf, whatever its score (a NaN key the mask hides touches nothing). Row by row,
// so that only one row's bounds are live. Only tiles the band cuts need it.
template <int kTiles, int kN, typename RowOf>
__device__ __forceinline__ void mask_scores(float (&s)[kTiles][kN / 8][4], const Mask& mask, int64_t j0,
                                            const RowOf& row_of);
// The visible columns [lo, hi] (clamped to [0, kN - 1]; empty when lo > hi) of key tile j0 for query row i.
template <int kN>
__device__ __forceinline__ void visible_cols(const Mask& mask, int64_t i, int64_t j0, int* lo, int* hi) {
  if (i >= mask.sq) {
    *lo = 1;
    *hi = 0;
    return;
  }
  const int64_t a = mask.first_key(i) - j0, b = mask.last_key(i) - j0;
  *lo = static_cast<int>(a < 0 ? 0 : (a > kN ? kN : a));
  *hi = static_cast<int>(b < -1 ? -1 : (b > kN - 1 ? kN - 1 : b));
}
template <int kTiles, int kN, typename RowOf>
__device__ __forceinline__ void mask_scores(float (&s)[kTiles][kN / 8][4], const Mask& mask, int64_t j0,
                                            const RowOf& row_of) {
#pragma unroll
  for (int r = 0; r < 2 * kTiles; ++r) {
    int lo, hi;
    visible_cols<kN>(mask, row_of(r), j0, &lo, &hi);
#pragma unroll
    for (int n8 = 0; n8 < kN / 8; ++n8)
#pragma unroll
      for (int e = 2 * (r % 2); e < 2 * (r % 2) + 2; ++e) {
        const int c = acc_col(n8, e);
        if (c < lo || c > hi) s[r / 2][n8][e] = -INFINITY;
      }
  }
}

// The visible rows [lo, hi] (clamped to [0, kM - 1]; empty when lo > hi) of query tile i0 for key j: the
// transpose of visible_cols, for the dk/dv pass (query i sees key j iff j - shift - right <= i <= j - shift + left,
// i < sq, j < sk; Mask::query_tiles). Window bounds past sq + sk are clamped there (no overflow).
template <int kM>
__device__ __forceinline__ void visible_rows(const Mask& mask, int64_t j, int64_t i0, int* lo, int* hi) {
  const int64_t big = mask.sq + mask.sk;
  const int64_t left = mask.left > big ? big : mask.left, right = mask.right > big ? big : mask.right;
  int64_t a = right < 0 ? 0 : j - mask.shift - right, b = left < 0 ? mask.sq - 1 : j - mask.shift + left;
  if (b > mask.sq - 1) b = mask.sq - 1;
  if (j >= mask.sk) b = -1;
  a -= i0;
  b -= i0;
  *lo = static_cast<int>(a < 0 ? 0 : (a > kM ? kM : a));
  *hi = static_cast<int>(b < -1 ? -1 : (b > kM - 1 ? kM - 1 : b));
}

// The backward's view of one raw score x = q . k: s, the score in the softmax's domain (s mul is the base-2
// score: mul = scale log2 e, or softcap log2 e when capped), and dtanh = d(capped score) / d(scale x) (1 when
// not capped; with softcap c, s = tanh(scale x / c) and the derivative of c tanh(scale x / c) is 1 - s^2).
struct Score {
  float s, dtanh;
};
__device__ __forceinline__ Score score(float x, bool capped, float pre) {
  if (!capped) return {x, 1.0f};
  const float t = fast_tanh(x * pre);
  return {t, 1.0f - t * t};
}

// ---- varlen sequences the launch cannot honour (seq_info's error bits; attention.h) -----------------
// fwd_kernel, delta_kernel, dq_kernel and dkdv_kernel skip such a sequence (`if (si.error) return;`).
// varlen_fail_kernel, launched before them on every varlen call, one CTA per sequence (grid-strided), raises
// the sequence's bits in p.error_flag (the first sequence reported leaves its offsets for the message) and
// writes NaN to every row it owns, rows past max_seqlen included: out and lse (forward), dq, dk and dv
// (backward). A separate launch (one more per varlen call, a few microseconds: every CTA reads 4 offsets and
// exits) because the same code as a cold branch inside the main kernels cost them registers (ptxas, sm_80:
// forward d = 64 129 -> 158, dk/dv d = 64 166 -> 197, i.e. 3 -> 2 CTAs per SM).
template <typename T>
__device__ void nan_rows(T* row0, const Layout& l, int64_t rows, int64_t heads, int64_t d) {
  const T nan = from_float<T>(NAN);
  const int64_t per_row = heads * d;
  for (int64_t e = threadIdx.x; e < rows * per_row; e += blockDim.x)
    row0[e / per_row * l.seq + e % per_row / d * l.head + e % d] = nan;
}

template <typename T>
__global__ void varlen_fail_kernel(Params p, bool backward) {
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const SeqInfo si = seq_info(p, b);
    if (!si.error) continue;
    if (threadIdx.x == 0 && p.error_flag != nullptr) {
      atomicOr(p.error_flag, si.error);
      if (atomicCAS(p.error_flag + 1, 0, static_cast<int>(b) + 1) == 0) {
        const int bit = si.error & -si.error;
        const bool q_side = (bit & (kErrSeqLenQ | kErrOffsetsQ)) != 0, len = (bit & (kErrSeqLenQ | kErrSeqLenK)) != 0;
        const int32_t* c = q_side ? p.cu_seqlens_q : p.cu_seqlens_k;
        const int64_t limit = len ? (q_side ? p.seqlen_q : p.seqlen_k) : (q_side ? p.total_q : p.total_k);
        p.error_flag[2] = bit;
        p.error_flag[3] = c[b];
        p.error_flag[4] = c[b + 1];
        p.error_flag[5] = static_cast<int>(limit < INT32_MAX ? limit : INT32_MAX);
      }
    }
    if (!backward) {
      nan_rows(q_row(static_cast<T*>(p.o), p.lo, si, 0, 0), p.lo, si.sq, p.heads_q, p.head_dim);
      for (int64_t e = threadIdx.x; e < p.heads_q * si.sq; e += blockDim.x)
        p.lse[lse_index(p, si, e % si.sq, e / si.sq)] = NAN;
    } else {
      nan_rows(q_row(static_cast<T*>(p.dq), p.ldq, si, 0, 0), p.ldq, si.sq, p.heads_q, p.head_dim);
      nan_rows(k_row(static_cast<T*>(p.dk), p.ldk, si, 0, 0), p.ldk, si.sk, p.heads_kv, p.head_dim);
      nan_rows(k_row(static_cast<T*>(p.dv), p.ldv, si, 0, 0), p.ldv, si.sk, p.heads_kv, p.head_dim);
    }
  }
}

template <typename T>
void launch_varlen_fail(const Params& p, bool backward, cudaStream_t stream) {
  if (!p.varlen() || p.batch == 0) return;
  const unsigned grid = static_cast<unsigned>(p.batch < 1024 ? p.batch : 1024);
  launch("flash_attention varlen_fail_kernel", varlen_fail_kernel<T>, dim3(grid), dim3(128), 0, stream, p, backward);
}

// The kv head of query head h (GQA / MQA). Heads are at most 65535 (check_cuda_params): a 32-bit division, not
// the called subroutine of a 64-bit one.
__device__ __forceinline__ int64_t kv_head(const Params& p, int64_t h) {
  return static_cast<int>(h) / (static_cast<int>(p.heads_q) / static_cast<int>(p.heads_kv));
}

// Launch helpers shared by the forward and backward launchers.
inline void check_aligned_rows(const void* p, const Layout& l, const char* name) {
  PYLLMOPS_CHECK(is_aligned(p, 16), name, " must be 16-byte aligned on CUDA (the Python layer copies otherwise)");
  for (int64_t s : {l.batch, l.seq, l.head})
    PYLLMOPS_CHECK(s % 8 == 0, name, " strides must be multiples of 8 elements on CUDA, got ", s);
}

// What the kernels rely on beyond the bindings' checks: 16-byte aligned rows for the vector loads.
inline void check_cuda_params(const Params& p, bool backward) {
  // Launch grids put query tiles in x, heads in y and the batch (varlen: sequences) in z.
  PYLLMOPS_CHECK(p.batch <= 65535, "flash attention on CUDA takes at most 65535 sequences per call, got ", p.batch,
                 " (split the batch)");
  PYLLMOPS_CHECK(p.heads_q <= 65535, "flash attention on CUDA takes at most 65535 heads, got ", p.heads_q);
  check_aligned_rows(p.q, p.lq, "q");
  check_aligned_rows(p.k, p.lk, "k");
  check_aligned_rows(p.v, p.lv, "v");
  check_aligned_rows(p.o, p.lo, "out");
  if (!backward) return;
  check_aligned_rows(p.dout, p.ldo, "dout");
  check_aligned_rows(p.dq, p.ldq, "dq");
  check_aligned_rows(p.dk, p.ldk, "dk");
  check_aligned_rows(p.dv, p.ldv, "dv");
}

// Calls f.template operator()<T, kD>() for the dtype and the padded head dim serving head_dim (the next of
// 64, 128, 256): the one place that decides which instantiations exist.
template <typename F>
void dispatch(const Params& p, DType dtype, const F& f) {
  const auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (p.head_dim <= 64) return f.template operator()<T, 64>();
    if (p.head_dim <= 128) return f.template operator()<T, 128>();
    return f.template operator()<T, 256>();
  };
  switch (dtype) {
    case DType::f16: return by_dim(__half());
    case DType::bf16: return by_dim(__nv_bfloat16());
    default:
      throw_invalid("pyllmops.flash_attention: CUDA kernels take float16 or bfloat16, got ", dtype_name(dtype));
  }
}

}  // namespace cuda
}  // namespace attention
}  // namespace pyllmops
