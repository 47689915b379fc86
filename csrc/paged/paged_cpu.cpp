// Paged attention, reshape_and_cache and copy_blocks on the CPU.
//
// The same decomposition as paged_cuda.cu (see paged.h): one work item per (sequence, kv head,
// row tile of kRowTile query rows, split); each walks its split's keys in tiles of kKeyTile with the
// online softmax (RowState), reading every K/V row once for the whole row tile, then writes the
// final output (one split) or a normalized fp32 partial + LSE merged afterwards in split order.
// Threads: parallel_for over work items, then over (query, head) rows for the merge.
//
// Napkin math (2 cores): decode at context 4096, 8 kv heads, head_dim 128 in fp32 reads 32 MiB of
// K/V per sequence and does ~2 FLOP per byte: ~10 GB/s of memory per core makes it ~2 ms per
// sequence; the fp32 scalar dot products (~1-2 GFLOP/s per core unvectorized) are of the same order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "common/online_softmax.h"
#include "common/parallel.h"
#include "paged/paged.h"

namespace pyllmops {
namespace paged {

namespace {

// One work item: rows [row_begin, row_end) of sequence s, kv head h, keys of split `split`.
template <typename T>
void attention_item(const AttnParams& p, int64_t s, int64_t h, int64_t tile, int64_t split, float* scratch) {
  const int64_t G = p.group(), D = p.head_dim, BS = p.block_size;
  int64_t q_begin, q_len;
  query_range(p, s, &q_begin, &q_len);
  const int64_t seq_len = p.seq_lens[s];
  const int64_t row_begin = tile * kRowTile, row_end = std::min(q_len * G, row_begin + kRowTile);
  if (row_begin >= row_end) return;
  const int64_t n_rows = row_end - row_begin;
  int64_t kb, ke, sb, se;
  visible_keys(seq_len, q_len, G, row_begin, row_end, p.window_left, &kb, &ke);
  split_keys(kb, ke, BS, split, p.num_splits, &sb, &se);

  float* qf = scratch;                       // [kRowTile][D], pre-scaled into the base-2 domain
  float* acc = qf + kRowTile * D;            // [kRowTile][D]
  float* kv = acc + kRowTile * D;            // [D]
  float* sc = kv + D;                        // [kRowTile][kKeyTile]
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  int64_t q_index[kRowTile], head[kRowTile];
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t row = row_begin + r;
    q_index[r] = q_begin + row / G;
    head[r] = h * G + row % G;
    const T* qr = q + (q_index[r] * p.heads_q + head[r]) * D;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(qr[d]) * p.scale_log2;
  }
  std::fill(acc, acc + kRowTile * D, 0.0f);
  softmax::RowState st[kRowTile];
  const int32_t* table = p.block_tables + s * p.max_blocks;
  auto token_offset = [&](int64_t j) {  // element offset of key j's row for kv head h
    const int64_t blk = table[j / BS];
    return ((blk * BS + j % BS) * p.heads_kv + h) * D;
  };

  for (int64_t t0 = sb; t0 < se; t0 += kKeyTile) {
    const int64_t nt = std::min<int64_t>(kKeyTile, se - t0);
    // scores
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t j = t0 + t;
      const T* kr = kc + token_offset(j);
      for (int64_t d = 0; d < D; ++d) kv[d] = to_float(kr[d]);
      for (int64_t r = 0; r < n_rows; ++r) {
        float dot = 0.0f;
        const float* qr = qf + r * D;
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * kv[d];
        sc[r * kKeyTile + t] = row_sees(seq_len, q_len, G, row_begin + r, j, p.window_left) ? dot : -INFINITY;
      }
    }
    // online softmax update
    for (int64_t r = 0; r < n_rows; ++r) {
      float* sr = sc + r * kKeyTile;
      float mx = -INFINITY;
      for (int64_t t = 0; t < nt; ++t) mx = std::max(mx, sr[t]);
      const float factor = st[r].rescale_to(mx);
      float sum = 0.0f;
      for (int64_t t = 0; t < nt; ++t) {
        sr[t] = softmax::exp2_shifted(sr[t], st[r].m);
        sum += sr[t];
      }
      st[r].l += sum;
      float* ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] *= factor;
    }
    // P V
    for (int64_t t = 0; t < nt; ++t) {
      const T* vr = vc + token_offset(t0 + t);
      for (int64_t d = 0; d < D; ++d) kv[d] = to_float(vr[d]);
      for (int64_t r = 0; r < n_rows; ++r) {
        const float pr = sc[r * kKeyTile + t];
        if (pr == 0.0f) continue;
        float* ar = acc + r * D;
        for (int64_t d = 0; d < D; ++d) ar[d] += pr * kv[d];
      }
    }
  }

  for (int64_t r = 0; r < n_rows; ++r) {
    const float inv = st[r].inv_l();
    const float* ar = acc + r * D;
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + (q_index[r] * p.heads_q + head[r]) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(ar[d] * inv);
    } else {
      const int64_t row = (split * p.total_q + q_index[r]) * p.heads_q + head[r];
      float* o = p.partial_out + row * D;
      for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
      p.partial_lse[row] = st[r].lse_natural();
    }
  }
}

template <typename T>
void merge_splits(const AttnParams& p) {
  const int64_t rows = p.total_q * p.heads_q, D = p.head_dim, stride = rows;
  parallel_for(rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const float total = merged_lse(p.partial_lse + row, stride, p.num_splits);
      T* o = static_cast<T*>(p.out) + row * D;
      for (int64_t d = 0; d < D; ++d) {
        float v = 0.0f;
        for (int64_t i = 0; i < p.num_splits; ++i) {
          const float w = softmax::merge_weight(p.partial_lse[i * stride + row], total);
          v += w == 0.0f ? 0.0f : w * p.partial_out[(i * stride + row) * D + d];
        }
        o[d] = from_float<T>(v);
      }
    }
  });
}

