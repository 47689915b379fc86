// Flash attention CPU kernels: forward and backward, single-pass or two-pass (attention.h has the algorithm).
//
// Tiling as the CUDA kernels: query tiles of kBlockM rows, key tiles of kBlockN keys, only the key tiles in the
// mask's band are visited. Tiles are converted to fp32 once when loaded, zero-padded to kBlockM / kBlockN rows and
// to dp = head_dim rounded up to 16 columns, so every tile product is a fixed-shape fp32 GEMM (64 x 128 x dp,
// 64 x dp x 128 or 128 x dp x 64) done by a register-blocked micro-kernel (attention_cpu_isa.inc) compiled for AVX-512, AVX2 + FMA
// and the baseline ISA and picked at run time (PYLLMOPS_CPU_ISA=baseline|avx2|avx512 caps it, for tests); exp2 is
// a vector polynomial from the same file. Softmax statistics and accumulators are fp32.
// Threads: parallel_for over (batch x heads x query tiles) in the forward and in the dq pass, over
// (batch x kv heads x key tiles) in the dk/dv pass, so every output element has one writer.
//
// Scores. s = softmax_scale * q.k, or with a logit softcap c > 0, c * tanh(softmax_scale * q.k / c) (Gemma 2), kept
// in the base-2 domain (times log2 e); masked entries are -inf. The backward multiplies dS by the derivative of the
// cap, 1 - tanh^2.
//
// Backward statistics. The backward does not rebuild P from the saved float32 LSE: at a large softmax_scale the
// LSE's rounding (|lse| * 6e-8) is a large error in the exponent (issue 15: dv error 0.06 at scale 1e5). For a query
// tile with a row |lse| > 16 (or a non-finite one) the backward first recomputes each row's max m and sum l over its
// key tiles (one more QK^T per tile pair), exactly as the forward does, and P = exp2(s - m) / l uses the same floats
// s; otherwise (m, l) = (lse log2 e, 1), whose rounding is below 2e-6 in the exponent (row_stats).
//
// Backward passes. Single pass (FlashAttention-2's 5 tile GEMMs per visited pair: S, dP, dV, dK, dQ) with one task
// per (sequence, kv head) that owns its dq rows, when there are at least as many such tasks as threads and a task's
// Q / dO / dQ buffers fit in 32 MB (single_pass_ok); else two passes, 7 tile GEMMs (dq pass: S, dP, dQ; dk/dv pass:
// S, dP, dV, dK), parallel over query tiles and over key tiles, the dk/dv pass reading (m, l) from a workspace.
//
// NaN policy (docs/attention.md): a non-finite input reaches exactly the outputs and gradients that the float64
// reference computes from it. Row maxima propagate NaN (std::max would drop it and make the row look empty);
// masked pairs contribute nothing even when the other operand is NaN: P and dS are set to 0 there, and a tile
// product whose B operand holds a non-finite value on a tile the mask cuts is done pair by pair, skipping the
// masked pairs (0 * NaN would otherwise spread the NaN).
//
// Memory per thread: a dozen tiles (kBlock x dp floats), ~800 KB at d = 256, independent of the sequence lengths.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/parallel.h"

namespace pyllmops {
namespace attention {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYLLMOPS_ATTN_X86_DISPATCH 1
#endif

// The project builds with -ffp-contract=off (bitwise-stable elementwise kernels); the tile products here are
// compared with tolerances, and a fused multiply-add is both faster and more accurate, so these regions allow it.
namespace isa_base {
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
constexpr int kVecWidth = 4;
constexpr int kPanel = 2;
constexpr int kRowsFor(int) { return 4; }
#include "attention/attention_cpu_isa.inc"
#pragma GCC pop_options
}  // namespace isa_base

#ifdef PYLLMOPS_ATTN_X86_DISPATCH
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
constexpr int kVecWidth = 8;
constexpr int kPanel = 2;
constexpr int kRowsFor(int nv) { return nv == 2 ? 6 : 12; }  // 16 ymm: R x nv accumulators, nv loads, a broadcast
#include "attention/attention_cpu_isa.inc"
#pragma GCC pop_options
}  // namespace isa_avx2

namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
constexpr int kVecWidth = 16;
constexpr int kPanel = 4;
// 32 zmm: R x nv accumulators, nv loads of B and a broadcast register for A; 6 x 4 measured
// faster than 14 x 2, 8 x 2 and 7 x 4 on the attention tile shapes
constexpr int kRowsFor(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : 14; }
#define PYLLMOPS_ATTN_AVX512 1
#include "attention/attention_cpu_isa.inc"
#undef PYLLMOPS_ATTN_AVX512
#pragma GCC pop_options
}  // namespace isa_avx512
#endif

using GemmFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, bool);
using FinishFn = void (*)(float*, int, int, const int*, const int*, float, float, float);
using GemmMaxFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                           int64_t, float*);
using OnlineFn = void (*)(const float*, int, int, int64_t, const int*, const int*, const float*, float*, float*, float*,
                          float*);
using ProbsFn = void (*)(const float*, int, int, int64_t, const int*, const int*, const float*, const float*, float*);
using GradFn = void (*)(const float*, const float*, int, int, int64_t, const int*, const int*, const float*, float,
                        float*);
using ScaleRowsFn = void (*)(float*, int64_t, int64_t, int64_t, const float*);
using LoadRowsFn = bool (*)(const float*, int64_t, int64_t, int64_t, int64_t, int, float, float*);
using TransposeFn = void (*)(const float*, int, int64_t, float*);
using StoreFn = void (*)(const float*, int64_t, int64_t, int64_t, float, float*, int64_t);

