// Paged KV cache and paged attention (vLLM-style block tables), shared by the CPU and CUDA kernels.
//
// Storage. Per layer, K and V pools [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
// logical token t lives in physical block block_table[t / block_size] at offset t % block_size,
// i.e. slot = block * block_size + offset. block_size is a power of two in [8, 256].
//
// Attention. Sequence s has seq_len keys (positions 0..seq_len-1) and q_len queries (1 for decode;
// cu_seqlens_q[s+1] - cu_seqlens_q[s] for multi-token queries), the last at position seq_len - 1:
// query i sits at p = seq_len - q_len + i and sees keys j with max(0, p - window_left) <= j <= p
// (window_left = -1: unbounded). A query that sees no key outputs 0 (never NaN).
//
// Work decomposition (identical on CPU and CUDA):
//   * rows: the q_len * group query rows of one (sequence, kv head), row r = query (r / group),
//     query head kv_head * group + r % group; cut into tiles of kRowTile rows. One work item reads
//     each K/V element it needs once for the whole tile, so a KV head is read once per GQA group
//     (decode with group <= kRowTile), not once per query head.
//   * keys: the blocks any row of the sequence can see, [first_block, last_block), cut into
//     num_splits contiguous chunks (split-KV / flash-decoding); blocks wholly outside every row's
//     window are never touched. Each split walks its keys in tiles of kKeyTile tokens with the
//     online softmax (common/online_softmax.h) and writes a normalized partial output plus its LSE;
//     a second pass merges the splits with softmax::merge_weight in a fixed order (deterministic).
//     With num_splits == 1 the split writes the final output directly.
//   * num_splits is a function of host-side sizes only (ops/paged.py: plan_num_splits), and the
//     fp32 partial workspaces are allocated by Python, so a decode step is CUDA-graph capturable.
//
// Napkin math (decode, bf16, head_dim 128, GQA group 8, context 4096): per (seq, kv head) the kernel
// reads 2 * 4096 * 128 * 2 B = 2 MiB of K/V and does 2 * 8 * 4096 * 128 * 2 = 17 MFLOP, i.e. ~8
// FLOP/byte: far below an H100's ~20 (CUDA-core fp32) FLOP/byte, so decode is bound by HBM
// bandwidth (~3.3 TB/s): "fast" means near the device-copy rate counted over K/V bytes actually read.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/online_softmax.h"
#include "common/tensor.h"

namespace pyllmops {
namespace paged {

constexpr int kMinBlockSize = 8;
constexpr int kMaxBlockSize = 256;
constexpr int kMaxHeadDim = 256;
constexpr int kRowTile = 8;    // query rows per work item (GQA group of a decode step fits in one)
constexpr int kKeyTile = 64;   // keys per online-softmax step
constexpr int kMaxSplits = 64;

// Error bits a CUDA kernel raises (atomicOr into an int32 flag) instead of reading out of bounds.
constexpr int kErrBlockIndex = 1;  // a visible block-table entry outside [0, num_blocks)
constexpr int kErrSeqLen = 2;      // seq_len < 0, > table capacity, or < q_len
constexpr int kErrSlot = 4;        // reshape_and_cache slot outside [-1, num_blocks * block_size)

// Everything the attention kernels need, as plain pointers and sizes (no TensorView on the device).
//
// Score domain. A kernel keeps each row's scores as x = q.k (softcap == 0) or
// x = softcap * tanh(q.k * cap_scale) with cap_scale = softmax_scale / softcap (logit softcap), and the
// row statistics (running max m, running sum l) in that domain; probabilities are
// exp2((x - m) * exp2_scale) with exp2_scale = softmax_scale * log2(e) (softcap == 0) or log2(e).
// The scale multiplies a difference that is <= 0, so no scale that is finite in float32 can overflow
// a score (softmax_scale = 1e38 gives the hard maximum, as in float64), and the split partials keep
// (m, l) rather than an LSE that would overflow.
struct AttnParams {
  const void* q = nullptr;            // [total_q, heads_q, head_dim], contiguous
  const void* k_cache = nullptr;      // [num_blocks, block_size, heads_kv, head_dim], contiguous
  const void* v_cache = nullptr;
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks]
  const int32_t* seq_lens = nullptr;      // [num_seqs]
  const int32_t* cu_seqlens_q = nullptr;  // [num_seqs + 1] or null (decode: one query per sequence)
  void* out = nullptr;                // [total_q, heads_q, head_dim]
  float* partial_out = nullptr;       // [num_splits, total_q, heads_q, head_dim] (num_splits > 1)
  float* partial_ml = nullptr;        // [num_splits, total_q, heads_q, 2]: each split's (m, l) of a row
  int* error_flag = nullptr;          // CUDA only: bits above; null on the CPU (which throws instead)
  int64_t num_seqs = 0, total_q = 0, max_q_len = 1;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t num_blocks = 0, block_size = 0, max_blocks = 0;
  int64_t num_splits = 1;
  int window_left = -1;               // -1: unbounded (the binding clamps windows >= the table's capacity)
  int log2_block_size = 0;            // block_size = 1 << log2_block_size (index math by shift and mask)
  float exp2_scale = 0.0f;            // see "Score domain"
  float softcap = 0.0f;               // 0: off
  float cap_scale = 0.0f;             // softmax_scale / softcap (softcap > 0)

