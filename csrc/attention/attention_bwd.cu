// Flash attention backward on sm80+ tensor cores: delta, dk/dv pass, dq pass (algorithm: attention.h).
//
// delta:  one thread per query row: delta = rowsum(dO * O) - dlse.
// dk/dv:  one CTA = 4 warps = kBlockN = 64 keys of one (batch, kv head); warp w owns keys 16w..16w+15.
//         For each query head of the GQA group and each query tile (kBlockMq = 32 rows) the mask lets
//         these keys be seen by (Mask::query_tiles), with the tile's lse / delta staged in shared memory:
//           S^T = K Q^T (gemm_ss), P^T = exp2(S^T scale log2e - lse2) (0 where masked / for empty rows)
//           dV += P^T dO          (gemm_rs, P^T rounded to fp16/bf16, dO read by ldmatrix.trans)
//           dP^T = V dO^T (gemm_ss), dS^T = P^T (dP^T - delta), dK += dS^T Q (gemm_rs)
//         dK and dV accumulate in fp32 registers over the whole group and are written once (dK * scale).
//         At the padded head dim 256 two accumulators of 16 x 256 per warp do not fit in registers: dK and
//         dV are then computed by two launches of the same kernel (kDoDK / kDoDV), recomputing P.
// dq:     one CTA = 4 warps = 64 query rows of one (batch, q head), walking the visited key tiles:
//           S = Q K^T, dP = dO V^T (gemm_ss), dS = P (dP - delta), dQ += dS K (gemm_rs), fp32 accumulation
//           in registers, written once (dQ * scale).
// Every gradient element has exactly one writer and a fixed summation order: gradients are bitwise
// reproducible run to run (no atomics), which is what `deterministic=True` asks for.
//
// Napkin math: 7 tile matmuls per visited (query tile, key tile) pair vs 2 in the forward, i.e. 3.5x the
// forward FLOPs (FlashAttention's own count is 2.5x with atomic dq). At kD 128 the dk/dv CTA keeps
// 2 x 64 fp32 accumulator registers per thread plus two 16 x 32 score tiles (ptxas: 252 registers, no spills).
#include "attention/attention_cuda.cuh"
#include "common/dtype.h"

namespace pyllmops {
namespace attention {
namespace cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kDeltaRows = 64;

template <int kD>
struct BwdConfig {
  static constexpr int kStride = kD + 8;
  // dq pass: 64 query rows, key tiles of 64 (32 at kD 256)
  static constexpr int kDqBlockM = 64;
  static constexpr int kDqBlockN = kD <= 128 ? 64 : 32;
  static constexpr int kDqSmemElems = (2 * kDqBlockM + 2 * kDqBlockN) * kStride;
  // dk/dv pass: 64 keys, query tiles of 32
  static constexpr int kKvBlockN = 64;
  static constexpr int kKvBlockM = 32;
  static constexpr int kKvSmemBytes = (2 * kKvBlockN + 2 * kKvBlockM) * kStride * 2 + 2 * kKvBlockM * 4;
};

template <typename T>
__global__ void delta_kernel(Params p) {
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kDeltaRows + threadIdx.x;
  if (i >= si.sq) return;
  const T* o = q_row(static_cast<const T*>(p.o), p.lo, si, i, h);
  const T* g = q_row(static_cast<const T*>(p.dout), p.ldo, si, i, h);
  float acc = 0.0f;
  for (int64_t c = 0; c < p.head_dim; ++c) acc += to_float(o[c]) * to_float(g[c]);
  const int64_t off = lse_index(p, si, i, h);
  p.delta[off] = p.dlse ? acc - p.dlse[off] : acc;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) dq_kernel(Params p) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockM = Cfg::kDqBlockM, kBlockN = Cfg::kDqBlockN, kStride = Cfg::kStride;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kStride;
  T* sK = sdO + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int64_t mt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i0 = mt * kBlockM;
  if (i0 >= si.sq) return;
  const Mask mask = seq_mask(p, si);
  const int64_t hk = h / (p.heads_q / p.heads_kv), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const bool capped = p.softcap > 0.0f;
  const float pre = capped ? p.scale / p.softcap : 0.0f, mul = (capped ? p.softcap : p.scale) * softmax::kLog2e;