struct Isa {
  GemmFn gemm;
  GemmMaxFn gemm_rowmax;
  FinishFn finish_scores;
  OnlineFn online_step;
  ProbsFn probs;
  GradFn grad_scores;
  ScaleRowsFn scale_rows;
  LoadRowsFn load_rows;
  TransposeFn transpose;
  StoreFn store_f32;
  const char* name;
};

#define PYLLMOPS_ATTN_ISA(ns, label)                                                                       \
  Isa {                                                                                                    \
    ns::gemm, ns::gemm_rowmax, ns::finish_scores, ns::online_step, ns::probs, ns::grad_scores, ns::scale_rows, \
        ns::load_rows, ns::transpose, ns::store_f32, label                                                 \
  }

const Isa& isa() {
  static const Isa chosen = [] {
    const char* env = std::getenv("PYLLMOPS_CPU_ISA");
    const std::string cap = env ? env : "";
#ifdef PYLLMOPS_ATTN_X86_DISPATCH
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && (cap.empty() || cap == "avx512")) return PYLLMOPS_ATTN_ISA(isa_avx512, "avx512");
    if (avx2 && (cap.empty() || cap == "avx512" || cap == "avx2")) return PYLLMOPS_ATTN_ISA(isa_avx2, "avx2");
#endif
    return PYLLMOPS_ATTN_ISA(isa_base, "baseline");
  }();
  return chosen;
}
#undef PYLLMOPS_ATTN_ISA

constexpr int kBlockM = 64;
constexpr int kBlockN = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// The backward takes a query tile's softmax statistics from the saved lse when every |lse| of the tile is at most this
// (P = exp2(s - lse log2 e): the lse's float32 rounding is then < 2e-6 in the exponent, as torch's CPU kernel, which
// rebuilds P from the lse at any size); else it recomputes them (see "Backward statistics").
constexpr float kStatsFromLseMax = 16.0f;

int64_t num_tiles(int64_t n, int block) { return (n + block - 1) / block; }

// Per-call constants.
struct Ctx {
  int64_t d = 0, dp = 0;  // head_dim, padded to a multiple of 16
  float scale = 1.0f, scale_log2 = 1.0f, softcap = 0.0f, inv_softcap = 0.0f, softcap_log2 = 0.0f;
  // Q tiles are loaded times q_mul: without a softcap the products q.k are then the base-2 logits themselves (no
  // pass over the score tile to scale them); dk, which sums dS^T Q, is stored times scale / q_mul to undo it.
  float q_mul = 1.0f;
  explicit Ctx(const Params& p)
      : d(p.head_dim), dp((p.head_dim + 15) / 16 * 16), scale(p.scale), scale_log2(p.scale * kLog2e),
        softcap(p.softcap) {
    if (softcap > 0.0f) {
      inv_softcap = 1.0f / softcap;
      softcap_log2 = softcap * kLog2e;
    } else {
      q_mul = scale_log2;
    }
  }
};

// rows [r0, r0 + rows) of a (token, head) slice, times mul -> dst[block][dp] in fp32, zero-padded. Returns whether
// every stored value is finite.
template <typename T>
bool load_tile(const T* base, int64_t row_stride, int64_t r0, int64_t rows, const Ctx& cx, int block, float* dst,
               float mul = 1.0f) {
  if constexpr (std::is_same_v<T, float>) {
    return isa().load_rows(base + r0 * row_stride, row_stride, rows, cx.d, cx.dp, block, mul, dst);
  }
  uint32_t bad = 0;  // a non-finite float has all exponent bits set
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + (r0 + r) * row_stride;
    float* out = dst + r * cx.dp;
    for (int64_t c = 0; c < cx.d; ++c) out[c] = to_float(src[c]) * mul;
    for (int64_t c = 0; c < cx.d; ++c) {
      uint32_t u;
      std::memcpy(&u, out + c, 4);
      bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    }
    std::fill(out + cx.d, out + cx.dp, 0.0f);
  }
  std::fill(dst + rows * cx.dp, dst + block * cx.dp, 0.0f);
  return bad == 0;
}

// src[block][dp] -> dst[dp][block] (block and dp multiples of 16): the ISA file's register-block transpose.
void transpose(const float* src, int block, int64_t dp, float* dst) { isa().transpose(src, block, dp, dst); }

template <typename T>
void store_rows(const float* src, float mul, int64_t rows, const Ctx& cx, T* base, int64_t row_stride, int64_t r0) {
  if constexpr (std::is_same_v<T, float>) {
    return isa().store_f32(src, cx.dp, rows, cx.d, mul, base + r0 * row_stride, row_stride);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = base + (r0 + r) * row_stride;
    for (int64_t c = 0; c < cx.d; ++c) dst[c] = from_float<T>(src[r * cx.dp + c] * mul);
  }
}

// C[i][j] += sum_k A(i, k) B[k][j] over the visible (query, key) pairs only: A(i, k) = a[i * as + k * ak] and the
// pair is (i, k) when a_rows_are_queries, else (k, i); the keys row r sees are columns [lo[r], hi[r]). For tile
// products whose B operand is not finite on a tile the mask cuts (see the NaN policy at the top).
void masked_gemm(int64_t I, int64_t J, int64_t K, const float* a, int64_t as, int64_t ak, const float* b,
                 int64_t ldb, float* c, int64_t ldc, const int* lo, const int* hi, bool a_rows_are_queries) {
  for (int64_t i = 0; i < I; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = a_rows_are_queries ? i : k, col = a_rows_are_queries ? k : i;
      if (col < lo[row] || col >= hi[row]) continue;
      const float x = a[i * as + k * ak];
      float* ci = c + i * ldc;
      const float* bk = b + k * ldb;
      for (int64_t j = 0; j < J; ++j) ci[j] += x * bk[j];
    }
}

