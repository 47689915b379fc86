// Paged attention, reshape_and_cache and copy_blocks on CUDA (fp16 / bf16).
//
// attention_kernel (CUDA cores; every case the tensor-core kernel in paged_tc.cu does not take: decode with
//   GQA group < 4, head dims not a multiple of 8, unaligned tensors):
//   one CTA (128 threads, 4 warps) per (sequence x split, kv head, row tile of
//   kRowTile = 8 query rows); the decomposition, masks and split ranges are paged.h's, shared with
//   paged_cpu.cpp. Inside a CTA, keys are handled by "key groups" of kLanes lanes: each lane owns
//   kElems = 8 elements of a K/V row (one 16-byte load when head_dim == kLanes * 8: head_dim 64 ->
//   8 lanes, 128 -> 16 lanes; any other head_dim <= 256 takes the strided 32-lane variant with scalar
//   loads). Per key tile of kKeyTile = 64 keys:
//     1. 64 threads translate the tile's keys to element offsets through the block table (bounds-
//        checked: an entry outside [0, num_blocks) is never dereferenced, the key is masked, the
//        rows become NaN and kErrBlockIndex is raised);
//     2. each key group loads a K row once and dots it with all (<= 8) query rows held in registers
//        (q pre-scaled by softmax_scale * log2 e), reducing across its lanes with shuffles;
//     3. one warp per row updates the online-softmax state (common/online_softmax.h RowState) and
//        turns scores into probabilities in shared memory;
//     4. each key group loads the V row once and accumulates p * v into per-thread fp32 registers.
//   At the end the key groups' accumulators are summed through shared memory, normalized by 1/l,
//   and written to out (one split) or to the fp32 partials + LSE (several splits), which
//   merge_kernel combines in split order (deterministic). Registers are indexed with compile-time
//   indices only (rows and elements are unrolled loops).
//   GQA: the 8 rows of a tile are the group's query heads (decode) or consecutive queries, so each
//   K/V element is read from memory once per CTA, i.e. once per group of query heads.
//
// Napkin math (decode, bf16, head_dim 128, GQA 8, context 4096, batch 32, 8 kv heads): K/V bytes
//   read 32 * 8 * 2 * 4096 * 128 * 2 B = 537 MB, q + out 2 * 32 * 64 * 128 * 2 B = 1 MB; at an
//   H100's ~3.3 TB/s that is ~160 us. Math: 2 * 2 * 32 * 64 * 4096 * 128 = 4.3 GFLOP of fp32 FMA,
//   ~90 us at ~50 TFLOP/s, so the kernel is bandwidth-bound when it overlaps loads with math; with
//   few sequences x kv heads the split-KV planner (ops/paged.py) multiplies CTAs to fill the SMs.
//
// reshape_and_cache_kernel: one CTA per token copies its K and V rows (16-byte units when sizes
//   and pointers allow) to the slot; slot -1 is skipped, an out-of-range slot raises kErrSlot.
// copy_blocks_kernel: grid (pair, cache): one launch copies every (src, dst) block pair in every
//   layer's K and V pool (copy-on-write after fork).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/dtype.h"
#include "common/online_softmax.h"
#include "common/warp_reduce.cuh"
#include "paged/paged.h"
#include "paged/paged_cuda.cuh"

