// Flash attention CPU kernels: forward and the two-pass backward (attention.h has the algorithm).
//
// Tiling as the CUDA kernels: query tiles of kBlockM rows, key tiles of kBlockN keys, only the key
// tiles in the mask's band are visited and only tiles the band cuts are masked per element. The
// tiles are converted to fp32 once when loaded; scores, softmax statistics and accumulators are fp32.
// Threads: parallel_for over (batch x heads x query tiles) in the forward and in the dq pass, over
// (batch x kv heads x key tiles) in the dk/dv pass, so every output element has one writer.
// Memory per thread: a few tiles (kBlockM x d + 2 kBlockN x d + kBlockM x kBlockN floats, ~100 KB at
// d = 128), independent of the sequence lengths.
//
// Napkin math (2 cores, ~30 GFLOP/s of fp32 FMA each with 8-wide vectors): sq = sk = 1024, h = 8,
// d = 64 non-causal is 4 * 1024^2 * 64 * 8 = 2.1 GFLOP forward: ~35 ms at peak; the scalar-order
// dot products here reach a fraction of that.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention.h"
#include "common/dtype.h"
#include "common/online_softmax.h"
#include "common/parallel.h"

namespace pyllmops {
namespace attention {

namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// 8 independent partial sums so the loop vectorizes without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] += a[j + t] * b[j + t];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// rows [r0, r0 + rows) of a (token, head) slice -> dst[rows][d] in fp32.
template <typename T>
void load_rows(const T* base, int64_t row_stride, int64_t r0, int64_t rows, int64_t d, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + (r0 + r) * row_stride;
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = to_float(src[c]);
  }
}

template <typename T>
void store_rows(const float* src, float mul, int64_t rows, int64_t d, T* base, int64_t row_stride, int64_t r0) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = base + (r0 + r) * row_stride;
    for (int64_t c = 0; c < d; ++c) dst[c] = from_float<T>(src[r * d + c] * mul);
  }
}

// Base pointers of sequence `s`, head `h` (row 0 of the sequence) for a tensor with these strides.
template <typename T>
T* head_base(T* p, int64_t batch_stride, int64_t seq_stride, int64_t head_stride, int64_t batch, int64_t row0,
             int64_t h) {
  return p + batch * batch_stride + row0 * seq_stride + h * head_stride;
}

int64_t num_tiles(int64_t n, int block) { return (n + block - 1) / block; }

// ---- forward -----------------------------------------------------------------------------------
template <typename T>
void forward_impl(const Params& p) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  const int64_t m_tiles = num_tiles(p.seqlen_q, kBlockM);
  const float scale_log2 = p.scale * softmax::kLog2e;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  parallel_for(p.batch * p.heads_q * m_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), acc(kBlockM * d), s(kBlockN);
    softmax::RowState rows_state[kBlockM];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t mt = task % m_tiles, h = (task / m_tiles) % p.heads_q, b = task / (m_tiles * p.heads_q);
      const SeqInfo si = seq_info(p, b);
      const int64_t i0 = mt * kBlockM;
      if (i0 >= si.sq) continue;  // varlen: this sequence is shorter than the longest
      const int64_t i1 = std::min(si.sq, i0 + kBlockM), rows = i1 - i0;
      const Mask mask = seq_mask(p, si);
      const int64_t hk = h / group;
      const T* qb = head_base(q, p.q_batch_stride, p.q_seq_stride, p.q_head_stride, si.q_batch, si.q_row0, h);
      const T* kb = head_base(k, p.k_batch_stride, p.k_seq_stride, p.k_head_stride, si.k_batch, si.k_row0, hk);
      const T* vb = head_base(v, p.v_batch_stride, p.v_seq_stride, p.v_head_stride, si.k_batch, si.k_row0, hk);
      load_rows(qb, p.q_seq_stride, i0, rows, d, qf.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = 0; r < rows; ++r) rows_state[r] = softmax::RowState();

      int64_t nb, ne;
      mask.key_tiles(i0, i1, kBlockN, &nb, &ne);
      for (int64_t nt = nb; nt < ne; ++nt) {
        const int64_t j0 = nt * kBlockN, j1 = std::min(si.sk, j0 + kBlockN), cols = j1 - j0;
        load_rows(kb, p.k_seq_stride, j0, cols, d, kf.data());
        load_rows(vb, p.v_seq_stride, j0, cols, d, vf.data());
        const bool full = mask.tile_is_full(i0, i1, j0, j1);
        for (int64_t r = 0; r < rows; ++r) {
          float tile_max = -INFINITY;
          for (int64_t c = 0; c < cols; ++c) {
            float x = dot(&qf[r * d], &kf[c * d], d) * scale_log2;
            if (!full && !mask.visible(i0 + r, j0 + c)) x = -INFINITY;
            s[c] = x;
            tile_max = std::max(tile_max, x);
          }
          softmax::RowState& st = rows_state[r];
          const float factor = st.rescale_to(tile_max);
          float* a = &acc[r * d];
          if (factor != 1.0f)
            for (int64_t c = 0; c < d; ++c) a[c] *= factor;
          float lsum = 0.0f;
          for (int64_t c = 0; c < cols; ++c) {
            const float pr = softmax::exp2_shifted(s[c], st.m);
            lsum += pr;
            if (pr != 0.0f) axpy(pr, &vf[c * d], a, d);
          }
          st.l += lsum;
        }
      }
      T* ob = head_base(o, p.o_batch_stride, p.o_seq_stride, p.o_head_stride, si.q_batch, si.q_row0, h);
      float* lse = p.lse + si.lse_off + h * p.lse_head_stride;
      for (int64_t r = 0; r < rows; ++r) {
        store_rows(&acc[r * d], rows_state[r].inv_l(), 1, d, ob, p.o_seq_stride, i0 + r);
        lse[i0 + r] = rows_state[r].lse_natural();
      }
    }
  });
}

