// Paged attention on tensor cores (fp16 / bf16): GQA decode (group >= 4) and multi-token queries (chunked
// prefill, speculative verification) with any GQA group.
//
// Work item: paged.h's (sequence x split, kv head, row tile of kRowTile = 8 rows), the same grid,
// split plan and merge as the CUDA-core kernel (paged_cuda.cu). Rows are query-major (row r = query
// r / group): in decode the 8 rows are heads of one query; in multi-token runs with a group that is not a
// multiple of 8 they come from up to 8 consecutive queries (group 1: 8 queries, group 3: parts of 3-4).
//
// Key bounds per row. Row g sees its own keys [lo_g, hi_g) (paged.h row_key_bounds, once, outside the key
// loop, intersected with the split [sb, se)); the tile loads the union [sb, se) and masks each score by
// select, vis = lo_g <= j < hi_g (32-bit compares), so a non-finite K never reaches a row that does not see
// its key. Bounds grow with the query, so every live row sees the common range [clo, chi) = [lo of the last
// live row, hi of the first); the other keys of [sb, se) are "ragged": at most 7 at the causal end and 7 at
// the window start (8 rows span at most 8 queries; all of the <= 15 keys when the window is < 7), in at most
// 3 key tiles per work item. Decode has none (clo = sb, chi = se). A row that sees no key of the split
// writes 0 with m = -inf.
//
// NaN policy (paged.h, docs/errors.md) on ragged keys: P V on the tensor core multiplies a ragged key's V
// row by P = 0 in the rows that do not see it, and 0 * inf / NaN = NaN would reach them. So in a key tile
// that holds ragged keys (block-uniform test), each warp votes per ragged key whether its V columns hold a
// non-finite value; if so it adds that key's p_gj V[j] to the rows that see it on CUDA cores (fp32, p_gj
// recomputed exactly as the main path does) and zeroes V[j] in its columns of shared memory before the mma
// (ragged_nonfinite_v). Finite V (the common case) costs one vote per ragged key.
//
// One m16 A tile = the 8 rows, padded with 8 zero rows. 4 warps split the head dim: warp w owns columns
// [w kDw, (w + 1) kDw), kDw = kD / 4, of q, K, V and out. Per key tile of kKeys keys (pipeline stage):
//   1. K and V rows are copied global -> shared by cp.async (16 bytes per thread and instruction; a key's
//      row address comes from its block-table entry by shift and mask), kStages deep: while a tile is
//      consumed the next kStages - 1 are in flight. The block-table entries a thread needs for a tile are
//      loaded into registers one tile before its copies are issued, so the copies never wait on them.
//      An entry outside [0, num_blocks) is never dereferenced (zero fill, rows NaN, kErrBlockIndex);
//      keys past the split's end are zero-filled and masked.
//   2. S_w = Q[:, cols_w] K[:, cols_w]^T (mma.sync m16n8k16, q fragments kept in registers): each warp's
//      partial scores over its columns go to shared memory; after one barrier every warp sums the 4
//      partials in the same order (so all warps hold identical scores, maxima and sums: no cross-warp
//      merge of the output is needed), applies the softcap and the key mask, and updates the online
//      softmax of its lanes' rows (common/online_softmax.h domain: unscaled scores, exp2 with exp2_scale;
//      NaN-propagating maxima).
//   3. O_w += P V[:, cols_w] (P rounded to T in registers as the A fragment, V read by ldmatrix.trans).
//   Finally each warp writes its columns of the 8 rows: out (one split) or fp32 partials + (m, l).
//
// Shapes (kD = head dim rounded up to 64 / 128 / 256; columns >= head_dim are zero-filled): stages of
// 4096 / kD keys = 16 KB of K + V, double-buffered (a third stage would pass 48 KB of static shared memory
// and cost a resident CTA):
//   kD   kKeys  shared memory (2 stages x K, V + partial scores)   state per thread: O, S, q registers
//   64    64    2 x 2 x 64 x 72 x 2 B  = 36 KB + 8 KB                8, 32, 4
//   128   32    2 x 2 x 32 x 136 x 2 B = 34 KB + 4 KB               16, 16, 8
//   256   16    2 x 2 x 16 x 264 x 2 B = 33 KB + 2 KB               32,  8, 16
// so __launch_bounds__(128, 4) holds: sm_90a 123 / 96 / 113 registers, 4 / 5 / 4 resident CTAs per SM
// (docs/paged.md), i.e. 4-5 x 16 KB of K/V in flight per SM, 2-3x what Little's law asks on an H100 /
// H200 (3.35-4.8 TB/s over 132 SMs x ~1 us of loaded latency: 22-31 KB).
//
// Napkin math, decode (bf16, head_dim 128, GQA 8, context 4096): per (sequence, kv head) 2 MiB of K/V and
// 2 x 2 x 16 x 4096 x 128 = 33.5 MFLOP of mma (8 of the 16 rows are padding): 16 FLOP/byte, far below
// the ~300 FLOP/byte of an H100's dense bf16 mma: bound by HBM bandwidth if the issue slots keep up. Per
// 16 KB stage and warp (SASS, kD = 128): 16 HMMA, 8 LDSM, 8 LDGSTS, ~425 instructions executed, i.e.
// ~9.6 bytes per warp instruction: docs/paged.md derives the predicted share of HBM from that.
// Multi-token (e.g. chunked prefill, group 1): one m16 tile = 8 queries, K/V read once per 8 queries (mostly
// from L2: the chunk's q_len / 8 tiles of a kv head stream the same context); issue-bound at ~53 warp
// instructions per key and 8 rows (kD = 128), ~2.7x fewer than the fp32 CUDA-core kernel's 8-row loop
// (docs/paged.md: a prediction, no GPU has run it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_cuda.cuh"  // the warp tile primitives gemm_abt / gemm_ab / pack2
#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/online_softmax.h"
#include "common/ptx.cuh"
#include "paged/paged.h"
#include "paged/paged_cuda.cuh"

