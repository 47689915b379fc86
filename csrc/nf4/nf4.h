// NF4 (QLoRA's 4-bit NormalFloat), in bitsandbytes' format byte for byte.
//
// Format. A tensor of n elements, flattened, is cut into blocks of `blocksize` (a power of two,
// 32..4096); the last block may be partial. Per block: absmax = max |x| (fp32). Each element is
// scaled s = x * (1 / absmax) and encoded as the index of the nearest of the 16 NF4 code values:
// the number of midpoints (code[i] + code[i+1]) / 2 (in fp32) strictly below s, so a value exactly
// on a midpoint takes the lower code. Two codes per byte, the first element in the high nibble; an
// odd count pads the last low nibble with code 7 (0.0). Decoding: x' = code[q] * absmax, in fp32,
// rounded once to the output dtype.
//
// Double quantization ("nested", bnb's compress_statistics=True): offset = mean(absmax); the
// centred absmax - offset is 8-bit quantized with a sorted 256-entry code (bnb's signed dynamic
// map) in blocks of 256 with fp32 absmax2. Decoding one block's scale:
//   scale = fl(fl(code2[qabsmax] * absmax2[b / 256]) + offset)   (two roundings, no FMA),
// the order bitsandbytes uses, so dequantizing a bnb checkpoint reproduces bnb's values exactly.
//
// This header holds the math both the CPU and the CUDA kernels run.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#include "common/tensor.h"

// The 16 NF4 values (QLoRA, Dettmers et al. 2023, Appendix E), as fp32 in bitsandbytes.
#define PYLLMOPS_NF4_CODE_VALUES                                                                \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                   \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,               \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

namespace pyllmops {
namespace nf4 {

constexpr int kMinBlocksize = 32;  // >= 32 lets a CUDA thread own 16 packed bytes of one block
constexpr int kMaxBlocksize = 4096;
constexpr int kNestedCodeSize = 256;
constexpr int kMaxSkinnyRows = 8;  // the fused matmul's row limit on CUDA for fp32 x (SIMT kernel)
constexpr int kMaxSkinnyRowsCuda = 16;  // ... for fp16 / bf16 x (tensor-core kernel: two n8 tiles)
constexpr int64_t kMaxSkinnyK = int64_t{1} << 25;  // the tensor-core kernel's in_features limit (32-bit k math)
constexpr int64_t kSkinnySpanK = 128;  // k per segment of a row in the tensor-core kernel
constexpr int kMaxSkinnyRowsCpu = 64;  // on the CPU (groups of 8 rows share each decoded row of W)

// Reciprocal used to scale a block; bnb clamps absmax at 1e-38 so an all-zero block encodes 0.
PYLLMOPS_HD float block_reciprocal(float absmax) { return 1.0f / (absmax < 1e-38f ? 1e-38f : absmax); }

// Midpoint i of a sorted code, between code[i] and code[i + 1], rounded as fp32 (code[i] + code[i+1]) / 2.
PYLLMOPS_HD float midpoint(const float* code, int i) {
  return PYLLMOPS_MUL_RN(PYLLMOPS_ADD_RN(code[i], code[i + 1]), 0.5f);
}

// Nearest NF4 code of a scaled value (ties to the lower code), branch-free: the number of the 15
// midpoints (mid[i] = midpoint(code, i), computed once per kernel) strictly below s.
PYLLMOPS_HD uint32_t encode(const float* mid, float s) {
  uint32_t q = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) q += s > mid[i] ? 1u : 0u;
  return q;
}

// ---- the nested (8-bit) quantizer: bitsandbytes' quantize_blockwise, byte for byte ------------
// bitsandbytes 0.50 rounds a scaled value s (x * (1 / absmax), fp32) to its sorted 256-entry code by a
// different rule on each device, and we follow each on its own device, so our bytes equal bnb's there:
// - CUDA (kernels.cu, dQuantize): a 7-step bisection, then the nearer of the two neighbours by the fp32
//   midpoint (code[i] + code[i+1]) * 0.5. The bisection always ends on an even index, so a value
//   exactly on a midpoint goes to the even index of the pair. Equivalently: the number of midpoints
//   strictly below s, plus one when s sits exactly on the midpoint above an odd index.
// - CPU (cpu_ops.cpp, quantize_cpu): s is clamped to [-1, 1], mapped to the nearest point of a
//   65536-point grid, index = (uint16)((s + 1) * 0.5 * 65535 + 0.5), and that index is looked up in a
//   table: lut[i] = the number of midpoints strictly below the grid value -1 + 2i / 65535 (fp32). Near
//   a midpoint this can pick the other neighbour than the exact rule (the issue-11 mismatches).
// Both: a block whose absmax is 0 gets code 0 everywhere (bnb's CPU writes 0; its CUDA kernel divides
// 1 / 0 and every comparison with the NaN product fails, which also lands on 0); a NaN s gives 0.

constexpr int kLutSize = 65536;

// The number of midpoints of a sorted code of size n strictly below s (binary search; NaN -> 0).
PYLLMOPS_HD uint32_t midpoints_below(const float* code, int n, float s) {
  int lo = 0, hi = n - 1;  // answer in [lo, hi]; midpoint i lies between code[i] and code[i + 1]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (s > midpoint(code, mid)) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint32_t>(lo);
}

// bitsandbytes' CUDA rule (see above).
PYLLMOPS_HD uint32_t encode_sorted_cuda_rule(const float* code, int n, float s) {
  uint32_t q = midpoints_below(code, n, s);
  if ((q & 1u) && static_cast<int>(q) + 1 < n && s == midpoint(code, static_cast<int>(q))) ++q;
  return q;
}

// bitsandbytes' CPU rule: the grid index of s (see above).
PYLLMOPS_HD uint32_t lut_index(float s) {
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  if (!(s == s)) return 0;  // NaN (0 * inf in a block whose absmax is subnormal): bnb's x86 cast gives 0
  return static_cast<uint32_t>(
      PYLLMOPS_ADD_RN(PYLLMOPS_MUL_RN(PYLLMOPS_MUL_RN(PYLLMOPS_ADD_RN(s, 1.0f), 0.5f), 65535.0f), 0.5f));
}

// bitsandbytes' CPU rule: the table (lut[kLutSize]) for a sorted code of size n.
inline void build_code_lut(const float* code, int n, uint8_t* lut) {
  int q = 0;
  for (int i = 0; i < kLutSize; ++i) {
    const float v = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLutSize - 1);
    while (q < n - 1 && midpoint(code, q) < v) ++q;
    lut[i] = static_cast<uint8_t>(q);
  }
}

