// NF4 CPU kernels: quantize, nested 8-bit quantize, dequantize, fused skinny matmul.
//
// Work is split by quantization block (dequantize) or by output row (matmul) over parallel_for; each
// block's scale is computed once. The format's math is in nf4.h; this file loops, with SIMD paths
// picked at run time (x86-64: AVX-512 (F, BW, VL) > AVX2 (+FMA, F16C) > portable scalar;
// PYLLMOPS_NF4_ISA=scalar|avx2|avx512 forces a lower one, for tests and comparisons):
//
// dequantize: per block, the 16 values code[j] * scale are rounded once to the output type (the
//   format's definition), then 16 packed bytes (32 outputs) at a time are split into nibbles, ordered
//   high nibble first, and looked up in registers: AVX2 pshufb on the low and high byte of each 16-bit
//   value, or vpermps on two 8-entry halves for fp32; AVX-512 vpermw / vpermps with the whole 16-entry
//   table. Output-write bound: 4096x4096 to fp32 writes 64 MiB and reads 8 MiB.
// skinny matmul (y = x W^T, few rows of x): x is converted to fp32 once; per output row and block the
//   16-entry fp32 table is scaled (code[j] * scale, exactly the dequantized values), 8 packed bytes at a
//   time are decoded to 16 fp32 weights in registers and FMA'd into per-row vector accumulators. W is
//   read once (0.5 byte per weight) and never written; the dense fp32 GEMV reads 4 bytes per weight.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define PYLLMOPS_NF4_X86 1
#include <immintrin.h>
#else
#define PYLLMOPS_NF4_X86 0
#endif

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
      throw_invalid("pyllmops._C: ", name, " must be finite, but element ", i, " (flattened index) is ",
                    to_float(x[i]));
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

// ---- instruction set, picked once per call ----------------------------------------------------
enum class Isa { scalar, avx2, avx512 };

Isa hardware_isa() {
#if PYLLMOPS_NF4_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa current_isa() {
  static const Isa hw = hardware_isa();
  const char* env = std::getenv("PYLLMOPS_NF4_ISA");
  if (env == nullptr || *env == '\0') return hw;
  const std::string want(env);
  Isa isa;
  if (want == "scalar") isa = Isa::scalar;
  else if (want == "avx2") isa = Isa::avx2;
  else if (want == "avx512") isa = Isa::avx512;
  else throw_invalid("pyllmops._C: PYLLMOPS_NF4_ISA must be scalar, avx2 or avx512, got '", want, "'");
  return static_cast<int>(isa) <= static_cast<int>(hw) ? isa : hw;  // never above what the CPU has
}

// ---- portable scalar paths ----------------------------------------------------------------------
// Elements [start, end) of one block (start even) with the block's 16 values in T.
template <typename T>
void dequantize_block_scalar(const uint8_t* packed, float scale, int64_t start, int64_t end, T* out) {
  T table[16];
  for (int j = 0; j < 16; ++j) table[j] = from_float<T>(kCode[j] * scale);
  const int64_t pairs_end = start + ((end - start) & ~int64_t(1));
  for (int64_t i = start; i < pairs_end; i += 2) {
    const uint8_t byte = packed[i >> 1];
    out[i] = table[byte >> 4];
    out[i + 1] = table[byte & 15];
  }
  if (pairs_end < end) out[pairs_end] = table[packed[pairs_end >> 1] >> 4];
}

// sum over elements [i0, i1) of W (flat indices) of table[code] * xs[i - base], one row of x.
inline float dot_scalar(const uint8_t* packed, const float* table, int64_t i0, int64_t i1, const float* xs,
                        int64_t base) {
  float s = 0.0f;
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t byte = packed[i >> 1];
    s += table[(i & 1) ? (byte & 15) : (byte >> 4)] * xs[i - base];
  }
  return s;
}

// out[m] += sum over elements [i0, i1) of one block (its fp32 scale) of W[i] x[m, i - base], scalar: a whole
// block on the portable path, the part of a segment the vector loops leave on the AVX paths.
template <int M>
inline void add_segment_dot(const uint8_t* packed, float scale, int64_t i0, int64_t i1, const float* xf, int64_t ldx,
                            int64_t base, float* out) {
  float table[16];
  for (int j = 0; j < 16; ++j) table[j] = kCode[j] * scale;
  for (int m = 0; m < M; ++m) out[m] += dot_scalar(packed, table, i0, i1, xf + m * ldx, base);
}

#if PYLLMOPS_NF4_X86
#define PYLLMOPS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYLLMOPS_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