namespace pyllmops {
namespace paged {

namespace {

using attention::cuda::gemm_ab;
using attention::cuda::gemm_abt;
using attention::cuda::pack2;
using attention::cuda::RegA;

constexpr int kTcThreads = 128;
constexpr int kTcWarps = kTcThreads / 32;

template <int kD>
struct TcShape {
  static constexpr int kKeys = 4096 / kD;            // keys per pipeline stage: 16 KB of K + V (+ padding)
  static constexpr int kStages = 2;                  // 3 would need > 48 KB: dynamic smem, 3 CTAs per SM
  static constexpr int kStride = kD + 8;             // shared row stride: conflict-free ldmatrix
  static constexpr int kDw = kD / kTcWarps;          // head-dim columns per warp
  static constexpr int kChunks = kD / 8;             // 16-byte chunks per row
  static constexpr int kRowStep = kTcThreads / kChunks;
  static constexpr int kCopies = kKeys / kRowStep;   // K (and V) chunks per thread and stage
  static_assert(kDw % 16 == 0 && kKeys % 16 == 0 && kKeys % kRowStep == 0, "tile shapes");
};

// Whether a fp16 / bf16 value is inf or NaN (all exponent bits set).
template <typename T>
__device__ __forceinline__ bool non_finite(T x) {
  return !(fabsf(to_float(x)) <= 3.402823466e38f);
}

// The rare path of a key tile with ragged keys (visible to some live rows of the tile, not to others):
// P V on the tensor core would multiply such a key's V row by P = 0 in the rows that do not see it, and
// 0 * inf / NaN = NaN would reach them. For each ragged key j of the tile whose V has a non-finite value in
// this warp's columns (one vote per key), the warp instead (a) adds p_gj V[j] to the rows g that see j, in
// fp32 on CUDA cores, with p_gj recomputed exactly as the main path computes it (partial scores summed in
// warp order, softcap, mask; o is already rescaled to m_new), and (b) zeroes V[j] in its columns of shared
// memory, so that the mma adds 0 for every row. Each warp only ever reads its own column slice of s_v, and
// s_part is not rewritten before the next iteration's barrier.
template <typename T, int kD>
__device__ __forceinline__ void ragged_nonfinite_v(const AttnParams& p, float (&o)[1][TcShape<kD>::kDw / 8][4],
                                                   T* s_v_stage, const float (*s_part)[kRowTile][TcShape<kD>::kKeys],
                                                   uint32_t t0, uint32_t se32, uint32_t clo, uint32_t chi,
                                                   uint32_t lo_g, uint32_t hi_g, float m_new) {
  using S = TcShape<kD>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int col0 = (threadIdx.x >> 5) * S::kDw;
#pragma unroll 1
  for (int r = 0; r < S::kKeys; ++r) {
    const uint32_t j = t0 + r;
    if (j >= se32) break;                 // block-uniform
    if (j >= clo && j < chi) continue;    // block-uniform: every live row sees j
    T* vrow = s_v_stage + r * S::kStride + col0 + 2 * t4;
    bool bad = false;
#pragma unroll
    for (int nt = 0; nt < S::kDw / 8; ++nt) bad |= non_finite(vrow[nt * 8]) || non_finite(vrow[nt * 8 + 1]);
    if (!__any_sync(0xffffffffu, bad)) continue;  // warp-uniform
    if (j >= lo_g && j < hi_g) {  // row g sees j
      float v = 0.0f;
#pragma unroll
      for (int ww = 0; ww < kTcWarps; ++ww) v += s_part[ww][g][r];
      const float x = score_of(p, v);
      const float pr = m_new == -INFINITY ? 0.0f : ptx::ex2_approx((x - m_new) * p.exp2_scale);
#pragma unroll
      for (int nt = 0; nt < S::kDw / 8; ++nt) {
        o[0][nt][0] += pr * to_float(vrow[nt * 8]);
        o[0][nt][1] += pr * to_float(vrow[nt * 8 + 1]);
      }
    }
    __syncwarp();  // every lane has read V[j] before it is zeroed
    if (g == 0) {  // one quad covers the warp's kDw columns
#pragma unroll
      for (int nt = 0; nt < S::kDw / 8; ++nt) *reinterpret_cast<uint32_t*>(vrow + nt * 8) = 0u;
    }
    __syncwarp();  // the zeros are visible to the warp's ldmatrix
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kTcThreads, 4) attention_tc_kernel(const AttnParams p) {
  using S = TcShape<kD>;
  constexpr int kKeys = S::kKeys, kStages = S::kStages, kStride = S::kStride, kDw = S::kDw;
  PYLLMOPS_SHARED(T[kStages][kKeys][kStride], s_k);
  PYLLMOPS_SHARED(T[kStages][kKeys][kStride], s_v);
  PYLLMOPS_SHARED(float[kTcWarps][kRowTile][kKeys], s_part);  // each warp's partial scores of rows 0..7
  PYLLMOPS_SHARED(int, s_bad);

  const WorkItem w = work_item(p);
  if (w.n_rows == 0) return;  // block-uniform
  if (!w.ok) {
    write_nan_rows<T>(p, w);
    return;
  }
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;  // accumulator row g (rows g + 8 are padding), column pair 2 t4
  const int D = static_cast<int>(p.head_dim);
  const int lg = p.log2_block_size;
  const int64_t bmask = p.block_size - 1;
  const float c = p.exp2_scale;
  const int col0 = warp * kDw;  // this warp's head-dim columns

  // Keys of this split: the tile's rows together see [sb, se) (loaded), row g sees [lo_g, hi_g) of them
  // (empty for padding rows), every live row sees the common range [clo, chi) (see the header).
  int64_t kb, ke, sb, se;
  const int64_t G = p.group();
  visible_keys(w.seq_len, w.q_len, G, w.row_begin, w.row_begin + w.n_rows, p.window_left, &kb, &ke);
  split_keys(kb, ke, lg, w.split, p.num_splits, &sb, &se);
  const bool row_live = g < w.n_rows;
  const int64_t orow = row_live ? out_row(p, w, g) : 0;
  const uint32_t sb32 = static_cast<uint32_t>(sb), se32 = static_cast<uint32_t>(se);
  uint32_t lo_g = sb32, hi_g = sb32;
  if (row_live) {
    int64_t lo, hi;
    row_key_bounds(w.seq_len, w.q_len, G, w.row_begin + g, p.window_left, &lo, &hi);
    lo_g = lo > sb ? static_cast<uint32_t>(lo) : sb32;
    hi_g = hi < se ? static_cast<uint32_t>(hi) : se32;
    if (hi_g < lo_g) hi_g = lo_g;
  }
  // Bounds grow with the query and rows are query-major: the largest lo_g is the last live row's, the
  // smallest hi_g the first row's. Keys of [sb, se) outside [clo, chi) are "ragged" (<= 7 per end).
  const uint32_t clo = __shfl_sync(0xffffffffu, lo_g, (w.n_rows - 1) * 4);
  const uint32_t chi = __shfl_sync(0xffffffffu, hi_g, 0);
  const uint32_t ragged_from = chi < se32 ? chi : UINT32_MAX;  // a key tile reaching past it has ragged keys

  // q fragments of row g (registers for the whole key loop); rows 8..15 of the m16 tile are zero.
  uint32_t qf[1][kDw / 16][4];
  {
    const T* qrow = static_cast<const T*>(p.q) + orow * D;
#pragma unroll
    for (int ks = 0; ks < kDw / 16; ++ks) {
      const int c_lo = col0 + ks * 16 + 2 * t4, c_hi = c_lo + 8;
      qf[0][ks][0] = row_live && c_lo < D ? *reinterpret_cast<const uint32_t*>(qrow + c_lo) : 0u;
      qf[0][ks][2] = row_live && c_hi < D ? *reinterpret_cast<const uint32_t*>(qrow + c_hi) : 0u;
      qf[0][ks][1] = 0u;
      qf[0][ks][3] = 0u;
    }
  }

  // cp.async work of this thread: chunk cc of rows r0 + i kRowStep (i < kCopies) of each stage. Key
  // positions are < 2^31 (int32 seq_lens) and a block's elements < 2^32 (the launcher checks), so the
  // index math is 32-bit but for one 32 x 32 -> 64-bit multiply-add per row: key j of block entry b is
  // b * block_elems + (j & bmask) * row_elems elements past this thread's base.
  const int cc = tid % S::kChunks, r0 = tid / S::kChunks;
  const bool col_ok = cc * 8 < D;
  const uint32_t row_elems = static_cast<uint32_t>(p.heads_kv * D);
  const uint32_t block_elems = static_cast<uint32_t>(p.block_size) * row_elems;
  const T* __restrict__ kbase = static_cast<const T*>(p.k_cache) + w.h * D + cc * 8;
  const T* __restrict__ vbase = static_cast<const T*>(p.v_cache) + w.h * D + cc * 8;
  const uint32_t num_blocks = p.num_blocks < INT32_MAX ? static_cast<uint32_t>(p.num_blocks) : INT32_MAX;
  const uint32_t bmask32 = static_cast<uint32_t>(bmask);
  const int32_t* __restrict__ table = p.block_tables + w.s * p.max_blocks;
  int32_t blk[S::kCopies];  // block-table entries of the next stage to issue (prefetched one stage ahead)
  auto fetch_table = [&](uint32_t k0) {
#pragma unroll
    for (int i = 0; i < S::kCopies; ++i) {
      const uint32_t j = k0 + r0 + i * S::kRowStep;
      blk[i] = j < se32 ? table[j >> lg] : -1;
    }
  };
  bool bad = false;
  auto issue = [&](int stage, uint32_t k0) {
    if (k0 < se32) {  // block-uniform
#pragma unroll
      for (int i = 0; i < S::kCopies; ++i) {
        const int r = r0 + i * S::kRowStep;
        const uint32_t j = k0 + r, b = static_cast<uint32_t>(blk[i]);
        const bool in_range = b < num_blocks;  // a negative entry wraps: out of range
        bad |= j < se32 && !in_range;
        const bool ok = in_range && col_ok;  // in_range implies j < se (fetch_table's -1 past the end)
        const uint64_t off = ok ? static_cast<uint64_t>(b) * block_elems + (j & bmask32) * row_elems : 0;
        ptx::cp_async_cg<16>(&s_k[stage][r][cc * 8], kbase + off, ok ? 16 : 0);
        ptx::cp_async_cg<16>(&s_v[stage][r][cc * 8], vbase + off, ok ? 16 : 0);
      }
    }
    ptx::cp_async_commit();  // one group per stage, empty or not: the wait counts stay uniform
  };

  if (tid == 0) s_bad = 0;
  __syncthreads();
  fetch_table(sb32);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    issue(st, sb32 + st * kKeys);
    fetch_table(sb32 + (st + 1) * kKeys);
  }

  // Row g's online-softmax state (identical in the 4 lanes of a quad and in every warp).
  float m = -INFINITY, l = 0.0f;
  float o[1][kDw / 8][4];
  attention::cuda::zero(o);
  int cur = 0, nxt = kStages - 1;  // stage consumed / stage to fill (rotating counters, no modulo)
  for (uint32_t t0 = sb32; t0 < se32; t0 += kKeys) {
    ptx::cp_async_wait<kStages - 2>();  // this thread's copies of stage `cur` have landed
    __syncthreads();                    // everyone's have; everyone is done with stage `nxt` and s_part
    issue(nxt, t0 + (kStages - 1) * kKeys);
    fetch_table(t0 + kStages * kKeys);

    // 2. partial scores over this warp's columns -> shared (rows 0..7 only)
    float sc[1][kKeys / 8][4];
    attention::cuda::zero(sc);
    gemm_abt<T, 1, kKeys, kDw, kStride>(sc, RegA<1, kDw>{qf}, &s_k[cur][0][col0]);
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt)
      *reinterpret_cast<float2*>(&s_part[warp][g][nt * 8 + 2 * t4]) = make_float2(sc[0][nt][0], sc[0][nt][1]);
    __syncthreads();

    // Full scores of row g at the lane's A-fragment columns (ks * 16 + 2 t4 + {0, 1, 8, 9}), summed in warp
    // order; mask, softcap, tile max.
    float x[kKeys / 16][4];
    float mx = -INFINITY;
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = ks * 16 + 2 * t4 + (e & 1) + (e >> 1) * 8;
        float v = 0.0f;
#pragma unroll
        for (int ww = 0; ww < kTcWarps; ++ww) v += s_part[ww][g][col];
        const uint32_t j = t0 + col;
        const bool vis = j >= lo_g && j < hi_g;  // per row: select, so a non-finite K score never leaks
        x[ks][e] = vis ? score_of(p, v) : -INFINITY;
        mx = ptx::fmax_nan(mx, x[ks][e]);
      }
    mx = attention::cuda::quad_max(mx);
    const float m_new = ptx::fmax_nan(m, mx);
    const float fac = m == -INFINITY ? 0.0f : ptx::ex2_approx((m - m_new) * c);
    uint32_t pf[1][kKeys / 16][4];
    float sum = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = m_new == -INFINITY ? 0.0f : ptx::ex2_approx((x[ks][e] - m_new) * c);
        sum += pr[e];
      }
      pf[0][ks][0] = pack2<T>(pr[0], pr[1]);
      pf[0][ks][1] = 0u;
      pf[0][ks][2] = pack2<T>(pr[2], pr[3]);
      pf[0][ks][3] = 0u;
    }
    l = l * fac + attention::cuda::quad_sum(sum);
    m = m_new;
#pragma unroll
    for (int nt = 0; nt < kDw / 8; ++nt) {
      o[0][nt][0] *= fac;
      o[0][nt][1] *= fac;
    }
    // Ragged keys (a rare, block-uniform tile): V values that are not finite go through CUDA cores.
    if (t0 < clo || t0 + kKeys > ragged_from)
      ragged_nonfinite_v<T, kD>(p, o, &s_v[cur][0][0], s_part, t0, se32, clo, chi, lo_g, hi_g, m_new);
    // 3. O += P V over this warp's columns
    gemm_ab<T, 1, kDw, kKeys, kStride>(o, RegA<1, kKeys>{pf}, &s_v[cur][0][col0]);
    cur = cur + 1 == kStages ? 0 : cur + 1;
    nxt = nxt + 1 == kStages ? 0 : nxt + 1;
  }
  ptx::cp_async_wait<0>();  // the zero-filled stages past the end: nothing may land after the CTA exits
  if (bad) s_bad = 1;
  __syncthreads();

  // 4. write this warp's columns of the live rows
  const bool any_bad = s_bad != 0;
  if (any_bad && tid == 0) atomicOr(p.error_flag, kErrBlockIndex);
  if (!row_live) return;
  // l = 0 after seeing keys: every visible score was -inf, 0/0 = NaN (paged.h finish_row)
  float m_store;
  const float inv = any_bad ? NAN : finish_row(m, l, hi_g > lo_g, p.num_splits > 1, &m_store);
  const int64_t rows_total = p.total_q * p.heads_q;
