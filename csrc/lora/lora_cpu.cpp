// LoRA CPU kernels: the fused matmul + low-rank epilogue (lora.h) and INT quantize / dequantize.
//
// Tiling mirrors lora_cuda.cu: the output is cut into (kTM rows) x (kTN columns) tiles, one task
// each (parallel_for over tasks, columns fastest so neighbouring tasks share rows of `in`). A task
// walks the reduction in chunks of kTK: it loads the chunk of `in` once (fp32), decodes the chunk of
// W (dense / NF4 / INT) into a transposed fp32 panel, loads the chunk of D, and accumulates both
// acc += in . Wop^T and t += (in * in_scale) . D^T. After the loop t is complete for the task's rows
// and the epilogue adds scaling * t . U^T, so out is written once. The t of a row is recomputed in
// every column tile (r / kTN extra work, as on the GPU); the column-0 tile writes it.
// The inner loops run over the column index of contiguous fp32 panels, so they vectorize without
// reassociating the reduction (the host builds with -ffp-contract=off and no fast-math).
//
// Napkin math (2 cores at ~30 GFLOP/s fp32 each): 2*m*n*k for the base product plus 2*m*k*r for t
// per column tile; 64 tokens x 1024 x 1024 at r = 8 is ~0.15 GFLOP, a few ms. This kernel is the
// algorithm's CPU twin and the test vehicle, not a competitor to a BLAS sgemm.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "lora/lora.h"

