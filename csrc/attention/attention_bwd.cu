// Flash attention backward on sm80+ tensor cores (algorithm: attention.h): FlashAttention-2's 5-matmul structure,
// with a deterministic two-pass variant.
//
// delta:  8 lanes per query row, 16-byte vector loads of O and dO: delta = rowsum(dO * O) - dlse. The same threads
//         zero the row's fp32 dQ accumulator (atomic mode): one launch fewer than a memset, and stream order makes
//         the zeros land before any atomic.
// dk/dv:  dkdv_kernel: the deterministic mode at every head dim, and the atomic mode at kD 64 and 256 (kD 128's
//         atomic mode runs dkdv_dq_kernel below, FlashAttention-2's tiles). One CTA = kKvWarps warps = kBlockN =
//         16 kKvWarps keys of one (batch, kv head); warp w owns keys 16w..16w+15. 8 warps (128 keys) at kD 128, 4
//         (64 keys) at kD 64 and 256 (BwdConfig says why).
//         Work items: (query head of the GQA group, query tile of kBlockM = 32 rows the mask lets these keys
//         be seen by, Mask::query_tiles); the next item's Q, dO (cp.async) and lse, delta are loaded into the
//         other of two shared-memory stages while this item is computed (one stage at kD 256). A warp whose 16
//         keys no query of the item sees skips the item (its dS^T rows are zeros). Otherwise:
//           S^T = K Q^T (gemm_abt), softcap, P^T = exp2(S^T mul - lse2) (0 where masked / for empty rows)
//           dV += P^T dO          (gemm_ab, P^T rounded to fp16/bf16, dO read by ldmatrix.trans)
//           dP^T = V dO^T (gemm_abt), dS^T = P^T (dP^T - delta) (1 - tanh^2 when capped), dK += dS^T Q (gemm_ab)
//           The per-element mask selects run only on warp tiles (16 keys x 32 queries) the band cuts.
//           atomic mode (kDoDQ): dS^T goes to shared memory (sdS, keys x queries) and, after a barrier, each warp
//           computes 2 m16 query tiles x kD / 4 columns of dQ(32 x kD) += dS K (gemm_ab over all the
//           CTA's keys, dS read as the A operand by ldmatrix.trans, K from the CTA's own tile) and adds them to the
//           fp32 workspace by reductions (ptx::red_add_f32x2: REDG.E.ADD.F32x2 on sm_90, 2 x RED.E.ADD.F32 on
//           sm_80), in chunks of at most 32 columns to bound the live registers.
//         dK and dV accumulate in fp32 registers over the whole group and are written once (dK * scale).
//         At the padded head dim 256 two accumulators of 16 x 256 per warp do not fit in registers: dK (+ dQ)
//         and dV are then computed by two launches of the same kernel (kDoDK / kDoDV), recomputing P.
// dq_convert (atomic mode): dq = dtype(workspace * scale), 8 lanes per row, 16-byte stores.
// dq (deterministic mode): one CTA = 4 warps = 64 query rows of one (batch, q head), walking the visited key
//         tiles (K, V of the next tile in flight by cp.async behind this tile's math, two stages; one at kD 256):
//           S = Q K^T, dP = dO V^T (gemm_abt), dS = P (dP - delta), dQ += dS K (gemm_ab), fp32 accumulation
//           in registers, written once (dQ * scale).
//
// Modes (Params::deterministic). Atomic (default, FlashAttention-2): 5 tile matmuls per visited (query tile, key
// tile) pair, dQ summed in an fp32 workspace (seqlen_q x heads_q x head_dim x 4 bytes, allocated by the launcher
// with cudaMallocAsync on the caller's stream and freed the same way) in whatever order the CTAs reach it: the
// fp32 sum, hence the last bits of dQ, varies run to run (dK and dV never do). Deterministic: the dk/dv kernel
// without dQ, then the dq kernel: every gradient element has one writer and a fixed summation order, bitwise
// reproducible, for 7 tile matmuls per pair (+40% backward FLOPs).
//
// Race freedom of the atomic mode, by construction: the workspace is zeroed by delta_kernel, only added to by
// atomics in dkdv_kernel and read by dq_convert_kernel: three launches ordered by the stream. Inside dkdv_kernel
// sdS is written between the stage barrier and the sdS barrier and read between the sdS barrier and the closing
// barrier; only rows < seqlen_q and columns < head_dim are added (padding rows of a tile would be the next
// sequence's rows in varlen).
//
// NaN (docs/attention.md): a NaN lse (a NaN row in the forward) is not "empty": its P, hence its gradients, are
// NaN; masked elements give dS exactly 0.
//
// Napkin math (bf16, d = 128, atomic mode, per visited 64 x 128 item of dkdv_dq_kernel): 5 matmuls of
// 64 x 128 x 128 = 2560 HMMA.m16n8k16, 320 per warp, fed by 144 ldmatrix.x4 per warp (0.45 per mma; dkdv_kernel's
// 32 x 128 items: 160 mma, 104 ldmatrix.x4, 0.65); the atomics add 64 x 128 fp32 = 16 REDG.F32x2 per thread. At
// kD 64 dkdv_kernel's 64-key CTAs add 32 x 64 per item, 8 per thread (a reduction sums 64 keys).
// FlashAttention's FLOP count for the backward, 2.5x the forward's, is exactly these 5 matmuls (the deterministic
// mode does 3.5x). Ceilings: docs/attention.md, GPU.
#include "attention/attention_cuda.cuh"
#include "common/dtype.h"
#include "common/warp_reduce.cuh"

#include <memory>
#include <type_traits>