// 8 packed bytes -> their 16 nibbles in element order (high nibble first), one per byte.
PYLLMOPS_AVX2 inline __m128i nibbles8(const uint8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0f);
  return _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// 16 fp32 -> 16 bf16 (float_to_bf16's rounding: to nearest even, NaN kept quiet) in 32-bit lanes.
PYLLMOPS_AVX2 inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

// The block's 16 values as 16-bit T, split into a table of low bytes and one of high bytes (each
// broadcast to both 128-bit lanes) for pshufb.
template <typename T>
PYLLMOPS_AVX2 inline void tables16_avx2(float scale, __m256i& tlo, __m256i& thi) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(kCode), s), v1 = _mm256_mul_ps(_mm256_loadu_ps(kCode + 8), s);
  __m256i h;  // 16 x 16-bit values in order
  if constexpr (std::is_same<T, bf16_t>::value) {
    h = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_avx2(v0), bf16_bits_avx2(v1)), 0xd8);
  } else {
    h = _mm256_set_m128i(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                         _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // per lane: low bytes of its 8 values, then their high bytes; then gather the lanes' halves
  const __m256i split = _mm256_shuffle_epi8(
      h, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
                          7, 9, 11, 13, 15));
  const __m256i byhalf = _mm256_permute4x64_epi64(split, 0xd8);  // [lo 0..15 | hi 0..15]
  tlo = _mm256_permute2x128_si256(byhalf, byhalf, 0x00);
  thi = _mm256_permute2x128_si256(byhalf, byhalf, 0x11);
}

// 16 fp32 table entries (two 8-entry halves) looked up by 8 indices.
PYLLMOPS_AVX2 inline __m256 lookup8_avx2(__m256 t0, __m256 t1, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Full 32-element chunks [start, start + 32 * chunks) of one block; returns the first element not done.
template <typename T>
PYLLMOPS_AVX2 int64_t dequantize_chunks_avx2(const uint8_t* packed, float scale, int64_t start, int64_t chunks,
                                              T* out) {
  const uint8_t* p = packed + (start >> 1);
  T* o = out + start;
  if constexpr (std::is_same<T, float>::value) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 t0 = _mm256_mul_ps(_mm256_loadu_ps(kCode), s), t1 = _mm256_mul_ps(_mm256_loadu_ps(kCode + 8), s);
    for (int64_t c = 0; c < chunks; ++c, p += 16, o += 32) {
      for (int h = 0; h < 2; ++h) {
        const __m128i idx = nibbles8(p + 8 * h);
        _mm256_storeu_ps(o + 16 * h, lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(idx)));
        _mm256_storeu_ps(o + 16 * h + 8, lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8))));
      }
    }
  } else {
    __m256i tlo, thi;
    tables16_avx2<T>(scale, tlo, thi);
    const __m256i m = _mm256_set1_epi8(0x0f);
    for (int64_t c = 0; c < chunks; ++c, p += 16, o += 32) {
      // lane 0 takes bytes 0..7, lane 1 bytes 8..15, each in its low 8 bytes
      const __m256i b = _mm256_permute4x64_epi64(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 0x50);
      const __m256i idx = _mm256_unpacklo_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), m), _mm256_and_si256(b, m));
      const __m256i lo = _mm256_shuffle_epi8(tlo, idx), hi = _mm256_shuffle_epi8(thi, idx);
      const __m256i o0 = _mm256_unpacklo_epi8(lo, hi), o1 = _mm256_unpackhi_epi8(lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(o0, o1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm256_permute2x128_si256(o0, o1, 0x31));
    }
  }
  return start + 32 * chunks;
}

// kStream: non-temporal stores (the caller guarantees 64-byte aligned chunks and fences afterwards).
template <typename T, bool kStream = false>
PYLLMOPS_AVX512 int64_t dequantize_chunks_avx512(const uint8_t* packed, float scale, int64_t start, int64_t chunks,
                                                  T* out) {
  const uint8_t* p = packed + (start >> 1);
  T* o = out + start;
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kCode), _mm512_set1_ps(scale));
  if constexpr (std::is_same<T, float>::value) {
    for (int64_t c = 0; c < chunks; ++c, p += 16, o += 32) {
      const __m512 a = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles8(p)), v);
      const __m512 b = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles8(p + 8)), v);
      if constexpr (kStream) {
        _mm512_stream_ps(o, a);
        _mm512_stream_ps(o + 16, b);
      } else {
        _mm512_storeu_ps(o, a);
        _mm512_storeu_ps(o + 16, b);
      }
    }
  } else {
    __m256i h;
    if constexpr (std::is_same<T, bf16_t>::value) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
      const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      const __mmask16 is_nan =
          _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
      h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, quiet));
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i table = _mm512_castsi256_si512(h);
    for (int64_t c = 0; c < chunks; ++c, p += 16, o += 32) {
      const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(nibbles8(p + 8), nibbles8(p)));
      if constexpr (kStream)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(o), _mm512_permutexvar_epi16(idx, table));
      else
        _mm512_storeu_si512(o, _mm512_permutexvar_epi16(idx, table));
    }
  }
  return start + 32 * chunks;
}

