// LoRA CUDA fused kernel, tensor-core main loop (fp16 / bf16 inputs): the decode kernel (rows < 64 by
// default; any rows with PYLLMOPS_LORA_PATH=fused). Checked on the emulated backend and with ptxas /
// SASS; never run on a GPU (none was available).
//
// Same product and epilogue as lora_cuda.cu (see lora.h): per CTA a 64 x 64 tile of out, the
// reduction in 32-wide steps. Shared memory holds the step's tiles in the input dtype, k contiguous,
// rows padded to 40 elements (80 bytes, so ldmatrix's 8 row addresses per matrix hit distinct banks):
//   x [64][40] rows of `in`, xd [64][40] the same times the dropout mask (scalar staging only),
//   w [64][40] W decoded (dense / NF4 / INT) and rounded once to the input dtype, as a
//             dequantize-then-matmul would, d [64][40] the down-projection, ranks >= r zero.
// Two ways to fill them:
//   async (forward, no dropout, in_features % 32 == 0, 16-byte aligned): two stages of 16-byte cp.async
//     copies (x, A (QA-LoRA's pooled A element by element), and dense W), step s + 1 in flight while step s
//     multiplies; NF4 / INT4 raw codes through a ring of kCodeStages stages, issued 3 steps ahead;
//     NF4 / INT4 codes are decoded from shared memory once per CTA and step (a CTA holds all rows of a
//     decode-shaped x, so each weight is decoded once per call);
//   scalar (everything else): one stage, element by element.
// 4 warps as 2 x 2; a warp owns 32 rows x 32 columns of out (2 x 4 mma tiles of m16n8k16, 32 fp32
// accumulators) and 32 rows x 32 ranks of t (8-rank tiles at or beyond r are skipped, warp-uniformly).
// Ranks above 64 (up to kMaxRankCudaMma = 256): t no longer fits the registers (128 fp32 per thread at 256),
// so a down pass (this kernel with kDown: no W, grid = rank chunks of 64 x row tiles x reduction slices)
// writes partial sums of t into t_part [slices, m, r] (fp32, allocated by the op with torch), and the
// fused kernel runs its main loop for the base product only (W still decoded once per call) and reads t
// in the epilogue, adding the slices in a fixed order (deterministic, no atomics). The epilogue walks the
// ranks in chunks of 64 (t and U through shared memory) for every r. docs/lora.md has the numbers.
// Fragments come from ldmatrix.x4 (PTX ISA fragment layouts; lora.h has them for the epilogue). All
// index math is 32-bit, with shifts for the power-of-two blocksize / group size / pool; the host checks
// the bounds (fits_32bit_indices) and sends larger problems to the SIMT kernel (ranks <= 64) or, above 64,
// the op to the workspace path. The epilogue computes as the SIMT kernel's does (t and U through shared
// memory in fp32, the rank sum in one FMA chain per output, then the adapter term, bias and one store),
// 64 ranks at a time; column tile 0 writes t.
//
// Split-K (decode shapes; ops/lora.py split_k picks S): grid (column tiles, row tiles, S), each CTA walking 1/S
// of the reduction (so each weight is still decoded once per call) and storing fp32 partial sums to o_part
// [S, m, n] (t comes from the down pass at every rank then); a finishing pass (grid (column tiles, row tiles),
// no main loop) adds the slices in order z = 0..S-1 (deterministic, no atomics) and runs the epilogue once:
// bias, adapter term, mask, one store. Both workspaces come from the op (torch).
//
// Napkin math (H200, bf16, decode m = 1, 4096 x 4096 NF4): 8.4 MB of codes and scales, 2.1 us at 4 TB/s.
// Without split-K: n / 64 = 64 CTAs, one 1 KB copy of codes in flight per CTA, ~64 KB in flight against the
// ~3 MB that Little's law asks of HBM (4 TB/s x ~0.7 us): latency-bound, a few % of HBM bandwidth. Split 8 ways
// with the 4-stage ring of codes: 512 CTAs, ~3 KB each, ~1.5 MB in flight, predicted ~20-40% per call, ~45% for
// the main loop (docs/lora.md, "Split-K"); more bytes in flight per CTA and fewer launches are the next steps.
//
// Arch floor: sm_80 (mma.sync m16n8k16 with bf16 inputs). A build for an older arch stops here instead of
// compiling the mma to nothing (which would return wrong results with no error); CMakeLists.txt refuses
// such archs at configure time already, and the SIMT kernel (lora_cuda.cu) is not a fallback for them
// either, since the attention kernels need sm_80 too.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/lora/lora_cuda_mma.cu: the tensor-core LoRA kernel needs sm_80 or newer (mma.sync.m16n8k16 bf16/f16); remove archs below 80 from PYLLMOPS_CUDA_ARCHS"
#endif
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "common/dtype.h"
#include "lora/lora.h"
#include "lora/lora_cuda.cuh"