namespace pyllmops {
namespace lora {

namespace {

const float kNF4Code[16] = {PYLLMOPS_NF4_CODE_VALUES};

constexpr int64_t kTM = 16, kTN = 64, kTK = 64;
constexpr int64_t kMR = 4, kNR = 16;  // register block of the multiply: kMR rows x kNR columns
static_assert(kTM % kMR == 0 && kTN % kNR == 0, "register blocks must tile the task tile");

// W[row, col0 .. col0 + len) to dst[e * stride], fp32: the same values as load_weight, with the NF4
// block scale (and its 16-entry table) or the INT group's scale / zero computed once per run.
template <WeightKind K, typename T>
void decode_run(const Weight& w, int64_t row, int64_t col0, int64_t len, float* dst, int64_t stride) {
  if constexpr (K == WeightKind::dense) {
    const T* src = static_cast<const T*>(w.dense) + row * w.k_in + col0;
    for (int64_t e = 0; e < len; ++e) dst[e * stride] = to_float(src[e]);
  } else if constexpr (K == WeightKind::nf4) {
    const int64_t flat0 = row * w.k_in + col0;
    for (int64_t e = 0; e < len;) {
      const int64_t block = (flat0 + e) / w.blocksize;
      const int64_t end = std::min(len, (block + 1) * w.blocksize - flat0);
      const float scale = w.nf4_scales(block);
      float table[16];
      for (int c = 0; c < 16; ++c) table[c] = kNF4Code[c] * scale;
      for (; e < end; ++e) {
        const int64_t f = flat0 + e;
        const uint32_t byte = w.packed[f >> 1];
        dst[e * stride] = table[(f & 1) ? (byte & 15u) : (byte >> 4)];
      }
    }
  } else {
    // Codes walked with a running (word, slot) cursor: one division per run, none per element.
    // The 2^bits values of a group come from a table built with int_decode, so they are the same floats.
    const int cpw = codes_per_word(w.bits);
    const uint32_t mask = static_cast<uint32_t>(max_code(w.bits));
    const int32_t* words = w.qweight + row * words_per_row(w.k_in, w.bits);
    const int64_t groups = w.k_in / w.group_size;
    int64_t wi = col0 / cpw;
    int slot = static_cast<int>(col0 - wi * cpw);
    uint32_t word = static_cast<uint32_t>(words[wi]) >> (slot * w.bits);
    for (int64_t e = 0; e < len;) {
      const int64_t g = (col0 + e) / w.group_size;
      const int64_t end = std::min(len, (g + 1) * w.group_size - col0);
      const float scale = w.scales[row * groups + g], zero = w.zeros[row * groups + g];
      float table[16];
      for (uint32_t q = 0; q <= mask; ++q) table[q] = int_decode(q, scale, zero);
      for (; e < end; ++e) {
        dst[e * stride] = table[word & mask];
        word >>= w.bits;
        if (++slot == cpw && col0 + e + 1 < w.k_in) {
          slot = 0;
          word = static_cast<uint32_t>(words[++wi]);
        }
      }
    }
  }
}

template <WeightKind K, typename T>
void fused_impl(const FusedArgs& a, const Weight& w) {
  const int64_t m_tiles = ceil_div(a.m, kTM), n_tiles = ceil_div(a.n_cols, kTN);
  const T* in = static_cast<const T*>(a.in);
  const T* in_scale = static_cast<const T*>(a.in_scale);
  const T* out_scale = static_cast<const T*>(a.out_scale);
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  const int64_t r = a.r;
  parallel_for(m_tiles * n_tiles, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> xs(kTM * kTK), xds(kTM * kTK), ws(kTK * kTN), ds(kTK * std::max<int64_t>(r, 1));
    std::vector<float> acc(kTM * kTN), tacc(kTM * std::max<int64_t>(r, 1));
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t m0 = (task / n_tiles) * kTM, j0 = (task % n_tiles) * kTN;
      const int64_t tm = std::min(kTM, a.m - m0), tn = std::min(kTN, a.n_cols - j0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(tacc.begin(), tacc.end(), 0.0f);
      for (int64_t red0 = 0; red0 < a.n_red; red0 += kTK) {
        const int64_t tk = std::min(kTK, a.n_red - red0);
        // load: in chunk (once, for both products), W panel transposed, D panel transposed
        if (tm < kTM) std::fill(xs.begin() + tm * kTK, xs.end(), 0.0f);
        for (int64_t i = 0; i < tm; ++i)
          for (int64_t kk = 0; kk < tk; ++kk) {
            const int64_t idx = (m0 + i) * a.n_red + red0 + kk;
            const float v = to_float(in[idx]);
            xs[i * kTK + kk] = v;
            xds[i * kTK + kk] = in_scale ? v * to_float(in_scale[idx]) : v;
          }
        // W panel ws[kk][jj] = Wop(j0 + jj, red0 + kk), decoded along W's rows (memory order)
        if (a.transposed) {
          for (int64_t kk = 0; kk < tk; ++kk) decode_run<K, T>(w, red0 + kk, j0, tn, &ws[kk * kTN], 1);
        } else {
          for (int64_t jj = 0; jj < tn; ++jj) decode_run<K, T>(w, j0 + jj, red0, tk, &ws[jj], kTN);
        }
        for (int64_t kk = 0; kk < tk; ++kk)
          for (int64_t q = 0; q < r; ++q) ds[kk * r + q] = down<T>(a, q, red0 + kk);
        // base product, register-blocked kMR x kNR (rows past tm are zero in xs, columns past tn
        // are never stored), then the adapter's down-projection
        for (int64_t i0 = 0; i0 < tm; i0 += kMR)
          for (int64_t jb = 0; jb < tn; jb += kNR) {
            float c[kMR][kNR] = {};
            for (int64_t kk = 0; kk < tk; ++kk) {
              const float* wr = &ws[kk * kTN + jb];
              for (int ii = 0; ii < kMR; ++ii) {
                const float xv = xs[(i0 + ii) * kTK + kk];
                for (int q = 0; q < kNR; ++q) c[ii][q] += xv * wr[q];
              }
            }
            for (int ii = 0; ii < kMR; ++ii)
              for (int q = 0; q < kNR; ++q) acc[(i0 + ii) * kTN + jb + q] += c[ii][q];
          }
        for (int64_t i = 0; i < tm; ++i) {
          float* trow = &tacc[i * r];
          for (int64_t kk = 0; kk < tk; ++kk) {
            const float xdv = xds[i * kTK + kk];
            const float* drow = &ds[kk * r];
            for (int64_t q = 0; q < r; ++q) trow[q] += xdv * drow[q];
          }
        }
      }
      // epilogue: out = acc + bias + scaling * out_scale * (t . U^T); t written by column tile 0
      for (int64_t i = 0; i < tm; ++i) {
        const float* trow = &tacc[i * r];
        for (int64_t jj = 0; jj < tn; ++jj) {
          const int64_t j = j0 + jj;
          float lr = 0.0f;
          for (int64_t q = 0; q < r; ++q) lr += trow[q] * up<T>(a, j, q);
          lr *= a.scaling;
          if (out_scale) lr *= to_float(out_scale[(m0 + i) * a.n_cols + j]);
          float v = acc[i * kTN + jj] + lr;
          if (bias) v += to_float(bias[j]);
          out[(m0 + i) * a.n_cols + j] = from_float<T>(v);
        }
        if (j0 == 0)
          for (int64_t q = 0; q < r; ++q) a.t[(m0 + i) * r + q] = trow[q];
      }
    }
  });
}

template <typename T>
void int_quantize_impl(const T* w, int64_t n, int64_t k, int bits, int64_t group_size, int32_t* qweight,
                       float* scales, float* zeros) {
  const int64_t groups = k / group_size, wpr = words_per_row(k, bits);
  const int cpw = codes_per_word(bits);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
  parallel_for(n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const T* wr = w + row * k;
      // phase 1: per-group min / max -> (scale, zero)
      for (int64_t g = 0; g < groups; ++g) {
        float lo = to_float(wr[g * group_size]), hi = lo;
        for (int64_t e = 1; e < group_size; ++e) {
          const float v = to_float(wr[g * group_size + e]);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        int_group_params(lo, hi, bits, &scales[row * groups + g], &zeros[row * groups + g]);
      }
      // phase 2: one word at a time (as the CUDA kernel: a word never straddles two writers)
      for (int64_t wi = 0; wi < wpr; ++wi) {
        uint32_t word = 0;
        for (int c = 0; c < cpw; ++c) {
          const int64_t e = wi * cpw + c;
          if (e >= k) break;
          const int64_t g = row * groups + e / group_size;
          word |= int_encode(to_float(wr[e]), scales[g], zeros[g], bits) << (c * bits);
        }
        qweight[row * wpr + wi] = static_cast<int32_t>(word);
      }
    }
  });
}

// One row of a 2- or 4-bit W, whose groups hold whole words (cpw divides group_size). Host builds use
// -ffp-contract=off, so q * scale + zero rounds twice, exactly as int_decode.
template <int BITS, typename T>
void int_dequantize_row_aligned(const int32_t* words, const float* scales, const float* zeros, int64_t groups,
                                int64_t group_size, T* dst) {
  constexpr int kCpw = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t words_per_group = group_size / kCpw;
  float vals[kCpw];
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = scales[g], zero = zeros[g];
    const int32_t* wg = words + g * words_per_group;
    T* d = dst + g * group_size;
    for (int64_t wi = 0; wi < words_per_group; ++wi) {
      const uint32_t word = static_cast<uint32_t>(wg[wi]);
      // int_decode's arithmetic, written so the compiler vectorizes it across the word's codes
      for (int c = 0; c < kCpw; ++c) vals[c] = static_cast<float>((word >> (c * BITS)) & kMask) * scale + zero;
      for (int c = 0; c < kCpw; ++c) d[wi * kCpw + c] = from_float<T>(vals[c]);
    }
  }
}

