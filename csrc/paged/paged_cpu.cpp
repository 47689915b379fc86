// Paged attention, reshape_and_cache and copy_blocks on the CPU.
//
// The same decomposition as paged_cuda.cu (see paged.h): one work item per (sequence, kv head,
// row tile of kRowTile query rows, split); each walks its split's keys in tiles of kKeyTile with the
// online softmax, reading every K/V row once for the whole row tile (so once per GQA group), then
// writes the final output (one split) or a normalized fp32 partial + its (m, l) merged afterwards
// in split order. The work item (paged_cpu_kernel.inc) is compiled three times: AVX-512
// (avx512f/bw/vl, 16 lanes), AVX2 + FMA + F16C (8 lanes) and portable scalar code; the first one
// the CPU supports is picked at run time (PYLLMOPS_PAGED_ISA=avx512|avx2|scalar forces one, for
// tests and benchmarks). Threads: parallel_for over work items, then over rows for the merge.
//
// Napkin math (2 cores): decode at context 4096, 8 kv heads, head_dim 128 in fp32 reads 32 MiB of
// K/V per sequence and does 2 FLOP per K/V element per query row: with GQA 8 that is 16 FLOP per
// 4-byte element, ~64 GFLOP/s per core with AVX-512 FMA against ~10 GB/s of memory per core: still
// memory-bound, which is why every K/V row is read once per group and the exp2 is vectorized
// (a scalar exp2 per score would cost as much as the dot products at GQA 8).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/online_softmax.h"
#include "common/parallel.h"
#include "paged/paged.h"

namespace pyllmops {
namespace paged {

namespace {

// exp2(x) on x <= 0 (or NaN): 2^n * poly(f), n = round(x), f = x - n in [-1/2, 1/2], degree-7
// Taylor polynomial of 2^f (relative error < 4e-9 before rounding); x < -126 gives 0 (flush: such
// a weight is below 2^-126 of the row's largest), NaN stays NaN.
constexpr float kExpC[8] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                            0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381609f,
                            1.5252733804059841e-05f};

// ---- portable scalar ----------------------------------------------------------------------------
namespace scalar_isa {
struct Vec {
  static constexpr int W = 1;
  using V = float;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const f16_t* p) { return to_float(*p); }
  static V load(const bf16_t* p) { return to_float(*p); }
  template <typename T>
  static V load_n(const T* p, int) { return load(p); }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static float reduce_add(V a) { return a; }
  static V exp2(V x) { return x < -126.0f ? 0.0f : std::exp2(x); }
};
#include "paged/paged_cpu_kernel.inc"
}  // namespace scalar_isa

// ---- AVX2 + FMA + F16C ----------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2_isa {
struct Vec {
  static constexpr int W = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  template <typename T>
  static V load_n(const T* p, int n) {  // n < W elements, zero-filled
    T tmp[W];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, p, n * sizeof(T));
    return load(tmp);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static float reduce_add(V a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  static V exp2(V x) {
    const V xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN: max returns its second operand
    const V n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(xc, n);
    V y = _mm256_set1_ps(kExpC[7]);
    for (int i = 6; i >= 0; --i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExpC[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ), y);
  }
};
#include "paged/paged_cpu_kernel.inc"
}  // namespace avx2_isa
#pragma GCC pop_options

// ---- AVX-512 (F, BW, VL) ------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace avx512_isa {
struct Vec {
  static constexpr int W = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
  static V load_n(const f16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
  }
  static V load_n(const bf16_t* p, int n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static float reduce_add(V a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  static V exp2(V x) {
    const V xc = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);  // NaN: max returns its second operand
    const V n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(xc, n);
    V y = _mm512_set1_ps(kExpC[7]);
    for (int i = 6; i >= 0; --i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExpC[i]));
    y = _mm512_scalef_ps(y, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ), y);
  }
};
#include "paged/paged_cpu_kernel.inc"
}  // namespace avx512_isa
#pragma GCC pop_options

enum class Isa { scalar, avx2, avx512 };

Isa pick_isa() {
  const char* force = std::getenv("PYLLMOPS_PAGED_ISA");
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (force != nullptr && *force != '\0') {
    const std::string f(force);
    PYLLMOPS_CHECK(f == "scalar" || f == "avx2" || f == "avx512",
                   "PYLLMOPS_PAGED_ISA must be scalar, avx2 or avx512, got ", f);
    PYLLMOPS_CHECK(f != "avx512" || has512, "PYLLMOPS_PAGED_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL");
    PYLLMOPS_CHECK(f != "avx2" || has2, "PYLLMOPS_PAGED_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    return f == "avx512" ? Isa::avx512 : (f == "avx2" ? Isa::avx2 : Isa::scalar);
  }
  return has512 ? Isa::avx512 : (has2 ? Isa::avx2 : Isa::scalar);
}

template <typename T>
void merge_splits(const AttnParams& p) {
  const int64_t rows = p.total_q * p.heads_q, D = p.head_dim, stride = rows;
  parallel_for(rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    std::vector<float> w(static_cast<size_t>(p.num_splits));
    for (int64_t row = r0; row < r1; ++row) {
      float m, l;
      merge_stats(p.partial_ml + 2 * row, stride, p.num_splits, p.exp2_scale, &m, &l);
      for (int64_t i = 0; i < p.num_splits; ++i) {
        const float* ml = p.partial_ml + 2 * (i * stride + row);
        w[i] = merge_weight(ml[0], ml[1], m, l, p.exp2_scale);
      }
      T* o = static_cast<T*>(p.out) + row * D;
      for (int64_t d = 0; d < D; ++d) {
        float v = 0.0f;
        for (int64_t i = 0; i < p.num_splits; ++i) v += w[i] * p.partial_out[(i * stride + row) * D + d];
        o[d] = from_float<T>(v);
      }
    }
  });
}