// 16 packed bytes -> their 32 nibbles in element order: elements 0..15 in lo, 16..31 in hi.
PYLLMOPS_AVX2 inline void nibbles16(const uint8_t* p, __m128i& lo, __m128i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i h = _mm_and_si128(_mm_srli_epi16(b, 4), m), l = _mm_and_si128(b, m);
  lo = _mm_unpacklo_epi8(h, l);
  hi = _mm_unpackhi_epi8(h, l);
}

// The skinny matmul's inner product for one output row (flat elements [flat, flat + k) of W) against
// M rows of x (fp32, row stride k): out[m] = sum_j W[j] x[m, j], W[j] = code * scale in fp32 exactly
// as dequantized. Per block the 16-entry table is scaled once; 32 weights (16 bytes) per step, into two
// accumulator sets so that one row of x still has two independent FMA chains. A row that starts on a
// low nibble (odd k) and a row end inside a 32-weight step take the scalar path.
template <int M>
PYLLMOPS_AVX2 void row_dot_avx2(const uint8_t* packed, const Scales& scales, int blocksize_log2, int64_t flat,
                                int64_t k, const float* xf, int64_t ldx, float* out) {
  __m256 acc0[M], acc1[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps(), tail[m] = 0.0f;
  const __m256 c0 = _mm256_loadu_ps(kCode), c1 = _mm256_loadu_ps(kCode + 8);
  int64_t i = flat;
  const int64_t row_end = flat + k;
  while (i < row_end) {
    const int64_t block = i >> blocksize_log2;
    const int64_t seg_end = std::min(row_end, (block + 1) << blocksize_log2);
    const float scale = scales(block);
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 t0 = _mm256_mul_ps(c0, s), t1 = _mm256_mul_ps(c1, s);
    const int64_t vec_start = i + (i & 1);  // byte aligned
    if (i & 1) {
      for (int m = 0; m < M; ++m) tail[m] += kCode[packed[i >> 1] & 15] * scale * xf[m * ldx + (i - flat)];
    }
    for (i = vec_start; i + 32 <= seg_end; i += 32) {
      __m128i lo, hi;
      nibbles16(packed + (i >> 1), lo, hi);
      const __m256 w0 = lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(lo));
      const __m256 w1 = lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(hi));
      const __m256 w3 = lookup8_avx2(t0, t1, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      const float* xs = xf + (i - flat);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs + m * ldx), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs + m * ldx + 8), acc1[m]);
        acc0[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xs + m * ldx + 16), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xs + m * ldx + 24), acc1[m]);
      }
    }
    if (i < seg_end) {
      add_segment_dot<M>(packed, scale, i, seg_end, xf, ldx, flat, tail);
      i = seg_end;
    }
  }
  for (int m = 0; m < M; ++m) {
    const __m256 a = _mm256_add_ps(acc0[m], acc1[m]);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[m] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q))) + tail[m];
  }
}

template <int M>
PYLLMOPS_AVX512 void row_dot_avx512(const uint8_t* packed, const Scales& scales, int blocksize_log2, int64_t flat,
                                    int64_t k, const float* xf, int64_t ldx, float* out) {
  __m512 acc0[M], acc1[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps(), tail[m] = 0.0f;
  const __m512 code = _mm512_loadu_ps(kCode);
  int64_t i = flat;
  const int64_t row_end = flat + k;
  while (i < row_end) {
    const int64_t block = i >> blocksize_log2;
    const int64_t seg_end = std::min(row_end, (block + 1) << blocksize_log2);
    const float scale = scales(block);
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(scale));
    const int64_t vec_start = i + (i & 1);
    if (i & 1) {
      for (int m = 0; m < M; ++m) tail[m] += kCode[packed[i >> 1] & 15] * scale * xf[m * ldx + (i - flat)];
    }
    for (i = vec_start; i + 32 <= seg_end; i += 32) {
      __m128i lo, hi;
      nibbles16(packed + (i >> 1), lo, hi);
      const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), t);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), t);
      const float* xs = xf + (i - flat);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs + m * ldx), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs + m * ldx + 16), acc1[m]);
      }
    }
    if (i < seg_end) {
      add_segment_dot<M>(packed, scale, i, seg_end, xf, ldx, flat, tail);
      i = seg_end;
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + tail[m];
}