// acc (+)= A B for a tile product: the micro-kernel, or masked_gemm when B is not finite and the mask cuts the tile.
void tile_gemm(bool b_finite, bool full, int64_t I, int64_t J, int64_t K, const float* a, int64_t as, int64_t ak,
               const float* b, int64_t ldb, float* c, int64_t ldc, const int* lo, const int* hi,
               bool a_rows_are_queries) {
  if (b_finite || full)
    isa().gemm(I, J, K, a, as, ak, b, ldb, c, ldc, true);
  else
    masked_gemm(I, J, K, a, as, ak, b, ldb, c, ldc, lo, hi, a_rows_are_queries);
}

// Base-2 logits of query rows [i0, i0 + rows) x keys [j0, j0 + cols) into s[kBlockM][kBlockN]; row r sees
// columns [lo[r], hi[r]) (lo = hi = 0: none); every other entry, padding included, is -inf. With lane_max (a
// kBlockM x 16 buffer), a tile that the mask does not cut, without a softcap and without padding columns also gets
// its row maxima from the tile product (gemm_rowmax); then lane_max is returned, else nullptr.
const float* scores(const Ctx& cx, const Mask& mask, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                    const float* qf, const float* kt, float* s, int* lo, int* hi, float* lane_max = nullptr) {
  // a tile without masked or padding columns and without a softcap: the products are the logits as they are
  const bool plain = cx.softcap == 0.0f && cols == kBlockN && mask.tile_is_full(i0, i0 + rows, j0, j0 + cols);
  if (!plain) lane_max = nullptr;
  if (lane_max)
    isa().gemm_rowmax(kBlockM, kBlockN, cx.dp, qf, cx.dp, 1, kt, kBlockN, s, kBlockN, lane_max);
  else
    isa().gemm(kBlockM, kBlockN, cx.dp, qf, cx.dp, 1, kt, kBlockN, s, kBlockN, false);
  if (plain) {
    std::fill(lo, lo + kBlockM, 0);
    std::fill(hi, hi + rows, kBlockN);
    std::fill(hi + rows, hi + kBlockM, 0);
    return lane_max;
  }
  for (int r = 0; r < kBlockM; ++r) {
    int a = 0, b = 0;
    if (r < rows) {
      const int64_t fk = std::max(mask.first_key(i0 + r), j0), lk = std::min(mask.last_key(i0 + r), j0 + cols - 1);
      if (fk <= lk) {
        a = static_cast<int>(fk - j0);
        b = static_cast<int>(lk - j0 + 1);
      }
    }
    lo[r] = a;
    hi[r] = b;
  }
  // Q was loaded times q_mul (the raw products are the logits without a softcap; with one, q_mul is 1)
  isa().finish_scores(s, kBlockM, kBlockN, lo, hi, cx.q_mul == 1.0f ? cx.scale_log2 : 1.0f, cx.scale * cx.inv_softcap,
                      cx.softcap_log2);
  return lane_max;
}

// P = exp2(s - m) / l on the visible columns, 0 elsewhere (padding rows included); m and l: row 0 of the tile on.
void probs(const float* s, const int* lo, const int* hi, int64_t rows, const float* m, const float* l, float* pb) {
  isa().probs(s, kBlockM, kBlockN, rows, lo, hi, m, l, pb);
}

// Online softmax step for one tile (the ISA file's online_step): m, l take in the tile's logits s, pb gets
// exp2(s - m_new), factor[r] is what row r's accumulator must be scaled by; lane_max: scores' row maxima or nullptr.
void online_step(const float* s, const int* lo, const int* hi, const float* lane_max, int64_t rows, float* m, float* l,
                 float* pb, float* factor) {
  isa().online_step(s, kBlockM, kBlockN, rows, lo, hi, lane_max, m, l, pb, factor);
}

// One work item of the query-tile loops (forward, dq pass): sequence, head, rows [i0, i1).
struct QueryTile {
  int64_t b = 0, h = 0, hk = 0, i0 = 0, i1 = 0, rows = 0;
  SeqInfo si;
  Mask mask;

  // Decodes task = (b * heads_q + h) * m_tiles + mt; false if the tile lies past a short (varlen) sequence.
  bool decode(const Params& p, int64_t task, int64_t m_tiles) {
    const int64_t mt = task % m_tiles;
    h = (task / m_tiles) % p.heads_q;
    b = task / (m_tiles * p.heads_q);
    hk = h / (p.heads_q / p.heads_kv);
    si = seq_info(p, b);
    i0 = mt * kBlockM;
    if (i0 >= si.sq) return false;
    i1 = std::min(si.sq, i0 + kBlockM);
    rows = i1 - i0;
    mask = seq_mask(p, si);
    return true;
  }
};