  const T* k = k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk);
  const T* v = k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk);
  cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q_row(static_cast<const T*>(p.q), p.lq, si, i0, h), p.lq.seq,
                                          si.sq - i0, d);
  cp_async_tile<T, kBlockM, kD, kThreads>(sdO, q_row(static_cast<const T*>(p.dout), p.ldo, si, i0, h), p.ldo.seq,
                                          si.sq - i0, d);
  ptx::cp_async_commit();

  // This lane's two rows: lse in base 2 (-inf for padding rows and rows that see no key) and delta.
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + acc_row(2 * r);
    const int64_t off = lse_index(p, si, i, h);
    lse2[r] = i < si.sq ? p.lse[off] * softmax::kLog2e : -INFINITY;
    dl[r] = i < si.sq ? p.delta[off] : 0.0f;
  }

  float acc_dq[1][kD / 8][4];
  zero(acc_dq);
  int64_t nb, ne;
  mask.key_tiles(i0, i0 + kBlockM < si.sq ? i0 + kBlockM : si.sq, kBlockN, &nb, &ne);
  for (int64_t nt = nb; nt < ne; ++nt) {
    const int64_t j0 = nt * kBlockN;
    __syncthreads();  // the previous tile is consumed by every warp
    cp_async_tile<T, kBlockN, kD, kThreads>(sK, k + j0 * p.lk.seq, p.lk.seq, si.sk - j0, d);
    cp_async_tile<T, kBlockN, kD, kThreads>(sV, v + j0 * p.lv.seq, p.lv.seq, si.sk - j0, d);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    float s[1][kBlockN / 8][4], dp[1][kBlockN / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, 1, kBlockN, kD, kStride>(s, SmemA<T, kStride>{sQ + warp * 16 * kStride}, sK);
    gemm_abt<T, 1, kBlockN, kD, kStride>(dp, SmemA<T, kStride>{sdO + warp * 16 * kStride}, sV);
    int lo[2] = {0, 0}, hi[2] = {kBlockN - 1, kBlockN - 1};
    if (!mask.tile_is_full(i0, i0 + kBlockM, j0, j0 + kBlockN))
#pragma unroll
      for (int r = 0; r < 2; ++r) visible_cols<kBlockN>(mask, i0 + warp * 16 + acc_row(2 * r), j0, &lo[r], &hi[r]);
#pragma unroll
    for (int n8 = 0; n8 < kBlockN / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, c = acc_col(n8, e);
        const Score x = score(s[0][n8][e], capped, pre);
        const bool keep = lse2[r] != -INFINITY && c >= lo[r] && c <= hi[r];
        const float pr = softmax::fast_exp2(x.s * mul - lse2[r]);
        s[0][n8][e] = keep ? pr * (dp[0][n8][e] - dl[r]) * x.dtanh : 0.0f;
      }
    uint32_t a[1][kBlockN / 16][4];
    acc_to_a<T, 1, kBlockN>(s, a);
    gemm_ab<T, 1, kD, kBlockN, kStride>(acc_dq, RegA<1, kBlockN>{a}, sK);
  }
  ptx::cp_async_wait<0>();  // no key tile visited: the Q / dO copies are still pending
  const float scale2[2] = {p.scale, p.scale};
  T* dq = q_row(static_cast<T*>(p.dq), p.ldq, si, i0 + warp * 16, h);
  store_acc<T, kD>(acc_dq[0], scale2, dq, p.ldq.seq, si.sq - i0 - warp * 16, d);
}