// The same product with x in "split" order: per 32-weight step, the step's 16 even elements, then its 16 odd
// ones (skinny_impl reorders x once per call when k % 32 == 0 and blocks hold >= 32 weights, so steps never
// straddle a block or a row). Then one vpmovzxbd of the step's 16 bytes indexes both halves of the table:
// lane b holds byte b, whose high nibble is element 2b and low nibble element 2b + 1, and vpermps reads only
// the low 4 bits of an index, so the odd elements need no mask and the even ones one shift. 3 shuffles per 32
// weights (they share port 5 with the second FMA unit) instead of row_dot_avx512's 6.
template <int M>
PYLLMOPS_AVX512 void row_dot_avx512_split(const uint8_t* packed, const Scales& scales, int blocksize_log2,
                                          int64_t flat, int64_t k, const float* xs, int64_t ldx, float* out) {
  __m512 acc0[M], acc1[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(kCode);
  const int64_t row_end = flat + k;
  for (int64_t i = flat; i < row_end;) {
    const int64_t block = i >> blocksize_log2;
    const int64_t seg_end = std::min(row_end, (block + 1) << blocksize_log2);
    const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(scales(block)));
    for (; i < seg_end; i += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (i >> 1))));
      const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t), w_odd = _mm512_permutexvar_ps(b, t);
      const float* x = xs + (i - flat);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(x + m * ldx), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(x + m * ldx + 16), acc1[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
}
#endif  // PYLLMOPS_NF4_X86

template <int M>
void row_dot_scalar(const uint8_t* packed, const Scales& scales, int blocksize_log2, int64_t flat, int64_t k,
                    const float* xf, int64_t ldx, float* out) {
  for (int m = 0; m < M; ++m) out[m] = 0.0f;
  int64_t i = flat;
  const int64_t row_end = flat + k;
  while (i < row_end) {
    const int64_t block = i >> blocksize_log2;
    const int64_t seg_end = std::min(row_end, (block + 1) << blocksize_log2);
    add_segment_dot<M>(packed, scales(block), i, seg_end, xf, ldx, flat, out);
    i = seg_end;
  }
}

// Outputs of at least this many bytes are written with non-temporal stores: larger than the L2 caches, so the
// stores would otherwise first read each line (read for ownership), a third more memory traffic for a
// write-only stream; smaller ones stay cached for the GEMM that usually reads them next (ops/lora.py).
// Up to glibc's largest mmap threshold (32 MiB): a larger buffer comes from fresh pages every call, which
// the kernel zeroes through the cache at the first touch, and streaming stores then only add traffic
// (measured, one and two threads: 4096x4096 fp32, 64 MiB, 22 -> 27 ms; 1024x4096, 16 MiB, 0.67 -> 0.58 ms).
constexpr int64_t kStreamBytes = int64_t{8} << 20, kStreamMaxBytes = int64_t{32} << 20;

// A large output is usually a fresh allocation (glibc maps anything above its 32 MiB maximum mmap threshold
// anew on every call), and writing it then costs one page fault per 4 KiB page: 16384 faults, ~1.5 us each,
// for a 64 MiB fp32 weight, more than the writes themselves (measured 4096x4096: 27-29 ms for us, bitsandbytes
// and a torch clone alike). Asking for transparent huge pages on the 2 MiB-aligned part of such a buffer (a
// hint; where THP is off or the range is already mapped it changes nothing) faults it in 2 MiB pages.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (data == nullptr || bytes < kStreamMaxBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

template <typename T>
void dequantize_impl(const uint8_t* packed, const Scales& scales, int64_t blocksize, int64_t n, T* out) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const Isa isa = current_isa();
  // Streaming needs every 32-element chunk (64 or 128 bytes) 64-byte aligned: an aligned output and blocks of
  // whole chunks.
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const bool stream = isa == Isa::avx512 && bytes >= kStreamBytes && bytes < kStreamMaxBytes &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && blocksize % 32 == 0;
  parallel_for(n_blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = scales(b);
      int64_t start = b * blocksize;
      const int64_t end = std::min(n, start + blocksize);
#if PYLLMOPS_NF4_X86
      if (isa == Isa::avx512)
        start = stream ? dequantize_chunks_avx512<T, true>(packed, scale, start, (end - start) / 32, out)
                       : dequantize_chunks_avx512<T>(packed, scale, start, (end - start) / 32, out);
      else if (isa == Isa::avx2)
        start = dequantize_chunks_avx2(packed, scale, start, (end - start) / 32, out);
#endif
      if (start < end) dequantize_block_scalar(packed, scale, start, end, out);
    }