  // 32-bit division (the binding checks heads_q <= INT32_MAX): no 64-bit division routine on CUDA.
  PYLLMOPS_HD int64_t group() const { return static_cast<uint32_t>(heads_q) / static_cast<uint32_t>(heads_kv); }
  PYLLMOPS_HD int64_t row_tiles() const { return (max_q_len * group() + kRowTile - 1) / kRowTile; }
};

// A score from a raw dot product q.k (see "Score domain").
PYLLMOPS_HD float score_of(const AttnParams& p, float dot) {
  if (p.softcap > 0.0f) {
#if defined(__CUDA_ARCH__)
    return p.softcap * tanhf(dot * p.cap_scale);
#else
    return p.softcap * std::tanh(dot * p.cap_scale);
#endif
  }
  return dot;
}

// The queries of sequence s: [q_begin, q_begin + q_len).
PYLLMOPS_HD void query_range(const AttnParams& p, int64_t s, int64_t* q_begin, int64_t* q_len) {
  if (p.cu_seqlens_q == nullptr) {
    *q_begin = s;
    *q_len = 1;
  } else {
    *q_begin = p.cu_seqlens_q[s];
    *q_len = static_cast<int64_t>(p.cu_seqlens_q[s + 1]) - p.cu_seqlens_q[s];
  }
}

// First key position query at position `pos` may see.
PYLLMOPS_HD int64_t first_visible_key(int64_t pos, int window_left) {
  if (window_left < 0) return 0;
  const int64_t lo = pos - window_left;
  return lo > 0 ? lo : 0;
}

// Keys [key_begin, key_end) that the rows [row_begin, row_end) of a sequence can see (rows are
// ordered query-major: row r is query r / group). Empty when the rows see nothing. Divisions are
// 32-bit (rows < 2^31: the binding bounds max_seqlen_q by total_q, and CUDA launches at most 65535
// row tiles; positions < 2^31: seq_lens are int32), so no 64-bit division routine is called.
PYLLMOPS_HD void visible_keys(int64_t seq_len, int64_t q_len, int64_t group, int64_t row_begin, int64_t row_end,
                              int window_left, int64_t* key_begin, int64_t* key_end) {
  const uint32_t g = static_cast<uint32_t>(group);
  const int64_t first_q = static_cast<uint32_t>(row_begin) / g, last_q = static_cast<uint32_t>(row_end - 1) / g;
  const int64_t first_pos = seq_len - q_len + first_q, last_pos = seq_len - q_len + last_q;
  *key_begin = first_visible_key(first_pos, window_left);
  *key_end = last_pos + 1;  // causal: the last row sees up to its own position
  if (*key_end > seq_len) *key_end = seq_len;
  if (*key_end < *key_begin) *key_end = *key_begin;
}

// The key range of split `split` out of `num_splits` over [key_begin, key_end), cut on block
// boundaries (block_size = 1 << log2_bs) so that no block is read by two splits.
PYLLMOPS_HD void split_keys(int64_t key_begin, int64_t key_end, int log2_bs, int64_t split, int64_t num_splits,
                            int64_t* split_begin, int64_t* split_end) {
  if (key_end <= key_begin) {
    *split_begin = *split_end = key_begin;
    return;
  }
  const int64_t bs = int64_t{1} << log2_bs;
  const int64_t b0 = key_begin >> log2_bs, b1 = (key_end + bs - 1) >> log2_bs;
  const int64_t per = static_cast<uint32_t>(b1 - b0 + num_splits - 1) / static_cast<uint32_t>(num_splits);
  int64_t lo = (b0 + split * per) << log2_bs, hi = (b0 + (split + 1) * per) << log2_bs;
  if (lo < key_begin) lo = key_begin;
  if (hi > key_end) hi = key_end;
  if (hi < lo) hi = lo;
  *split_begin = lo;
  *split_end = hi;
}

// Keys [lo, hi) row `row` sees (row r is query r / group of a sequence with q_len queries and
// seq_len keys). Called once per row, outside every key loop (the one division is here).
PYLLMOPS_HD void row_key_bounds(int64_t seq_len, int64_t q_len, int64_t group, int64_t row, int window_left,
                                int64_t* lo, int64_t* hi) {
  const int64_t pos = seq_len - q_len + static_cast<uint32_t>(row) / static_cast<uint32_t>(group);
  *lo = first_visible_key(pos, window_left);
  *hi = pos + 1;
}

// Whether sequence s's sizes are usable (checked host-side on the CPU; flagged and skipped on CUDA).
PYLLMOPS_HD bool seq_ok(const AttnParams& p, int64_t seq_len, int64_t q_len) {
  return seq_len >= 0 && q_len >= 0 && q_len <= seq_len && seq_len <= p.max_blocks * p.block_size;
}

// End of a row's walk over one split's keys: returns the factor its accumulator is multiplied by and sets
// *m_store, the m its split partial records (num_splits > 1). l > 0: 1 / l. NaN l: NaN. A row that saw no
// key: 0, m = -inf (weighs nothing in the merge). A row that saw keys whose scores were all -inf (l = 0):
// with one split 0/0 = NaN, as in float64; as a split partial the raw accumulator, 0 x V (0, or NaN where
// a visible V is inf / NaN), with m = kAllNegInf, a finite stand-in for -inf that merge_weight gives
// weight 0: those NaNs reach the row as 0 * inf does in float64 (dropping the split would drop them), and
// a row whose every split saw only -inf scores or nothing (l_tot = 0, finite m_tot) is 0/0 = NaN.
constexpr float kAllNegInf = -3.402823466e38f;  // -FLT_MAX
PYLLMOPS_HD float finish_row(float m, float l, bool saw, bool split, float* m_store) {
  *m_store = m;
  if (l > 0.0f) return 1.0f / l;
  if (l != l) return NAN;
  if (!saw) return 0.0f;
  if (!split) return NAN;
  *m_store = kAllNegInf;
  return 1.0f;
}

// Split-KV merge of n partials of one row (split i: statistics (m_i, l_i) at ml[2 * i * stride],
// normalized output o_i; see finish_row). Sets *m_tot (NaN-propagating max of the m_i) and *l_tot; partial i then
// weighs merge_weight(...). NaN in any m_i or l_i (NaN input, or a split that met bad metadata on
// CUDA) makes the row NaN, never a plausible number built from the other splits. Fixed order:
// deterministic.
PYLLMOPS_HD void merge_stats(const float* ml, int64_t stride, int64_t n, float exp2_scale, float* m_tot,
                             float* l_tot) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = softmax::nan_max(ml[2 * i * stride], mx);
  float l = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float mi = ml[2 * i * stride], li = ml[2 * i * stride + 1];
    l += li != li ? li : (mi == -INFINITY ? 0.0f : li * softmax::fast_exp2((mi - mx) * exp2_scale));
  }
  *m_tot = mx;
  *l_tot = l;
}