template <typename T>
void attention_impl(const AttnParams& p) {
  const int64_t tiles = p.row_tiles();
  const int64_t items = p.num_seqs * p.heads_kv * tiles * p.num_splits;
  const int64_t scratch_floats = 2 * kRowTile * p.head_dim + p.head_dim + kRowTile * kKeyTile;
  // grain 1: an item is a whole split of a sequence (>= one key tile of work when non-empty).
  parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t split = i % p.num_splits;
      const int64_t tile = (i / p.num_splits) % tiles;
      const int64_t h = (i / (p.num_splits * tiles)) % p.heads_kv;
      const int64_t s = i / (p.num_splits * tiles * p.heads_kv);
      attention_item<T>(p, s, h, tile, split, scratch.data());
    }
  });
  if (p.num_splits > 1) merge_splits<T>(p);
}

}  // namespace

void validate_metadata_cpu(const AttnParams& p) {
  if (p.cu_seqlens_q != nullptr) {
    PYLLMOPS_CHECK(p.cu_seqlens_q[0] == 0, "cu_seqlens_q[0] must be 0, got ", p.cu_seqlens_q[0]);
    PYLLMOPS_CHECK(p.cu_seqlens_q[p.num_seqs] == p.total_q, "cu_seqlens_q[-1] must equal the number of queries ",
                   p.total_q, ", got ", p.cu_seqlens_q[p.num_seqs]);
  }
  const int64_t capacity = p.max_blocks * p.block_size;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    int64_t q_begin, q_len;
    query_range(p, s, &q_begin, &q_len);
    const int64_t seq_len = p.seq_lens[s];
    PYLLMOPS_CHECK(q_len >= 0, "cu_seqlens_q must be non-decreasing, but sequence ", s, " has ", q_len, " queries");
    PYLLMOPS_CHECK(q_len <= p.max_q_len, "sequence ", s, " has ", q_len, " queries, more than max_seqlen_q ",
                   p.max_q_len);
    PYLLMOPS_CHECK(seq_len >= 0 && seq_len <= capacity, "seq_lens[", s, "] = ", seq_len,
                   " is outside [0, ", capacity, "] (the block table holds ", p.max_blocks, " blocks of ",
                   p.block_size, ")");
    PYLLMOPS_CHECK(q_len <= seq_len, "sequence ", s, " has ", q_len, " queries but seq_lens[", s, "] = ", seq_len,
                   " keys (the queries are the last q_len positions, so q_len <= seq_len)");
    if (q_len == 0) continue;
    int64_t kb, ke;
    visible_keys(seq_len, q_len, p.group(), 0, q_len * p.group(), p.window_left, &kb, &ke);
    const int32_t* table = p.block_tables + s * p.max_blocks;
    for (int64_t b = kb / p.block_size; b < (ke + p.block_size - 1) / p.block_size; ++b)
      PYLLMOPS_CHECK(table[b] >= 0 && table[b] < p.num_blocks, "block_tables[", s, ", ", b, "] = ", table[b],
                     " is outside [0, ", p.num_blocks, ") (the cache has ", p.num_blocks, " blocks)");
  }
}

void attention_cpu(const AttnParams& p, DType dtype) {
  validate_metadata_cpu(p);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] { attention_impl<scalar_t>(p); });
}

void reshape_and_cache_cpu(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                           const TensorView& value_cache, const TensorView& slot_mapping) {
  const int64_t n = slot_mapping.numel();
  const int64_t slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slot = slot_mapping.ptr<const int64_t>();
  for (int64_t t = 0; t < n; ++t)  // check every slot before writing any
    PYLLMOPS_CHECK(slot[t] >= -1 && slot[t] < slots, "slot_mapping[", t, "] = ", slot[t], " is outside [-1, ",
                   slots, ") (num_blocks * block_size)");
  const int64_t row_bytes = key.numel() / std::max<int64_t>(n, 1) * dtype_size(key.dtype);
  const char* k = static_cast<const char*>(key.data);
  const char* v = static_cast<const char*>(value.data);
  char* kc = static_cast<char*>(key_cache.data);
  char* vc = static_cast<char*>(value_cache.data);
  parallel_for(n, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (slot[t] < 0) continue;
      std::memcpy(kc + slot[t] * row_bytes, k + t * row_bytes, row_bytes);
      std::memcpy(vc + slot[t] * row_bytes, v + t * row_bytes, row_bytes);
    }
  });
}

void copy_blocks_cpu(const TensorView& caches, const TensorView& pairs) {
  const int64_t n = pairs.size(0), num_caches = caches.size(0), num_blocks = caches.size(1);
  const int64_t* pr = pairs.ptr<const int64_t>();
  for (int64_t i = 0; i < 2 * n; ++i)
    PYLLMOPS_CHECK(pr[i] >= 0 && pr[i] < num_blocks, "block pair entry ", i / 2, " has block ", pr[i],
                   " outside [0, ", num_blocks, ")");
  const int64_t block_bytes = caches.numel() / std::max<int64_t>(num_caches * num_blocks, 1) * dtype_size(caches.dtype);
  char* base = static_cast<char*>(caches.data);
  parallel_for(num_caches * n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      char* c = base + (i / n) * num_blocks * block_bytes;
      const int64_t src = pr[2 * (i % n)], dst = pr[2 * (i % n) + 1];
      std::memcpy(c + dst * block_bytes, c + src * block_bytes, block_bytes);
    }
  });
}

}  // namespace paged
}  // namespace pyllmops