template <typename T, int kD, bool kDoDK, bool kDoDV>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(Params p) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockN = Cfg::kKvBlockN, kBlockM = Cfg::kKvBlockM, kStride = Cfg::kStride;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  T* sQ = sV + kBlockN * kStride;
  T* sdO = sQ + kBlockM * kStride;
  float* sL = reinterpret_cast<float*>(sdO + kBlockM * kStride);
  float* sD = sL + kBlockM;

  const int64_t nt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t j0 = nt * kBlockN;
  if (j0 >= si.sk) return;
  const Mask mask = seq_mask(p, si);
  const int64_t group = p.heads_q / p.heads_kv, d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const bool capped = p.softcap > 0.0f;
  const float pre = capped ? p.scale / p.softcap : 0.0f, mul = (capped ? p.softcap : p.scale) * softmax::kLog2e;

  cp_async_tile<T, kBlockN, kD, kThreads>(sK, k_row(static_cast<const T*>(p.k), p.lk, si, j0, hk), p.lk.seq,
                                          si.sk - j0, d);
  cp_async_tile<T, kBlockN, kD, kThreads>(sV, k_row(static_cast<const T*>(p.v), p.lv, si, j0, hk), p.lv.seq,
                                          si.sk - j0, d);
  ptx::cp_async_commit();

  float acc_dk[1][kDoDK ? kD / 8 : 1][4], acc_dv[1][kDoDV ? kD / 8 : 1][4];
  zero(acc_dk);
  zero(acc_dv);
  int64_t mb, me;
  mask.query_tiles(j0, j0 + kBlockN < si.sk ? j0 + kBlockN : si.sk, kBlockM, &mb, &me);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const T* q = q_row(static_cast<const T*>(p.q), p.lq, si, 0, h);
    const T* dout = q_row(static_cast<const T*>(p.dout), p.ldo, si, 0, h);
    const float* lse = p.lse + lse_index(p, si, 0, h);
    const float* delta = p.delta + lse_index(p, si, 0, h);
    for (int64_t mt = mb; mt < me; ++mt) {
      const int64_t i0 = mt * kBlockM;
      __syncthreads();  // the previous query tile is consumed by every warp
      cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q + i0 * p.lq.seq, p.lq.seq, si.sq - i0, d);
      cp_async_tile<T, kBlockM, kD, kThreads>(sdO, dout + i0 * p.ldo.seq, p.ldo.seq, si.sq - i0, d);
      ptx::cp_async_commit();
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool in = i0 + r < si.sq;
        sL[r] = in ? lse[i0 + r] * softmax::kLog2e : -INFINITY;
        sD[r] = in ? delta[i0 + r] : 0.0f;
      }
      ptx::cp_async_wait<0>();
      __syncthreads();
      float s[1][kBlockM / 8][4];
      zero(s);
      gemm_abt<T, 1, kBlockM, kD, kStride>(s, SmemA<T, kStride>{sK + warp * 16 * kStride}, sQ);  // S^T
      // Rows of S^T are keys, columns queries: query i0 + c sees key j iff c lies in the visible query columns
      // of key j, i.e. lo_k[r] <= c <= hi_k[r] (Mask::query_tiles' bounds per key).
      int lo[2] = {0, 0}, hi[2] = {kBlockM - 1, kBlockM - 1};
      if (!mask.tile_is_full(i0, i0 + kBlockM, j0, j0 + kBlockN))
#pragma unroll
        for (int r = 0; r < 2; ++r) visible_rows<kBlockM>(mask, j0 + warp * 16 + acc_row(2 * r), i0, &lo[r], &hi[r]);
      float dtanh[kDoDK ? kBlockM / 8 : 1][4];
#pragma unroll
      for (int n8 = 0; n8 < kBlockM / 8; ++n8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, c = acc_col(n8, e);
          const Score x = score(s[0][n8][e], capped, pre);
          if constexpr (kDoDK) dtanh[n8][e] = x.dtanh;
          const bool keep = sL[c] != -INFINITY && c >= lo[r] && c <= hi[r];
          s[0][n8][e] = keep ? softmax::fast_exp2(x.s * mul - sL[c]) : 0.0f;
        }
      uint32_t a[1][kBlockM / 16][4];
      if constexpr (kDoDV) {
        acc_to_a<T, 1, kBlockM>(s, a);
        gemm_ab<T, 1, kD, kBlockM, kStride>(acc_dv, RegA<1, kBlockM>{a}, sdO);
      }
      if constexpr (kDoDK) {
        float dp[1][kBlockM / 8][4];
        zero(dp);
        gemm_abt<T, 1, kBlockM, kD, kStride>(dp, SmemA<T, kStride>{sV + warp * 16 * kStride}, sdO);  // dP^T
#pragma unroll
        for (int n8 = 0; n8 < kBlockM / 8; ++n8)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e / 2, c = acc_col(n8, e);
            const bool keep = sL[c] != -INFINITY && c >= lo[r] && c <= hi[r];  // dS exactly 0 where masked
            s[0][n8][e] = keep ? s[0][n8][e] * (dp[0][n8][e] - sD[c]) * dtanh[n8][e] : 0.0f;
          }
        acc_to_a<T, 1, kBlockM>(s, a);
        gemm_ab<T, 1, kD, kBlockM, kStride>(acc_dk, RegA<1, kBlockM>{a}, sQ);
      }
    }
  }
  ptx::cp_async_wait<0>();  // no query tile visited: the K / V copies are still pending
  const int64_t rows = si.sk - j0 - warp * 16;
  if constexpr (kDoDK) {
    const float scale2[2] = {p.scale, p.scale};
    store_acc<T, kD>(acc_dk[0], scale2, k_row(static_cast<T*>(p.dk), p.ldk, si, j0 + warp * 16, hk), p.ldk.seq,
                     rows, d);
  }
  if constexpr (kDoDV) {
    const float one[2] = {1.0f, 1.0f};
    store_acc<T, kD>(acc_dv[0], one, k_row(static_cast<T*>(p.dv), p.ldv, si, j0 + warp * 16, hk), p.ldv.seq, rows, d);
  }
}