#if PYLLMOPS_NF4_X86
    if (stream) _mm_sfence();  // this thread's streamed stores are visible before parallel_for returns
#endif
  });
}

template <int M>
void rows_dot(Isa isa, const uint8_t* packed, const Scales& scales, int blocksize_log2, int64_t flat, int64_t len,
              const float* xf, int64_t ldx, float* out) {
#if PYLLMOPS_NF4_X86
  if (isa == Isa::avx512) return row_dot_avx512<M>(packed, scales, blocksize_log2, flat, len, xf, ldx, out);
  if (isa == Isa::avx2) return row_dot_avx2<M>(packed, scales, blocksize_log2, flat, len, xf, ldx, out);
#endif
  (void)isa;
  row_dot_scalar<M>(packed, scales, blocksize_log2, flat, len, xf, ldx, out);
}

using RowsDotFn = void (*)(Isa, const uint8_t*, const Scales&, int, int64_t, int64_t, const float*, int64_t, float*);
constexpr RowsDotFn kRowsDot[8] = {rows_dot<1>, rows_dot<2>, rows_dot<3>, rows_dot<4>,
                                   rows_dot<5>, rows_dot<6>, rows_dot<7>, rows_dot<8>};

#if PYLLMOPS_NF4_X86
template <int M>
void rows_dot_split(Isa, const uint8_t* packed, const Scales& scales, int blocksize_log2, int64_t flat, int64_t len,
                    const float* xf, int64_t ldx, float* out) {
  row_dot_avx512_split<M>(packed, scales, blocksize_log2, flat, len, xf, ldx, out);
}
constexpr RowsDotFn kRowsDotSplit[8] = {rows_dot_split<1>, rows_dot_split<2>, rows_dot_split<3>, rows_dot_split<4>,
                                        rows_dot_split<5>, rows_dot_split<6>, rows_dot_split<7>, rows_dot_split<8>};
#endif

// Rows of x in groups of up to kGroup share each decoded weight. The columns are walked in chunks of kc
// (a multiple of 32, fixed by the row count alone, so results do not depend on the thread count) so that
// the chunk of x stays in L1 while a thread's rows of W stream past it: M=8 rows of 4096 would be 128 KiB,
// re-read from L2 for every row of W (measured: M=8 at 1024x4096 went from 2.2 ms to 1.4 ms, one core).
constexpr int kGroup = 8;

template <typename T>
void skinny_impl(const T* x, int64_t m, int64_t k, const uint8_t* packed, const Scales& scales, int64_t blocksize,
                 const T* bias, int64_t n, T* y) {
  const Isa isa = current_isa();
  const int lg = log2_pow2(blocksize);
  const RowsDotFn* dots = kRowsDot;
  std::vector<float> xf(static_cast<size_t>(m * k));
#if PYLLMOPS_NF4_X86
  if (isa == Isa::avx512 && k % 32 == 0 && blocksize >= 32) {  // row_dot_avx512_split's order of x
    dots = kRowsDotSplit;
    for (int64_t i = 0; i < m * k; i += 32)
      for (int j = 0; j < 16; ++j) {
        xf[i + j] = to_float(x[i + 2 * j]);
        xf[i + 16 + j] = to_float(x[i + 2 * j + 1]);
      }
  } else
#endif
  {
    for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(x[i]);
  }
  const int64_t group = std::min<int64_t>(m, kGroup);
  const int64_t kc = std::max<int64_t>(256, (8192 / group) & ~int64_t(31));  // <= 32 KiB of x per chunk
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(k * group, 1));
  parallel_for(n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(static_cast<size_t>((r1 - r0) * m), 0.0f);
    float sums[kGroup];
    for (int64_t g = 0; g < m; g += kGroup) {
      const int rows = static_cast<int>(std::min<int64_t>(kGroup, m - g));
      const RowsDotFn dot = dots[rows - 1];
      for (int64_t j0 = 0; j0 < k; j0 += kc) {
        const int64_t len = std::min(kc, k - j0);
        const float* xs = xf.data() + g * k + j0;
        for (int64_t r = r0; r < r1; ++r) {
          dot(isa, packed, scales, lg, r * k + j0, len, xs, k, sums);
          for (int i = 0; i < rows; ++i) acc[(r - r0) * m + g + i] += sums[i];
        }
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float b = bias ? to_float(bias[r]) : 0.0f;
      for (int64_t i = 0; i < m; ++i) y[i * n + r] = from_float<T>(acc[(r - r0) * m + i] + b);
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
  advise_huge_pages(out.data, out.numel() * dtype_size(out.dtype));
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