// A float buffer on a 64-byte boundary, left uninitialized. Aligned: the tiles are whole multiples of 16 floats, so
// every vector load and store of a tile product then stays within one cache line (new float[] promises 16 bytes, and
// at any other offset each 64-byte load spans two lines: the tile products measured 2-4% slower). Uninitialized: a
// std::vector would zero ~0.5 MB of tiles per call and thread (1% of a 512-token forward), and every element is
// written before it is read (loads zero-pad, the tile products without accumulation write the whole tile, the
// accumulators are cleared by their loops).
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { reset(n); }
  void reset(int64_t n) {
    p_.reset(static_cast<float*>(::operator new[](sizeof(float) * static_cast<size_t>(n), std::align_val_t(kAlign))));
  }
  float* data() { return p_.get(); }
  const float* data() const { return p_.get(); }
  float* begin() { return p_.get(); }
  float& operator[](int64_t i) { return p_.get()[i]; }

 private:
  static constexpr size_t kAlign = 64;
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(kAlign)); }
  };
  std::unique_ptr<float, Free> p_;
};

// Key / value tiles of one (sequence, kv head) as the tile products read them, kept per thread across the query
// tiles that read them: a thread's tasks are consecutive query tiles of one head (and the heads of a GQA group are
// consecutive), so each key tile is converted, checked and transposed once per thread and head instead of once per
// query tile. Direct-mapped: tile nt lives in slot nt % slots, at most kCacheFloats floats per thread, so a sequence
// longer than the cache (8192 keys at d = 64, 2048 at d = 256) reloads tiles as before.
struct KvTiles {
  const float *kf = nullptr, *kt = nullptr, *vf = nullptr, *vt = nullptr;  // K, K^T, V, V^T
  bool k_fin = true, v_fin = true;
};

class TileCache {
 public:
  enum : int { kK = 1, kKT = 2, kV = 4, kVT = 8 };
  explicit TileCache(const Ctx& cx, int64_t seqlen_k)
      : tile_(kBlockN * cx.dp), slots_(std::max<int64_t>(1, std::min(num_tiles(seqlen_k, kBlockN),
                                                                          kCacheFloats / (4 * tile_)))),
        data_(slots_ * 4 * tile_), tag_(slots_, -1), have_(slots_, 0), fin_(slots_, 0) {}

  // Tiles of key tile nt (keys [j0, j0 + cols)) of kv head hk of sequence b; `need` is a mask of kK, kKT, kV, kVT.
  template <typename T>
  KvTiles get(const Params& p, const Ctx& cx, const SeqInfo& si, int64_t b, int64_t hk, int64_t nt, int64_t j0,
              int64_t cols, int need) {
    if (b != b_ || hk != hk_) {
      std::fill(tag_.begin(), tag_.end(), -1);
      b_ = b;
      hk_ = hk;
    }
    const int64_t slot = nt % slots_;
    if (tag_[slot] != nt) {
      tag_[slot] = nt;
      have_[slot] = 0;
      fin_[slot] = 0;
    }
    float* base = data_.data() + slot * 4 * tile_;
    float *kf = base, *kt = base + tile_, *vf = base + 2 * tile_, *vt = base + 3 * tile_;
    uint8_t& have = have_[slot];
    if ((need & (kK | kKT)) && !(have & kK)) {
      fin_[slot] |= load_tile(k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk), p.lk.seq, j0, cols, cx, kBlockN, kf)
                        ? kK : 0;
      have |= kK;
    }
    if ((need & kKT) && !(have & kKT)) {
      transpose(kf, kBlockN, cx.dp, kt);
      have |= kKT;
    }
    if ((need & (kV | kVT)) && !(have & kV)) {
      fin_[slot] |= load_tile(k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk), p.lv.seq, j0, cols, cx, kBlockN, vf)
                        ? kV : 0;
      have |= kV;
    }
    if ((need & kVT) && !(have & kVT)) {
      transpose(vf, kBlockN, cx.dp, vt);
      have |= kVT;
    }
    KvTiles t;
    t.kf = kf;
    t.kt = kt;
    t.vf = vf;
    t.vt = vt;
    t.k_fin = (fin_[slot] & kK) != 0;
    t.v_fin = (fin_[slot] & kV) != 0;
    return t;
  }

 private:
  static constexpr int64_t kCacheFloats = int64_t(1) << 21;
  int64_t tile_, slots_;
  Scratch data_;  // a slot is written before it is read
  std::vector<int64_t> tag_;
  std::vector<uint8_t> have_, fin_;
  int64_t b_ = -1, hk_ = -1;
};

// Per-thread tiles.
struct Buffers {
  Scratch qf, gf, kf, kt, vf, vt, s, pb, ds, acc, acc2;
  int lo[kBlockM], hi[kBlockM];
  float m[kBlockM], l[kBlockM], factor[kBlockM];
  alignas(64) float lane_max[kBlockM * 16];  // scores' row maxima, kVecWidth <= 16 lanes a row
  explicit Buffers(const Ctx& cx)
      : qf(kBlockM * cx.dp), gf(kBlockM * cx.dp), kf(kBlockN * cx.dp), kt(kBlockN * cx.dp), vf(kBlockN * cx.dp),
        vt(kBlockN * cx.dp), s(kBlockM * kBlockN), pb(kBlockM * kBlockN), ds(kBlockM * kBlockN),
        acc(std::max(kBlockM, kBlockN) * cx.dp), acc2(kBlockN * cx.dp) {}
};

template <typename T>
bool load_keys(const Params& p, const Ctx& cx, const SeqInfo& si, int64_t hk, int64_t j0, int64_t cols, Buffers& bf) {
  const bool fin = load_tile(k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk), p.lk.seq, j0, cols, cx, kBlockN,
                             bf.kf.data());
  transpose(bf.kf.data(), kBlockN, cx.dp, bf.kt.data());
  return fin;
}