namespace pyllmops {
namespace attention {
namespace cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kDeltaLanes = 8;                       // lanes per row of delta_kernel
constexpr int kDeltaRows = kThreads / kDeltaLanes;  // rows per delta_kernel CTA

template <int kD>
struct BwdConfig {
  static constexpr int kStride = kD + 8;
  // dq pass: 64 query rows; key tiles of 64 (kD 64) or 32 keys, in kDqStages shared-memory stages (2: the next
  // tile's cp.async runs behind this tile's math; kD 256: 1, two stages would leave 1 CTA per SM on sm_80)
  static constexpr int kDqBlockM = 64;
  static constexpr int kDqBlockN = kD <= 64 ? 64 : 32;
  static constexpr int kDqStages = kD <= 128 ? 2 : 1;
  static constexpr int kDqSmemBytes = (2 * kDqBlockM + 2 * kDqStages * kDqBlockN) * kStride * 2;
  // dk/dv pass: kKvWarps warps of 16 keys each, kKvBlockN = 16 kKvWarps keys per CTA. kD 128: 8 warps (128
  // keys), so every item's Q / dO tile, lse and delta feed 128 keys and every dQ reduction sums 128 keys. kD 64: 4
  // warps (64 keys): 8 warps fit 2 CTAs per SM only at 128 registers, where ptxas spills (32 bytes), and 1 CTA of 8
  // warps is fewer warps than 3 of 4 (164 registers). kD 256: 4 warps, two 128-key K / V tiles would not fit in
  // sm_80's shared memory. Query tiles of 32 (with their lse and delta) in kKvStages stages.
  static constexpr int kKvWarps = kD == 128 ? 8 : 4;
  static constexpr int kKvThreads = kKvWarps * kWarpSize;
  static constexpr int kKvBlockN = 16 * kKvWarps;
  static constexpr int kKvBlockM = 32;
  static constexpr int kKvStages = kD <= 128 ? 2 : 1;
  static constexpr int kKvSmemBytes = (2 * kKvBlockN + 2 * kKvStages * kKvBlockM) * kStride * 2 +
                                      2 * kKvStages * kKvBlockM * 4;
  // atomic dQ (kD 64 and 256; kD 128 runs dkdv_dq_kernel): dS^T of one item (kKvBlockN keys x kKvBlockM queries,
  // padded rows: conflict-free ldmatrix and 32-bit stores). dQ(32 x kD) of an item is split over the 4 warps by
  // column quarters (both m16 query tiles per warp), kDqChunk columns at a time to bound the live registers
  // (32 x kDqChunk fp32 per warp).
  static constexpr int kDsStride = kKvBlockM + 8;
  // CTAs per SM the register allocation must allow (__launch_bounds__' second argument; 0: none). ptxas: the
  // atomic-dQ kernel at kD 64 takes 3 CTAs without spills (about 200 registers, 2 CTAs, without the hint); the one
  // without dQ (deterministic mode) spills 8-24 bytes under that hint and takes 166 / 174 registers without it (3 /
  // 2 CTAs on sm_90a / sm_80); the others keep none (docs/attention.md, GPU: static numbers).
  static constexpr int kv_min_blocks(bool dq) { return dq && kD == 64 ? 3 : 0; }
  static constexpr int kv_smem_bytes(bool dq) { return kKvSmemBytes + (dq ? kKvBlockN * kDsStride * 2 : 0); }
};

// Row of the fp32 dQ workspace that holds query row i of sequence si (layout (rows, heads_q, head_dim), rows =
// batch x seqlen_q, or total_q for varlen).
__device__ __forceinline__ int64_t dq_ws_row(const Params& p, const SeqInfo& si, int64_t i) {
  return si.q_batch * p.seqlen_q + si.q_row0 + i;
}

// delta = rowsum(dO * O) - dlse: kDeltaLanes lanes per row, each reading 16-byte vectors of O and dO (a row of
// d = 128 bf16 is one 256-byte coalesced segment per tensor per 8 lanes), summed over the lanes by shuffles.
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(Params p, float* dq_ws) {
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int sub = threadIdx.x % kDeltaLanes;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kDeltaRows + threadIdx.x / kDeltaLanes;
  float acc = 0.0f;
  if (i < si.sq) {
    const T* o = q_row(static_cast<const T*>(p.o), p.lo, si, i, h);
    const T* g = q_row(static_cast<const T*>(p.dout), p.ldo, si, i, h);
    for (int64_t c = sub * 8; c < p.head_dim; c += kDeltaLanes * 8) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c), gv = *reinterpret_cast<const uint4*>(g + c);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* ge = reinterpret_cast<const T*>(&gv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += to_float(oe[e]) * to_float(ge[e]);
    }
  }
  acc = group_sum<kDeltaLanes>(acc);
  if (dq_ws != nullptr && i < si.sq) {  // atomic mode: this row's dQ accumulator starts at 0
    float* w = dq_ws + (dq_ws_row(p, si, i) * p.heads_q + h) * p.head_dim;
    for (int64_t c = sub * 8; c < p.head_dim; c += kDeltaLanes * 8) {
      reinterpret_cast<float4*>(w + c)[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      reinterpret_cast<float4*>(w + c)[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  if (sub == 0 && i < si.sq) {
    const int64_t off = lse_index(p, si, i, h);
    p.delta[off] = p.dlse ? acc - p.dlse[off] : acc;
  }
}

// dq = dtype(workspace * scale), the delta kernel's layout of threads: 8 lanes per row, 8 elements per lane and step
// (two 16-byte loads, one 16-byte store).
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_convert_kernel(Params p, const float* dq_ws) {
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kDeltaRows + threadIdx.x / kDeltaLanes;
  if (i >= si.sq) return;
  const float* w = dq_ws + (dq_ws_row(p, si, i) * p.heads_q + h) * p.head_dim;
  T* dq = q_row(static_cast<T*>(p.dq), p.ldq, si, i, h);
  for (int64_t c = (threadIdx.x % kDeltaLanes) * 8; c < p.head_dim; c += kDeltaLanes * 8) {
    const float4 x = reinterpret_cast<const float4*>(w + c)[0], y = reinterpret_cast<const float4*>(w + c)[1];
    uint4 out;
    out.x = pack2<T>(x.x * p.scale, x.y * p.scale);
    out.y = pack2<T>(x.z * p.scale, x.w * p.scale);
    out.z = pack2<T>(y.x * p.scale, y.y * p.scale);
    out.w = pack2<T>(y.z * p.scale, y.w * p.scale);
    *reinterpret_cast<uint4*>(dq + c) = out;
  }
}

// The A operand dS (queries x keys) of dQ += dS K, read from sdS, which holds dS^T (keys x queries, row stride
// kDsStride): ldmatrix.trans of the four 8 x 8 blocks (queries 0-7 / 8-15) x (keys 0-7 / 8-15), in the order of
// the A fragment's registers.
template <typename T, int kDsStride>
struct SmemAT {
  const T* s;
  __device__ __forceinline__ void operator()(int mt, int ks, uint32_t (&a)[4]) const {
    const int lane = threadIdx.x % kWarpSize;
    ptx::ldmatrix_x4_trans(a, s + (ks * 16 + lane % 8 + (lane / 16) * 8) * kDsStride + mt * 16 + ((lane / 8) % 2) * 8);
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) dq_kernel(Params p) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockM = Cfg::kDqBlockM, kBlockN = Cfg::kDqBlockN, kStride = Cfg::kStride;
  constexpr int kStages = Cfg::kDqStages;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kStride;
  T* sK = sdO + kBlockM * kStride;      // kStages K tiles
  T* sV = sK + kStages * kBlockN * kStride;  // kStages V tiles

  const int64_t mt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t i0 = mt * kBlockM;
  if (i0 >= si.sq) return;
  const Mask mask = seq_mask(p, si);
  const int64_t hk = kv_head(p, h), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const bool capped = p.softcap > 0.0f;
  const float pre = capped ? softcap_pre(p) : 0.0f, mul = (capped ? p.softcap : p.scale) * softmax::kLog2e;

  const T* k = k_row(static_cast<const T*>(p.k), p.lk, si, 0, hk);
  const T* v = k_row(static_cast<const T*>(p.v), p.lv, si, 0, hk);
  cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q_row(static_cast<const T*>(p.q), p.lq, si, i0, h), p.lq.seq,
                                          si.sq - i0, d);
  cp_async_tile<T, kBlockM, kD, kThreads>(sdO, q_row(static_cast<const T*>(p.dout), p.ldo, si, i0, h), p.ldo.seq,
                                          si.sq - i0, d);
  ptx::cp_async_commit();
  const auto load_kv = [&](int64_t tile, int stage) {  // K and V of key tile `tile` into `stage`, one group
    const int64_t j0 = tile * kBlockN;
    cp_async_tile<T, kBlockN, kD, kThreads>(sK + stage * kBlockN * kStride, k + j0 * p.lk.seq, p.lk.seq, si.sk - j0, d);
    cp_async_tile<T, kBlockN, kD, kThreads>(sV + stage * kBlockN * kStride, v + j0 * p.lv.seq, p.lv.seq, si.sk - j0, d);
    ptx::cp_async_commit();
  };

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
  if (nb < ne) load_kv(nb, 0);
  for (int64_t nt = nb; nt < ne; ++nt) {
    const int64_t j0 = nt * kBlockN;
    const int st = kStages == 2 ? static_cast<int>((nt - nb) & 1) : 0;
    if (kStages == 2 && nt + 1 < ne) {
      load_kv(nt + 1, st ^ 1);  // that stage was consumed in the previous iteration (its closing barrier)
      ptx::cp_async_wait<1>();  // everything but the newest group has landed: this tile's K and V
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKt = sK + st * kBlockN * kStride;
    const T* sVt = sV + st * kBlockN * kStride;
    float s[1][kBlockN / 8][4], dp[1][kBlockN / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, 1, kBlockN, kD, kStride>(s, SmemA<T, kStride>{sQ + warp * 16 * kStride}, sKt);
    gemm_abt<T, 1, kBlockN, kD, kStride>(dp, SmemA<T, kStride>{sdO + warp * 16 * kStride}, sVt);
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
        const float pr = ptx::ex2_approx(x.s * mul - lse2[r]);
        s[0][n8][e] = keep ? pr * (dp[0][n8][e] - dl[r]) * x.dtanh : 0.0f;
      }
    uint32_t a[1][kBlockN / 16][4];
    acc_to_a<T, 1, kBlockN>(s, a);
    gemm_ab<T, 1, kD, kBlockN, kStride>(acc_dq, RegA<1, kBlockN>{a}, sKt);
    __syncthreads();  // every warp is done with this stage
    if (kStages == 1 && nt + 1 < ne) load_kv(nt + 1, 0);
  }
  ptx::cp_async_wait<0>();  // no key tile visited: the Q / dO copies are still pending
  const float scale2[2] = {p.scale, p.scale};
  T* dq = q_row(static_cast<T*>(p.dq), p.ldq, si, i0 + warp * 16, h);
  store_acc<T, kD>(acc_dq[0], scale2, dq, p.ldq.seq, si.sq - i0 - warp * 16, d);
}

template <typename T, int kD, bool kDoDK, bool kDoDV, bool kDoDQ>
__global__ void __launch_bounds__(BwdConfig<kD>::kKvThreads, BwdConfig<kD>::kv_min_blocks(kDoDQ))
    dkdv_kernel(Params p, float* dq_ws) {
  static_assert(!kDoDQ || kDoDK, "dkdv_kernel: dQ needs the dS of the dK computation");
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockN = Cfg::kKvBlockN, kBlockM = Cfg::kKvBlockM, kStride = Cfg::kStride;
  constexpr int kStages = Cfg::kKvStages;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  T* sQs = sV + kBlockN * kStride;              // kStages Q tiles
  T* sdOs = sQs + kStages * kBlockM * kStride;  // kStages dO tiles
  float* sLs = reinterpret_cast<float*>(sdOs + kStages * kBlockM * kStride);  // kStages x (lse2, delta)
  T* sdS = reinterpret_cast<T*>(sLs + kStages * 2 * kBlockM);                 // kDoDQ: dS^T of the item

  const int64_t nt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t j0 = nt * kBlockN;
  if (j0 >= si.sk) return;
  const Mask mask = seq_mask(p, si);
  const int64_t group = static_cast<int>(p.heads_q) / static_cast<int>(p.heads_kv), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize;
  const bool capped = p.softcap > 0.0f;
  const float pre = capped ? softcap_pre(p) : 0.0f, mul = (capped ? p.softcap : p.scale) * softmax::kLog2e;
  const float inv_mul = __fdividef(1.0f, mul);

  constexpr int kCtaThreads = Cfg::kKvThreads;
  cp_async_tile<T, kBlockN, kD, kCtaThreads>(sK, k_row(static_cast<const T*>(p.k), p.lk, si, j0, hk), p.lk.seq,
                                             si.sk - j0, d);
  cp_async_tile<T, kBlockN, kD, kCtaThreads>(sV, k_row(static_cast<const T*>(p.v), p.lv, si, j0, hk), p.lv.seq,
                                             si.sk - j0, d);
  ptx::cp_async_commit();

  // This warp's keys [wj0, wj0 + 16) are seen by query rows [wq_lo, wq_hi) (empty past the sequence's keys): an
  // item outside them is skipped by the whole warp (a window narrower than the CTA's 128 keys, the first items of
  // a causal diagonal CTA).
  const int64_t wj0 = j0 + warp * 16;
  int64_t wq_lo = 0, wq_hi = 0;
  if (wj0 < si.sk) mask.query_tiles(wj0, wj0 + 16 < si.sk ? wj0 + 16 : si.sk, 1, &wq_lo, &wq_hi);

  float acc_dk[1][kDoDK ? kD / 8 : 1][4], acc_dv[1][kDoDV ? kD / 8 : 1][4];
  (void)sdS;
  (void)dq_ws;
  zero(acc_dk);
  zero(acc_dv);
  // Work items: (query head g of the group, query tile mb + m) for m < tiles, in that order.
  int64_t mb, me;
  mask.query_tiles(j0, j0 + kBlockN < si.sk ? j0 + kBlockN : si.sk, kBlockM, &mb, &me);
  const int64_t tiles = me - mb, items = group * tiles;
  // Q, dO (cp.async, one group) and lse2, delta (plain loads, visible after the next barrier) of the next item
  // (query tile mb + ld_m of head hk * group + ld_g), then advances to the one after. Counters, not it / tiles:
  // a 64-bit division is a called subroutine. lse2 is +inf for padding rows and rows that saw no key (lse -inf):
  // exp2(score - inf) = 0 makes their P, hence dS, exactly 0 without a per-element select (their Q / dO rows are
  // zero-filled, or the mask hides them); a NaN lse stays NaN.
  int64_t ld_g = 0, ld_m = 0, cur_m = 0, cur_g = 0;
  const auto load_q = [&](int stage) {
    const int64_t h = hk * group + ld_g, i0 = (mb + ld_m) * kBlockM;
    if (++ld_m == tiles) {
      ld_m = 0;
      ++ld_g;
    }
    cp_async_tile<T, kBlockM, kD, kCtaThreads>(sQs + stage * kBlockM * kStride,
                                               q_row(static_cast<const T*>(p.q), p.lq, si, i0, h), p.lq.seq,
                                               si.sq - i0, d);
    cp_async_tile<T, kBlockM, kD, kCtaThreads>(sdOs + stage * kBlockM * kStride,
                                               q_row(static_cast<const T*>(p.dout), p.ldo, si, i0, h), p.ldo.seq,
                                               si.sq - i0, d);
    ptx::cp_async_commit();
    float* sl = sLs + stage * 2 * kBlockM;
    for (int r = threadIdx.x; r < kBlockM; r += kCtaThreads) {
      const bool in = i0 + r < si.sq;
      const int64_t off = lse_index(p, si, i0 + r, h);
      const float lse = in ? p.lse[off] : -INFINITY;
      sl[r] = lse == -INFINITY ? INFINITY : lse * softmax::kLog2e;
      sl[kBlockM + r] = in ? p.delta[off] : 0.0f;
    }
  };
  if (items > 0) load_q(0);
  for (int64_t it = 0; it < items; ++it) {
    const int st = kStages == 2 ? static_cast<int>(it & 1) : 0;
    if (kStages == 2 && it + 1 < items) {
      load_q(st ^ 1);           // that stage was consumed in the previous iteration (its closing barrier)
      ptx::cp_async_wait<1>();  // everything but the newest group has landed: K, V and this item's Q, dO
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t i0 = (mb + cur_m) * kBlockM;
    if (++cur_m == tiles) cur_m = 0;
    const int64_t item_g = cur_g;
    if (cur_m == 0) ++cur_g;
    (void)item_g;
    const T* sQ = sQs + st * kBlockM * kStride;
    const T* sdO = sdOs + st * kBlockM * kStride;
    const float* sL = sLs + st * 2 * kBlockM;
    const float* sD = sL + kBlockM;
    if (i0 + kBlockM <= wq_lo || i0 >= wq_hi) {  // no query of this item sees the warp's keys: dS^T = 0
      if constexpr (kDoDQ) {
        const int lane = threadIdx.x % kWarpSize;
        uint32_t* row_g = reinterpret_cast<uint32_t*>(sdS + (warp * 16 + lane / 2) * Cfg::kDsStride + (lane % 2) * 16);
#pragma unroll
        for (int i = 0; i < 8; ++i) row_g[i] = 0u;  // 16 rows x 32 queries: 2 lanes per row, 16 columns each
      }
    } else {
      float s[1][kBlockM / 8][4];
      zero(s);
      gemm_abt<T, 1, kBlockM, kD, kStride>(s, SmemA<T, kStride>{sK + warp * 16 * kStride}, sQ);  // S^T
      // Rows of S^T are keys, columns queries: query i0 + c sees key j iff c lies in the visible query columns
      // of key j, i.e. lo_k[r] <= c <= hi_k[r] (Mask::query_tiles' bounds per key). A warp tile fully inside the
      // band (the common case) runs the element loops without the select (the loops' `masked` argument false).
      const bool full = mask.tile_is_full(i0, i0 + kBlockM, wj0, wj0 + 16);
      int lo[2] = {0, 0}, hi[2] = {kBlockM - 1, kBlockM - 1};
      if (!full)
#pragma unroll
        for (int r = 0; r < 2; ++r) visible_rows<kBlockM>(mask, wj0 + acc_row(2 * r), i0, &lo[r], &hi[r]);
      const auto p_of_scores = [&](auto masked) {
#pragma unroll
        for (int n8 = 0; n8 < kBlockM / 8; ++n8)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e / 2, c = acc_col(n8, e);
            const float pr = ptx::ex2_approx(score(s[0][n8][e], capped, pre).s * mul - sL[c]);
            s[0][n8][e] = !decltype(masked)::value || (c >= lo[r] && c <= hi[r]) ? pr : 0.0f;
          }
      };
      if (full)
        p_of_scores(std::false_type());
      else
        p_of_scores(std::true_type());
      uint32_t a[1][kBlockM / 16][4];
      if constexpr (kDoDV) {
        acc_to_a<T, 1, kBlockM>(s, a);
        gemm_ab<T, 1, kD, kBlockM, kStride>(acc_dv, RegA<1, kBlockM>{a}, sdO);
      }
      if constexpr (kDoDK) {
        float dp[1][kBlockM / 8][4];
        zero(dp);
        gemm_abt<T, 1, kBlockM, kD, kStride>(dp, SmemA<T, kStride>{sV + warp * 16 * kStride}, sdO);  // dP^T
        // dS^T = P^T (dP^T - delta) (x (1 - t^2) when capped), exactly 0 where masked (also when dP^T is NaN
        // there: a NaN in V or dO the mask hides), which also covers padding rows and rows that see no key.
        const auto ds_of_p = [&](auto masked) {
#pragma unroll
          for (int n8 = 0; n8 < kBlockM / 8; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e / 2, c = acc_col(n8, e);
              const float pr = s[0][n8][e];
              // Softcap: the capped score t is recovered from P = exp2(t mul - lse2) instead of being kept in 16
              // more registers (which spilled at kD 128): t = (log2 P + lse2) / mul, accurate to ~1e-7 absolute.
              float dt = 1.0f;
              if (capped && pr > 0.0f) {
                const float t = (ptx::lg2_approx(pr) + sL[c]) * inv_mul;
                dt = 1.0f - t * t;
              }
              const float ds = pr * (dp[0][n8][e] - sD[c]) * dt;
              s[0][n8][e] = !decltype(masked)::value || (c >= lo[r] && c <= hi[r]) ? ds : 0.0f;
            }
        };
        if (full)
          ds_of_p(std::false_type());
        else
          ds_of_p(std::true_type());
        acc_to_a<T, 1, kBlockM>(s, a);
        if constexpr (kDoDQ) {  // dS^T rows of this warp's keys -> sdS (the A fragments hold adjacent query pairs)
          const int lane = threadIdx.x % kWarpSize;
          uint32_t* row_g = reinterpret_cast<uint32_t*>(sdS + (warp * 16 + lane / 4) * Cfg::kDsStride + (lane % 4) * 2);
#pragma unroll
          for (int ks = 0; ks < kBlockM / 16; ++ks)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              row_g[((i & 1) * 8 * Cfg::kDsStride + ks * 16 + (i / 2) * 8) / 2] = a[0][ks][i];
        }
        gemm_ab<T, 1, kD, kBlockM, kStride>(acc_dk, RegA<1, kBlockM>{a}, sQ);
      }
    }
    if constexpr (kDoDQ) {
      __syncthreads();  // sdS holds every warp's keys
      // dQ(kBlockM x kD) += dS(kBlockM x kBlockN) K(kBlockN x kD): this warp's 2 m16 query tiles and kD / 4
      // columns, kChunk at a time.
      static_assert(Cfg::kKvWarps == 4, "dkdv_kernel: dQ with 4 warps (kD 128 runs dkdv_dq_kernel)");
      constexpr int kTiles = 2, kCols = kD / 4, kChunk = kD / 4 < 32 ? kD / 4 : 32;
      const int lane = threadIdx.x % kWarpSize;
      // This lane's workspace row (query i0 + lane / 4 of head hk * group + item_g) at column 2 (lane % 4);
      // the rows of one query are heads_q * d floats apart. rows: the tile's valid rows after this lane's first.
      const int64_t ws_stride = p.heads_q * d;
      float* w0 = dq_ws + (dq_ws_row(p, si, i0) * p.heads_q + hk * group + item_g) * d +
                  (lane / 4) * ws_stride + (lane % 4) * 2;
      const int64_t rows = si.sq - i0 - lane / 4;
#pragma unroll
      for (int c0 = 0; c0 < kCols; c0 += kChunk) {
        const int col0 = (warp % 4) * kCols + c0;
        if (col0 >= d) break;  // padded head dim: nothing to add (uniform across the warp)
        float acc_dq[kTiles][kChunk / 8][4];
        zero(acc_dq);
        gemm_ab<T, kTiles, kChunk, kBlockN, kStride>(acc_dq, SmemAT<T, Cfg::kDsStride>{sdS}, sK + col0);
#pragma unroll
        for (int r = 0; r < 2 * kTiles; ++r) {  // accumulator rows 8 r (m16 tile r / 2, half r % 2)
          if (8 * r >= rows) break;
          float* w = w0 + 8 * r * ws_stride + col0;
#pragma unroll
          for (int n8 = 0; n8 < kChunk / 8; ++n8)
            if (col0 + n8 * 8 < d)  // d is a multiple of 8: an n8 block is valid or padding as a whole
              ptx::red_add_f32x2(w + n8 * 8, acc_dq[r / 2][n8][2 * (r % 2)], acc_dq[r / 2][n8][2 * (r % 2) + 1]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage (and with sdS)
    if (kStages == 1 && it + 1 < items) load_q(0);
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

// The atomic-dQ backward at kD 128 with FlashAttention-2's tiles (dkdv_dq_kernel). One CTA = 8 warps = kBlockN = 128
// keys of one (batch, kv head); items are query tiles of kBlockM = 64 rows (with the query head of the GQA group), the
// next item's Q / dO / lse / delta loaded while this one is computed. Per item, warp w (key block kb = w % 4 of 32
// keys, half hb = w / 4):
//   S^T, P^T, dP^T, dS^T on a 32 keys x 32 queries warp tile (keys 32 kb, queries 32 hb): each K / V fragment feeds
//   4 mma and each Q / dO fragment 4 (m16 tiles of 16 keys x 16 queries: one feeds 2), and P^T, dS^T are written
//   to shared memory (sP, sdS: keys x queries, rounded to T), then after a barrier
//   dV += P^T dO and dK += dS^T Q on 32 keys (kb) x kD / 2 columns (half hb), over the item's 64 queries, A from
//   sP / sdS (ldmatrix), B by ldmatrix.trans; the dK / dV accumulators of the CTA's 128 keys x kD are split over
//   the 8 warps (2 x 16 x 64 fp32 each, the registers one warp of the 16-key kernel spent on 16 x 128);
//   dQ(64 x kD) += dS K: 32 queries (hb) x kD / 4 columns (kb) per warp, dS read from sdS by ldmatrix.trans,
//   added to the fp32 workspace by ptx::red_add_f32x2 as in dkdv_kernel.
// Shared stages: Q has two (its last reader, dK, runs after the barrier at which the next item's loads are issued);
// dO, lse and delta have one (their last readers, dP^T / dS^T / dV, run before that barrier). Three barriers per
// item: B1 (this item's loads landed; also: every warp finished the previous item's dK / dQ reads of sP, sdS and
// the other Q stage), B2 (sP and sdS written), B3 (every warp done with sdO, sL: the next item's loads start).
// A warp whose 32 keys no query of its 32-query tile sees writes zeros to its sP / sdS tile and skips the S / dP
// matmuls; one whose keys the whole item does not see also skips dV and dK (a window narrower than the CTA, the
// first items of a causal diagonal CTA, keys past the sequence's end). Per warp and item: 144 ldmatrix.x4 feed 320
// mma (0.45 per mma; dkdv_kernel: 104 per 160, 0.65). Napkin math: docs/attention.md, GPU.
template <int kD>
struct Fa2BwdConfig {
  static constexpr int kWarps = 8, kThreads = kWarps * kWarpSize;
  static constexpr int kBlockN = 128, kBlockM = 64;  // keys per CTA, query rows per item
  static constexpr int kStride = kD + 8;             // rows of K, V, Q, dO (conflict-free ldmatrix)
  static constexpr int kPStride = kBlockM + 8;       // rows of sP, sdS (keys x queries)
  // K, V; Q x 2 stages, dO; lse2 and delta; sP, sdS. 155.5 KB at kD 128: fits sm_80's 163 KB per CTA.
  static constexpr int kSmemBytes =
      (2 * kBlockN + 3 * kBlockM) * kStride * 2 + 2 * kBlockM * 4 + 2 * kBlockN * kPStride * 2;
};

template <typename T, int kD>
__global__ void __launch_bounds__(Fa2BwdConfig<kD>::kThreads, 1) dkdv_dq_kernel(Params p, float* dq_ws) {
  using Cfg = Fa2BwdConfig<kD>;
  constexpr int kBlockN = Cfg::kBlockN, kBlockM = Cfg::kBlockM, kStride = Cfg::kStride, kPS = Cfg::kPStride;
  constexpr int kThreads = Cfg::kThreads, kHalf = kD / 2, kQuarter = kD / 4;
  PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  T* sQs = sV + kBlockN * kStride;                                  // 2 Q stages
  T* sdO = sQs + 2 * kBlockM * kStride;
  float* sL = reinterpret_cast<float*>(sdO + kBlockM * kStride);  // lse2 [kBlockM], delta [kBlockM]
  T* sP = reinterpret_cast<T*>(sL + 2 * kBlockM);                 // P^T of the item (keys x queries)
  T* sdS = sP + kBlockN * kPS;                                     // dS^T of the item

  const int64_t nt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo si = seq_info(p, b);
  if (si.error) return;  // a varlen sequence the launch cannot honour: varlen_fail_kernel (attention_cuda.cuh)
  const int64_t j0 = nt * kBlockN;
  if (j0 >= si.sk) return;
  const Mask mask = seq_mask(p, si);
  const int64_t group = static_cast<int>(p.heads_q) / static_cast<int>(p.heads_kv), d = p.head_dim;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int kb = warp % 4, hb = warp / 4;
  const bool capped = p.softcap > 0.0f;
  const float pre = capped ? softcap_pre(p) : 0.0f, mul = (capped ? p.softcap : p.scale) * softmax::kLog2e;
  const float inv_mul = __fdividef(1.0f, mul);

  cp_async_tile<T, kBlockN, kD, kThreads>(sK, k_row(static_cast<const T*>(p.k), p.lk, si, j0, hk), p.lk.seq,
                                          si.sk - j0, d);
  cp_async_tile<T, kBlockN, kD, kThreads>(sV, k_row(static_cast<const T*>(p.v), p.lv, si, j0, hk), p.lv.seq,
                                          si.sk - j0, d);
  ptx::cp_async_commit();

  // This warp's keys [wj0, wj0 + 32) are seen by query rows [wq_lo, wq_hi) (empty past the sequence's keys).
  const int64_t wj0 = j0 + 32 * kb;
  int64_t wq_lo = 0, wq_hi = 0;
  if (wj0 < si.sk) mask.query_tiles(wj0, wj0 + 32 < si.sk ? wj0 + 32 : si.sk, 1, &wq_lo, &wq_hi);

  float acc_dk[2][kHalf / 8][4], acc_dv[2][kHalf / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  // Work items: (query head g of the group, query tile mb + m) for m < tiles, in that order (dkdv_kernel's order
  // and counters; lse2 is +inf for padding rows and rows that saw no key, so their P is exactly 0).
  int64_t mb, me;
  mask.query_tiles(j0, j0 + kBlockN < si.sk ? j0 + kBlockN : si.sk, kBlockM, &mb, &me);
  const int64_t tiles = me - mb, items = group * tiles;
  int64_t ld_g = 0, ld_m = 0, cur_m = 0, cur_g = 0;
  const auto load_item = [&](int stage) {  // Q into `stage`, dO, lse2 and delta of the next item (one group)
    const int64_t h = hk * group + ld_g, i0 = (mb + ld_m) * kBlockM;
    if (++ld_m == tiles) {
      ld_m = 0;
      ++ld_g;
    }
    cp_async_tile<T, kBlockM, kD, kThreads>(sQs + stage * kBlockM * kStride,
                                            q_row(static_cast<const T*>(p.q), p.lq, si, i0, h), p.lq.seq,
                                            si.sq - i0, d);
    cp_async_tile<T, kBlockM, kD, kThreads>(sdO, q_row(static_cast<const T*>(p.dout), p.ldo, si, i0, h),
                                            p.ldo.seq, si.sq - i0, d);
    ptx::cp_async_commit();
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      const bool in = i0 + r < si.sq;
      const int64_t off = lse_index(p, si, i0 + r, h);
      const float lse = in ? p.lse[off] : -INFINITY;
      sL[r] = lse == -INFINITY ? INFINITY : lse * softmax::kLog2e;
      sL[kBlockM + r] = in ? p.delta[off] : 0.0f;
    }
  };
  // The warp's 32 x 32 tile (rows 32 kb, columns 32 hb) of sP / sdS: from the accumulator, rounded to T (the A
  // fragments' rounding), or zeros.
  const auto store_tile = [&](T* dst, const float (&acc)[2][4][4]) {
    uint32_t* row_g = reinterpret_cast<uint32_t*>(dst + (32 * kb + lane / 4) * kPS + 32 * hb + (lane % 4) * 2);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int n8 = 0; n8 < 4; ++n8)
          row_g[((16 * mt + 8 * half) * kPS + n8 * 8) / 2] =
              pack2<T>(acc[mt][n8][2 * half], acc[mt][n8][2 * half + 1]);
  };
  const auto zero_tile = [&](T* dst) {  // lane = row of the tile
    uint32_t* row = reinterpret_cast<uint32_t*>(dst + (32 * kb + lane) * kPS + 32 * hb);
#pragma unroll
    for (int i = 0; i < 16; ++i) row[i] = 0u;
  };

  if (items > 0) load_item(0);
  for (int64_t it = 0; it < items; ++it) {
    const int st = static_cast<int>(it & 1);
    ptx::cp_async_wait<0>();  // this item's Q, dO (and, at the first, K and V)
    __syncthreads();          // B1
    const int64_t i0 = (mb + cur_m) * kBlockM;
    if (++cur_m == tiles) cur_m = 0;
    const int64_t item_g = cur_g;
    if (cur_m == 0) ++cur_g;
    const T* sQ = sQs + st * kBlockM * kStride;
    const int64_t ti0 = i0 + 32 * hb;  // the warp's S^T tile: keys [wj0, wj0 + 32) x queries [ti0, ti0 + 32)
    if (ti0 + 32 <= wq_lo || ti0 >= wq_hi) {  // no query of the tile sees the warp's keys: P^T = dS^T = 0
      zero_tile(sP);
      zero_tile(sdS);
    } else {
      float s[2][4][4];
      zero(s);
      gemm_abt<T, 2, 32, kD, kStride>(s, SmemA<T, kStride>{sK + 32 * kb * kStride}, sQ + 32 * hb * kStride);
      // Accumulator row r = 2 mt + half is key wj0 + 16 mt + 8 half + lane / 4; columns are queries ti0 + c, visible
      // iff lo[r] <= c <= hi[r]. Full warp tiles (the common case) run the element loops without the select.
      // The bounds are computed in each masked loop rather than kept across the dP^T matmul (8 registers).
      const bool full = mask.tile_is_full(ti0, ti0 + 32, wj0, wj0 + 32);
      const float* sLt = sL + 32 * hb;
      const float* sDt = sLt + kBlockM;
      const auto bounds = [&](auto masked, int (&lo)[4], int (&hi)[4]) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          lo[r] = 0;
          hi[r] = 31;
          if (decltype(masked)::value)
            visible_rows<32>(mask, wj0 + 16 * (r / 2) + acc_row(2 * (r % 2)), ti0, &lo[r], &hi[r]);
        }
      };
      // s[mt][n8][e] = f(mt, n8, e, column c) over the warp's 2 x 4 x 4 fragments, exactly 0 outside the rows'
      // visible columns when masked (the P and the dS^T passes below).
      const auto for_each_fragment = [&](auto masked, auto f) {
        int lo[4], hi[4];
        bounds(masked, lo, hi);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + e / 2, c = acc_col(n8, e);
              const float v = f(mt, n8, e, c);
              s[mt][n8][e] = !decltype(masked)::value || (c >= lo[r] && c <= hi[r]) ? v : 0.0f;
            }
      };
      const auto over_tile = [&](auto f) {
        if (full)
          for_each_fragment(std::false_type(), f);
        else
          for_each_fragment(std::true_type(), f);
      };
      over_tile([&](int mt, int n8, int e, int c) {
        return ptx::ex2_approx(score(s[mt][n8][e], capped, pre).s * mul - sLt[c]);
      });
      store_tile(sP, s);
      float dp[2][4][4];
      zero(dp);
      gemm_abt<T, 2, 32, kD, kStride>(dp, SmemA<T, kStride>{sV + 32 * kb * kStride}, sdO + 32 * hb * kStride);
      // dS^T = P^T (dP^T - delta) (x (1 - t^2) when capped, t recovered from P as in dkdv_kernel), exactly 0 where
      // masked (also where dP^T is NaN).
      over_tile([&](int mt, int n8, int e, int c) {
        const float pr = s[mt][n8][e];
        float dt = 1.0f;
        if (capped && pr > 0.0f) {
          const float t = (ptx::lg2_approx(pr) + sLt[c]) * inv_mul;
          dt = 1.0f - t * t;
        }
        return pr * (dp[mt][n8][e] - sDt[c]) * dt;
      });
      store_tile(sdS, s);
    }
    __syncthreads();  // B2: sP and sdS hold the item
    const bool kv_seen = i0 + kBlockM > wq_lo && i0 < wq_hi;  // some query of the item sees the warp's keys
    if (kv_seen)  // dV(keys 32 kb, columns kHalf hb) += P^T dO
      gemm_ab<T, 2, kHalf, kBlockM, kStride>(acc_dv, SmemA<T, kPS>{sP + 32 * kb * kPS}, sdO + hb * kHalf);
    __syncthreads();  // B3: sdO and sL are free
    if (it + 1 < items) load_item(st ^ 1);
    if (kv_seen)  // dK(keys 32 kb, columns kHalf hb) += dS^T Q
      gemm_ab<T, 2, kHalf, kBlockM, kStride>(acc_dk, SmemA<T, kPS>{sdS + 32 * kb * kPS}, sQ + hb * kHalf);
    // dQ(queries 32 hb, columns kQuarter kb) += dS K over the CTA's keys, added to the workspace.
    const int col0 = kb * kQuarter;
    if (col0 < d) {  // a padded head dim: nothing to add (uniform across the warp)
      float acc_dq[2][kQuarter / 8][4];
      zero(acc_dq);
      gemm_ab<T, 2, kQuarter, kBlockN, kStride>(acc_dq, SmemAT<T, kPS>{sdS + 32 * hb}, sK + col0);
      const int64_t ws_stride = p.heads_q * d;
      float* w0 = dq_ws + (dq_ws_row(p, si, i0) * p.heads_q + hk * group + item_g) * d +
                  (32 * hb + lane / 4) * ws_stride + col0 + (lane % 4) * 2;
      const int64_t rows = si.sq - i0 - 32 * hb - lane / 4;
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // accumulator rows 8 r (m16 tile r / 2, half r % 2)
        if (8 * r >= rows) break;
#pragma unroll
        for (int n8 = 0; n8 < kQuarter / 8; ++n8)
          if (col0 + n8 * 8 < d)  // d is a multiple of 8: an n8 block is valid or padding as a whole
            ptx::red_add_f32x2(w0 + 8 * r * ws_stride + n8 * 8, acc_dq[r / 2][n8][2 * (r % 2)],
                               acc_dq[r / 2][n8][2 * (r % 2) + 1]);
      }
    }
  }
  ptx::cp_async_wait<0>();  // no item: the K / V copies are still pending
  const float scale2[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int64_t rows = si.sk - wj0 - 16 * mt;
    store_acc<T, kHalf>(acc_dk[mt], scale2, k_row(static_cast<T*>(p.dk), p.ldk, si, wj0 + 16 * mt, hk) + hb * kHalf,
                        p.ldk.seq, rows, d - hb * kHalf);
    store_acc<T, kHalf>(acc_dv[mt], one, k_row(static_cast<T*>(p.dv), p.ldv, si, wj0 + 16 * mt, hk) + hb * kHalf,
                        p.ldv.seq, rows, d - hb * kHalf);
  }
}

// The fp32 dQ workspace of the atomic mode: stream-ordered allocation on the caller's stream (cudaMallocAsync: the
// device's default memory pool caches it between calls; capturable in a CUDA graph), freed the same way when the
// launches are queued, also when one of them throws.
class DqWorkspace {
 public:
  DqWorkspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    void* ptr = nullptr;
    PYLLMOPS_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream));
    data_ = static_cast<float*>(ptr);
  }
  ~DqWorkspace() { cudaFreeAsync(data_, stream_); }
  DqWorkspace(const DqWorkspace&) = delete;
  DqWorkspace& operator=(const DqWorkspace&) = delete;
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  cudaStream_t stream_;
};

template <typename T, int kD, bool kDoDK, bool kDoDV, bool kDoDQ>
void launch_dkdv(const Params& p, float* dq_ws, const char* name, cudaStream_t stream) {
  using Cfg = BwdConfig<kD>;
  constexpr int smem = Cfg::kv_smem_bytes(kDoDQ);
  auto kernel = dkdv_kernel<T, kD, kDoDK, kDoDV, kDoDQ>;
  static DynamicSmemOptIn opt_in;  // set once per device
  opt_in.ensure(kernel, smem, p.device, name);
  launch(name, kernel, dim3(static_cast<unsigned>(ceil_div(p.seqlen_k, Cfg::kKvBlockN)),
                            static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch)),
         Cfg::kKvThreads, smem, stream, p, dq_ws);
}

template <typename T, int kD>
void launch_dkdv_dq(const Params& p, float* dq_ws, cudaStream_t stream) {
  using Cfg = Fa2BwdConfig<kD>;
  constexpr int smem = Cfg::kSmemBytes;
  auto kernel = dkdv_dq_kernel<T, kD>;
  static DynamicSmemOptIn opt_in;  // set once per device
  opt_in.ensure(kernel, smem, p.device, "flash_attention dkdv_dq_kernel");
  launch("flash_attention dkdv_dq_kernel", kernel,
         dim3(static_cast<unsigned>(ceil_div(p.seqlen_k, Cfg::kBlockN)), static_cast<unsigned>(p.heads_kv),
              static_cast<unsigned>(p.batch)),
         Cfg::kThreads, smem, stream, p, dq_ws);
}

template <typename T, int kD>
void launch_bwd(const Params& p, cudaStream_t stream) {
  launch_varlen_fail<T>(p, true, stream);  // varlen: NaN and error bits for the sequences the kernels skip
  using Cfg = BwdConfig<kD>;
  const unsigned hq = static_cast<unsigned>(p.heads_q), batch = static_cast<unsigned>(p.batch);
  const bool atomic_dq = !p.deterministic && p.seqlen_q > 0;
  // rows x heads_q x head_dim fp32, rows = batch x seqlen_q (varlen: total_q); bounded by the dq tensor (x2 bytes)
  const int64_t ws_rows = p.varlen() ? p.total_q : p.batch * p.seqlen_q;
  std::unique_ptr<DqWorkspace> ws;
  if (atomic_dq)
    ws = std::make_unique<DqWorkspace>(static_cast<size_t>(ws_rows * p.heads_q * p.head_dim) * sizeof(float), stream);
  float* dq_ws = ws ? ws->data() : nullptr;
  const dim3 row_grid(static_cast<unsigned>(ceil_div(p.seqlen_q, kDeltaRows)), hq, batch);
  if (p.seqlen_q > 0) launch("flash_attention delta_kernel", delta_kernel<T>, row_grid, kThreads, 0, stream, p, dq_ws);

  if (p.seqlen_k > 0) {  // runs even when no query exists: dK = dV = 0 must still be written
    if constexpr (kD <= 128) {
      if (!atomic_dq)
        launch_dkdv<T, kD, true, true, false>(p, nullptr, "flash_attention dkdv_kernel", stream);
      else if constexpr (kD == 128)
        launch_dkdv_dq<T, kD>(p, dq_ws, stream);  // FlashAttention-2 tiles
      else
        launch_dkdv<T, kD, true, true, true>(p, dq_ws, "flash_attention dkdv_kernel (dq atomic)", stream);
    } else {
      if (atomic_dq)
        launch_dkdv<T, kD, true, false, true>(p, dq_ws, "flash_attention dkdv_kernel (dk, dq atomic)", stream);
      else
        launch_dkdv<T, kD, true, false, false>(p, nullptr, "flash_attention dkdv_kernel (dk)", stream);
      launch_dkdv<T, kD, false, true, false>(p, nullptr, "flash_attention dkdv_kernel (dv)", stream);
    }
  }

  if (p.seqlen_q == 0) return;
  if (atomic_dq) {
    launch("flash_attention dq_convert_kernel", dq_convert_kernel<T>, row_grid, kThreads, 0, stream, p,
           static_cast<const float*>(dq_ws));
    return;
  }
  constexpr int dq_smem = Cfg::kDqSmemBytes;
  auto kernel = dq_kernel<T, kD>;
  static DynamicSmemOptIn opt_in;
  opt_in.ensure(kernel, dq_smem, p.device, "flash_attention dq_kernel");
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