// Where each block's scale comes from: plain fp32 absmax, or the nested 8-bit form.
struct Scales {
  const float* absmax = nullptr;   // plain: [n_blocks] fp32
  const uint8_t* qabsmax = nullptr;  // nested: [n_blocks] codes into code2
  const float* absmax2 = nullptr;  // nested: [ceil(n_blocks / blocksize2)] fp32
  const float* code2 = nullptr;    // nested: [256] sorted code
  const float* offset = nullptr;   // nested: [1] fp32 mean of the original absmax
  int blocksize2_log2 = 8;          // nested blocksize = 1 << blocksize2_log2 (a power of two: a shift, not a division)

  PYLLMOPS_HD bool nested() const { return qabsmax != nullptr; }
  PYLLMOPS_HD float operator()(int64_t block) const {
    if (qabsmax == nullptr) return absmax[block];
    const float v = PYLLMOPS_MUL_RN(code2[qabsmax[block]], absmax2[block >> blocksize2_log2]);
    return PYLLMOPS_ADD_RN(v, offset[0]);
  }
};

// ---- kernel entry points (bindings.cpp checks views, then calls one of these) ------------------
// Buffers are contiguous. `stream` is a cudaStream_t handle for the CUDA entry points.

// w[n] (f32/f16/bf16) -> packed[(n + 1) / 2], absmax[ceil(n / blocksize)]
void quantize_cpu(const TensorView& w, int64_t blocksize, const TensorView& packed, const TensorView& absmax);
void quantize_cuda(const TensorView& w, int64_t blocksize, const TensorView& packed, const TensorView& absmax,
                   uintptr_t stream);

// x[n] fp32 -> q[n] uint8 codes into `code` (sorted, code_size entries), absmax[ceil(n / blocksize)],
// by bitsandbytes' rule of the device (see above).
void quantize_sorted_code_cpu(const TensorView& x, const TensorView& code, int64_t blocksize, const TensorView& q,
                              const TensorView& absmax);
void quantize_sorted_code_cuda(const TensorView& x, const TensorView& code, int64_t blocksize, const TensorView& q,
                               const TensorView& absmax, uintptr_t stream);

// packed + scales -> out[n] (f32/f16/bf16)
void dequantize_cpu(const TensorView& packed, const Scales& scales, int64_t blocksize, const TensorView& out);
void dequantize_cuda(const TensorView& packed, const Scales& scales, int64_t blocksize, const TensorView& out,
                     uintptr_t stream);

// y[m, n] = x[m, k] . W[n, k]^T (+ bias[n]) with W in NF4 (flattened row-major, n*k elements); W is decoded
// in registers and never written out. Rows of x: CPU <= kMaxSkinnyRowsCpu; CUDA <= kMaxSkinnyRows (fp32 x) or
// kMaxSkinnyRowsCuda (fp16 / bf16 x), which also needs an fp32 workspace of ceil(k / 512) * m * n elements
// when k > 512 (split-k partial sums; `workspace` may be null otherwise).
void skinny_matmul_cpu(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                       const TensorView* bias, const TensorView& y);
void skinny_matmul_cuda(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                        const TensorView* bias, const TensorView& y, const TensorView* workspace, uintptr_t stream);

}  // namespace nf4
}  // namespace pyllmops
