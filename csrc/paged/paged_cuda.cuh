// Device helpers shared by the two paged-attention kernels (paged_cuda.cu: CUDA-core kernel for any
// dtype pairing and head dim; paged_tc.cu: tensor-core kernel for GQA decode and multi-token queries): the work item of a CTA
// (paged.h's decomposition), the output row of a tile row, and the NaN rows written for bad metadata.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "paged/paged.h"

namespace pyllmops {
namespace paged {

// One CTA's work item: (sequence x split = blockIdx.x, kv head = blockIdx.y, row tile = blockIdx.z).
struct WorkItem {
  int64_t s, split, h, q_begin, q_len, seq_len, row_begin;
  int n_rows;  // rows of the tile that exist (0: nothing to do, the CTA returns)
  bool ok;     // the sequence's metadata is usable (else: NaN rows + kErrSeqLen, the cache is never read)
};

// The few divisions here run once per CTA, in 32 bits.
__device__ __forceinline__ WorkItem work_item(const AttnParams& p) {
  WorkItem w;
  w.s = blockIdx.x / static_cast<uint32_t>(p.num_splits);
  w.split = blockIdx.x - w.s * p.num_splits;
  w.h = blockIdx.y;
  query_range(p, w.s, &w.q_begin, &w.q_len);
  w.seq_len = p.seq_lens[w.s];
  w.ok = seq_ok(p, w.seq_len, w.q_len) && w.q_len <= p.max_q_len && w.q_begin >= 0 &&
         w.q_begin + w.q_len <= p.total_q;
  const int64_t q_len_c = w.ok ? w.q_len : (w.q_len < 0 ? 0 : (w.q_len > p.max_q_len ? p.max_q_len : w.q_len));
  w.row_begin = static_cast<int64_t>(blockIdx.z) * kRowTile;
  const int64_t rows = q_len_c * p.group();
  const int64_t row_end = rows < w.row_begin + kRowTile ? rows : w.row_begin + kRowTile;
  w.n_rows = w.row_begin < row_end ? static_cast<int>(row_end - w.row_begin) : 0;
  return w;
}

// Row `r` of the tile as a (query, head) row of q / out: query r / group, head h * group + r % group.
__device__ __forceinline__ int64_t out_row(const AttnParams& p, const WorkItem& w, int r) {
  const uint32_t row = static_cast<uint32_t>(w.row_begin + r), g32 = static_cast<uint32_t>(p.group());
  const uint32_t qi = row / g32;
  return (w.q_begin + qi) * p.heads_q + w.h * g32 + (row - qi * g32);
}

// Bad metadata: never read the cache; the item's rows (where addressable) become NaN.
template <typename T>
__device__ void write_nan_rows(const AttnParams& p, const WorkItem& w) {
  const int64_t rows_total = p.total_q * p.heads_q;
  if (threadIdx.x == 0) atomicOr(p.error_flag, kErrSeqLen);
  for (int r = 0; r < w.n_rows; ++r) {
    const int64_t orow = out_row(p, w, r);
    if (orow < 0 || orow >= rows_total) continue;
    for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
      if (p.num_splits == 1)
        static_cast<T*>(p.out)[orow * p.head_dim + d] = from_float<T>(NAN);
      else
        p.partial_out[(w.split * rows_total + orow) * p.head_dim + d] = NAN;
    }
    if (p.num_splits > 1 && threadIdx.x == 0) {
      p.partial_ml[2 * (w.split * rows_total + orow)] = NAN;
      p.partial_ml[2 * (w.split * rows_total + orow) + 1] = NAN;
    }
  }
}

// Launches the tensor-core kernel (paged_tc.cu) when it serves p: float16 / bfloat16, head_dim % 8 == 0,
// 16-byte aligned q / caches / out, and decode with GQA group >= 4 or multi-token queries (any group; a row
// tile then holds the rows of one or several consecutive queries). Returns false otherwise.
template <typename T>
bool launch_attention_tc(const AttnParams& p, const dim3& grid, cudaStream_t stream);

}  // namespace paged
}  // namespace pyllmops
