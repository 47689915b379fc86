// LoRA / QLoRA / QA-LoRA: one fused "matmul + low-rank epilogue" and group-wise INT quantization.
//
// The fused product. Every forward and the input-gradient of every backward is the same shape:
//   t[m, q]   = sum_red (in[m, red] * in_scale[m, red]) * D(q, red)           (q < r, fp32 out)
//   out[m, j] = sum_red in[m, red] * Wop(j, red) + bias[j]
//               + scaling * out_scale[m, j] * sum_q t[m, q] * U(j, q)
//   forward  (transposed = false): in = x, Wop(j, k) = W[j, k], D = A_exp, U = B     -> y,  t = x.A^T
//   backward (transposed = true):  in = dy, Wop(k, n) = W[n, k], D = B^T, U = A_exp^T -> dx, t = dy.B
// with W (out_features, in_features) dense, NF4 or INT, decoded tile by tile (never written out);
// A_exp(q, k) = A[q, k / pool] / pool expands QA-LoRA's A (r, in_features / pool) so the adapter
// sees x mean-pooled over groups of `pool` input features (pool = 1 for LoRA / QLoRA; pool is a
// power of two, so the division is exact). in_scale is the dropout mask (0 or 1/(1-p)) applied to
// the adapter input only; in the backward it multiplies the adapter term of dx (out_scale).
// One tile of `in` rows is read once and feeds both products; t is finished when the reduction
// loop ends, so the adapter's up-projection is an epilogue of the base matmul; out is written once.
// The tile that owns output columns [0, tile) also writes t (it is the same in every column tile),
// which the backward needs: dB = s * dy^T . t_fwd, dA = s * t_bwd^T . (x * mask) (pooled for QA-LoRA).
//
// INT format (QA-LoRA's group-wise asymmetric min-max, arXiv 2309.14717 sec. 3.3):
//   per row n and group g of `group_size` consecutive input features:
//     zero = min(w), scale = (max(w) - min(w)) / (2^bits - 1)  (scale := 1 if that is 0)
//     q = clamp(rint((w - zero) / scale), 0, 2^bits - 1)    (fp32, ties to even)
//     w' = fl(fl(q * scale) + zero)                             (fp32, two roundings, no FMA)
//   scales, zeros: fp32 [out, in / group_size]. qweight: int32 [out, ceil(in / cpw)], cpw = 32 / bits
//   codes per word (4-bit: 8, 3-bit: 10 with 2 bits unused, 2-bit: 16), element k of a row in word
//   k / cpw at bit (k % cpw) * bits. Keeping zeros as floats (not integer zero points) is what
//   makes the QA-LoRA merge exact: zeros' = zeros + scaling * (B.A)[n, g] / group_size.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#include "common/tensor.h"
#include "nf4/nf4.h"

#if defined(__CUDA_ARCH__)
#define PYLLMOPS_LORA_DIV_RN(a, b) __fdiv_rn((a), (b))
#define PYLLMOPS_LORA_RINT(a) rintf(a)
#else
#include <cmath>
#define PYLLMOPS_LORA_DIV_RN(a, b) ((a) / (b))
#define PYLLMOPS_LORA_RINT(a) std::nearbyint(a)
#endif

