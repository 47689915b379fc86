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
// d = 64 non-causal is 4 * 1024^2 * 64 * 8 = 2.1 GFLOP forward: ~35 ms at peak. The loops here are
// row-by-row dot products (no register blocking), measured at ~10 GFLOP/s on 2 cores
// (`python -m pyllmops bench attention --device cpu`): a correct, memory-lean reference path, not a
// competitor to oneDNN-backed torch SDPA on CPU.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/online_softmax.h"
#include "common/parallel.h"

namespace pyllmops {
namespace attention {

namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

int64_t num_tiles(int64_t n, int block) { return (n + block - 1) / block; }

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

// Loads the fp32 K and V rows [j0, j1) of kv head hk; returns the number of keys.
template <typename T>
int64_t load_kv(const Params& p, const SeqInfo& si, int64_t hk, int64_t j0, int64_t j1, float* kf, float* vf) {
  const int64_t d = p.head_dim;
  load_rows(k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk), p.lk.seq, j0, j1 - j0, d, kf);
  load_rows(k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk), p.lv.seq, j0, j1 - j0, d, vf);
  return j1 - j0;
}

// ---- forward -----------------------------------------------------------------------------------
template <typename T>
void forward_impl(const Params& p) {
  const int64_t d = p.head_dim, m_tiles = num_tiles(p.seqlen_q, kBlockM);
  const float scale_log2 = p.scale * softmax::kLog2e;
  parallel_for(p.batch * p.heads_q * m_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), acc(kBlockM * d), s(kBlockN);
    softmax::RowState rows_state[kBlockM];
    QueryTile t;
    for (int64_t task = t0; task < t1; ++task) {
      if (!t.decode(p, task, m_tiles)) continue;
      load_rows(q_row(static_cast<const T*>(p.q), p.lq, t.si, 0, t.h), p.lq.seq, t.i0, t.rows, d, qf.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = 0; r < t.rows; ++r) rows_state[r] = softmax::RowState();

      int64_t nb, ne;
      t.mask.key_tiles(t.i0, t.i1, kBlockN, &nb, &ne);
      for (int64_t nt = nb; nt < ne; ++nt) {
        const int64_t j0 = nt * kBlockN, j1 = std::min(t.si.sk, j0 + kBlockN);
        const int64_t cols = load_kv<T>(p, t.si, t.hk, j0, j1, kf.data(), vf.data());
        const bool full = t.mask.tile_is_full(t.i0, t.i1, j0, j1);
        for (int64_t r = 0; r < t.rows; ++r) {
          float tile_max = -INFINITY;
          for (int64_t c = 0; c < cols; ++c) {
            float x = dot8(&qf[r * d], &kf[c * d], d) * scale_log2;
            if (!full && !t.mask.visible(t.i0 + r, j0 + c)) x = -INFINITY;
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
      T* ob = q_row(static_cast<T*>(p.o), p.lo, t.si, 0, t.h);
      float* lse = p.lse + lse_index(p, t.si, 0, t.h);
      for (int64_t r = 0; r < t.rows; ++r) {
        store_rows(&acc[r * d], rows_state[r].inv_l(), 1, d, ob, p.lo.seq, t.i0 + r);
        lse[t.i0 + r] = rows_state[r].lse_natural();
      }
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
        float acc = 0.0f;
        for (int64_t c = 0; c < d; ++c) acc += to_float(ob[i * p.lo.seq + c]) * to_float(gb[i * p.ldo.seq + c]);
        p.delta[off + i] = p.dlse ? acc - p.dlse[off + i] : acc;
      }
    }
  });
}

// The backward's inner tile: for each visible (query row r, key col c) of rows [i0, i0 + rows) x keys
// [j0, j0 + cols), recomputes P = exp2(S scale log2e - lse2) and dS = P (dP - delta) and calls
// f(r, c, P, dS). Rows that saw no key in the forward (lse = -inf) get no gradient.
template <typename F>
void for_each_grad(const Params& p, const Mask& mask, const float* lse, const float* delta, int64_t i0, int64_t rows,
                   int64_t j0, int64_t cols, const float* qf, const float* gf, const float* kf, const float* vf,
                   const F& f) {
  const int64_t d = p.head_dim;
  const float scale_log2 = p.scale * softmax::kLog2e;
  const bool full = mask.tile_is_full(i0, i0 + rows, j0, j0 + cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float lse2 = lse[i0 + r] * softmax::kLog2e;
    if (lse2 == -INFINITY) continue;
    const float dl = delta[i0 + r];
    for (int64_t c = 0; c < cols; ++c) {
      if (!full && !mask.visible(i0 + r, j0 + c)) continue;
      const float pr = softmax::fast_exp2(dot8(&qf[r * d], &kf[c * d], d) * scale_log2 - lse2);
      const float dp = dot8(&gf[r * d], &vf[c * d], d);
      f(r, c, pr, pr * (dp - dl));
    }
  }
}

