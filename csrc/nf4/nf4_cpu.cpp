// NF4 CPU kernels: quantize, nested 8-bit quantize, dequantize, fused skinny matmul.
//
// Same decomposition as the CUDA kernels (nf4_cuda.cu): work is split by quantization block, each
// block's scale is computed once, and the 16 decoded values of a block are a lookup table. All math
// is in nf4.h; this file only loops. Threads: parallel_for over blocks (or output rows).
//
// Napkin math (2 cores, ~10 GB/s of memory each): dequantizing 4096x4096 to bf16 moves 8 MiB in and
// 32 MiB out, ~4 ms at bandwidth; the table lookup costs ~1 ns per byte per core, so ~4 ms too.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "nf4/nf4.h"

namespace pyllmops {
namespace nf4 {

namespace {

const float kCode[16] = {PYLLMOPS_NF4_CODE_VALUES};

struct Midpoints {
  float v[15];
  Midpoints() {
    for (int i = 0; i < 15; ++i) v[i] = midpoint(kCode, i);
  }
};
const Midpoints kMid;

// The first non-finite element seen by any thread (quantizers refuse them: a NaN would otherwise be
// encoded as a number, an inf would poison the nested statistics).
struct FirstBad {
  std::atomic<int64_t> index{std::numeric_limits<int64_t>::max()};
  template <typename T>
  void scan(const T* x, int64_t start, int64_t end) {  // called only for a block known to hold one
    for (int64_t i = start; i < end; ++i)
      if (!(std::fabs(to_float(x[i])) <= FLT_MAX)) {
        int64_t cur = index.load();
        while (i < cur && !index.compare_exchange_weak(cur, i)) {}
        return;
      }
  }
  template <typename T>
  void throw_if_any(const T* x, const char* name) const {
    const int64_t i = index.load();
    if (i != std::numeric_limits<int64_t>::max())
      throw_invalid("pyllmops._C: ", name, " must be finite, but element ", i, " (flattened) is ", to_float(x[i]));
  }
};

// Blocks per parallel_for chunk: keep each thread's share at >= ~64k elements.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

template <typename T>
void quantize_impl(const T* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  FirstBad bad;
  parallel_for(n_blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = start; i < end; ++i) {
        const float a = std::fabs(to_float(w[i]));
        finite &= a <= FLT_MAX;
        amax = std::max(amax, a);
      }
      if (!finite) bad.scan(w, start, end);
      absmax[b] = amax;
      const float rcp = block_reciprocal(amax);
      // blocksize is even, so a block starts on a byte; only the very last byte can be half full.
      for (int64_t i = start; i < end; i += 2) {
        const uint32_t hi = encode(kMid.v, to_float(w[i]) * rcp);
        const uint32_t lo = i + 1 < end ? encode(kMid.v, to_float(w[i + 1]) * rcp) : 7u;
        packed[i >> 1] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
  bad.throw_if_any(w, "w");
}

template <typename T>
void dequantize_impl(const uint8_t* packed, const Scales& scales, int64_t blocksize, int64_t n, T* out) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  parallel_for(n_blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    T table[16];
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = scales(b);
      for (int j = 0; j < 16; ++j) table[j] = from_float<T>(kCode[j] * scale);
      const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
      const int64_t pairs_end = start + ((end - start) & ~int64_t(1));
      for (int64_t i = start; i < pairs_end; i += 2) {
        const uint8_t byte = packed[i >> 1];
        out[i] = table[byte >> 4];
        out[i + 1] = table[byte & 15];
      }
      if (pairs_end < end) out[pairs_end] = table[packed[pairs_end >> 1] >> 4];
    }
  });
}

// Decodes row elements [flat, flat + k) of W into wrow (fp32, scaled). Handles rows that start
// mid-byte (odd k) and rows that span several blocks or share one.
void decode_row(const uint8_t* packed, const Scales& scales, int64_t blocksize, int64_t flat, int64_t k,
                float* wrow) {
  int64_t j = 0;
  while (j < k) {
    const int64_t i = flat + j;
    const int64_t block = i / blocksize;
    const int64_t seg_end = std::min(k, (block + 1) * blocksize - flat);
    float table[16];
    const float scale = scales(block);
    for (int t = 0; t < 16; ++t) table[t] = kCode[t] * scale;
    if (((flat + j) & 1) && j < seg_end) {  // a row of odd length can start on a low nibble
      wrow[j] = table[packed[(flat + j) >> 1] & 15];
      ++j;
    }
    for (; j + 1 < seg_end; j += 2) {  // now byte-aligned: two elements per byte
      const uint8_t byte = packed[(flat + j) >> 1];
      wrow[j] = table[byte >> 4];
      wrow[j + 1] = table[byte & 15];
    }
    if (j < seg_end) {
      wrow[j] = table[packed[(flat + j) >> 1] >> 4];
      ++j;
    }
  }
}

template <typename T>
void skinny_impl(const T* x, int64_t m, int64_t k, const uint8_t* packed, const Scales& scales, int64_t blocksize,
                 const T* bias, int64_t n, T* y) {
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(x[i]);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
  parallel_for(n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> wrow(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      decode_row(packed, scales, blocksize, r * k, k, wrow.data());
      const float b = bias ? to_float(bias[r]) : 0.0f;
      for (int64_t i = 0; i < m; ++i) y[i * n + r] = from_float<T>(dot8(xf.data() + i * k, wrow.data(), k) + b);
    }
  });
}

}  // namespace