namespace pyllmops {
namespace paged {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kElems = 8;  // elements of a K/V/q row per lane

// Element index of element e of lane li: contiguous chunks (16-byte loads) or strided by kLanes.
template <int kLanes, bool kContig>
__device__ __forceinline__ int elem_index(int li, int e) {
  return kContig ? li * kElems + e : e * kLanes + li;
}

// The kElems elements lane li owns of a row of `dim` elements, as floats (0 past the end).
template <typename T, int kLanes, bool kContig>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int li, int dim, float (&v)[kElems]) {
  if constexpr (kContig) {
    union {
      uint4 vec;
      T elems[kElems];
    } u;
    u.vec = __ldg(reinterpret_cast<const uint4*>(row) + li);
#pragma unroll
    for (int e = 0; e < kElems; ++e) v[e] = to_float(u.elems[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int d = elem_index<kLanes, kContig>(li, e);
      v[e] = d < dim ? to_float(row[d]) : 0.0f;
    }
  }
}

// NaN-propagating max over an aligned group of kWidth lanes (fmaxf would drop a NaN score and make
// the row look masked).
template <int kWidth = 32>
__device__ __forceinline__ float group_max_nan(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = softmax::nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// kRows: register rows (1, 4 or 8 >= the rows a tile really has), so a decode step without GQA
// keeps 2 x 8 fp32 registers of q / accumulator per thread instead of 2 x 64.
// The kElems q elements lane li owns of row r, from shared memory (two 16-byte loads when contiguous).
template <int kLanes, bool kContig, int kDMax>
__device__ __forceinline__ void load_q(const float (&row)[kDMax], int li, float (&v)[kElems]) {
  if constexpr (kContig) {
    const float4 a = reinterpret_cast<const float4*>(row)[2 * li];
    const float4 b = reinterpret_cast<const float4*>(row)[2 * li + 1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) v[e] = row[elem_index<kLanes, kContig>(li, e)];
  }
}

// Occupancy: q lives in shared memory (not 64 registers per thread for 8 rows), so the variants fit
// __launch_bounds__(128, 4)'s 128 registers: 4 resident CTAs (16 warps) per SM, <= 40 KB of shared
// memory each (sm_90a: 52-123 registers, no spill). The strided 8-row variant (head dims other than
// 64 / 128) spilled at 128 registers and asks for 3 CTAs per SM instead.
template <bool kContig, int kRows>
constexpr int min_ctas_per_sm() { return (kContig || kRows < kRowTile) ? 4 : 3; }

template <typename T, int kLanes, bool kContig, int kRows>
__global__ void __launch_bounds__(kThreads, (min_ctas_per_sm<kContig, kRows>())) attention_kernel(const AttnParams p) {
  constexpr int kGroups = kThreads / kLanes;
  constexpr int kDMax = kLanes * kElems;
  constexpr int kKeysPerGroup = kKeyTile / kGroups;
  static_assert(kKeyTile % kGroups == 0 && kKeyTile == 64 && kRows <= kRowTile, "tile shapes");
  PYLLMOPS_SHARED(float[kRows][kKeyTile], s_p);        // scores, then probabilities
  PYLLMOPS_SHARED(float[kRows], s_m);
  PYLLMOPS_SHARED(float[kRows], s_l);
  PYLLMOPS_SHARED(float[kRows], s_fac);
  PYLLMOPS_SHARED(int64_t[kRows], s_lo);               // keys [s_lo, s_hi) of this split row r sees
  PYLLMOPS_SHARED(int64_t[kRows], s_hi);
  PYLLMOPS_SHARED(int64_t[kRows], s_orow);             // row r's (query, head) row of out
  PYLLMOPS_SHARED(int64_t[kKeyTile], s_off);           // element offset of each key's row, -1: none
  PYLLMOPS_SHARED(float[kGroups][kRows][kDMax], s_red);  // <= 32 KiB: the key groups' accumulators
  PYLLMOPS_SHARED(float[kRows][kDMax], s_q);           // unscaled q rows (paged.h "Score domain")
  PYLLMOPS_SHARED(int, s_bad);

  // Index math: lane decomposition by shifts and masks (kLanes is a power of two); the few divisions
  // (work_item, out_row) run once per CTA or once per row, in 32 bits, outside every key loop.
  const int tid = threadIdx.x, g = tid / kLanes, li = tid % kLanes, warp = tid >> 5, lane = tid & 31;
  const WorkItem w = work_item(p);
  if (w.n_rows == 0) return;  // block-uniform
  const int64_t s = w.s, split = w.split, h = w.h, q_len = w.q_len, seq_len = w.seq_len, row_begin = w.row_begin;
  const int64_t row_end = row_begin + w.n_rows;
  const int64_t G = p.group();
  const int lg = p.log2_block_size;
  const int64_t bmask = p.block_size - 1;
  const int D = static_cast<int>(p.head_dim);
  const float c = p.exp2_scale;
  const int n_rows = w.n_rows;
  if (n_rows > kRows) {  // the launcher's kRows is too small: a bug, never a silent partial result
    if (tid == 0) atomicOr(p.error_flag, kErrSeqLen);
    return;
  }
  if (!w.ok) {  // never read the cache for bad metadata: NaN rows (where addressable) + error bit
    write_nan_rows<T>(p, w);
    return;
  }
  if (tid < n_rows) s_orow[tid] = out_row(p, w, tid);
  __syncthreads();
  const int64_t rows_total = p.total_q * p.heads_q;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kc = static_cast<const T*>(p.k_cache);
  const T* __restrict__ vc = static_cast<const T*>(p.v_cache);
  if (g == 0) {  // key group 0 stages q (read before the key loop's first barrier)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float qv[kElems];
      if (r < n_rows) {
        load_row<T, kLanes, kContig>(q + s_orow[r] * D, li, D, qv);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) qv[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kElems; ++e) s_q[r][elem_index<kLanes, kContig>(li, e)] = qv[e];
    }
  }
  int64_t kb, ke, sb, se;
  visible_keys(seq_len, q_len, G, row_begin, row_end, p.window_left, &kb, &ke);
  split_keys(kb, ke, lg, split, p.num_splits, &sb, &se);
  if (tid < kRows) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
    s_fac[tid] = 1.0f;
    int64_t lo = 0, hi = 0;
    if (tid < n_rows) {
      row_key_bounds(seq_len, q_len, G, row_begin + tid, p.window_left, &lo, &hi);
      lo = lo > sb ? lo : sb;
      hi = hi < se ? hi : se;
      if (hi < lo) hi = lo;
    }
    s_lo[tid] = lo;
    s_hi[tid] = hi;
  }
  if (tid == 0) s_bad = 0;
  float acc[kRows][kElems];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = 0.0f;
  const int32_t* __restrict__ table = p.block_tables + s * p.max_blocks;

  for (int64_t t0 = sb; t0 < se; t0 += kKeyTile) {
    __syncthreads();  // the previous tile's s_off / s_p are consumed (and the init is visible)
    // 1. keys -> element offsets through the block table (shift and mask: block_size = 2^lg)
    if (tid < kKeyTile) {
      const int64_t j = t0 + tid;
      int64_t off = -1;
      if (j < se) {
        const int64_t blk = table[j >> lg];
        if (blk >= 0 && blk < p.num_blocks)
          off = (((blk << lg) + (j & bmask)) * p.heads_kv + h) * D;
        else
          s_bad = 1;
      }
      s_off[tid] = off;
    }
    __syncthreads();
    // 2. scores: one K row load per key for all rows of the tile
#pragma unroll
    for (int it = 0; it < kKeysPerGroup; ++it) {  // same trip count for every group: shuffles are safe
      const int t = g + it * kGroups;
      const int64_t off = s_off[t];
      float kv[kElems];
      if (off >= 0) {
        load_row<T, kLanes, kContig>(kc + off, li, D, kv);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) kv[e] = 0.0f;
      }
      const int64_t j = t0 + t;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < n_rows) {  // block-uniform
          float qv[kElems];
          load_q<kLanes, kContig, kDMax>(s_q[r], li, qv);
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < kElems; ++e) dot = fmaf(qv[e], kv[e], dot);
          dot = group_sum<kLanes>(dot);
          if (li == 0) s_p[r][t] = (off >= 0 && j >= s_lo[r] && j < s_hi[r]) ? score_of(p, dot) : -INFINITY;
        }
      }
    }
    __syncthreads();
    // 3. online softmax: one warp per row; p = exp2((x - m) * exp2_scale)
    for (int r = warp; r < n_rows; r += kWarps) {
      const float x0 = s_p[r][lane], x1 = s_p[r][lane + 32];
      const float m_old = s_m[r];
      const float m_new = softmax::nan_max(group_max_nan(softmax::nan_max(x0, x1)), m_old);
      const float fac = m_old == -INFINITY ? 0.0f : softmax::fast_exp2((m_old - m_new) * c);
      const float p0 = softmax::exp2_scaled(x0, m_new, c), p1 = softmax::exp2_scaled(x1, m_new, c);
      const float sum = group_sum(p0 + p1);
      s_p[r][lane] = p0;
      s_p[r][lane + 32] = p1;
      if (lane == 0) {
        s_m[r] = m_new;
        s_l[r] = s_l[r] * fac + sum;
        s_fac[r] = fac;
      }
    }
    __syncthreads();
    // 4. P V: one V row load per key for all rows; a key a row does not see is skipped (select), so a
    //    non-finite V there never reaches the row, while a key it sees always contributes.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float f = s_fac[r];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] *= f;
    }
