// Flash attention forward on sm80+ tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// Computes out and lse as attention.h describes. One CTA = 4 warps = one tile of kBlockM = 64 query rows
// of one (batch, head); warp w owns rows 16w..16w+15 (so row statistics never leave the warp). Grid:
// (query tiles, heads_q, batch); varlen uses the same kernel (seq_info() maps batch -> packed rows and
// CTAs past a short sequence exit at once).
//
// Per key tile (kBlockN = 64 keys, 32 at the padded head dim 256), visited only if the mask's band
// touches the tile (Mask::key_tiles), masked per element only if the band cuts it (Mask::tile_is_full):
//   load K, V tiles to shared memory (16-byte loads, zero-filled past seqlen / head_dim)
//   S = Q K^T              gemm_ss, fp32 in registers (16 x kBlockN per warp)
//   online softmax         scores * scale * log2 e, row max over the quad, RowState::rescale_to, exp2
//   O += P V               P rounded to fp16/bf16 in registers (acc_to_a), gemm_rs with V read by ldmatrix.trans
// then O / l (0 for a row that saw no key), lse = m + log2 l in natural log.
//
// Head dims: instantiated for padded kD in {64, 128, 256} (x fp16, bf16: 6 kernels); any multiple of 8
// up to 256 runs on the next padded size with zero-filled columns (exact, at the padded cost).
// Shared memory: (kBlockM + 2 kBlockN) x (kD + 8) x 2 bytes = 25.5 KB (kD 64), 51 KB (128), 67.6 KB (256).
//
// Napkin math (H100 SXM, bf16 dense mma ~660 TFLOP/s through mma.sync, ~990 with wgmma): per key tile a
// warp does 2 x 16 x 64 x kD x 2 FLOPs = 0.5 MFLOP at kD 128 for 2 x 64 x 136 x 2 = 35 KB of shared-memory
// tile loads per CTA: the K/V tile is loaded once per CTA and used by 4 warps, so at 4 CTAs / SM the
// kernel is bound by mma issue plus the serialized load -> compute of this single-stage version.
// Next steps (not done): cp.async double buffering of K/V, Q fragments kept in registers, and the sm90a
// version (TMA loads, wgmma, producer/consumer warp specialization) on the same tile decomposition.
#include "attention/attention_cuda.cuh"
#include "common/dtype.h"

namespace pyllmops {
namespace attention {
namespace cuda {

namespace {

constexpr int kBlockM = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;

template <int kD>
struct FwdConfig {
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;
  static constexpr int kStride = kD + 8;
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kStride;
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Params p) {
  using Cfg = FwdConfig<kD>;
  constexpr int kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int64_t mt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i0 = mt * kBlockM;
  if (i0 >= si.sq) return;
  const Mask mask = seq_mask(p, si);
  const int64_t hk = h / (p.heads_q / p.heads_kv), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const float scale_log2 = p.scale * softmax::kLog2e;

  const T* q = q_row(static_cast<const T*>(p.q), p.lq, si, i0, h);
  const T* k = k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk);
  const T* v = k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk);
  load_tile<T, kBlockM, kD, kThreads>(sQ, q, p.lq.seq, si.sq - i0, d);

  float acc_o[kD / 8][4];
  zero(acc_o);
  softmax::RowState st[2];  // rows g and g + 8 of this warp's slice; l is this lane's partial sum

  int64_t nb, ne;
  mask.key_tiles(i0, i0 + kBlockM < si.sq ? i0 + kBlockM : si.sq, kBlockN, &nb, &ne);
  for (int64_t nt = nb; nt < ne; ++nt) {
    const int64_t j0 = nt * kBlockN;
    __syncthreads();  // previous tile fully consumed (and, the first time, nothing pending)
    load_tile<T, kBlockN, kD, kThreads>(sK, k + j0 * p.lk.seq, p.lk.seq, si.sk - j0, d);
    load_tile<T, kBlockN, kD, kThreads>(sV, v + j0 * p.lv.seq, p.lv.seq, si.sk - j0, d);
    __syncthreads();

    float s[kBlockN / 8][4];
    zero(s);
    gemm_ss<T, kBlockN, kD, kStride>(s, sQ + warp * 16 * kStride, sK);

    const bool full = mask.tile_is_full(i0, i0 + kBlockM, j0, j0 + kBlockN);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n8 = 0; n8 < kBlockN / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n8][e] * scale_log2;
        if (!full) {
          const int64_t i = i0 + warp * 16 + acc_row(e), j = j0 + acc_col(n8, e);
          if (i >= si.sq || j >= si.sk || !mask.visible(i, j)) x = -INFINITY;
        }
        s[n8][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    float factor[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) factor[r] = st[r].rescale_to(quad_max(tile_max[r]));
#pragma unroll
    for (int n8 = 0; n8 < kD / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[n8][e] *= factor[e / 2];
#pragma unroll
    for (int n8 = 0; n8 < kBlockN / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pr = softmax::exp2_shifted(s[n8][e], st[e / 2].m);
        st[e / 2].l += pr;
        s[n8][e] = pr;
      }
    uint32_t a[kBlockN / 16][4];
    acc_to_a<T, kBlockN>(s, a);
    gemm_rs<T, kD, kBlockN, kStride>(acc_o, a, sV);
  }

  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st[r].l = quad_sum(st[r].l);
    inv_l[r] = st[r].inv_l();
  }
  T* o = q_row(static_cast<T*>(p.o), p.lo, si, i0 + warp * 16, h);
  const int64_t rows = si.sq - i0;
  store_acc<T, kD>(acc_o, inv_l, o, p.lo.seq, rows - warp * 16, d);
  if (threadIdx.x % 4 == 0) {
    float* lse = p.lse + lse_index(p, si, i0, h);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = warp * 16 + acc_row(2 * r);
      if (row < rows) lse[row] = st[r].lse_natural();
    }
  }
}

template <typename T, int kD>
void launch_fwd(const Params& p, cudaStream_t stream) {
  launch_varlen_fail<T>(p, false, stream);  // varlen: NaN and error bits for the sequences fwd_kernel skips
  if (p.seqlen_q == 0) return;               // no query rows (the offsets are still checked above)
  constexpr int smem = FwdConfig<kD>::kSmemElems * sizeof(T);
  auto kernel = fwd_kernel<T, kD>;
  set_max_dynamic_smem(kernel, smem, "flash_attention fwd_kernel");
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seqlen_q, kBlockM)), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  launch("flash_attention fwd_kernel", kernel, grid, kThreads, smem, stream, p);
}

struct LaunchFwd {
  const Params& p;
  cudaStream_t stream;
  template <typename T, int kD>
  void operator()() const { launch_fwd<T, kD>(p, stream); }
};

}  // namespace

}  // namespace cuda

void forward_cuda(const Params& p, DType dtype, uintptr_t stream) {
  cuda::check_cuda_params(p, false);
  if (p.batch == 0 || p.heads_q == 0) return;
  CudaDeviceGuard guard(p.device);
  cuda::dispatch(p, dtype, cuda::LaunchFwd{p, as_stream(stream)});
}

}  // namespace attention
}  // namespace pyllmops