template <typename T>
bool load_values(const Params& p, const Ctx& cx, const SeqInfo& si, int64_t hk, int64_t j0, int64_t cols,
                 Buffers& bf, bool transposed) {
  const bool fin = load_tile(k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk), p.lv.seq, j0, cols, cx, kBlockN,
                             bf.vf.data());
  if (transposed) transpose(bf.vf.data(), kBlockN, cx.dp, bf.vt.data());
  return fin;
}

// The query-tile loop of the forward and of the dq pass: parallel over (batch x heads x query tiles), per thread
// one set of tiles and one key / value tile cache; body(t, bf, cache) runs per query tile with its Q tile in bf.qf
// (times q_mul).
template <typename T, typename Body>
void for_each_query_tile(const Params& p, const Ctx& cx, Body body) {
  const int64_t m_tiles = num_tiles(p.seqlen_q, kBlockM);
  parallel_for(p.batch * p.heads_q * m_tiles, 1, [&](int64_t t0, int64_t t1) {
    Buffers bf(cx);
    TileCache cache(cx, p.seqlen_k);
    QueryTile t;
    for (int64_t task = t0; task < t1; ++task) {
      if (!t.decode(p, task, m_tiles)) continue;
      load_tile(q_row(static_cast<const T*>(p.q), p.lq, t.si, 0, t.h), p.lq.seq, t.i0, t.rows, cx, kBlockM,
                bf.qf.data(), cx.q_mul);
      body(static_cast<const QueryTile&>(t), bf, cache);
    }
  });
}

// ---- forward -----------------------------------------------------------------------------------
template <typename T>
void forward_impl(const Params& p) {
  const Ctx cx(p);
  const int64_t dp = cx.dp;
  for_each_query_tile<T>(p, cx, [&](const QueryTile& t, Buffers& bf, TileCache& cache) {
    std::fill(bf.acc.begin(), bf.acc.begin() + kBlockM * dp, 0.0f);
    std::fill(bf.m, bf.m + kBlockM, -INFINITY);
    std::fill(bf.l, bf.l + kBlockM, 0.0f);
    int64_t nb, ne;
    t.mask.key_tiles(t.i0, t.i1, kBlockN, &nb, &ne);
    for (int64_t nt = nb; nt < ne; ++nt) {
      const int64_t j0 = nt * kBlockN, cols = std::min(t.si.sk, j0 + kBlockN) - j0;
      const KvTiles kv = cache.get<T>(p, cx, t.si, t.b, t.hk, nt, j0, cols, TileCache::kKT | TileCache::kV);
      const float* lane_max =
          scores(cx, t.mask, t.i0, t.rows, j0, cols, bf.qf.data(), kv.kt, bf.s.data(), bf.lo, bf.hi, bf.lane_max);
      online_step(bf.s.data(), bf.lo, bf.hi, lane_max, t.rows, bf.m, bf.l, bf.s.data(), bf.factor);  // P over S
      isa().scale_rows(bf.acc.data(), t.rows, dp, dp, bf.factor);
      tile_gemm(kv.v_fin, t.mask.tile_is_full(t.i0, t.i1, j0, j0 + cols), kBlockM, dp, kBlockN, bf.s.data(),
                kBlockN, 1, kv.vf, dp, bf.acc.data(), dp, bf.lo, bf.hi, true);
    }
    T* ob = q_row(static_cast<T*>(p.o), p.lo, t.si, 0, t.h);
    float* lse = p.lse + lse_index(p, t.si, 0, t.h);
    for (int64_t r = 0; r < t.rows; ++r) {
      const float l = bf.l[r];  // 0: the row saw no key; NaN propagates
      store_rows(&bf.acc[r * dp], l == 0.0f ? 0.0f : 1.0f / l, 1, cx, ob, p.lo.seq, t.i0 + r);
      lse[t.i0 + r] = l == 0.0f ? -INFINITY : (bf.m[r] + std::log2(l)) * kLn2;
    }
  });
}

// ---- backward ----------------------------------------------------------------------------------
template <typename T>
void delta_impl(const Params& p) {
  // delta[b, h, i] = sum_c dO[b, i, h, c] * O[b, i, h, c] - dlse[b, h, i]: with a gradient g on the
  // lse, dS = P (dP - delta + g), since d lse / d S = P.
  const int64_t d = p.head_dim;
  parallel_for(p.batch * p.heads_q, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task % p.heads_q, b = task / p.heads_q;
      const SeqInfo si = seq_info(p, b);
      const T* ob = q_row(static_cast<const T*>(p.o), p.lo, si, 0, h);
      const T* gb = q_row(static_cast<const T*>(p.dout), p.ldo, si, 0, h);
      const int64_t off = lse_index(p, si, 0, h);
      for (int64_t i = 0; i < si.sq; ++i) {
        // a serial sum on purpose: cpu_math.h's 16-lane sum16 is as accurate, but its rounding took
        // tests/test_fsdp.py's 1-vs-2-process training comparison from 0.42x to 2.07x of its tolerance
        float acc = 0.0f;
        for (int64_t c = 0; c < d; ++c) acc += to_float(ob[i * p.lo.seq + c]) * to_float(gb[i * p.ldo.seq + c]);
        p.delta[off + i] = p.dlse ? acc - p.dlse[off + i] : acc;
      }
    }
  });
}

// dS = P (dP - delta) on the visible columns (times the softcap's 1 - tanh^2), 0 elsewhere; in place over dp_ds.
void grad_scores(const Ctx& cx, const float* s, const float* pb, const int* lo, const int* hi, int64_t rows,
                 const float* delta, float* dp_ds) {
  isa().grad_scores(s, pb, kBlockM, kBlockN, rows, lo, hi, delta, cx.softcap > 0.0f ? cx.softcap_log2 : 0.0f, dp_ds);
}