void quantize_cpu(const TensorView& w, int64_t blocksize, const TensorView& packed, const TensorView& absmax) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(w.dtype, "w", f16_t, bf16_t, [&] {
    quantize_impl(w.ptr<const scalar_t>(), w.numel(), blocksize, packed.ptr<uint8_t>(), absmax.ptr<float>());
  });
}

void quantize_sorted_code_cpu(const TensorView& x, const TensorView& code, int64_t blocksize, const TensorView& q,
                              const TensorView& absmax) {
  const float* xp = x.ptr<const float>();
  const int code_size = static_cast<int>(code.numel());
  std::vector<uint8_t> lut(kLutSize);
  build_code_lut(code.ptr<const float>(), code_size, lut.data());
  uint8_t* qp = q.ptr<uint8_t>();
  float* ap = absmax.ptr<float>();
  const int64_t n = x.numel(), n_blocks = (n + blocksize - 1) / blocksize;
  FirstBad bad;
  parallel_for(n_blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = start; i < end; ++i) {
        const float a = std::fabs(xp[i]);
        finite &= a <= FLT_MAX;
        amax = std::max(amax, a);
      }
      if (!finite) bad.scan(xp, start, end);
      ap[b] = amax;
      if (amax == 0.0f) {  // bitsandbytes' rule: an all-zero block is code 0
        std::fill(qp + start, qp + end, uint8_t{0});
        continue;
      }
      const float rcp = 1.0f / amax;
      for (int64_t i = start; i < end; ++i) qp[i] = lut[lut_index(xp[i] * rcp)];
    }
  });
  bad.throw_if_any(xp, "x");
}

void dequantize_cpu(const TensorView& packed, const Scales& scales, int64_t blocksize, const TensorView& out) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(out.dtype, "out", f16_t, bf16_t, [&] {
    dequantize_impl(packed.ptr<const uint8_t>(), scales, blocksize, out.numel(), out.ptr<scalar_t>());
  });
}

void skinny_matmul_cpu(const TensorView& x, const TensorView& packed, const Scales& scales, int64_t blocksize,
                       const TensorView* bias, const TensorView& y) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(x.dtype, "x", f16_t, bf16_t, [&] {
    skinny_impl(x.ptr<const scalar_t>(), x.size(0), x.size(1), packed.ptr<const uint8_t>(), scales, blocksize,
                bias ? bias->ptr<const scalar_t>() : nullptr, y.size(1), y.ptr<scalar_t>());
  });
}

}  // namespace nf4
}  // namespace pyllmops
