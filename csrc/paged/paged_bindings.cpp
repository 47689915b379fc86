// Python bindings of the paged KV-cache kernels (csrc/paged/paged.h). Checks everything a kernel
// relies on (dtypes, contiguity, devices, sizes) and throws; on CPU tensors it also validates the
// block tables / seq_lens / cu_seqlens_q / slots before any kernel reads memory. On CUDA those live
// on the device: the kernels bounds-check them, skip what is out of range and raise error bits.
#include <algorithm>
#include <cmath>

#include "bindings.h"
#include "paged/paged.h"

using pyllmops::DType;
using pyllmops::TensorView;
using pyllmops::bind::OptView;
using pyllmops::bind::check_float_dtype;
using pyllmops::bind::check_input;
namespace paged = pyllmops::paged;

namespace {

void check_cache_pair(const TensorView& key_cache, const TensorView& value_cache) {
  check_float_dtype(key_cache, "key_cache");
  check_input(key_cache, key_cache, "key_cache", "key_cache");
  check_input(value_cache, key_cache, "value_cache", "key_cache");
  PYLLMOPS_CHECK(key_cache.dim() == 4, "key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], got ",
                 key_cache.dim(), "-D");
  PYLLMOPS_CHECK(value_cache.shape == key_cache.shape && value_cache.dtype == key_cache.dtype,
                 "value_cache must have key_cache's shape and dtype");
  const int64_t bs = key_cache.size(1);
  PYLLMOPS_CHECK(bs >= paged::kMinBlockSize && bs <= paged::kMaxBlockSize && (bs & (bs - 1)) == 0,
                 "block_size must be a power of two in [", paged::kMinBlockSize, ", ", paged::kMaxBlockSize,
                 "], got ", bs);
  PYLLMOPS_CHECK(key_cache.size(3) >= 1 && key_cache.size(3) <= paged::kMaxHeadDim, "head_dim must be in [1, ",
                 paged::kMaxHeadDim, "], got ", key_cache.size(3));
}

// The int32 error word CUDA kernels raise bits in; required for CUDA tensors, unused on the CPU.
int* flag_ptr(const OptView& flag, const TensorView& ref) {
  if (!ref.is_cuda()) return nullptr;
  PYLLMOPS_CHECK(flag.has_value(), "error_flag is required for CUDA tensors");
  check_input(*flag, ref, "error_flag", "the cache");
  pyllmops::check_dtype(*flag, DType::i32, "error_flag");
  pyllmops::check_min_numel(*flag, 1, "error_flag");
  return flag->ptr<int>();
}

// Whether the bytes of two contiguous views overlap.
bool overlaps(const TensorView& a, const TensorView& b) {
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  const int64_t na = a.numel() * pyllmops::dtype_size(a.dtype), nb = b.numel() * pyllmops::dtype_size(b.dtype);
  return na > 0 && nb > 0 && a0 < b0 + nb && b0 < a0 + na;
}

void paged_reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                             const TensorView& value_cache, const TensorView& slot_mapping, const OptView& error_flag,
                             uintptr_t stream) {
  check_cache_pair(key_cache, value_cache);
  check_input(key, key_cache, "key", "key_cache");
  check_input(value, key_cache, "value", "key_cache");
  check_input(slot_mapping, key_cache, "slot_mapping", "key_cache");
  pyllmops::check_dtype(slot_mapping, DType::i64, "slot_mapping");
  PYLLMOPS_CHECK(key.dim() == 3 && value.shape == key.shape, "key and value must be 3-D of one shape");
  PYLLMOPS_CHECK(key.dtype == key_cache.dtype && value.dtype == key_cache.dtype,
                 "key and value must have the cache's dtype ", pyllmops::dtype_name(key_cache.dtype));
  PYLLMOPS_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3), "key is [", key.size(0), ", ",
                 key.size(1), ", ", key.size(2), "] but the cache holds ", key_cache.size(2), " heads of ",
                 key_cache.size(3));
  PYLLMOPS_CHECK(slot_mapping.numel() == key.size(0), "slot_mapping has ", slot_mapping.numel(),
                 " entries, expected one per token (", key.size(0), ")");
  PYLLMOPS_CHECK(!overlaps(key_cache, value_cache), "key_cache and value_cache share memory (the values would "
                 "overwrite the keys); pass two separate caches");
  PYLLMOPS_CHECK(!overlaps(key, key_cache) && !overlaps(key, value_cache) && !overlaps(value, key_cache) &&
                     !overlaps(value, value_cache),
                 "key / value share memory with a cache they are written into; pass separate tensors");
  if (key.size(0) == 0) return;
  int* flag = flag_ptr(error_flag, key_cache);
  (void)flag;  // used by the CUDA branch only
  PYLLMOPS_ON_DEVICE(key, "reshape_and_cache",
                     paged::reshape_and_cache_cpu(key, value, key_cache, value_cache, slot_mapping),
                     paged::reshape_and_cache_cuda(key, value, key_cache, value_cache, slot_mapping, flag, stream));
}