#pragma unroll
  for (int nt = 0; nt < kDw / 8; ++nt) {
    const int col = col0 + nt * 8 + 2 * t4;
    if (col >= D) continue;
    const float v0 = o[0][nt][0] * inv, v1 = o[0][nt][1] * inv;
    if (p.num_splits == 1)
      *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + orow * D + col) = pack2<T>(v0, v1);
    else
      *reinterpret_cast<float2*>(p.partial_out + (w.split * rows_total + orow) * D + col) = make_float2(v0, v1);
  }
  if (p.num_splits > 1 && warp == 0 && t4 == 0) {
    p.partial_ml[2 * (w.split * rows_total + orow)] = any_bad ? NAN : m_store;
    p.partial_ml[2 * (w.split * rows_total + orow) + 1] = any_bad ? NAN : l;
  }
}

}  // namespace

template <typename T>
bool launch_attention_tc(const AttnParams& p, const dim3& grid, cudaStream_t stream) {
  const int64_t G = p.group();
  // Decode: an m16 tile holds the group's heads, mostly padding below 4. Multi-token: up to 8 query rows
  // (several consecutive queries when the group is not a multiple of 8) per tile, any group.
  const bool tc_rows = p.max_q_len > 1 || G >= 4;
  const bool aligned = is_aligned(p.q, 16) && is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16) &&
                       is_aligned(p.out, 16) && (p.num_splits == 1 || is_aligned(p.partial_out, 16));
  const bool small_blocks = p.block_size * p.heads_kv * p.head_dim <= UINT32_MAX;  // 32-bit in-block offsets
  if (!tc_rows || p.head_dim % 8 != 0 || p.head_dim > kMaxHeadDim || !aligned || !small_blocks)
    return false;
  if (p.head_dim <= 64)
    launch("attention_tc_kernel", attention_tc_kernel<T, 64>, grid, kTcThreads, 0, stream, p);
  else if (p.head_dim <= 128)
    launch("attention_tc_kernel", attention_tc_kernel<T, 128>, grid, kTcThreads, 0, stream, p);
  else
    launch("attention_tc_kernel", attention_tc_kernel<T, 256>, grid, kTcThreads, 0, stream, p);
  return true;
}

template bool launch_attention_tc<__half>(const AttnParams&, const dim3&, cudaStream_t);
template bool launch_attention_tc<__nv_bfloat16>(const AttnParams&, const dim3&, cudaStream_t);

}  // namespace paged
}  // namespace pyllmops
