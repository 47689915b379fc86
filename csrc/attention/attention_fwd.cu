// Flash attention forward on sm80+ tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// Computes out and lse as attention.h describes. One CTA = 4 warps = kBlockM query rows of one (batch, head);
// each warp owns kTilesM m16 row tiles (kD <= 128: two, 32 rows, kBlockM = 128; kD 256: one, kBlockM = 64), so
// row statistics never leave the warp and every K / V fragment read from shared memory feeds kTilesM mma.
// Grid: (query tiles, heads_q, batch), query tiles in reverse order (under a causal mask the last tiles see the
// most keys: they start first). Varlen uses the same kernel (seq_info() maps batch -> packed rows; CTAs past a
// short sequence exit at once).
//
// Prologue: Q tile and the first K tile by cp.async; Q fragments then stay in registers (kD <= 128) or are
// read from shared memory per k-step (kD 256: the 16 x 256 O accumulator leaves no room). Per key tile
// (kBlockN keys), visited only if the mask's band touches it (Mask::key_tiles), masked per element only if the
// band cuts it (Mask::tile_is_full), with the loads in flight behind the math (FlashAttention-2's schedule):
//   issue V(j) (cp.async)              | S = Q K(j)^T (gemm_abt), softcap, mask, online softmax (base 2)
//   wait V(j), barrier; issue K(j + 1) | O += P V(j) (P rounded to fp16/bf16 in registers, gemm_ab)
//   wait K(j + 1), barrier
// then O / l (0 for a row that saw no key), lse = m + log2 l in natural log.
//
// NaN (docs/attention.md): a NaN score makes its row's max NaN (max.NaN, never fmaxf), hence its out and lse
// NaN; masked scores are -inf whatever q . k is; a row that sees no key gives out 0, lse -inf.
//
// Instantiations: padded kD in {64, 128, 256} x fp16, bf16 x softcap on / off (12 kernels; the softcap is a
// template argument because its ~10 instructions per score would otherwise sit in every kernel's loop). Any head
// dim that is a multiple of 8 up to 256 runs on the next padded size with zero-filled columns (exact).
// Tiles and shared memory ((kBlockM + 2 kBlockN) x (kD + 8) x 2 bytes):
//   kD  64: 128 x 64 keys, 36.9 KB;  kD 128: 128 x 32 keys, 52.2 KB;  kD 256: 64 x 32 keys, 67.6 KB.
// Registers per thread (fp32 accumulators): kD 128: O 2 x 16 x 4 = 128, S 2 x 4 x 4 = 32, Q fragments
// 2 x 8 x 4 = 64; a 64-key tile would need 32 more (over the 255 that 2 CTAs of 128 threads allow).
// Napkin math and the static report's numbers: docs/attention.md, "GPU".
#include "attention/attention_cuda.cuh"
#include "common/dtype.h"