#pragma unroll
    for (int it = 0; it < kKeysPerGroup; ++it) {
      const int t = g + it * kGroups;
      const int64_t off = s_off[t];
      if (off < 0) continue;  // uniform within the key group
      const int64_t j = t0 + t;
      float vv[kElems];
      load_row<T, kLanes, kContig>(vc + off, li, D, vv);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < n_rows) {
          const float pr = s_p[r][t];
          const bool sees = j >= s_lo[r] && j < s_hi[r];
#pragma unroll
          for (int e = 0; e < kElems; ++e) acc[r][e] = sees ? fmaf(pr, vv[e], acc[r][e]) : acc[r][e];
        }
      }
    }
  }

  // Sum the key groups' accumulators, normalize, write.
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r < n_rows) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const int d = elem_index<kLanes, kContig>(li, e);
        if (d < D) s_red[g][r][d] = acc[r][e];
      }
    }
  }
  __syncthreads();
  const bool bad = s_bad != 0;
  if (bad && tid == 0) atomicOr(p.error_flag, kErrBlockIndex);
  for (int r = 0; r < n_rows; ++r) {
    const float l = s_l[r];
    // l = 0 after seeing keys: every visible score was -inf, 0/0 = NaN as in float64 (paged.h finish_row)
    float m_store;
    const float inv = bad ? NAN : finish_row(s_m[r], l, s_hi[r] > s_lo[r], p.num_splits > 1, &m_store);
    const int64_t orow = s_orow[r];
    for (int d = tid; d < D; d += kThreads) {
      float v = 0.0f;
#pragma unroll
      for (int gg = 0; gg < kGroups; ++gg) v += s_red[gg][r][d];
      v *= inv;
      if (p.num_splits == 1)
        static_cast<T*>(p.out)[orow * D + d] = from_float<T>(v);
      else
        p.partial_out[(split * rows_total + orow) * D + d] = v;
    }
    if (p.num_splits > 1 && tid == 0) {
      p.partial_ml[2 * (split * rows_total + orow)] = bad ? NAN : m_store;
      p.partial_ml[2 * (split * rows_total + orow) + 1] = bad ? NAN : l;
    }
  }
}

