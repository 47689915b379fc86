// Tiled flash attention (forward and backward) with causal, sliding-window and GQA masks.
//
// What. out[b, i, h, :] = sum_j softmax_j(scale * q[b, i, h, :] . k[b, j, h / group, :]) v[b, j, h / group, :]
// over the keys j that query i may see, and lse[b, h, i] = log sum_j exp(scale * q_i . k_j) (natural log,
// float32). group = heads_q / heads_kv (GQA / MQA). Masks as FlashAttention (see `Mask` below). The
// backward recomputes the probabilities from the saved LSE: nothing of size seqlen_q x seqlen_k is stored.
//
// Algorithm (FlashAttention-2, Dao 2023), shared by the CPU kernel (attention_cpu.cpp) and the CUDA
// kernels (attention_cuda*.cu):
//   forward, per (batch, head, query tile of kBlockM rows): walk the key tiles of kBlockN keys that
//     the mask lets the tile see (tiles outside the band are never visited), S = Q K^T in the base-2
//     domain (scores pre-multiplied by scale * log2 e), per-element masking only on tiles the band
//     cuts, online softmax (common/online_softmax.h), O += P V; finally O /= l, lse = m + log2 l.
//   backward: delta[i] = sum_d dO[i, d] O[i, d] (minus the lse's gradient) first (one pass over O and dO).
//     CUDA, deterministic = false (default): FlashAttention-2's 5 tile matmuls, per (batch, kv head, key
//       tile): for each query head of the group and each visited query tile, P = exp2(S - lse2),
//       dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q, and dQ += dS K added to an fp32
//       workspace with atomics (converted to the output dtype by a last small kernel).
//     CUDA, deterministic = true, and the CPU: two passes so that every gradient element has exactly one
//       writer (bitwise reproducible, no atomics): the dk/dv pass above without dQ, then a dq pass per
//       (batch, q head, query tile) that recomputes S and dP: 7 tile matmuls per visited tile pair
//       (+40% backward FLOPs).
//
// Napkin math. Forward FLOPs over the visited area A (pairs (i, j) a query sees): 4 * A * d (two
// matmuls); bytes: q, k, v read, o written once each ~ 2 * (2 sq + 2 sk) * d * h per batch (bf16),
// so at d = 128 and sq = sk = 4096 the arithmetic intensity is ~1000 FLOP/byte: compute-bound; "fast"
// is a large fraction of the tensor-core peak (H100 SXM: ~990 dense bf16 TFLOP/s; FA2 on A100 reaches
// ~70% of 312). Backward is 2.5x the forward FLOPs by FlashAttention's count.
//
// Layouts. q (batch, seqlen_q, heads_q, d) and k, v (batch, seqlen_k, heads_kv, d) with arbitrary
// batch / seq / head strides (in elements) and d contiguous; varlen packs sequences along one token
// axis (total, heads, d) with cu_seqlens (int32, batch + 1). lse is float32 (batch, heads_q, seqlen_q),
// or (heads_q, total_q) for varlen (FlashAttention's varlen layout); the Python layer passes its strides.
//
// Varlen offsets the kernels cannot honour. The CPU path checks cu_seqlens on the host and throws. On CUDA they
// live on the device (reading them would synchronize), so seq_info() checks each sequence as its CTAs start:
// a sequence longer than max_seqlen (the grid would not cover it) or offsets that are not
// 0 = c[0] <= c[1] <= ... <= c[batch] = total get error bits; the kernels then compute nothing for that
// sequence, write NaN to every row it owns (out, lse; dq, dk, dv), never touch memory outside the tensors, and
// raise the bits in Params::error_flag (pyllmops.check_kernel_errors() reads it; see docs/attention.md). The
// clamping below only keeps every access inside the tensors.
#pragma once
#include <cstdint>

#include "common/macros.h"
#include "common/tensor.h"

namespace pyllmops {
namespace attention {

constexpr int kMaxHeadDim = 256;

// Error bits (SeqInfo::error, error_flag[0]); q-side bits are the even powers, k-side the odd ones.
constexpr int kErrSeqLenQ = 1;   // a sequence of cu_seqlens_q is longer than max_seqlen_q
constexpr int kErrSeqLenK = 2;   // a sequence of cu_seqlens_k is longer than max_seqlen_k
constexpr int kErrOffsetsQ = 4;  // cu_seqlens_q is not 0 = c[0] <= ... <= c[batch] = total_q around a sequence
constexpr int kErrOffsetsK = 8;  // the same for cu_seqlens_k and total_k
// error_flag layout (int32): [0] the bits of every bad sequence (atomicOr); [1] 1 + the index of the first one
// reported (claimed by atomicCAS from 0), then of that sequence: [2] its lowest bit, [3] c[b], [4] c[b + 1],
// [5] the limit it broke (max_seqlen for a length bit, total rows for an offsets bit).
constexpr int kErrorWords = 6;

// The band of keys a query may see. FlashAttention's convention: query i of a sequence with sq queries
// and sk keys sees key j iff i + sk - sq - left <= j <= i + sk - sq + right; left/right < 0: unbounded.
//
// `shift` is the diagonal offset: sk - sq (bottom-right alignment, FlashAttention) by default, 0 for
// torch SDPA's top-left causal mask (scaled_dot_product_attention with is_causal and L != S).
struct Mask {
  int64_t sq = 0, sk = 0, shift = 0;
  int64_t left = -1, right = -1;