namespace pyllmops {
namespace attention {
namespace cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;

// Tile sizes per head dim, chosen from ptxas on sm_80 and sm_90a (static report): the largest key tile that
// leaves 2 CTAs of 128 threads per SM (<= 255 registers) without spills. kD 128: 64-key tiles spilled 8-16 bytes
// at 254-255 registers (sm_90a), 48-key tiles 8 bytes on sm_80; 32 keys fit on both, except with the softcap
// (8 bytes on sm_90a), which takes 16.
template <int kD, bool kSoftcap>
struct FwdConfig {
  static constexpr int kTilesM = kD <= 128 ? 2 : 1;  // m16 row tiles per warp
  static constexpr int kBlockM = kWarps * 16 * kTilesM;
  static constexpr int kBlockN = kD <= 64 ? 64 : (kD <= 128 && kSoftcap ? 16 : 32);
  static constexpr bool kQInRegs = kD <= 64;  // kD 128: the 64 registers of Q fragments do not fit next to O
  static constexpr int kStride = kD + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kStride * 2;
};

template <typename T, int kD, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(Params p) {
  using Cfg = FwdConfig<kD, kSoftcap>;
  constexpr int kTilesM = Cfg::kTilesM, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kRows = 2 * kTilesM;  // accumulator rows per lane
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int64_t mt = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i0 = mt * kBlockM;
  if (i0 >= si.sq) return;
  const Mask mask = seq_mask(p, si);
  const int64_t hk = kv_head(p, h), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t iw = i0 + warp * 16 * kTilesM;  // the warp's first query row
  const float mul = (kSoftcap ? p.softcap : p.scale) * softmax::kLog2e;  // scores -> base-2 softmax domain
  const float pre = kSoftcap ? softcap_pre(p) : 0.0f;

  const T* q = q_row(static_cast<const T*>(p.q), p.lq, si, i0, h);
  const T* k = k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk);
  const T* v = k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk);
  // What the epilogue needs, computed now so that only these stay live across the loop (keeping SeqInfo's fields
  // instead cost an 8-byte spill at kD 128).
  T* const o_warp = q_row(static_cast<T*>(p.o), p.lo, si, iw, h);
  float* const lse_warp = p.lse + lse_index(p, si, iw, h);
  const int out_rows = static_cast<int>(si.sq - iw < kBlockM ? si.sq - iw : kBlockM);  // may be <= 0
  int64_t nb, ne;
  mask.key_tiles(i0, i0 + kBlockM < si.sq ? i0 + kBlockM : si.sq, kBlockN, &nb, &ne);
  // Key tiles [fb, fe) lie inside the band for every row of the CTA and need no per-element mask
  // (Mask::tile_is_full, solved once for the tile range: j0 >= first_key(last row), j0 + kBlockN - 1 <= last_key(i0)).
  // Tile indices fit in int (a key tensor of 2^31 tiles would hold > 2^36 rows).
  int fb = 0, fe = 0;
  if (i0 + kBlockM <= si.sq) {
    fb = static_cast<int>((mask.first_key(i0 + kBlockM - 1) + kBlockN - 1) / kBlockN);
    fe = static_cast<int>((mask.last_key(i0) + 1) / kBlockN);
  }
  const int tb = static_cast<int>(nb), te = static_cast<int>(ne);

  cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q, p.lq.seq, si.sq - i0, d);
  if (tb < te) cp_async_tile<T, kBlockN, kD, kThreads>(sK, k + nb * kBlockN * p.lk.seq, p.lk.seq, si.sk - nb * kBlockN, d);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  const SmemA<T, kStride> q_smem{sQ + warp * 16 * kTilesM * kStride};
  uint32_t q_frag[Cfg::kQInRegs ? kTilesM : 1][Cfg::kQInRegs ? kD / 16 : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int t = 0; t < kTilesM; ++t)
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) q_smem(t, ks, q_frag[t][ks]);
  }

  float acc_o[kTilesM][kD / 8][4];
  zero(acc_o);
  float row_m[kRows], row_l[kRows];  // running max (score domain, before `mul`) and this lane's partial sum
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.0f;
  }

  for (int nt = tb; nt < te; ++nt) {
    const int64_t j0 = static_cast<int64_t>(nt) * kBlockN;
    cp_async_tile<T, kBlockN, kD, kThreads>(sV, v + j0 * p.lv.seq, p.lv.seq, si.sk - j0, d);
    ptx::cp_async_commit();

    float s[kTilesM][kBlockN / 8][4];
    zero(s);
    if constexpr (Cfg::kQInRegs) {
      gemm_abt<T, kTilesM, kBlockN, kD, kStride>(s, RegA<kTilesM, kD>{q_frag}, sK);
    } else {
      gemm_abt<T, kTilesM, kBlockN, kD, kStride>(s, q_smem, sK);
    }
    if constexpr (kSoftcap) softcap_scores<kTilesM, kBlockN>(s, pre);
    if (nt < fb || nt >= fe)
      mask_scores<kTilesM, kBlockN>(s, mask, j0, [&](int r) { return iw + (r / 2) * 16 + acc_row(2 * (r % 2)); });

    // Online softmax: new row max (NaN-propagating), rescale O and l, P = exp2((s - m) mul).
    float m_scaled[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = row_m[r];
#pragma unroll
      for (int n8 = 0; n8 < kBlockN / 8; ++n8) {
        mx = ptx::fmax_nan(mx, s[r / 2][n8][2 * (r % 2)]);
        mx = ptx::fmax_nan(mx, s[r / 2][n8][2 * (r % 2) + 1]);
      }
      mx = quad_max(mx);
      // exp2(-inf - -inf) would be NaN: a row still without a visible key keeps factor 0 (its O and l are 0).
      const float factor = mx == -INFINITY ? 0.0f : ptx::ex2_approx((row_m[r] - mx) * mul);
      row_m[r] = mx;
      row_l[r] *= factor;
#pragma unroll
      for (int n8 = 0; n8 < kD / 8; ++n8) {
        acc_o[r / 2][n8][2 * (r % 2)] *= factor;
        acc_o[r / 2][n8][2 * (r % 2) + 1] *= factor;
      }
      m_scaled[r] = mx == -INFINITY ? 0.0f : mx * mul;  // masked scores (-inf) still give exp2(-inf) = 0
    }
#pragma unroll
    for (int t = 0; t < kTilesM; ++t)
#pragma unroll
      for (int n8 = 0; n8 < kBlockN / 8; ++n8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * t + e / 2;
          const float pr = ptx::ex2_approx(s[t][n8][e] * mul - m_scaled[r]);
          row_l[r] += pr;
          s[t][n8][e] = pr;
        }
    uint32_t p_frag[kTilesM][kBlockN / 16][4];
    acc_to_a<T, kTilesM, kBlockN>(s, p_frag);

    ptx::cp_async_wait<0>();  // V(j) has landed (this thread's copies) ...
    __syncthreads();          // ... everyone's, and every warp is done reading K(j)
    if (nt + 1 < te) {
      cp_async_tile<T, kBlockN, kD, kThreads>(sK, k + (j0 + kBlockN) * p.lk.seq, p.lk.seq, si.sk - j0 - kBlockN, d);
      ptx::cp_async_commit();
    }
    gemm_ab<T, kTilesM, kD, kBlockN, kStride>(acc_o, RegA<kTilesM, kBlockN>{p_frag}, sV);
    ptx::cp_async_wait<0>();  // K(j + 1) has landed ...
    __syncthreads();          // ... for everyone, and every warp is done reading V(j)
  }

  const int rows = out_rows;  // valid rows from the warp's first
  float lse_r[kRows];