namespace pyllmops {
namespace lora {

namespace {

__constant__ float c_nf4_code_mma[16] = {PYLLMOPS_NF4_CODE_VALUES};

constexpr int kBM = 64, kBN = 64, kBK = 32, kLD = kBK + 8, kThreads = 128, kRT = kMaxRankCuda;
constexpr int kTileElems = 64 * kLD;
constexpr int kPackedRow = 16;  // bytes of 4-bit codes per W row and 32-wide step (NF4, INT4)
// Ring of raw 4-bit code stages (async path): step s's codes are issued kCodeStages - 1 steps ahead, so ~3 KB of
// W per CTA is in flight instead of 1 KB (x and A, L2-resident, stay one step ahead). A power of two; 4 keeps
// the shared memory at 39 KB, 4 CTAs per SM on sm_80 (164 KB) as on sm_90.
constexpr int kCodeStages = 4;
constexpr int kEpiFloats = kBM * (kRT + 1) + kBN * (kRT + 1);

// The problem's sizes and the format's constants as 32-bit values: the host (launch_mma) has checked
// that every index below stays under 2^31, so no 64-bit multiply or division is needed in the loops;
// blocksize, group_size and pool are powers of two, so "/" is a shift.
struct Dims {
  int m, n_cols, n_red, r, k_in;
  int ldb;                     // row stride of B (the adapter's full rank; r is the ranks the main loop computes)
  int bs_lg, gs_lg, pool_lg;  // log2 of the NF4 blocksize, INT group_size, QA-LoRA pool
  int groups, wpr, cpw, bits;  // INT: groups per row, words per row, codes per word, bits
  int cpw_lg;                  // log2(cpw) for 2- and 4-bit (16 and 8 codes per word); 3-bit has 10
  uint32_t code_mask;
  float pool_inv;              // 1 / pool, exact (a power of two built from its exponent: no division)
};

// k / cpw for a 32-bit k: a shift for 2- and 4-bit, a division by the constant 10 for 3-bit (a multiply-high,
// no division routine).
__device__ __forceinline__ uint32_t word_of(const Dims& d, uint32_t k) {
  return d.bits == 3 ? k / 10u : k >> d.cpw_lg;
}

__device__ __forceinline__ int ilog2(int64_t v) { return 31 - __clz(static_cast<int>(v)); }

__device__ __forceinline__ Dims make_dims(const FusedArgs& a, const Weight& w) {
  Dims d;
  d.m = static_cast<int>(a.m), d.n_cols = static_cast<int>(a.n_cols), d.n_red = static_cast<int>(a.n_red);
  d.r = d.ldb = static_cast<int>(a.r), d.k_in = static_cast<int>(w.k_in);
  d.bs_lg = ilog2(w.blocksize), d.gs_lg = ilog2(w.group_size), d.pool_lg = ilog2(a.pool);
  d.bits = w.bits, d.cpw = codes_per_word(w.bits), d.code_mask = static_cast<uint32_t>(max_code(w.bits));
  d.cpw_lg = d.bits == 2 ? 4 : 3;
  d.groups = d.k_in >> d.gs_lg, d.wpr = static_cast<int>(word_of(d, static_cast<uint32_t>(d.k_in + d.cpw - 1)));
  d.pool_inv = __int_as_float((127 - d.pool_lg) << 23);
  return d;
}

// W[n, k] as fp32 (load_weight's values, 32-bit index math).
template <WeightKind K, typename T>
__device__ __forceinline__ float weight_at(const Weight& w, const Dims& d, int n, int k, const float* code) {
  if constexpr (K == WeightKind::dense) {
    return to_float(static_cast<const T*>(w.dense)[n * d.k_in + k]);
  } else if constexpr (K == WeightKind::nf4) {
    const uint32_t flat = static_cast<uint32_t>(n * d.k_in + k);
    const uint32_t byte = w.packed[flat >> 1];
    return PYLLMOPS_MUL_RN(code[(flat & 1) ? (byte & 15u) : (byte >> 4)], w.nf4_scales(flat >> d.bs_lg));
  } else {
    const uint32_t ku = static_cast<uint32_t>(k), wi = word_of(d, ku);
    const uint32_t word = static_cast<uint32_t>(w.qweight[n * d.wpr + static_cast<int>(wi)]);
    const uint32_t q = (word >> ((ku - wi * static_cast<uint32_t>(d.cpw)) * d.bits)) & d.code_mask;
    const int g = n * d.groups + (k >> d.gs_lg);
    return int_decode(q, w.scales[g], w.zeros[g]);
  }
}

// One element of each staged tile (0 outside): in / in * in_scale, Wop(j, red), D(q, red).
template <typename T>
__device__ __forceinline__ void in_at(const FusedArgs& a, const Dims& d, int row, int red, float* v, float* vd) {
  *v = *vd = 0.0f;
  if (row < d.m && red < d.n_red) {
    const int idx = row * d.n_red + red;
    *v = to_float(static_cast<const T*>(a.in)[idx]);
    *vd = a.in_scale ? *v * to_float(static_cast<const T*>(a.in_scale)[idx]) : *v;
  }
}
template <WeightKind K, typename T>
__device__ __forceinline__ float wop_at(const FusedArgs& a, const Weight& w, const Dims& d, int j, int red,
                                        const float* code) {
  if (j >= d.n_cols || red >= d.n_red) return 0.0f;
  return a.transposed ? weight_at<K, T>(w, d, red, j, code) : weight_at<K, T>(w, d, j, red, code);
}
template <typename T>
__device__ __forceinline__ float d_at(const FusedArgs& a, const Dims& d, int q, int red) {
  if (q >= d.r || red >= d.n_red) return 0.0f;
  if (a.transposed) return to_float(static_cast<const T*>(a.lora_b)[red * d.ldb + q]);  // B^T
  const float v = to_float(static_cast<const T*>(a.lora_a)[q * (d.n_red >> d.pool_lg) + (red >> d.pool_lg)]);
  return d.pool_lg == 0 ? v : PYLLMOPS_MUL_RN(v, d.pool_inv);
}

// A fragment (16 rows from r0, 16 k from k0) of a [row][k] tile, and B fragments of two 8-row n tiles
// (n0 and n0 + 8, 16 k from k0) of an [n][k] tile, with ldmatrix (lane l passes one 16-byte row; see
// ptx.cuh). Rows are 80 bytes apart, so the 8 rows of each 8 x 8 matrix fall in distinct bank groups.
template <typename T>
__device__ __forceinline__ void frag_a(const T* tile, int r0, int k0, int lane, uint32_t (&a)[4]) {
  ptx::ldmatrix_x4(a, tile + (r0 + (lane & 15)) * kLD + k0 + (lane >> 4) * 8);
}
template <typename T>
__device__ __forceinline__ void frag_b2(const T* tile, int n0, int k0, int lane, uint32_t (&b)[4]) {
  ptx::ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kLD + k0 + ((lane >> 3) & 1) * 8);
}

// Shared memory of the main loop: two stages of the in, W and D tiles (input dtype, k contiguous), the
// dropout-scaled in tile (scalar staging only), and a ring of kCodeStages stages of raw 4-bit codes (NF4 / INT4,
// async path; slot = step & (kCodeStages - 1)).
template <typename T>
struct Stages {
  T x[2][kTileElems];
  T w[2][kTileElems];
  T d[2][kTileElems];
  T xd[kTileElems];
  alignas(16) uint8_t packed[kCodeStages][kBN * kPackedRow];
};

// Async staging (the forward of decode shapes, `vec`): 16-byte cp.async of the step's rows of x, of A and
// of W (dense; the 4-bit codes: issue_codes); rows past m, r or n_cols are zero-filled (src_bytes 0). The host
// guarantees n_red % 32 == 0 and 16-byte aligned bases, so every 16-byte chunk is whole and aligned. The down
// pass (kDown) copies no W; a main loop with no ranks (d.r == 0: t comes from the down pass) copies no A.
template <WeightKind K, typename T, bool kDown>
__device__ __forceinline__ void issue_async(const FusedArgs& a, const Weight& w, const Dims& d, Stages<T>& sm,
                                            int st, int j0, int red0, int tid) {
  for (int c = tid; c < 64 * 4; c += kThreads) {  // 64 rows x 4 chunks of 8 elements
    const int row = c >> 2, ch = (c & 3) * 8;
    const T* in = static_cast<const T*>(a.in);
    const bool in_ok = row < d.m;
    ptx::cp_async_cg<16>(&sm.x[st][row * kLD + ch], in_ok ? in + row * d.n_red + red0 + ch : in, in_ok ? 16 : 0);
    if (d.pool_lg == 0 && d.r > 0) {  // QA-LoRA's pooled A (A_exp) is staged element by element
      const T* A = static_cast<const T*>(a.lora_a);
      const bool a_ok = row < d.r;
      ptx::cp_async_cg<16>(&sm.d[st][row * kLD + ch], a_ok ? A + row * d.n_red + red0 + ch : A, a_ok ? 16 : 0);
    }
    if constexpr (K == WeightKind::dense && !kDown) {
      const T* W = static_cast<const T*>(w.dense);
      const bool w_ok = j0 + row < d.n_cols;
      ptx::cp_async_cg<16>(&sm.w[st][row * kLD + ch], w_ok ? W + (j0 + row) * d.k_in + red0 + ch : W, w_ok ? 16 : 0);
    }
  }
}

// The 4-bit codes (NF4 / INT4) of the step at red0 into ring slot `slot`: 16 bytes per W row, decoded from
// shared memory by decode_packed; columns past n_cols zero-filled.
template <WeightKind K, typename T>
__device__ __forceinline__ void issue_codes(const Weight& w, const Dims& d, Stages<T>& sm, int slot, int j0, int red0,
                                            int tid) {
  if (tid < kBN) {
    const int j = j0 + tid;
    const bool ok = j < d.n_cols;
    const uint8_t* base = K == WeightKind::nf4 ? w.packed : reinterpret_cast<const uint8_t*>(w.qweight);
    const uint8_t* src = K == WeightKind::nf4 ? base + (static_cast<uint32_t>(j * d.k_in + red0) >> 1)
                                              : base + 4 * (j * d.wpr + (red0 >> 3));
    ptx::cp_async_cg<16>(&sm.packed[slot][tid * kPackedRow], ok ? src : base, ok ? 16 : 0);
  }
}

// 4-bit codes of ring slot `slot` -> W tile of stage st (input dtype): thread tid decodes 16 weights of row tid / 2
// with one scale lookup (a 16-weight run never crosses an NF4 block or an INT group: both are >= 32 and aligned).
template <WeightKind K, typename T>
__device__ __forceinline__ void decode_packed(const Weight& w, const Dims& d, Stages<T>& sm, int st, int slot, int j0,
                                              int red0, int tid, const float* code) {
  const int row = tid >> 1, half = tid & 1, j = j0 + row;
  T* dst = &sm.w[st][row * kLD + half * 16];
  const uint8_t* p = &sm.packed[slot][row * kPackedRow + half * 8];
  if (j >= d.n_cols) {
#pragma unroll
    for (int e = 0; e < 16; ++e) dst[e] = from_float<T>(0.0f);
    return;
  }
  const int k0 = red0 + half * 16;
  if constexpr (K == WeightKind::nf4) {
    const float scale = w.nf4_scales(static_cast<uint32_t>(j * d.k_in + k0) >> d.bs_lg);
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const uint32_t byte = p[b];
      dst[2 * b] = from_float<T>(PYLLMOPS_MUL_RN(code[byte >> 4], scale));
      dst[2 * b + 1] = from_float<T>(PYLLMOPS_MUL_RN(code[byte & 15u], scale));
    }
  } else {  // INT4: 8 codes per word, low bits first
    const int g = j * d.groups + (k0 >> d.gs_lg);
    const float scale = w.scales[g], zero = w.zeros[g];
#pragma unroll
    for (int wd = 0; wd < 2; ++wd) {
      const uint32_t word = reinterpret_cast<const uint32_t*>(p)[wd];
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[wd * 8 + e] = from_float<T>(int_decode((word >> (4 * e)) & 15u, scale, zero));
    }
  }
}

// f(mi, ni, e, il, jl) for each of the lane's 32 accumulator elements of the warp's 32 x 32 (mma m16n8 layout:
// 2 x 4 fragments of 4), (il, jl) the element's row and column in the CTA's 64 x 64 tile.
template <typename F>
__device__ __forceinline__ void for_each_acc(int wm, int wn, int lane, F&& f) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        f(mi, ni, e, wm * 32 + mi * 16 + mma_c_row(lane, e), wn * 32 + ni * 8 + mma_c_col(lane, e));
}