// dk, dv for one key tile, summed over the query heads of the kv head's group.
template <typename T>
void dkdv_impl(const Params& p) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv, n_tiles = num_tiles(p.seqlen_k, kBlockN);
  parallel_for(p.batch * p.heads_kv * n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), gf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), dkf(kBlockN * d),
        dvf(kBlockN * d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t nt = task % n_tiles, hk = (task / n_tiles) % p.heads_kv, b = task / (n_tiles * p.heads_kv);
      const SeqInfo si = seq_info(p, b);
      const int64_t j0 = nt * kBlockN;
      if (j0 >= si.sk) continue;
      const int64_t cols = load_kv<T>(p, si, hk, j0, std::min(si.sk, j0 + kBlockN), kf.data(), vf.data());
      const Mask mask = seq_mask(p, si);
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      int64_t mb, me;
      mask.query_tiles(j0, j0 + cols, kBlockM, &mb, &me);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float* lse = p.lse + lse_index(p, si, 0, h);
        const float* delta = p.delta + lse_index(p, si, 0, h);
        for (int64_t mt = mb; mt < me; ++mt) {
          const int64_t i0 = mt * kBlockM, rows = std::min(si.sq, i0 + kBlockM) - i0;
          load_rows(q_row(static_cast<const T*>(p.q), p.lq, si, 0, h), p.lq.seq, i0, rows, d, qf.data());
          load_rows(q_row(static_cast<const T*>(p.dout), p.ldo, si, 0, h), p.ldo.seq, i0, rows, d, gf.data());
          for_each_grad(p, mask, lse, delta, i0, rows, j0, cols, qf.data(), gf.data(), kf.data(), vf.data(),
                        [&](int64_t r, int64_t c, float pr, float ds) {
                          axpy(pr, &gf[r * d], &dvf[c * d], d);
                          axpy(ds, &qf[r * d], &dkf[c * d], d);
                        });
        }
      }
      store_rows(dkf.data(), p.scale, cols, d, k_row(static_cast<T*>(p.dk), p.ldk, si, 0, hk), p.ldk.seq, j0);
      store_rows(dvf.data(), 1.0f, cols, d, k_row(static_cast<T*>(p.dv), p.ldv, si, 0, hk), p.ldv.seq, j0);
    }
  });
}

template <typename T>
void dq_impl(const Params& p) {
  const int64_t d = p.head_dim, m_tiles = num_tiles(p.seqlen_q, kBlockM);
  parallel_for(p.batch * p.heads_q * m_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(kBlockM * d), gf(kBlockM * d), kf(kBlockN * d), vf(kBlockN * d), dqf(kBlockM * d);
    QueryTile t;
    for (int64_t task = t0; task < t1; ++task) {
      if (!t.decode(p, task, m_tiles)) continue;
      load_rows(q_row(static_cast<const T*>(p.q), p.lq, t.si, 0, t.h), p.lq.seq, t.i0, t.rows, d, qf.data());
      load_rows(q_row(static_cast<const T*>(p.dout), p.ldo, t.si, 0, t.h), p.ldo.seq, t.i0, t.rows, d, gf.data());
      const float* lse = p.lse + lse_index(p, t.si, 0, t.h);
      const float* delta = p.delta + lse_index(p, t.si, 0, t.h);
      std::fill(dqf.begin(), dqf.end(), 0.0f);
      int64_t nb, ne;
      t.mask.key_tiles(t.i0, t.i1, kBlockN, &nb, &ne);
      for (int64_t nt = nb; nt < ne; ++nt) {
        const int64_t j0 = nt * kBlockN;
        const int64_t cols = load_kv<T>(p, t.si, t.hk, j0, std::min(t.si.sk, j0 + kBlockN), kf.data(), vf.data());
        for_each_grad(p, t.mask, lse, delta, t.i0, t.rows, j0, cols, qf.data(), gf.data(), kf.data(), vf.data(),
                      [&](int64_t r, int64_t c, float, float ds) { axpy(ds, &kf[c * d], &dqf[r * d], d); });
      }
      store_rows(dqf.data(), p.scale, t.rows, d, q_row(static_cast<T*>(p.dq), p.ldq, t.si, 0, t.h), p.ldq.seq, t.i0);
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