#pragma unroll
  for (int t = 0; t < kTilesM; ++t) {
    float inv_l[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 2 * t + half;
      const float l = quad_sum(row_l[r]);
      // l == 0: the row saw no key (out 0, lse -inf). A NaN l (NaN scores) stays NaN in both.
      inv_l[half] = l == 0.0f ? 0.0f : __fdividef(1.0f, l);  // l in [1, keys]: no range issue
      lse_r[r] = l == 0.0f ? -INFINITY : (row_m[r] * mul + log2f(l)) * softmax::kLn2;
    }
    T* o = o_warp + t * 16 * p.lo.seq;
    store_acc<T, kD>(acc_o[t], inv_l, o, p.lo.seq, rows - t * 16, d);
  }
  if (threadIdx.x % 4 == 0) {
    float* lse = lse_warp;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = (r / 2) * 16 + acc_row(2 * (r % 2));
      if (row < rows) lse[row] = lse_r[r];
    }
  }
}

template <typename T, int kD, bool kSoftcap>
void launch_fwd(const Params& p, cudaStream_t stream) {
  using Cfg = FwdConfig<kD, kSoftcap>;
  constexpr int smem = Cfg::kSmemBytes;
  auto kernel = fwd_kernel<T, kD, kSoftcap>;
  static DynamicSmemOptIn opt_in;  // the attribute is set once per device
  opt_in.ensure(kernel, smem, p.device, "flash_attention fwd_kernel");
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seqlen_q, Cfg::kBlockM)), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  launch("flash_attention fwd_kernel", kernel, grid, kThreads, smem, stream, p);
}

struct LaunchFwd {
  const Params& p;
  cudaStream_t stream;
  template <typename T, int kD>
  void operator()() const {
    launch_varlen_fail<T>(p, false, stream);  // varlen: NaN and error bits for the sequences fwd_kernel skips
    if (p.seqlen_q == 0) return;               // no query rows (the offsets are still checked above)
    if (p.softcap > 0.0f)
      launch_fwd<T, kD, true>(p, stream);
    else
      launch_fwd<T, kD, false>(p, stream);
  }
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