// One slice's partial sums straight from the fragments: base[il * ld + c] = f for rows il < rows and columns
// c < cols of the warp's 32 x 32 (every such element of the CTA's tile written once; 32-bit offsets).
__device__ __forceinline__ void store_frags(float* base, int ld, const float (&f)[2][4][4], int rows, int cols,
                                            int wm, int wn, int lane) {
  for_each_acc(wm, wn, lane, [&](int mi, int ni, int e, int il, int c) {
    if (il < rows && c < cols) base[il * ld + c] = f[mi][ni][e];
  });
}

// The kernel's three passes (template argument P):
enum class Pass { fused, down, finish };

// Pass::fused, the fused kernel. Grid (column tiles, row tiles). out = base + bias + adapter term for the
//   CTA's 64 x 64 tile. With r <= 64, t for the CTA's rows comes from the main loop (tacc); with r > 64
//   (a.t_part set) the main loop computes the base product only and the epilogue reads t from t_part, the
//   down pass's partial sums. The epilogue walks the ranks in chunks of 64 either way.
//   Split-K (a.o_part set; t_part from the down pass at every rank): grid (column tiles, row tiles, o_splits);
//   the CTA walks slice z = blockIdx.z of the reduction (split_steps 32-wide steps), base product only, and
//   stores its partial base tile to o_part[z]; no epilogue.
// Pass::finish (split-K only, after the split grid): grid (column tiles, row tiles); acc = the o_splits partial
//   tiles added in slice order, t = t_part's slices added in slice order, then the same epilogue (bias, adapter
//   term, dropout mask, one store; column tile 0 writes t). Instantiated with K = dense (no main loop).
// Pass::down: the down pass (r > 64, or split-K with r > 0; before the fused kernel). Grid (rank chunks of 64,
//   row tiles, t_splits):
//   t_part[z][rows][chunk] = the chunk's t over slice z of the reduction (split_steps 32-wide steps); the
//   main loop without W (same staging, same mma t loop). Instantiated with K = dense only (W is not read).
template <WeightKind K, typename T, Pass P>
__global__ void __launch_bounds__(kThreads) fused_mma_kernel(FusedArgs a, Weight w, bool vec, int split_steps) {
  constexpr bool kDown = P == Pass::down;
  constexpr int kLoopBytes = static_cast<int>(sizeof(Stages<T>));
  constexpr int kEpiBytes = kEpiFloats * 4;
  constexpr int kSmemBytes = kLoopBytes > kEpiBytes ? kLoopBytes : kEpiBytes;
  PYLLMOPS_SHARED(unsigned char[kSmemBytes], smem_raw);
  PYLLMOPS_SHARED(float[16], s_code);
  if (threadIdx.x < 16) s_code[threadIdx.x] = c_nf4_code_mma[threadIdx.x];
  Stages<T>& sm = *reinterpret_cast<Stages<T>*>(smem_raw);
  Dims d = make_dims(a, w);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int m0 = static_cast<int>(blockIdx.y) * kBM, j0 = kDown ? 0 : static_cast<int>(blockIdx.x) * kBN;
  const int r_all = d.r;
  const int steps = (d.n_red + kBK - 1) / kBK;
  int s_begin = 0, s_end = steps, q0 = 0;
  const bool split = P == Pass::fused && a.o_part != nullptr;  // a slice of the split-K grid
  if constexpr (P == Pass::finish) {
    s_end = 0;  // no main loop: the partial sums are the split grid's
  } else if (split) {
    s_begin = static_cast<int>(blockIdx.z) * split_steps;
    s_end = min(steps, s_begin + split_steps);
  }
  if constexpr (kDown) {  // this CTA's ranks [q0, q0 + 64) and reduction slice
    q0 = static_cast<int>(blockIdx.x) * kRT;
    d.r = min(kRT, r_all - q0);
    if (a.transposed) {  // D = B^T: columns q0.. of B (row stride ldb)
      a.lora_b = static_cast<const T*>(a.lora_b) + q0;
    } else {  // D = A_exp: rows q0.. of A
      a.lora_a = static_cast<const T*>(a.lora_a) + q0 * (d.n_red >> d.pool_lg);
    }
    s_begin = static_cast<int>(blockIdx.z) * split_steps;
    s_end = min(steps, s_begin + split_steps);
  } else if (a.t_part != nullptr) {
    d.r = 0;  // t comes from the down pass: the main loop stages no D and runs no t mma
  }
  // This CTA's rows of `in` (the row tile's offset folded into the base pointers, so the loaders index
  // from 0 and stay 32-bit).
  a.in = static_cast<const T*>(a.in) + static_cast<int64_t>(m0) * d.n_red;
  if (a.in_scale) a.in_scale = static_cast<const T*>(a.in_scale) + static_cast<int64_t>(m0) * d.n_red;
  d.m -= m0;
  const bool masked = !vec && a.in_scale != nullptr;
  // Warps whose 32 rows all lie past m (decode: m <= 32 leaves half the warps idle) skip their fragment
  // loads and mma (warp-uniform; their accumulators stay 0 and their rows are never stored).
  const bool live = wm * 32 < d.m;

  float acc[2][4][4], tacc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = tacc[mi][ni][e] = 0.0f;

  constexpr bool kCodes = K != WeightKind::dense && !kDown;  // W's 4-bit codes through the ring
  __syncthreads();  // s_code
  if (vec && s_begin < s_end) {  // one group: x and A of the first step, codes of the first kCodeStages - 1 steps
    issue_async<K, T, kDown>(a, w, d, sm, 0, j0, s_begin * kBK, tid);
    if constexpr (kCodes) {
      for (int c = s_begin; c < s_begin + kCodeStages - 1 && c < s_end; ++c)
        issue_codes<K, T>(w, d, sm, c & (kCodeStages - 1), j0, c * kBK, tid);
    }
    ptx::cp_async_commit();
  }
  for (int s = s_begin; s < s_end; ++s) {
    const int red0 = s * kBK, st = vec ? ((s - s_begin) & 1) : 0;
    if (vec) {  // step s + 1's x and A and step s + kCodeStages - 1's codes fly while step s multiplies
      if (s + 1 < s_end) issue_async<K, T, kDown>(a, w, d, sm, st ^ 1, j0, red0 + kBK, tid);
      if constexpr (kCodes) {
        const int c = s + kCodeStages - 1;  // its slot was last read at step s - 1, before the barriers below
        if (c < s_end) issue_codes<K, T>(w, d, sm, c & (kCodeStages - 1), j0, c * kBK, tid);
      }
      ptx::cp_async_commit();  // one group per step, empty near the end, so that
      ptx::cp_async_wait<1>();  // everything but this step's group has landed: step s's x, A and codes
      __syncthreads();
      if constexpr (kCodes) decode_packed<K, T>(w, d, sm, st, s & (kCodeStages - 1), j0, red0, tid, s_code);
      if (d.pool_lg != 0 && d.r > 0) {  // QA-LoRA: D = A_exp, one A value per pooled group, from global memory
        for (int e = tid; e < 64 * kBK; e += kThreads) {
          const int q = e / kBK, kk = e % kBK;
          sm.d[st][q * kLD + kk] = from_float<T>(d_at<T>(a, d, q, red0 + kk));
        }
      }
      if ((K != WeightKind::dense && !kDown) || (d.pool_lg != 0 && d.r > 0)) __syncthreads();
    } else {  // scalar staging: any shape, stride pattern, mask, pool or transposition
      for (int e = tid; e < 64 * kBK; e += kThreads) {
        {  // in rows: consecutive threads walk the reduction
          const int i = e / kBK, kk = e % kBK;
          float v, vd;
          in_at<T>(a, d, i, red0 + kk, &v, &vd);
          sm.x[0][i * kLD + kk] = from_float<T>(v);
          if (masked) sm.xd[i * kLD + kk] = from_float<T>(vd);
        }
        if constexpr (!kDown) {  // W: forward walks W's rows along the reduction, backward along the columns
          const int jj = a.transposed ? e % kBN : e / kBK, kk = a.transposed ? e / kBN : e % kBK;
          sm.w[0][jj * kLD + kk] = from_float<T>(wop_at<K, T>(a, w, d, j0 + jj, red0 + kk, s_code));
        }
        if (d.r > 0) {  // D: ranks as rows
          const int q = e / kBK, kk = e % kBK;
          sm.d[0][q * kLD + kk] = from_float<T>(d_at<T>(a, d, q, red0 + kk));
        }
      }
      __syncthreads();
    }
    const T* Xs = sm.x[st];
    const T* Xd = masked ? sm.xd : Xs;
    const T* Ws = sm.w[st];
    const T* Ds = sm.d[st];
    if (live) {
#pragma unroll
      for (int k0 = 0; k0 < kBK; k0 += 16) {
        uint32_t af[2][4], adf[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          frag_a(Xs, wm * 32 + mi * 16, k0, lane, af[mi]);
          if (masked) {
            frag_a(Xd, wm * 32 + mi * 16, k0, lane, adf[mi]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) adf[mi][e] = af[mi][e];
          }
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          if constexpr (!kDown) {
            uint32_t bf[4];
            frag_b2(Ws, wn * 32 + np * 16, k0, lane, bf);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              ptx::mma_m16n8k16<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
              ptx::mma_m16n8k16<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
            }
          }
          const int qt = wn * 32 + np * 16;
          if (qt < d.r) {  // warp-uniform: skip rank tiles past the loop's ranks (D is zero there)
            uint32_t df[4];
            frag_b2(Ds, qt, k0, lane, df);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              ptx::mma_m16n8k16<T>(tacc[mi][2 * np], adf[mi], df[0], df[1]);
              if (qt + 8 < d.r) ptx::mma_m16n8k16<T>(tacc[mi][2 * np + 1], adf[mi], df[2], df[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // the stage is re-filled two steps later (vec) or at the next step (scalar)
  }

  if constexpr (kDown) {  // the chunk's partial t (every (row < m, rank) of the slice written; empty: zeros)
    float* tp = a.t_part + (static_cast<int64_t>(blockIdx.z) * a.m + m0) * a.r + q0;
    store_frags(tp, static_cast<int>(a.r), tacc, d.m, d.r, wm, wn, lane);
    return;
  }
  if (split) {  // the slice's partial base tile; bias and the adapter term are the finishing pass's
    float* op = a.o_part + (static_cast<int64_t>(blockIdx.z) * a.m + m0) * a.n_cols + j0;
    store_frags(op, d.n_cols, acc, d.m, d.n_cols - j0, wm, wn, lane);
    return;
  }
  if constexpr (P == Pass::finish) {  // acc (zero) += the slices' partial base tiles, in slice order
    const float* op = a.o_part + static_cast<int64_t>(m0) * a.n_cols + j0;
    const int64_t slice = a.m * a.n_cols;
    for (int z = 0; z < static_cast<int>(a.o_splits); ++z, op += slice)  // 32 independent loads per slice
      for_each_acc(wm, wn, lane, [&](int mi, int ni, int e, int il, int jl) {
        if (il < d.m && j0 + jl < d.n_cols) acc[mi][ni][e] += op[il * d.n_cols + jl];
      });
  }
  // the epilogue indexes `in`'s rows from the original base again
  a.in = static_cast<const T*>(a.in) - static_cast<int64_t>(m0) * d.n_red;
  if (a.in_scale) a.in_scale = static_cast<const T*>(a.in_scale) - static_cast<int64_t>(m0) * d.n_red;

  // ---- epilogue: out = acc + bias + scaling * mask * t.U^T, the ranks in chunks of 64 ---------------
  // Per chunk: t (from tacc, or the sum of the down pass's partials in slice order) and U go to shared
  // memory (fp32); each thread continues its outputs' rank sums lr (in tacc's registers once t is out).
  float* Ts = reinterpret_cast<float*>(smem_raw);  // [kBM][kRT + 1]
  float* Us = Ts + kBM * (kRT + 1);               // [kBN][kRT + 1]
  const int64_t split_stride = a.m * a.r;
  const int splits = a.t_part != nullptr ? static_cast<int>(a.t_splits) : 0;
  for (int c0 = 0; c0 < r_all; c0 += kRT) {
    const int nq = min(kRT, r_all - c0);
    __syncthreads();  // the main loop's (or the previous chunk's) reads of this memory are done
    if (a.t_part != nullptr) {
      for (int e = tid; e < kBM * kRT; e += kThreads) {
        const int il = e / kRT, q = e % kRT;
        float v = 0.0f;
        if (il < d.m && q < nq) {
          const float* p = a.t_part + static_cast<int64_t>(m0 + il) * a.r + c0 + q;
          for (int z = 0; z < splits; ++z) v += p[z * split_stride];
        }
        Ts[il * (kRT + 1) + q] = v;
      }
    } else {
      for_each_acc(wm, wn, lane, [&](int mi, int ni, int e, int il, int q) {
        Ts[il * (kRT + 1) + q] = tacc[mi][ni][e];
        tacc[mi][ni][e] = 0.0f;  // from here on: lr
      });
    }
    for (int e = tid; e < kBN * kRT; e += kThreads) {  // U(j0 + jj, c0 + q), zero past r and n_cols
      const int jj = e / kRT, q = e % kRT, j = j0 + jj;
      float u = 0.0f;
      if (q < nq && j < d.n_cols) {
        if (a.transposed) {  // A_exp^T: A[c0 + q, j / pool] / pool
          u = to_float(static_cast<const T*>(a.lora_a)[(c0 + q) * (d.n_cols >> d.pool_lg) + (j >> d.pool_lg)]);
          if (d.pool_lg) u = PYLLMOPS_MUL_RN(u, d.pool_inv);
        } else {
          u = to_float(static_cast<const T*>(a.lora_b)[j * d.ldb + c0 + q]);
        }
      }
      Us[jj * (kRT + 1) + q] = u;
    }
    __syncthreads();
    // lr[i][j] += t[i][q] * U[j][q], q ascending (the order of store_out's sum): per q a thread loads its 4 rows'
    // t and 8 columns' U once (12 loads for 32 FMA; 8 distinct rows / columns per warp, 65-float row pitch: no
    // bank conflicts), and skips row halves that lie past m (warp-uniform: decode rows leave most idle).
    if (live) {
      const bool live1 = wm * 32 + 16 < d.m;
      for (int q = 0; q < nq; ++q) {
        float tv[2][2], uv[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) tv[mi][h] = Ts[(wm * 32 + mi * 16 + mma_c_row(lane, 2 * h)) * (kRT + 1) + q];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) uv[ni][c] = Us[(wn * 32 + ni * 8 + mma_c_col(lane, c)) * (kRT + 1) + q];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          if (mi == 1 && !live1) break;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) tacc[mi][ni][e] = fmaf(tv[mi][e >> 1], uv[ni][e & 1], tacc[mi][ni][e]);
        }
      }
    }
    if (blockIdx.x == 0) {  // t straight from shared memory: every rank column of the chunk was written above
      for (int il = warp; il < kBM; il += kThreads / 32)  // a warp per row, lanes over ranks: no division
        for (int q = lane; q < nq; q += 32)
          if (il < d.m) a.t[static_cast<int64_t>(m0 + il) * a.r + c0 + q] = Ts[il * (kRT + 1) + q];
    }
  }
  for_each_acc(wm, wn, lane, [&](int mi, int ni, int e, int il, int jl) {
    store_out_lr<T>(a, m0 + il, j0 + jl, acc[mi][ni][e], tacc[mi][ni][e]);
  });
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The down pass's async staging: x and A only (forward, no dropout, whole aligned 16-byte chunks).
bool async_staging_down(const FusedArgs& a) {
  return !a.transposed && a.in_scale == nullptr && a.n_red > 0 && a.n_red % 32 == 0 && aligned16(a.in) &&
         aligned16(a.lora_a);
}

// The async (cp.async, double-buffered) staging applies to the forward without dropout (decode: the shape
// that matters), with whole 16-byte chunks: n_red % 32 == 0, 16-byte aligned bases, NF4 blocks or 4-bit
// INT groups of >= 32 weights (QA-LoRA's pooled A is then staged element by element). Everything else
// stages with scalar loads.
bool async_staging(WeightKind kind, const FusedArgs& a, const Weight& w) {
  if (!async_staging_down(a)) return false;
  switch (kind) {
    case WeightKind::dense: return aligned16(w.dense);
    case WeightKind::nf4: return aligned16(w.packed) && w.blocksize >= 32;
    case WeightKind::int_q: return w.bits == 4 && w.group_size >= 32 && aligned16(w.qweight);
  }
  return false;
}

template <WeightKind K, typename T>
void launch_mma(const FusedArgs& a, const Weight& w, cudaStream_t stream, bool vec) {
  const int64_t gy = ceil_div(a.m, kBM), gx = ceil_div(a.n_cols, kBN), steps = ceil_div(a.n_red, kBK);
  PYLLMOPS_CHECK(gy <= 65535, "the LoRA CUDA kernel takes at most ", 65535 * kBM, " rows, got ", a.m);
  // The down pass (t's partial sums per (rank chunk, row tile, reduction slice)): for ranks above 64, and for every
  // rank with split-K (else the one column tile that computed t would walk its slice behind a cold read of A
  // each step, while the other tiles run ahead on the ring of W's codes).
  if (a.r > kRT || (a.o_part != nullptr && a.r > 0)) {
    const int64_t splits = a.t_splits;
    PYLLMOPS_CHECK(a.t_part != nullptr && splits >= 1 && splits <= 65535, "the tensor-core LoRA kernel needs a ",
                   "t_part workspace of 1 to 65535 slices for ranks above ", kRT, " and with split-K, got ", splits);
    const int split_steps = static_cast<int>(ceil_div(steps, splits));
    launch("fused_mma_kernel(down)", fused_mma_kernel<WeightKind::dense, T, Pass::down>,
           dim3(static_cast<unsigned>(ceil_div(a.r, kRT)), static_cast<unsigned>(gy), static_cast<unsigned>(splits)),
           kThreads, 0, stream, a, w, async_staging_down(a), split_steps);
  }
  FusedArgs b = a;
  if (a.o_part == nullptr) {  // one CTA per output tile walks the whole reduction
    if (a.r <= kRT) b.t_part = nullptr;  // t from the main loop
    launch("fused_mma_kernel", fused_mma_kernel<K, T, Pass::fused>,
           dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream, b, w, vec, 0);
    return;
  }
  // split-K: partial sums per (column tile, row tile, slice), then the finishing pass
  const int64_t splits = a.o_splits;
  PYLLMOPS_CHECK(splits >= 1 && splits <= 65535, "the tensor-core LoRA kernel's split-K workspace o_part must have ",
                 "1 to 65535 slices, got ", splits);
  const int split_steps = static_cast<int>(ceil_div(steps, splits));
  launch("fused_mma_kernel(split)", fused_mma_kernel<K, T, Pass::fused>,
         dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits)), kThreads, 0,
         stream, b, w, vec, split_steps);
  launch("fused_mma_kernel(finish)", fused_mma_kernel<WeightKind::dense, T, Pass::finish>,
         dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream, b, w, false, 0);
}

}  // namespace