  // First and last visible key of query i (inclusive); empty when first > last. Written so that no sum overflows
  // int64 whatever left / right are (make_params also clamps windows >= sq + sk to -1, unbounded): i, shift are
  // bounded by the sequence lengths, and left / right are only added once known to be smaller than a distance.
  PYLLMOPS_HD int64_t first_key(int64_t i) const {
    const int64_t diag = i + shift;
    if (left < 0 || left >= diag) return 0;
    return diag - left;
  }
  PYLLMOPS_HD int64_t last_key(int64_t i) const {
    const int64_t diag = i + shift;
    if (right < 0 || right >= sk - 1 - diag) return sk - 1;
    return diag + right;
  }
  PYLLMOPS_HD bool visible(int64_t i, int64_t j) const { return j >= first_key(i) && j <= last_key(i) && j >= 0; }

  // Key tiles [tile_begin, tile_end) that query rows [i0, i1) must visit: every other tile is fully
  // masked for all these rows and is skipped. Both bounds are monotone in i, so the union is
  // [first_key(i0), last_key(i1 - 1)].
  PYLLMOPS_HD void key_tiles(int64_t i0, int64_t i1, int block_n, int64_t* tile_begin, int64_t* tile_end) const {
    const int64_t lo = first_key(i0), hi = last_key(i1 - 1);
    if (hi < lo || hi < 0 || lo > sk - 1) {
      *tile_begin = *tile_end = 0;
      return;
    }
    *tile_begin = lo / block_n;
    *tile_end = hi / block_n + 1;
  }
  // Query tiles that key rows [j0, j1) are seen by (the backward's dk/dv pass walks these).
  // Query i sees key j iff i >= j - shift - right (if right >= 0) and i <= j - shift + left (if left >= 0).
  PYLLMOPS_HD void query_tiles(int64_t j0, int64_t j1, int block_m, int64_t* tile_begin, int64_t* tile_end) const {
    // (overflow-free as first_key / last_key: a bound beyond [0, sq - 1] is clamped before it is computed)
    const int64_t dlo = j0 - shift, dhi = (j1 - 1) - shift;
    int64_t lo = (right < 0 || right >= dlo) ? 0 : dlo - right;
    int64_t hi = (left < 0 || left >= sq - 1 - dhi) ? sq - 1 : dhi + left;
    if (lo < 0) lo = 0;
    if (hi > sq - 1) hi = sq - 1;
    if (hi < lo) {
      *tile_begin = *tile_end = 0;
      return;
    }
    *tile_begin = lo / block_m;
    *tile_end = hi / block_m + 1;
  }
  // True when every (i, j) of the tile is visible and in range: the tile needs no per-element mask.
  PYLLMOPS_HD bool tile_is_full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (i1 > sq || j1 > sk) return false;
    return first_key(i1 - 1) <= j0 && last_key(i0) >= j1 - 1;
  }
};

// Strides (in elements) of a token-major tensor; head_dim is contiguous. Varlen tensors have batch = 0.
struct Layout {
  int64_t batch = 0, seq = 0, head = 0;
  PYLLMOPS_HD int64_t at(int64_t b, int64_t row, int64_t h) const { return b * batch + row * seq + h * head; }
};

// Everything a kernel needs.
struct Params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  Layout lq, lk, lv, lo;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse seq stride is 1
  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // varlen: the maxima
  const int32_t* cu_seqlens_q = nullptr;  // varlen when non-null: sequence b is rows [cu[b], cu[b + 1])
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;       // varlen: rows of q and k (cu_seqlens are clamped to them)
  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: scores s become softcap * tanh(s / softcap) before mask and softmax (Gemma 2)
  int64_t window_left = -1, window_right = -1;
  bool top_left = false;                  // diagonal through (0, 0) instead of (sq - 1, sk - 1)
  int device = -1;                        // CUDA device index of the tensors (-1: CPU)
  int* error_flag = nullptr;              // CUDA: kErrorWords int32 (layout above); null on the CPU (it throws)

  // Backward only: dO (layout of O), dQ/dK/dV (layouts of Q/K/V: the Python layer allocates them so),
  // delta (float32, the lse layout) = rowsum(dO * O).
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;
  const float* dlse = nullptr;  // optional gradient of the returned lse (same layout): delta -= dlse
  bool deterministic = false;   // true: bitwise reproducible gradients (no order-dependent atomics)
  Layout ldo, ldq, ldk, ldv;