// Softmax statistics (m, l) of query rows [i0, i0 + rows) into m[kBlockM], l[kBlockM]: (lse log2 e, 1) when every
// row's saved lse is finite and |lse| <= kStatsFromLseMax, else recomputed over the rows' key tiles as the forward
// does (see "Backward statistics" at the top). key_t(nt, j0, cols) gives K^T of key tile nt; bf's s, pb, lo, hi and
// factor are scratch.
template <typename KeyT>
void row_stats(const Params& p, const Ctx& cx, const Mask& mask, int64_t i0, int64_t rows, int64_t sk, int64_t off,
               const float* qf, Buffers& bf, float* m, float* l, KeyT key_t) {
  std::fill(m, m + kBlockM, -INFINITY);
  std::fill(l, l + kBlockM, 0.0f);
  bool from_lse = true;
  for (int64_t r = 0; r < rows && from_lse; ++r) from_lse = std::fabs(p.lse[off + r]) <= kStatsFromLseMax;
  if (from_lse) {
    for (int64_t r = 0; r < rows; ++r) {
      m[r] = static_cast<float>(static_cast<double>(p.lse[off + r]) * 1.4426950408889634);
      l[r] = 1.0f;
    }
    return;
  }
  int64_t nb, ne;
  mask.key_tiles(i0, i0 + rows, kBlockN, &nb, &ne);
  for (int64_t nt = nb; nt < ne; ++nt) {
    const int64_t j0 = nt * kBlockN, cols = std::min(sk, j0 + kBlockN) - j0;
    const float* lane_max =
        scores(cx, mask, i0, rows, j0, cols, qf, key_t(nt, j0, cols), bf.s.data(), bf.lo, bf.hi, bf.lane_max);
    online_step(bf.s.data(), bf.lo, bf.hi, lane_max, rows, m, l, bf.pb.data(), bf.factor);
  }
}

// dq per query tile; first recomputes the rows' softmax statistics (m, l) and stores them in ws_m / ws_l (lse
// layout) for the dk/dv pass.
template <typename T>
void dq_impl(const Params& p, float* ws_m, float* ws_l) {
  const Ctx cx(p);
  const int64_t dp = cx.dp;
  for_each_query_tile<T>(p, cx, [&](const QueryTile& t, Buffers& bf, TileCache& cache) {
    load_tile(q_row(static_cast<const T*>(p.dout), p.ldo, t.si, 0, t.h), p.ldo.seq, t.i0, t.rows, cx, kBlockM,
              bf.gf.data());
    const int64_t off = lse_index(p, t.si, 0, t.h) + t.i0;
    const float* delta = p.delta + off;
    int64_t nb, ne;
    t.mask.key_tiles(t.i0, t.i1, kBlockN, &nb, &ne);
    row_stats(p, cx, t.mask, t.i0, t.rows, t.si.sk, off, bf.qf.data(), bf, bf.m, bf.l,
              [&](int64_t nt, int64_t j0, int64_t cols) {
                return cache.get<T>(p, cx, t.si, t.b, t.hk, nt, j0, cols, TileCache::kKT).kt;
              });
    for (int64_t r = 0; r < t.rows; ++r) {
      ws_m[off + r] = bf.m[r];
      ws_l[off + r] = bf.l[r];
    }
    std::fill(bf.acc.begin(), bf.acc.begin() + kBlockM * dp, 0.0f);
    for (int64_t nt = nb; nt < ne; ++nt) {  // dq
      const int64_t j0 = nt * kBlockN, cols = std::min(t.si.sk, j0 + kBlockN) - j0;
      const KvTiles kv = cache.get<T>(p, cx, t.si, t.b, t.hk, nt, j0, cols,
                                      TileCache::kK | TileCache::kKT | TileCache::kVT);
      scores(cx, t.mask, t.i0, t.rows, j0, cols, bf.qf.data(), kv.kt, bf.s.data(), bf.lo, bf.hi);
      probs(bf.s.data(), bf.lo, bf.hi, t.rows, bf.m, bf.l, bf.pb.data());
      isa().gemm(kBlockM, kBlockN, dp, bf.gf.data(), dp, 1, kv.vt, kBlockN, bf.ds.data(), kBlockN, false);
      grad_scores(cx, bf.s.data(), bf.pb.data(), bf.lo, bf.hi, t.rows, delta, bf.ds.data());
      tile_gemm(kv.k_fin, t.mask.tile_is_full(t.i0, t.i1, j0, j0 + cols), kBlockM, dp, kBlockN, bf.ds.data(),
                kBlockN, 1, kv.kf, dp, bf.acc.data(), dp, bf.lo, bf.hi, true);
    }
    store_rows(bf.acc.data(), p.scale, t.rows, cx, q_row(static_cast<T*>(p.dq), p.ldq, t.si, 0, t.h), p.ldq.seq,
               t.i0);
  });
}