void paged_copy_blocks(const TensorView& caches, const TensorView& pairs, uintptr_t stream) {
  check_float_dtype(caches, "caches");
  check_input(caches, caches, "caches", "caches");
  check_input(pairs, caches, "pairs", "caches");
  pyllmops::check_dtype(pairs, DType::i64, "pairs");
  PYLLMOPS_CHECK(caches.dim() >= 3, "caches must be [num_caches, num_blocks, ...], got ", caches.dim(), "-D");
  PYLLMOPS_CHECK(pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be [n, 2]");
  if (pairs.size(0) == 0 || caches.numel() == 0) return;
  PYLLMOPS_ON_DEVICE(caches, "copy_blocks", paged::copy_blocks_cpu(caches, pairs),
                     paged::copy_blocks_cuda(caches, pairs, stream));
}

void paged_attention(const TensorView& q, const TensorView& key_cache, const TensorView& value_cache,
                     const TensorView& block_tables, const TensorView& seq_lens, const OptView& cu_seqlens_q,
                     const TensorView& out, const OptView& partial_out, const OptView& partial_ml,
                     const OptView& error_flag, double softmax_scale, double softcap, int64_t window_left,
                     int64_t max_q_len, int64_t num_splits, uintptr_t stream) {
  check_cache_pair(key_cache, value_cache);
  check_input(q, key_cache, "q", "key_cache");
  check_input(out, key_cache, "out", "key_cache");
  check_input(block_tables, key_cache, "block_tables", "key_cache");
  check_input(seq_lens, key_cache, "seq_lens", "key_cache");
  PYLLMOPS_CHECK(q.dtype == key_cache.dtype && out.dtype == q.dtype, "q, out and the caches must share one dtype");
  PYLLMOPS_CHECK(q.dim() == 3 && out.shape == q.shape, "q must be 3-D [total_q, heads_q, head_dim] and out like q");
  pyllmops::check_dtype(block_tables, DType::i32, "block_tables");
  pyllmops::check_dtype(seq_lens, DType::i32, "seq_lens");
  PYLLMOPS_CHECK(block_tables.dim() == 2 && seq_lens.dim() == 1 && seq_lens.size(0) == block_tables.size(0),
                 "block_tables must be [num_seqs, max_blocks] and seq_lens [num_seqs]");
  paged::AttnParams p;
  p.num_seqs = seq_lens.size(0);
  p.total_q = q.size(0);
  p.heads_q = q.size(1);
  p.head_dim = q.size(2);
  p.num_blocks = key_cache.size(0);
  p.block_size = key_cache.size(1);
  p.heads_kv = key_cache.size(2);
  p.max_blocks = block_tables.size(1);
  PYLLMOPS_CHECK(key_cache.size(3) == p.head_dim, "q has head_dim ", p.head_dim, " but the cache ", key_cache.size(3));
  PYLLMOPS_CHECK(p.heads_q <= INT32_MAX, "q has ", p.heads_q, " heads, at most ", INT32_MAX, " supported");
  PYLLMOPS_CHECK(p.heads_kv >= 1 && p.heads_q % p.heads_kv == 0, "heads_q (", p.heads_q,
                 ") must be a multiple of num_kv_heads (", p.heads_kv, ")");
  PYLLMOPS_CHECK(window_left >= -1, "window_left must be -1 (unbounded) or >= 0, got ", window_left);
  // A window at least the table's capacity is unbounded (no key position reaches it): clamp, no overflow.
  if (window_left >= p.max_blocks * p.block_size || window_left > INT32_MAX) window_left = -1;
  PYLLMOPS_CHECK(num_splits >= 1 && num_splits <= paged::kMaxSplits, "num_splits must be in [1, ", paged::kMaxSplits,
                 "], got ", num_splits);
  PYLLMOPS_CHECK(max_q_len >= 1 && max_q_len <= std::max<int64_t>(p.total_q, 1), "max_seqlen_q must be in [1, ",
                 std::max<int64_t>(p.total_q, 1), "] (no sequence has more queries than q has rows), got ", max_q_len);
  // Scores stay unscaled (paged.h "Score domain"): the scale multiplies x - m <= 0 and must be a
  // positive finite float32, as must the softcap and softmax_scale / softcap.
  const float scale_f = static_cast<float>(softmax_scale);
  PYLLMOPS_CHECK(scale_f > 0.0f && std::isfinite(scale_f) && std::isfinite(static_cast<float>(softmax_scale * pyllmops::softmax::kLog2e)),
                 "softmax_scale must be positive and finite in float32 (at most ~2.3e38), got ", softmax_scale);
  PYLLMOPS_CHECK(softcap == 0.0 || (static_cast<float>(softcap) > 0.0f && std::isfinite(static_cast<float>(softcap)) &&
                                    std::isfinite(static_cast<float>(softmax_scale / softcap)) &&
                                    static_cast<float>(softmax_scale / softcap) > 0.0f),
                 "softcap must be 0 (off) or positive with softmax_scale / softcap finite and nonzero in float32, got "
                 "softcap ", softcap, " with softmax_scale ", softmax_scale);
  if (cu_seqlens_q) {
    check_input(*cu_seqlens_q, key_cache, "cu_seqlens_q", "key_cache");
    pyllmops::check_dtype(*cu_seqlens_q, DType::i32, "cu_seqlens_q");
    PYLLMOPS_CHECK(cu_seqlens_q->numel() == p.num_seqs + 1, "cu_seqlens_q must have num_seqs + 1 = ", p.num_seqs + 1,
                   " entries, got ", cu_seqlens_q->numel());
    p.cu_seqlens_q = cu_seqlens_q->ptr<const int32_t>();
  } else {
    PYLLMOPS_CHECK(p.total_q == p.num_seqs && max_q_len == 1, "decode (no cu_seqlens_q) takes one query per sequence: "
                   "q has ", p.total_q, " rows for ", p.num_seqs, " sequences");
  }
  if (num_splits > 1) {
    PYLLMOPS_CHECK(partial_out && partial_ml, "num_splits > 1 needs partial_out and partial_ml");
    check_input(*partial_out, key_cache, "partial_out", "key_cache");
    check_input(*partial_ml, key_cache, "partial_ml", "key_cache");
    pyllmops::check_dtype(*partial_out, DType::f32, "partial_out");
    pyllmops::check_dtype(*partial_ml, DType::f32, "partial_ml");
    pyllmops::check_min_numel(*partial_out, num_splits * q.numel(), "partial_out");
    pyllmops::check_min_numel(*partial_ml, 2 * num_splits * p.total_q * p.heads_q, "partial_ml");
    p.partial_out = partial_out->ptr<float>();
    p.partial_ml = partial_ml->ptr<float>();
  }
  p.q = q.data;
  p.k_cache = key_cache.data;
  p.v_cache = value_cache.data;
  p.block_tables = block_tables.ptr<const int32_t>();
  p.seq_lens = seq_lens.ptr<const int32_t>();
  p.out = out.data;
  p.max_q_len = max_q_len;
  p.num_splits = num_splits;
  p.window_left = static_cast<int>(window_left);
  p.log2_block_size = __builtin_ctzll(static_cast<unsigned long long>(p.block_size));
  p.softcap = static_cast<float>(softcap);
  p.cap_scale = softcap > 0.0 ? static_cast<float>(softmax_scale / softcap) : 0.0f;
  p.exp2_scale = softcap > 0.0 ? pyllmops::softmax::kLog2e
                               : static_cast<float>(softmax_scale * pyllmops::softmax::kLog2e);
  if (p.total_q == 0 || p.num_seqs == 0 || p.heads_q == 0) return;  // no output row: nothing to launch
  p.error_flag = flag_ptr(error_flag, key_cache);
  PYLLMOPS_ON_DEVICE(q, "paged_attention", paged::attention_cpu(p, q.dtype), paged::attention_cuda(p, q.dtype, q.device, stream));
}

}  // namespace

void register_paged(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_reshape_and_cache", &paged_reshape_and_cache, nogil);
  m.def("paged_copy_blocks", &paged_copy_blocks, nogil);
  m.def("paged_attention", &paged_attention, nogil);
}