namespace pyllmops {
namespace lora {

constexpr int kMaxRankCuda = 64;      // the SIMT CUDA kernel keeps t for its rows in registers
constexpr int kMaxRankCudaMma = 256;  // the tensor-core kernel: above 64, t comes from a down pass (t_part)

// ---- INT (QA-LoRA) format ------------------------------------------------------------------------
PYLLMOPS_HD int codes_per_word(int bits) { return 32 / bits; }
PYLLMOPS_HD int64_t words_per_row(int64_t in_features, int bits) {
  return (in_features + codes_per_word(bits) - 1) / codes_per_word(bits);
}
PYLLMOPS_HD int max_code(int bits) { return (1 << bits) - 1; }

// (scale, zero) of a group from its min and max.
PYLLMOPS_HD void int_group_params(float wmin, float wmax, int bits, float* scale, float* zero) {
  float s = PYLLMOPS_LORA_DIV_RN(PYLLMOPS_ADD_RN(wmax, -wmin), static_cast<float>(max_code(bits)));
  *scale = s == 0.0f ? 1.0f : s;
  *zero = wmin;
}
PYLLMOPS_HD uint32_t int_encode(float w, float scale, float zero, int bits) {
  float q = PYLLMOPS_LORA_RINT(PYLLMOPS_LORA_DIV_RN(PYLLMOPS_ADD_RN(w, -zero), scale));
  q = q < 0.0f ? 0.0f : q;
  const float hi = static_cast<float>(max_code(bits));
  q = q > hi ? hi : q;
  return static_cast<uint32_t>(q);
}
PYLLMOPS_HD float int_decode(uint32_t q, float scale, float zero) {
  return PYLLMOPS_ADD_RN(PYLLMOPS_MUL_RN(static_cast<float>(q), scale), zero);
}

// ---- where the base weight W (out_features x in_features, row-major) comes from ------------------
enum class WeightKind { dense, nf4, int_q };

struct Weight {
  int64_t n_out = 0, k_in = 0;
  const void* dense = nullptr;  // dense: [n_out, k_in], the dtype of x
  const uint8_t* packed = nullptr;  // nf4: bitsandbytes bytes of the flattened W
  nf4::Scales nf4_scales;
  int64_t blocksize = 64;
  const int32_t* qweight = nullptr;  // int: see the format above
  const float* scales = nullptr;
  const float* zeros = nullptr;
  int bits = 4;
  int64_t group_size = 128;
};

// W[n, k] as fp32. `code` is the NF4 table (constant / shared memory on the device).
template <WeightKind K, typename T>
PYLLMOPS_HD float load_weight(const Weight& w, int64_t n, int64_t k, const float* code) {
  if constexpr (K == WeightKind::dense) {
    return to_float(static_cast<const T*>(w.dense)[n * w.k_in + k]);
  } else if constexpr (K == WeightKind::nf4) {
    const int64_t flat = n * w.k_in + k;
    const uint32_t byte = w.packed[flat >> 1];
    return PYLLMOPS_MUL_RN(code[(flat & 1) ? (byte & 15u) : (byte >> 4)], w.nf4_scales(flat / w.blocksize));
  } else {
    const int cpw = codes_per_word(w.bits);
    const uint32_t word = static_cast<uint32_t>(w.qweight[n * words_per_row(w.k_in, w.bits) + k / cpw]);
    const uint32_t q = (word >> ((k % cpw) * w.bits)) & static_cast<uint32_t>(max_code(w.bits));
    const int64_t g = n * (w.k_in / w.group_size) + k / w.group_size;
    return int_decode(q, w.scales[g], w.zeros[g]);
  }
}

// ---- the fused product's arguments (see the top of this file) -------------------------------------
struct FusedArgs {
  int64_t m = 0, n_cols = 0, n_red = 0;  // out is [m, n_cols]; the reduction runs over n_red
  bool transposed = false;               // false: forward (y); true: backward (dx)
  const void* in = nullptr;              // [m, n_red]
  const void* in_scale = nullptr;        // optional [m, n_red]: dropout mask on the adapter input
  const void* out_scale = nullptr;       // optional [m, n_cols]: dropout mask on the adapter term of dx
  const void* bias = nullptr;            // optional [n_cols]
  const void* lora_a = nullptr;          // [r, in_features / pool]
  const void* lora_b = nullptr;          // [out_features, r]
  int64_t r = 0, pool = 1;
  float scaling = 1.0f;
  void* out = nullptr;                   // [m, n_cols]
  float* t = nullptr;                    // [m, r] fp32
  // CUDA tensor-core kernel with r > 64 or split-K (lora_cuda_mma.cu): [t_splits, m, r] fp32 partial sums of t
  // over t_splits slices of the reduction, written by the down pass and summed by the fused kernel's
  // epilogue in slice order. Every element is written before it is read; nullptr otherwise.
  float* t_part = nullptr;
  int64_t t_splits = 0;
  // CUDA tensor-core kernel, split-K (decode shapes; ops/lora.py: split_k): [o_splits, m, n_cols] fp32 partial
  // sums of the base product over o_splits slices of the reduction, one per CTA of the (column tile, row tile,
  // slice) grid; a finishing pass adds them in slice order and applies bias and the adapter term once. t then
  // comes from the down pass (t_part) at every rank > 0. nullptr: no split.
  float* o_part = nullptr;
  int64_t o_splits = 0;
};

// A_exp(q, k) = A[q, k / pool] / pool; in_features = pool * (columns of A).
template <typename T>
PYLLMOPS_HD float a_exp(const FusedArgs& a, int64_t in_features, int64_t q, int64_t k) {
  const int64_t cols = in_features / a.pool;
  const float v = to_float(static_cast<const T*>(a.lora_a)[q * cols + k / a.pool]);
  return a.pool == 1 ? v : PYLLMOPS_MUL_RN(v, 1.0f / static_cast<float>(a.pool));
}
template <typename T>
PYLLMOPS_HD float lora_b(const FusedArgs& a, int64_t n, int64_t q) {
  return to_float(static_cast<const T*>(a.lora_b)[n * a.r + q]);
}
// D(q, red): the adapter's down-projection along the reduction.
template <typename T>
PYLLMOPS_HD float down(const FusedArgs& a, int64_t q, int64_t red) {
  return a.transposed ? lora_b<T>(a, red, q) : a_exp<T>(a, a.n_red, q, red);
}
// U(j, q): the adapter's up-projection onto output column j.
template <typename T>
PYLLMOPS_HD float up(const FusedArgs& a, int64_t j, int64_t q) {
  return a.transposed ? a_exp<T>(a, a.n_cols, q, j) : lora_b<T>(a, j, q);
}
// Wop(j, red).
template <WeightKind K, typename T>
PYLLMOPS_HD float base(const FusedArgs& a, const Weight& w, int64_t j, int64_t red, const float* code) {
  return a.transposed ? load_weight<K, T>(w, red, j, code) : load_weight<K, T>(w, j, red, code);
}

// ---- mma.sync m16n8k16 (f16 / bf16 inputs, f32 accumulators) fragment coordinates --------------
// PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type": lane l, g = l >> 2,
// t = l & 3; element i of a lane's fragment (registers hold elements 2r and 2r + 1, low half first).
PYLLMOPS_HD int mma_a_row(int lane, int i) { return (lane >> 2) + ((i & 2) ? 8 : 0); }         // A 16 x 16
PYLLMOPS_HD int mma_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + ((i & 4) ? 8 : 0); }
PYLLMOPS_HD int mma_b_k(int lane, int i) { return (lane & 3) * 2 + (i & 1) + ((i & 2) ? 8 : 0); }   // B 16 x 8
PYLLMOPS_HD int mma_b_n(int lane) { return lane >> 2; }
PYLLMOPS_HD int mma_c_row(int lane, int i) { return (lane >> 2) + ((i & 2) ? 8 : 0); }         // C 16 x 8
PYLLMOPS_HD int mma_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// ---- kernel entry points (lora_bindings.cpp checks views, then calls one of these) ----------------
// x's dtype (f32/f16/bf16) is `dtype`; all buffers are contiguous; `stream` is a cudaStream_t.
void fused_cpu(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w);
// tensor_cores: fp16 / bf16 inputs take the mma.sync main loop (experimental: see lora_cuda_mma.cu).
void fused_cuda(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w, int device, uintptr_t stream,
                bool tensor_cores);
void fused_cuda_mma(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w, uintptr_t stream);
// Whether the tensor-core kernel's 32-bit indices cover the problem (lora_cuda_mma.cu).
bool fits_32bit_indices(const FusedArgs& args, const Weight& w);

// w [n, k] (f32/f16/bf16) -> qweight int32 [n, words_per_row], scales, zeros fp32 [n, k / group_size]
void int_quantize_cpu(const TensorView& w, int bits, int64_t group_size, const TensorView& qweight,
                      const TensorView& scales, const TensorView& zeros);
void int_quantize_cuda(const TensorView& w, int bits, int64_t group_size, const TensorView& qweight,
                       const TensorView& scales, const TensorView& zeros, uintptr_t stream);
// -> out [n, k] (f32/f16/bf16)
void int_dequantize_cpu(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int bits,
                        int64_t group_size, const TensorView& out);
void int_dequantize_cuda(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int bits,
                         int64_t group_size, const TensorView& out, uintptr_t stream);

}  // namespace lora
}  // namespace pyllmops