// dk, dv for one key tile, summed over the query heads of the kv head's group.
template <typename T>
void dkdv_impl(const Params& p, const float* ws_m, const float* ws_l) {
  const Ctx cx(p);
  const int64_t dp = cx.dp, group = p.heads_q / p.heads_kv, n_tiles = num_tiles(p.seqlen_k, kBlockN);
  parallel_for(p.batch * p.heads_kv * n_tiles, 1, [&](int64_t t0, int64_t t1) {
    Buffers bf(cx);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t nt = task % n_tiles, hk = (task / n_tiles) % p.heads_kv, b = task / (n_tiles * p.heads_kv);
      const SeqInfo si = seq_info(p, b);
      const int64_t j0 = nt * kBlockN;
      if (j0 >= si.sk) continue;
      const int64_t cols = std::min(si.sk, j0 + kBlockN) - j0;
      load_keys<T>(p, cx, si, hk, j0, cols, bf);
      load_values<T>(p, cx, si, hk, j0, cols, bf, true);
      const Mask mask = seq_mask(p, si);
      float* dkf = bf.acc.data();
      float* dvf = bf.acc2.data();
      std::fill(dkf, dkf + kBlockN * dp, 0.0f);
      std::fill(dvf, dvf + kBlockN * dp, 0.0f);
      int64_t mb, me;
      mask.query_tiles(j0, j0 + cols, kBlockM, &mb, &me);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t mt = mb; mt < me; ++mt) {
          const int64_t i0 = mt * kBlockM, rows = std::min(si.sq, i0 + kBlockM) - i0;
          const int64_t off = lse_index(p, si, 0, h) + i0;
          const bool q_fin = load_tile(q_row(static_cast<const T*>(p.q), p.lq, si, 0, h), p.lq.seq, i0, rows, cx,
                                       kBlockM, bf.qf.data(), cx.q_mul);
          const bool g_fin = load_tile(q_row(static_cast<const T*>(p.dout), p.ldo, si, 0, h), p.ldo.seq, i0, rows,
                                       cx, kBlockM, bf.gf.data());
          scores(cx, mask, i0, rows, j0, cols, bf.qf.data(), bf.kt.data(), bf.s.data(), bf.lo, bf.hi);
          probs(bf.s.data(), bf.lo, bf.hi, rows, ws_m + off, ws_l + off, bf.pb.data());
          isa().gemm(kBlockM, kBlockN, dp, bf.gf.data(), dp, 1, bf.vt.data(), kBlockN, bf.ds.data(), kBlockN, false);
          grad_scores(cx, bf.s.data(), bf.pb.data(), bf.lo, bf.hi, rows, p.delta + off, bf.ds.data());
          const bool full = mask.tile_is_full(i0, i0 + rows, j0, j0 + cols);
          tile_gemm(g_fin, full, kBlockN, dp, kBlockM, bf.pb.data(), 1, kBlockN, bf.gf.data(), dp, dvf, dp, bf.lo,
                    bf.hi, false);
          tile_gemm(q_fin, full, kBlockN, dp, kBlockM, bf.ds.data(), 1, kBlockN, bf.qf.data(), dp, dkf, dp, bf.lo,
                    bf.hi, false);
        }
      }
      store_rows(dkf, p.scale / cx.q_mul, cols, cx, k_row(static_cast<T*>(p.dk), p.ldk, si, 0, hk), p.ldk.seq, j0);
      store_rows(dvf, 1.0f, cols, cx, k_row(static_cast<T*>(p.dv), p.ldv, si, 0, hk), p.ldv.seq, j0);
    }
  });
}


// Single-pass backward (FlashAttention-2's five tile products: S, dP, dV, dK, dQ) for one (sequence, kv head) per
// task: the task owns every dq row of its group's query heads, so dq accumulates in its own fp32 buffer with no
// second pass over the keys and no reduction across threads. Q and dO are converted once per task (each tile is then
// read from the buffer by every key tile), the statistics come from row_stats per query tile. Used when the tasks
// keep every thread busy and their buffers are small (single_pass_ok); else the two-pass backward above.
bool single_pass_ok(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t head_dim) {
  constexpr int64_t kMaxTaskFloats = int64_t(8) << 20;  // 32 MB per thread: Q, dO, dQ tiles and (m, l) of a task
  if (batch <= 0 || heads_kv <= 0 || heads_q % heads_kv != 0 || seqlen_q < 0 || head_dim <= 0) return false;
  const int64_t dp = (head_dim + 15) / 16 * 16, rows = num_tiles(seqlen_q, kBlockM) * kBlockM;
  const int64_t group = heads_q / heads_kv;
  return batch * heads_kv >= num_threads() && rows <= kMaxTaskFloats / (3 * dp + 2) / group;
}