// ---- backward ----------------------------------------------------------------------------------
// P = exp2(S * scale_log2 - lse * log2e) for a visible pair, 0 otherwise (and for rows with lse = -inf).
inline float prob(float score_log2, float lse_log2) {
  return lse_log2 == -INFINITY ? 0.0f : softmax::fast_exp2(score_log2 - lse_log2);
}

template <typename T>
void delta_impl(const Params& p) {
  // delta[b, h, i] = sum_c dO[b, i, h, c] * O[b, i, h, c] - dlse[b, h, i]: with a gradient g on the
  // lse, dS = P (dP - delta + g), since d lse / d S = P.
  const int64_t d = p.head_dim;
  const T* o = static_cast<const T*>(p.o);
  const T* dout = static_cast<const T*>(p.dout);
  parallel_for(p.batch * p.heads_q, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task % p.heads_q, b = task / p.heads_q;
      const SeqInfo si = seq_info(p, b);
      const T* ob = head_base(o, p.o_batch_stride, p.o_seq_stride, p.o_head_stride, si.q_batch, si.q_row0, h);
      const T* gb = head_base(dout, p.do_batch_stride, p.do_seq_stride, p.do_head_stride, si.q_batch, si.q_row0, h);
      float* delta = p.delta + si.lse_off + h * p.lse_head_stride;
      const float* dlse = p.dlse ? p.dlse + si.lse_off + h * p.lse_head_stride : nullptr;
      for (int64_t i = 0; i < si.sq; ++i) {
        float acc = 0.0f;
        for (int64_t c = 0; c < d; ++c)
          acc += to_float(ob[i * p.o_seq_stride + c]) * to_float(gb[i * p.do_seq_stride + c]);
        delta[i] = dlse ? acc - dlse[i] : acc;
      }
    }
  });
}

// dk, dv for one key tile, summed over the query heads of the kv head's group.
template <typename T>
void dkdv_impl(const Params& p) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  const int64_t n_tiles = num_tiles(p.seqlen_k, kBlockN);
  const float scale_log2 = p.scale * softmax::kLog2e;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  parallel_for(p.batch * p.heads_kv * n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), gf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), dkf(kBlockN * d),
        dvf(kBlockN * d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t nt = task % n_tiles, hk = (task / n_tiles) % p.heads_kv, b = task / (n_tiles * p.heads_kv);
      const SeqInfo si = seq_info(p, b);
      const int64_t j0 = nt * kBlockN;
      if (j0 >= si.sk) continue;
      const int64_t j1 = std::min(si.sk, j0 + kBlockN), cols = j1 - j0;
      const Mask mask = seq_mask(p, si);
      const T* kb = head_base(k, p.k_batch_stride, p.k_seq_stride, p.k_head_stride, si.k_batch, si.k_row0, hk);
      const T* vb = head_base(v, p.v_batch_stride, p.v_seq_stride, p.v_head_stride, si.k_batch, si.k_row0, hk);
      load_rows(kb, p.k_seq_stride, j0, cols, d, kf.data());
      load_rows(vb, p.v_seq_stride, j0, cols, d, vf.data());
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      int64_t mb, me;
      mask.query_tiles(j0, j1, kBlockM, &mb, &me);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const T* qb = head_base(q, p.q_batch_stride, p.q_seq_stride, p.q_head_stride, si.q_batch, si.q_row0, h);
        const T* gb = head_base(dout, p.do_batch_stride, p.do_seq_stride, p.do_head_stride, si.q_batch, si.q_row0, h);
        const float* lse = p.lse + si.lse_off + h * p.lse_head_stride;
        const float* delta = p.delta + si.lse_off + h * p.lse_head_stride;
        for (int64_t mt = mb; mt < me; ++mt) {
          const int64_t i0 = mt * kBlockM, i1 = std::min(si.sq, i0 + kBlockM), rows = i1 - i0;
          load_rows(qb, p.q_seq_stride, i0, rows, d, qf.data());
          load_rows(gb, p.do_seq_stride, i0, rows, d, gf.data());
          const bool full = mask.tile_is_full(i0, i1, j0, j1);
          for (int64_t r = 0; r < rows; ++r) {
            const float lse2 = lse[i0 + r] * softmax::kLog2e;
            if (lse2 == -INFINITY) continue;  // the row sees no key: no gradient flows through it
            const float dl = delta[i0 + r];
            for (int64_t c = 0; c < cols; ++c) {
              if (!full && !mask.visible(i0 + r, j0 + c)) continue;
              const float pr = prob(dot(&qf[r * d], &kf[c * d], d) * scale_log2, lse2);
              const float dp = dot(&gf[r * d], &vf[c * d], d);
              axpy(pr, &gf[r * d], &dvf[c * d], d);
              axpy(pr * (dp - dl), &qf[r * d], &dkf[c * d], d);
            }
          }
        }
      }
      T* dkb = head_base(dk, p.dk_batch_stride, p.dk_seq_stride, p.dk_head_stride, si.k_batch, si.k_row0, hk);
      T* dvb = head_base(dv, p.dv_batch_stride, p.dv_seq_stride, p.dv_head_stride, si.k_batch, si.k_row0, hk);
      store_rows(dkf.data(), p.scale, cols, d, dkb, p.dk_seq_stride, j0);
      store_rows(dvf.data(), 1.0f, cols, d, dvb, p.dv_seq_stride, j0);
    }
  });
}