  bool varlen() const { return cu_seqlens_q != nullptr; }
};

// Where sequence b lives: its first query / key row (element offset along the token axis, already
// multiplied by nothing: rows), its lengths, and the row offset into lse. Shared by CPU and CUDA.
struct SeqInfo {
  int64_t q_row0 = 0, k_row0 = 0, sq = 0, sk = 0;
  int64_t q_batch = 0, k_batch = 0;  // batch index for the batch strides (0 for varlen)
  int64_t lse_off = 0;               // offset of (b, h = 0, i = 0) in lse / delta
  int error = 0;                     // varlen: kErr* bits of this sequence (0 on the CPU, which checked first)
};

PYLLMOPS_HD int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Rows [*row0, *row0 + *len) of sequence b of the offsets c (batch + 1 entries over `total` rows) and its error
// bits: err_offsets unless 0 = c[0] (b = 0), c[b] <= c[b + 1] <= total and c[batch] = total (b = batch - 1) hold,
// else err_len if the length exceeds max_len. Rows are clamped to [0, total); a sequence in error also owns the
// rows no sequence claims (before c[0] for b = 0, after c[batch] for the last), so that they get NaN too.
PYLLMOPS_HD int varlen_rows(const int32_t* c, int64_t b, int64_t batch, int64_t total, int64_t max_len, int err_len,
                            int err_offsets, int64_t* row0, int64_t* len) {
  const int64_t lo = c[b], hi = c[b + 1];
  int err = 0;
  if (lo < 0 || hi < lo || hi > total || (b == 0 && lo != 0) || (b == batch - 1 && hi != total))
    err = err_offsets;
  else if (hi - lo > max_len)
    err = err_len;
  int64_t r0 = clamp(lo, 0, total), r1 = clamp(hi, r0, total);
  if (err && b == 0) r0 = 0;
  if (err && b == batch - 1) r1 = total;
  *row0 = r0;
  *len = r1 - r0;
  return err;
}

PYLLMOPS_HD SeqInfo seq_info(const Params& p, int64_t b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    // A sequence in error (see the top of this file) may be longer than the grid covers: the main CUDA
    // kernels skip it, varlen_fail_kernel (attention_cuda.cuh) writes NaN to its rows and reports it.
    s.error = varlen_rows(p.cu_seqlens_q, b, p.batch, p.total_q, p.seqlen_q, kErrSeqLenQ, kErrOffsetsQ, &s.q_row0,
                          &s.sq) |
              varlen_rows(p.cu_seqlens_k, b, p.batch, p.total_k, p.seqlen_k, kErrSeqLenK, kErrOffsetsK, &s.k_row0,
                          &s.sk);
    s.lse_off = s.q_row0;  // lse (heads, total_q)
  } else {
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
    s.q_batch = s.k_batch = b;
    s.lse_off = b * p.lse_batch_stride;
  }
  return s;
}

// Row `row` of sequence s, head h, of a query-side (q, o, dO, dq) or key-side (k, v, dk, dv) tensor.
template <typename T>
PYLLMOPS_HD T* q_row(T* base, const Layout& l, const SeqInfo& s, int64_t row, int64_t h) {
  return base + l.at(s.q_batch, s.q_row0 + row, h);
}
template <typename T>
PYLLMOPS_HD T* k_row(T* base, const Layout& l, const SeqInfo& s, int64_t row, int64_t h) {
  return base + l.at(s.k_batch, s.k_row0 + row, h);
}
// lse / delta of sequence s, head h, from query row `row` on.
PYLLMOPS_HD int64_t lse_index(const Params& p, const SeqInfo& s, int64_t row, int64_t h) {
  return s.lse_off + h * p.lse_head_stride + row;
}

PYLLMOPS_HD Mask seq_mask(const Params& p, const SeqInfo& s) {
  Mask m;
  m.sq = s.sq;
  m.sk = s.sk;
  m.shift = p.top_left ? 0 : s.sk - s.sq;
  m.left = p.window_left;
  m.right = p.window_right;
  return m;
}

// ---- kernel entry points (attention_bindings.cpp checks views and fills Params first) ----------
// dtype: the element type of q/k/v/o (and of dout/dq/dk/dv).
void forward_cpu(const Params& p, DType dtype);
const char* cpu_isa_name();  // the instruction set the CPU kernel's tile products run on: avx512, avx2 or baseline
void backward_cpu(const Params& p, DType dtype);
// Whether backward_cpu takes its single pass for these sizes (else two passes: dq, then dk / dv). seqlen_q is the
// longest sequence's (max_seqlen_q for varlen). The ops route causal CPU calls to this kernel only then.
bool cpu_single_pass_backward(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t head_dim);
void forward_cuda(const Params& p, DType dtype, uintptr_t stream);
void backward_cuda(const Params& p, DType dtype, uintptr_t stream);

}  // namespace attention
}  // namespace pyllmops