template <typename T>
__global__ void merge_kernel(const AttnParams p) {
  const int64_t row = blockIdx.x, rows = p.total_q * p.heads_q;
  float m, l;
  merge_stats(p.partial_ml + 2 * row, rows, p.num_splits, p.exp2_scale, &m, &l);
  for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float v = 0.0f;
    for (int64_t i = 0; i < p.num_splits; ++i) {
      const float* ml = p.partial_ml + 2 * (i * rows + row);
      v += merge_weight(ml[0], ml[1], m, l, p.exp2_scale) * p.partial_out[(i * rows + row) * p.head_dim + d];
    }
    static_cast<T*>(p.out)[row * p.head_dim + d] = from_float<T>(v);
  }
}

template <typename T, int kRows>
void launch_rows(const AttnParams& p, const dim3& grid, cudaStream_t stream) {
  const bool aligned = is_aligned(p.q, 16) && is_aligned(p.k_cache, 16) && is_aligned(p.v_cache, 16);
  if (p.head_dim == 64 && aligned) {
    launch("attention_kernel", attention_kernel<T, 8, true, kRows>, grid, kThreads, 0, stream, p);
  } else if (p.head_dim == 128 && aligned) {
    launch("attention_kernel", attention_kernel<T, 16, true, kRows>, grid, kThreads, 0, stream, p);
  } else {
    launch("attention_kernel", attention_kernel<T, 32, false, kRows>, grid, kThreads, 0, stream,
           p);  // any head_dim <= 256
  }
}

template <typename T>
void launch_attention(const AttnParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_seqs * p.num_splits), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.row_tiles()));
  const int64_t rows = p.max_q_len * p.group();  // rows of the fullest tile, capped at kRowTile
  if (launch_attention_tc<T>(p, grid, stream)) {
    // GQA decode and multi-token queries: tensor cores, paged_tc.cu
  } else if (rows <= 1)
    launch_rows<T, 1>(p, grid, stream);
  else if (rows <= 4)
    launch_rows<T, 4>(p, grid, stream);
  else
    launch_rows<T, kRowTile>(p, grid, stream);
  if (p.num_splits > 1) {
    const int threads = p.head_dim >= 128 ? 128 : (p.head_dim >= 64 ? 64 : 32);
    launch("merge_kernel", merge_kernel<T>, static_cast<unsigned>(p.total_q * p.heads_q), threads, 0, stream, p);
  }
}

// ---- reshape_and_cache / copy_blocks: typeless row copies -----------------------------------
template <typename U>
__global__ void reshape_and_cache_kernel(const U* __restrict__ key, const U* __restrict__ value, U* __restrict__ kc,
                                         U* __restrict__ vc, const int64_t* __restrict__ slots, int64_t row_units,
                                         int64_t num_slots, int* error_flag) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot == -1) return;
  if (slot < 0 || slot >= num_slots) {
    if (threadIdx.x == 0) atomicOr(error_flag, kErrSlot);
    return;
  }
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) {
    kc[slot * row_units + i] = key[t * row_units + i];
    vc[slot * row_units + i] = value[t * row_units + i];
  }
}