template <typename T>
void dq_impl(const Params& p) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  const int64_t m_tiles = num_tiles(p.seqlen_q, kBlockM);
  const float scale_log2 = p.scale * softmax::kLog2e;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  parallel_for(p.batch * p.heads_q * m_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), gf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), dqf(kBlockM * d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t mt = task % m_tiles, h = (task / m_tiles) % p.heads_q, b = task / (m_tiles * p.heads_q);
      const SeqInfo si = seq_info(p, b);
      const int64_t i0 = mt * kBlockM;
      if (i0 >= si.sq) continue;
      const int64_t i1 = std::min(si.sq, i0 + kBlockM), rows = i1 - i0;
      const Mask mask = seq_mask(p, si);
      const int64_t hk = h / group;
      const T* qb = head_base(q, p.q_batch_stride, p.q_seq_stride, p.q_head_stride, si.q_batch, si.q_row0, h);
      const T* gb = head_base(dout, p.do_batch_stride, p.do_seq_stride, p.do_head_stride, si.q_batch, si.q_row0, h);
      const T* kb = head_base(k, p.k_batch_stride, p.k_seq_stride, p.k_head_stride, si.k_batch, si.k_row0, hk);
      const T* vb = head_base(v, p.v_batch_stride, p.v_seq_stride, p.v_head_stride, si.k_batch, si.k_row0, hk);
      const float* lse = p.lse + si.lse_off + h * p.lse_head_stride;
      const float* delta = p.delta + si.lse_off + h * p.lse_head_stride;
      load_rows(qb, p.q_seq_stride, i0, rows, d, qf.data());
      load_rows(gb, p.do_seq_stride, i0, rows, d, gf.data());
      std::fill(dqf.begin(), dqf.end(), 0.0f);
      int64_t nb, ne;
      mask.key_tiles(i0, i1, kBlockN, &nb, &ne);
      for (int64_t nt = nb; nt < ne; ++nt) {
        const int64_t j0 = nt * kBlockN, j1 = std::min(si.sk, j0 + kBlockN), cols = j1 - j0;
        load_rows(kb, p.k_seq_stride, j0, cols, d, kf.data());
        load_rows(vb, p.v_seq_stride, j0, cols, d, vf.data());
        const bool full = mask.tile_is_full(i0, i1, j0, j1);
        for (int64_t r = 0; r < rows; ++r) {
          const float lse2 = lse[i0 + r] * softmax::kLog2e;
          if (lse2 == -INFINITY) continue;
          const float dl = delta[i0 + r];
          for (int64_t c = 0; c < cols; ++c) {
            if (!full && !mask.visible(i0 + r, j0 + c)) continue;
            const float pr = prob(dot(&qf[r * d], &kf[c * d], d) * scale_log2, lse2);
            const float dp = dot(&gf[r * d], &vf[c * d], d);
            axpy(pr * (dp - dl), &kf[c * d], &dqf[r * d], d);
          }
        }
      }
      T* dqb = head_base(dq, p.dq_batch_stride, p.dq_seq_stride, p.dq_head_stride, si.q_batch, si.q_row0, h);
      store_rows(dqf.data(), p.scale, rows, d, dqb, p.dq_seq_stride, i0);
    }
  });
}

}  // namespace

void forward_cpu(const Params& p, DType dtype) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] { forward_impl<scalar_t>(p); });
}

void backward_cpu(const Params& p, DType dtype) {
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "q", f16_t, bf16_t, [&] {
    delta_impl<scalar_t>(p);
    dkdv_impl<scalar_t>(p);
    dq_impl<scalar_t>(p);
  });
}

}  // namespace attention
}  // namespace pyllmops