// Weight of partial (m_i, l_i) in a merge with totals (m, l): l_i * 2^((m_i - m) * s) / l. The output
// is sum_i weight_i * o_i over every split (a weight 0 times a NaN partial is NaN, as in float64). An
// empty partial (m_i = -inf) weighs 0 unless the row is NaN; a row whose every split is empty weighs 0
// (output 0); a row with l = 0 and a finite m saw only -inf scores (finish_row): NaN, 0/0.
PYLLMOPS_HD float merge_weight(float mi, float li, float m, float l, float exp2_scale) {
  if (m != m || l != l) return NAN;
  if (!(l > 0.0f)) return m == -INFINITY ? 0.0f : NAN;
  if (mi == -INFINITY) return 0.0f;
  return li * softmax::fast_exp2((mi - m) * exp2_scale) / l;
}

// ---- kernel entry points (paged_bindings.cpp checks views, then calls these) -------------------
// reshape_and_cache: key/value [num_tokens, heads_kv, head_dim] -> caches at slot_mapping (int64,
// -1 = skip). CPU throws on a slot out of range (before writing anything); CUDA skips it and raises
// kErrSlot in error_flag.
void reshape_and_cache_cpu(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                           const TensorView& value_cache, const TensorView& slot_mapping);
void reshape_and_cache_cuda(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                            const TensorView& value_cache, const TensorView& slot_mapping, int* error_flag,
                            uintptr_t stream);

// copy_blocks: caches [num_caches, num_blocks, block_elems...] (all layers' K and V pools in one
// tensor); pairs int64 [n, 2] of (src, dst) blocks, copied in every cache by one launch.
void copy_blocks_cpu(const TensorView& caches, const TensorView& pairs);
void copy_blocks_cuda(const TensorView& caches, const TensorView& pairs, uintptr_t stream);

// paged attention: p filled by the binding; dtype of q / caches / out.
void attention_cpu(const AttnParams& p, DType dtype);
void attention_cuda(const AttnParams& p, DType dtype, int device, uintptr_t stream);

// Host-side validation of block tables, seq_lens and cu_seqlens_q (CPU tensors): throws ValueError
// naming the sequence and value. Checks only the table entries some row can see.
void validate_metadata_cpu(const AttnParams& p);

}  // namespace paged
}  // namespace pyllmops