template <typename U>
__global__ void copy_blocks_kernel(U* __restrict__ caches, const int64_t* __restrict__ pairs, int64_t num_blocks,
                                   int64_t block_units) {
  const int64_t pair = blockIdx.x, c = blockIdx.y;
  const int64_t src = pairs[2 * pair], dst = pairs[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;  // validated host-side
  U* base = caches + c * num_blocks * block_units;
  for (int64_t i = threadIdx.x; i < block_units; i += blockDim.x) base[dst * block_units + i] = base[src * block_units + i];
}

}  // namespace

void attention_cuda(const AttnParams& p, DType dtype, int device, uintptr_t stream) {
  PYLLMOPS_CHECK(dtype == DType::f16 || dtype == DType::bf16, "paged_attention on CUDA takes float16 or bfloat16, got ",
                 dtype_name(dtype));
  PYLLMOPS_CHECK(p.num_seqs * p.num_splits <= INT32_MAX && p.heads_kv <= 65535 && p.row_tiles() <= 65535,
                 "paged_attention: launch too large (num_seqs * num_splits ", p.num_seqs * p.num_splits,
                 ", kv heads ", p.heads_kv, ", row tiles ", p.row_tiles(), ")");
  CudaDeviceGuard guard(device);
  if (dtype == DType::f16)
    launch_attention<__half>(p, as_stream(stream));
  else
    launch_attention<__nv_bfloat16>(p, as_stream(stream));
}

void reshape_and_cache_cuda(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                            const TensorView& value_cache, const TensorView& slot_mapping, int* error_flag,
                            uintptr_t stream) {
  CudaDeviceGuard guard(key.device);
  const int64_t n = key.size(0);
  PYLLMOPS_CHECK(n <= INT32_MAX, "reshape_and_cache: too many tokens (", n, ")");
  const int64_t row_bytes = key.size(1) * key.size(2) * dtype_size(key.dtype);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const bool vec = row_bytes % 16 == 0 && is_aligned(key.data, 16) && is_aligned(value.data, 16) &&
                   is_aligned(key_cache.data, 16) && is_aligned(value_cache.data, 16);
  const auto* slots = slot_mapping.ptr<const int64_t>();
  if (vec) {
    launch("reshape_and_cache_kernel", reshape_and_cache_kernel<uint4>, static_cast<unsigned>(n), 128, 0,
           as_stream(stream), key.ptr<const uint4>(), value.ptr<const uint4>(), key_cache.ptr<uint4>(),
           value_cache.ptr<uint4>(), slots, row_bytes / 16, num_slots, error_flag);
  } else {
    launch("reshape_and_cache_kernel", reshape_and_cache_kernel<uint16_t>, static_cast<unsigned>(n), 128, 0,
           as_stream(stream), key.ptr<const uint16_t>(), value.ptr<const uint16_t>(), key_cache.ptr<uint16_t>(),
           value_cache.ptr<uint16_t>(), slots, row_bytes / 2, num_slots, error_flag);
  }
}

void copy_blocks_cuda(const TensorView& caches, const TensorView& pairs, uintptr_t stream) {
  CudaDeviceGuard guard(caches.device);
  const int64_t n = pairs.size(0), num_caches = caches.size(0), num_blocks = caches.size(1);
  PYLLMOPS_CHECK(n <= INT32_MAX && num_caches <= 65535, "copy_blocks: launch too large");
  const int64_t block_bytes = caches.numel() / (num_caches * num_blocks) * dtype_size(caches.dtype);
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(num_caches));
  if (block_bytes % 16 == 0 && is_aligned(caches.data, 16)) {
    launch("copy_blocks_kernel", copy_blocks_kernel<uint4>, grid, 256, 0, as_stream(stream), caches.ptr<uint4>(),
           pairs.ptr<const int64_t>(), num_blocks, block_bytes / 16);
  } else {
    PYLLMOPS_CHECK(block_bytes % 2 == 0, "copy_blocks: block of ", block_bytes, " bytes");
    launch("copy_blocks_kernel", copy_blocks_kernel<uint16_t>, grid, 256, 0, as_stream(stream), caches.ptr<uint16_t>(),
           pairs.ptr<const int64_t>(), num_blocks, block_bytes / 2);
  }
}

}  // namespace paged
}  // namespace pyllmops