template <typename T, int kD>
void launch_bwd(const Params& p, cudaStream_t stream) {
  launch_varlen_fail<T>(p, true, stream);  // varlen: NaN and error bits for the sequences the kernels skip
  using Cfg = BwdConfig<kD>;
  const unsigned hq = static_cast<unsigned>(p.heads_q), hkv = static_cast<unsigned>(p.heads_kv),
                 batch = static_cast<unsigned>(p.batch);
  if (p.seqlen_q > 0) {
    launch("flash_attention delta_kernel", delta_kernel<T>,
           dim3(static_cast<unsigned>(ceil_div(p.seqlen_q, kDeltaRows)), hq, batch), kDeltaRows, 0, stream, p);
  }

  if (p.seqlen_k > 0) {  // runs even when no query exists: dK = dV = 0 must still be written
    constexpr int kv_smem = Cfg::kKvSmemBytes;
    const dim3 kv_grid(static_cast<unsigned>(ceil_div(p.seqlen_k, Cfg::kKvBlockN)), hkv, batch);
    if constexpr (kD <= 128) {
      auto kernel = dkdv_kernel<T, kD, true, true>;
      set_max_dynamic_smem(kernel, kv_smem, "flash_attention dkdv_kernel");
      launch("flash_attention dkdv_kernel", kernel, kv_grid, kThreads, kv_smem, stream, p);
    } else {
      auto kernel_dk = dkdv_kernel<T, kD, true, false>;
      auto kernel_dv = dkdv_kernel<T, kD, false, true>;
      set_max_dynamic_smem(kernel_dk, kv_smem, "flash_attention dkdv_kernel (dk)");
      set_max_dynamic_smem(kernel_dv, kv_smem, "flash_attention dkdv_kernel (dv)");
      launch("flash_attention dkdv_kernel (dk)", kernel_dk, kv_grid, kThreads, kv_smem, stream, p);
      launch("flash_attention dkdv_kernel (dv)", kernel_dv, kv_grid, kThreads, kv_smem, stream, p);
    }
  }

  if (p.seqlen_q == 0) return;
  constexpr int dq_smem = Cfg::kDqSmemElems * sizeof(T);
  auto kernel = dq_kernel<T, kD>;
  set_max_dynamic_smem(kernel, dq_smem, "flash_attention dq_kernel");
  launch("flash_attention dq_kernel", kernel,
         dim3(static_cast<unsigned>(ceil_div(p.seqlen_q, Cfg::kDqBlockM)), hq, batch),
         kThreads, dq_smem, stream, p);
}

struct LaunchBwd {
  const Params& p;
  cudaStream_t stream;
  template <typename T, int kD>
  void operator()() const { launch_bwd<T, kD>(p, stream); }
};

}  // namespace

}  // namespace cuda

void backward_cuda(const Params& p, DType dtype, uintptr_t stream) {
  cuda::check_cuda_params(p, true);
  if (p.batch == 0 || p.heads_q == 0) return;
  CudaDeviceGuard guard(p.device);
  cuda::dispatch(p, dtype, cuda::LaunchBwd{p, as_stream(stream)});
}

}  // namespace attention
}  // namespace pyllmops