template <typename T>
void attention_impl(const AttnParams& p) {
  const Isa isa = pick_isa();  // per call (a getenv): tests and benchmarks switch it
  const int64_t tiles = p.row_tiles();
  const int64_t items = p.num_seqs * p.heads_kv * tiles * p.num_splits;
  const int64_t dp = (p.head_dim + 15) / 16 * 16;
  const int64_t scratch_floats = 2 * kRowTile * dp + kRowTile * kKeyTile;
  // Grain: at least ~1 MB of K/V per thread (starting a thread costs tens of us, much more on a
  // loaded machine, while 1 MB is ~100 us of reading), else an item (a whole split of a sequence).
  int64_t kv_bytes = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) kv_bytes += p.seq_lens[s];
  kv_bytes *= 2 * p.heads_kv * p.head_dim * static_cast<int64_t>(sizeof(T));
  const int64_t per_item = std::max<int64_t>(1, kv_bytes / std::max<int64_t>(items, 1));
  const int64_t grain = std::max<int64_t>(1, ((int64_t{1} << 20) + per_item - 1) / per_item);
  parallel_for(items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t i = i0; i < i1; ++i) {  // once per work item, not per key
      const int64_t split = i % p.num_splits;
      const int64_t tile = (i / p.num_splits) % tiles;
      const int64_t h = (i / (p.num_splits * tiles)) % p.heads_kv;
      const int64_t s = i / (p.num_splits * tiles * p.heads_kv);
      if (isa == Isa::avx512)
        avx512_isa::attention_item<T>(p, s, h, tile, split, scratch.data());
      else if (isa == Isa::avx2)
        avx2_isa::attention_item<T>(p, s, h, tile, split, scratch.data());
      else
        scalar_isa::attention_item<T>(p, s, h, tile, split, scratch.data());
    }
  });
  if (p.num_splits > 1) merge_splits<T>(p);
}

}  // namespace

void validate_metadata_cpu(const AttnParams& p) {
  if (p.cu_seqlens_q != nullptr) {
    PYLLMOPS_CHECK(p.cu_seqlens_q[0] == 0 && p.cu_seqlens_q[p.num_seqs] == p.total_q,
                   "cu_seqlens_q must start at 0 and end at total_q=", p.total_q, " (q.shape[0]), got first ",
                   p.cu_seqlens_q[0], " and last ", p.cu_seqlens_q[p.num_seqs]);
    for (int64_t s = 0; s < p.num_seqs; ++s)
      PYLLMOPS_CHECK(p.cu_seqlens_q[s + 1] >= p.cu_seqlens_q[s], "cu_seqlens_q must be non-decreasing, but "
                     "sequence ", s, " has ", static_cast<int64_t>(p.cu_seqlens_q[s + 1]) - p.cu_seqlens_q[s],
                     " queries");
  }
  const int64_t capacity = p.max_blocks * p.block_size;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    int64_t q_begin, q_len;
    query_range(p, s, &q_begin, &q_len);
    const int64_t seq_len = p.seq_lens[s];
    PYLLMOPS_CHECK(q_len <= p.max_q_len, "max_seqlen_q = ", p.max_q_len, " but a sequence has ", q_len,
                   " queries (sequence ", s, ")");
    PYLLMOPS_CHECK(seq_len >= 0 && seq_len <= capacity, "seq_lens[", s, "] = ", seq_len,
                   " is outside [0, ", capacity, "] (block_tables holds ", p.max_blocks, " blocks of ",
                   p.block_size, " per sequence)");
    PYLLMOPS_CHECK(q_len <= seq_len, "sequence ", s, " has ", q_len, " queries but seq_lens[", s, "] = ", seq_len,
                   "; the queries are the last positions of the sequence, so q_len <= seq_len");
    if (q_len == 0) continue;
    int64_t kb, ke;
    visible_keys(seq_len, q_len, p.group(), 0, q_len * p.group(), p.window_left, &kb, &ke);
    const int32_t* table = p.block_tables + s * p.max_blocks;
    for (int64_t b = kb / p.block_size; b < (ke + p.block_size - 1) / p.block_size; ++b)
      PYLLMOPS_CHECK(table[b] >= 0 && table[b] < p.num_blocks, "block_tables[", s, ", ", b, "] = ", table[b],
                     " is outside [0, ", p.num_blocks, ") (the cache has ", p.num_blocks, " blocks) and sequence ", s,
                     " reads it");
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
  {  // two tokens writing one slot would race (the winner would depend on thread timing)
    std::vector<int64_t> seen;
    seen.reserve(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t)
      if (slot[t] >= 0) seen.push_back(slot[t]);
    std::sort(seen.begin(), seen.end());
    const auto dup = std::adjacent_find(seen.begin(), seen.end());
    if (dup != seen.end()) {
      int64_t first = -1, second = -1;
      for (int64_t t = 0; t < n && second < 0; ++t)
        if (slot[t] == *dup) (first < 0 ? first : second) = t;
      PYLLMOPS_CHECK(false, "slot_mapping has duplicate slot ", *dup, " (tokens ", first, " and ", second,
                     "); each slot may be written by one token (-1 skips a token)");
    }
  }
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