template <typename T>
void fused_bwd_impl(const Params& p) {
  const Ctx cx(p);
  const int64_t dp = cx.dp, group = p.heads_q / p.heads_kv, tile = kBlockM * dp;
  parallel_for(p.batch * p.heads_kv, 1, [&](int64_t t0, int64_t t1) {
    Buffers bf(cx);
    Scratch work;  // the task's Q, dO and dQ tiles and (m, l): grows, never zero-filled whole
    int64_t work_size = 0;
    std::vector<uint8_t> q_fin, g_fin;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t hk = task % p.heads_kv, b = task / p.heads_kv;
      const SeqInfo si = seq_info(p, b);
      const Mask mask = seq_mask(p, si);
      const int64_t m_tiles = num_tiles(si.sq, kBlockM), n_items = group * m_tiles;  // item = (head in group, tile)
      const int64_t need = n_items * (3 * tile + 2 * kBlockM);
      if (need > work_size) {
        work.reset(need);
        work_size = need;
      }
      // Q and dO tiles are written whole by load_tile, m and l by row_stats; only dQ accumulates from 0
      float *qs = work.data(), *gs = qs + n_items * tile, *dqs = gs + n_items * tile;
      float *ms = dqs + n_items * tile, *ls = ms + n_items * kBlockM;
      std::fill(dqs, dqs + n_items * tile, 0.0f);
      q_fin.assign(static_cast<size_t>(n_items), 0);
      g_fin.assign(static_cast<size_t>(n_items), 0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        for (int64_t mt = 0; mt < m_tiles; ++mt) {
          const int64_t it = g * m_tiles + mt, i0 = mt * kBlockM, rows = std::min(si.sq, i0 + kBlockM) - i0;
          float* qf = qs + it * tile;
          q_fin[it] = load_tile(q_row(static_cast<const T*>(p.q), p.lq, si, 0, h), p.lq.seq, i0, rows, cx, kBlockM, qf,
                                cx.q_mul);
          g_fin[it] = load_tile(q_row(static_cast<const T*>(p.dout), p.ldo, si, 0, h), p.ldo.seq, i0, rows, cx,
                                kBlockM, gs + it * tile);
          row_stats(p, cx, mask, i0, rows, si.sk, lse_index(p, si, 0, h) + i0, qf, bf, ms + it * kBlockM,
                    ls + it * kBlockM, [&](int64_t, int64_t j0, int64_t cols) {
                      load_keys<T>(p, cx, si, hk, j0, cols, bf);
                      return static_cast<const float*>(bf.kt.data());
                    });
        }
      }
      float* dkf = bf.acc.data();
      float* dvf = bf.acc2.data();
      for (int64_t nt = 0; nt < num_tiles(si.sk, kBlockN); ++nt) {
        const int64_t j0 = nt * kBlockN, cols = std::min(si.sk, j0 + kBlockN) - j0;
        const bool k_fin = load_keys<T>(p, cx, si, hk, j0, cols, bf);
        load_values<T>(p, cx, si, hk, j0, cols, bf, true);
        std::fill(dkf, dkf + kBlockN * dp, 0.0f);
        std::fill(dvf, dvf + kBlockN * dp, 0.0f);
        int64_t mb, me;
        mask.query_tiles(j0, j0 + cols, kBlockM, &mb, &me);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          for (int64_t mt = mb; mt < me; ++mt) {
            const int64_t it = g * m_tiles + mt, i0 = mt * kBlockM, rows = std::min(si.sq, i0 + kBlockM) - i0;
            const float *qf = qs + it * tile, *gf = gs + it * tile;
            scores(cx, mask, i0, rows, j0, cols, qf, bf.kt.data(), bf.s.data(), bf.lo, bf.hi);
            probs(bf.s.data(), bf.lo, bf.hi, rows, ms + it * kBlockM, ls + it * kBlockM, bf.pb.data());
            isa().gemm(kBlockM, kBlockN, dp, gf, dp, 1, bf.vt.data(), kBlockN, bf.ds.data(), kBlockN, false);
            grad_scores(cx, bf.s.data(), bf.pb.data(), bf.lo, bf.hi, rows, p.delta + lse_index(p, si, 0, h) + i0,
                        bf.ds.data());
            const bool full = mask.tile_is_full(i0, i0 + rows, j0, j0 + cols);
            tile_gemm(g_fin[it], full, kBlockN, dp, kBlockM, bf.pb.data(), 1, kBlockN, gf, dp, dvf, dp, bf.lo,
                      bf.hi, false);
            tile_gemm(q_fin[it], full, kBlockN, dp, kBlockM, bf.ds.data(), 1, kBlockN, qf, dp, dkf, dp, bf.lo,
                      bf.hi, false);
            tile_gemm(k_fin, full, kBlockM, dp, kBlockN, bf.ds.data(), kBlockN, 1, bf.kf.data(), dp,
                      dqs + it * tile, dp, bf.lo, bf.hi, true);
          }
        }
        store_rows(dkf, p.scale / cx.q_mul, cols, cx, k_row(static_cast<T*>(p.dk), p.ldk, si, 0, hk), p.ldk.seq, j0);
        store_rows(dvf, 1.0f, cols, cx, k_row(static_cast<T*>(p.dv), p.ldv, si, 0, hk), p.ldv.seq, j0);
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t mt = 0; mt < m_tiles; ++mt) {
          const int64_t it = g * m_tiles + mt, i0 = mt * kBlockM, rows = std::min(si.sq, i0 + kBlockM) - i0;
          store_rows(dqs + it * tile, p.scale, rows, cx, q_row(static_cast<T*>(p.dq), p.ldq, si, 0, hk * group + g),
                     p.ldq.seq, i0);
        }
    }
  });
}

}  // namespace

const char* cpu_isa_name() { return isa().name; }

bool cpu_single_pass_backward(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t head_dim) {
  return single_pass_ok(batch, heads_q, heads_kv, seqlen_q, head_dim);
}

void forward_cpu(const Params& p, DType dtype) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] { forward_impl<scalar_t>(p); });
}

void backward_cpu(const Params& p, DType dtype) {
  // (m, l) per query row, in the lse layout (see "Backward statistics" at the top)
  if (single_pass_ok(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.head_dim)) {
    PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] {
      delta_impl<scalar_t>(p);
      fused_bwd_impl<scalar_t>(p);
    });
    return;
  }
  const int64_t n_stats = p.varlen() ? p.heads_q * p.lse_head_stride : p.batch * p.lse_batch_stride;
  std::vector<float> ws(2 * static_cast<size_t>(n_stats));
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] {
    delta_impl<scalar_t>(p);
    dq_impl<scalar_t>(p, ws.data(), ws.data() + n_stats);
    dkdv_impl<scalar_t>(p, ws.data(), ws.data() + n_stats);
  });
}

}  // namespace attention
}  // namespace pyllmops