template <typename T>
void int_dequantize_impl(const int32_t* qweight, const float* scales, const float* zeros, int bits,
                         int64_t group_size, int64_t n, int64_t k, T* out) {
  Weight w;
  w.n_out = n;
  w.k_in = k;
  w.qweight = qweight;
  w.scales = scales;
  w.zeros = zeros;
  w.bits = bits;
  w.group_size = group_size;
  if (k == 0) return;
  const int64_t grain = std::max<int64_t>(1, 65536 / k), groups = k / group_size, wpr = words_per_row(k, bits);
  parallel_for(n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(bits == 3 ? static_cast<size_t>(k) : 0);
    for (int64_t rr = r0; rr < r1; ++rr) {
      const int32_t* words = qweight + rr * wpr;
      const float* s = scales + rr * groups;
      const float* z = zeros + rr * groups;
      if (bits == 4) {
        int_dequantize_row_aligned<4, T>(words, s, z, groups, group_size, out + rr * k);
      } else if (bits == 2) {
        int_dequantize_row_aligned<2, T>(words, s, z, groups, group_size, out + rr * k);
      } else {  // 3-bit: 10 codes per word, so groups straddle words; the cursor walk of decode_run
        decode_run<WeightKind::int_q, T>(w, rr, 0, k, row.data(), 1);
        for (int64_t e = 0; e < k; ++e) out[rr * k + e] = from_float<T>(row[e]);
      }
    }
  });
}

}  // namespace

void fused_cpu(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w) {
  if (args.m == 0 || args.n_cols == 0) return;
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "x", f16_t, bf16_t, [&] {
    switch (kind) {
      case WeightKind::dense: return fused_impl<WeightKind::dense, scalar_t>(args, w);
      case WeightKind::nf4: return fused_impl<WeightKind::nf4, scalar_t>(args, w);
      case WeightKind::int_q: return fused_impl<WeightKind::int_q, scalar_t>(args, w);
    }
  });
}

void int_quantize_cpu(const TensorView& w, int bits, int64_t group_size, const TensorView& qweight,
                      const TensorView& scales, const TensorView& zeros) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(w.dtype, "w", f16_t, bf16_t, [&] {
    int_quantize_impl(w.ptr<const scalar_t>(), w.size(0), w.size(1), bits, group_size, qweight.ptr<int32_t>(),
                      scales.ptr<float>(), zeros.ptr<float>());
  });
}

void int_dequantize_cpu(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int bits,
                        int64_t group_size, const TensorView& out) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(out.dtype, "out", f16_t, bf16_t, [&] {
    int_dequantize_impl(qweight.ptr<const int32_t>(), scales.ptr<const float>(), zeros.ptr<const float>(), bits,
                        group_size, out.size(0), out.size(1), out.ptr<scalar_t>());
  });
}

}  // namespace lora
}  // namespace pyllmops