bool fits_32bit_indices(const FusedArgs& a, const Weight& w) {
  constexpr int64_t kLim = 2147483647;
  const int64_t rows = a.r > 64 ? a.r : 64;  // tile rows, or A's / B's rank extent
  return w.n_out * w.k_in <= kLim && rows * a.n_red <= kLim && rows * a.n_cols <= kLim;
}

void fused_cuda_mma(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w, uintptr_t stream) {
  // The kernel indexes in 32 bits (no 64-bit multiply or division call in its loops); fused_cuda routes
  // larger problems to the SIMT kernel, and this re-check keeps the kernel safe from any other caller.
  PYLLMOPS_CHECK(fits_32bit_indices(args, w), "the tensor-core LoRA kernel indexes in 32 bits: W (", w.n_out, " x ",
                 w.k_in, ") and max(64, r) x max(n_red, n_cols) (", args.r, "; ", args.n_red, ", ", args.n_cols,
                 ") must stay below 2^31");
  const cudaStream_t s = as_stream(stream);
  const bool vec = async_staging(kind, args, w);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    switch (kind) {
      case WeightKind::dense: return launch_mma<WeightKind::dense, T>(args, w, s, vec);
      case WeightKind::nf4: return launch_mma<WeightKind::nf4, T>(args, w, s, vec);
      case WeightKind::int_q: return launch_mma<WeightKind::int_q, T>(args, w, s, vec);
    }
  };
  if (dtype == DType::bf16) {
    go(__nv_bfloat16{});
  } else if (dtype == DType::f16) {
    go(__half{});
  } else {
    throw_invalid("pyllmops._C: the tensor-core LoRA kernel takes float16 or bfloat16, got ", dtype_name(dtype));
  }
}

}  // namespace lora
}  // namespace pyllmops
