// LoRA CUDA fused kernel, tensor-core main loop (fp16 / bf16 inputs). EXPERIMENTAL: compiled and
// checked with ptxas, never run (no GPU was available); off unless PYLLMOPS_LORA_TENSOR_CORES=1.
//
// Same product and epilogue as lora_cuda.cu (see lora.h): per CTA a 64 x 64 tile of out, the
// reduction in 32-wide steps. Shared memory holds the step's tiles in the input dtype, k contiguous:
//   Xs [64][40] rows of `in`, Xd [64][40] the same times the dropout mask (or Xd = Xs),
//   Ws [64][40] W decoded (dense / NF4 / INT) and rounded once to the input dtype, as a
//               dequantize-then-matmul would, Ds [64][40] the down-projection, ranks >= r zero.
// Rows are padded to 40 elements (80 bytes) so the 32-bit fragment loads of the 8 row groups hit
// 32 distinct banks. 4 warps as 2 x 2; a warp owns 32 rows x 32 columns of out (2 x 4 mma tiles of
// m16n8k16, 32 fp32 accumulators) and 32 rows x 32 ranks of t (the warp's rank half; 8-rank tiles
// at or beyond r are skipped, warp-uniformly). Fragment coordinates come from lora.h (mma_a_row ...),
// transcribed from the PTX ISA. The epilogue is the SIMT kernel's: t and U through shared memory
// (fp32), then bias, the adapter term, and one store; column tile 0 writes t.
//
// Napkin math (H100, bf16): 2 x 4 mma per warp per 16-wide k step against 3 x 2048 elements staged
// per 32-wide CTA step by scalar loads: the main loop is load-bound, not MMA-bound; cp.async double
// buffering and vector loads are the next steps. Expected well above the SIMT kernel (~60 TFLOP/s
// fp32 peak), far below cuBLAS (~700 TFLOP/s); no number here is measured.
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
constexpr int kEpiFloats = kBM * (kRT + 1) + kBN * (kRT + 1);

// Two consecutive elements (the pair a fragment register holds) of a k-contiguous tile.
template <typename T>
__device__ __forceinline__ uint32_t pair(const T* tile, int row, int col) {
  return *reinterpret_cast<const uint32_t*>(tile + row * kLD + col);
}

// A fragment (16 rows from r0, 16 k from k0) and B fragment (8 rows of a [n][k] tile from n0).
template <typename T>
__device__ __forceinline__ void load_a(const T* tile, int r0, int k0, int lane, uint32_t (&a)[4]) {
#pragma unroll
  for (int reg = 0; reg < 4; ++reg)
    a[reg] = pair(tile, r0 + mma_a_row(lane, 2 * reg), k0 + mma_a_col(lane, 2 * reg));
}
template <typename T>
__device__ __forceinline__ void load_b(const T* tile, int n0, int k0, int lane, uint32_t (&b)[2]) {
#pragma unroll
  for (int reg = 0; reg < 2; ++reg) b[reg] = pair(tile, n0 + mma_b_n(lane), k0 + mma_b_k(lane, 2 * reg));
}

template <WeightKind K, typename T>
__global__ void __launch_bounds__(kThreads) fused_mma_kernel(FusedArgs a, Weight w) {
  constexpr int kLoopBytes = 4 * kTileElems * static_cast<int>(sizeof(T));
  constexpr int kEpiBytes = kEpiFloats * 4;
  constexpr int kSmemBytes = kLoopBytes > kEpiBytes ? kLoopBytes : kEpiBytes;
  PYLLMOPS_SHARED(unsigned char[kSmemBytes], smem_raw);
  PYLLMOPS_SHARED(float[16], s_code);
  if (threadIdx.x < 16) s_code[threadIdx.x] = c_nf4_code_mma[threadIdx.x];
  T* Xs = reinterpret_cast<T*>(smem_raw);
  T* Xd = a.in_scale ? Xs + kTileElems : Xs;
  T* Ws = Xs + 2 * kTileElems;
  T* Ds = Xs + 3 * kTileElems;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, j0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int r = static_cast<int>(a.r);

  float acc[2][4][4], tacc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = tacc[mi][ni][e] = 0.0f;

  for (int64_t red0 = 0; red0 < a.n_red; red0 += kBK) {
    __syncthreads();
    for (int e = tid; e < 64 * kBK; e += kThreads) {
      {  // in rows: consecutive threads walk the reduction
        const int i = e / kBK, kk = e % kBK;
        float v, vd;
        load_in<T>(a, m0 + i, red0 + kk, &v, &vd);
        Xs[i * kLD + kk] = from_float<T>(v);
        if (a.in_scale) Xd[i * kLD + kk] = from_float<T>(vd);
      }
      {  // W: forward walks W's rows along the reduction, backward along the output columns
        const int jj = a.transposed ? e % kBN : e / kBK, kk = a.transposed ? e / kBN : e % kBK;
        Ws[jj * kLD + kk] = from_float<T>(load_w<K, T>(a, w, j0 + jj, red0 + kk, s_code));
      }
      {  // D: ranks as rows
        const int q = e / kBK, kk = e % kBK;
        Ds[q * kLD + kk] = from_float<T>(load_d<T>(a, q, red0 + kk));
      }
    }
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < kBK; k0 += 16) {
      uint32_t af[2][4], adf[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        load_a(Xs, wm * 32 + mi * 16, k0, lane, af[mi]);
        load_a(Xd, wm * 32 + mi * 16, k0, lane, adf[mi]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        uint32_t bf[2];
        load_b(Ws, wn * 32 + ni * 8, k0, lane, bf);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) ptx::mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[0], bf[1]);
        if (wn * 32 + ni * 8 < r) {  // warp-uniform: skip rank tiles past r
          uint32_t df[2];
          load_b(Ds, wn * 32 + ni * 8, k0, lane, df);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) ptx::mma_m16n8k16<T>(tacc[mi][ni], adf[mi], df[0], df[1]);
        }
      }
    }
  }

  // ---- epilogue (as lora_cuda.cu): out = acc + bias + scaling * mask * t.U^T -------------------
  __syncthreads();
  float* Ts = reinterpret_cast<float*>(smem_raw);  // [kBM][kRT + 1]
  float* Us = Ts + kBM * (kRT + 1);               // [kBN][kRT + 1]
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        Ts[(wm * 32 + mi * 16 + mma_c_row(lane, e)) * (kRT + 1) + wn * 32 + ni * 8 + mma_c_col(lane, e)] =
            tacc[mi][ni][e];
  load_up<T>(a, j0, kBN, kRT, Us);
  __syncthreads();
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = wm * 32 + mi * 16 + mma_c_row(lane, e), jl = wn * 32 + ni * 8 + mma_c_col(lane, e);
        store_out<T>(a, m0 + il, j0 + jl, acc[mi][ni][e], &Ts[il * (kRT + 1)], &Us[jl * (kRT + 1)]);
      }
  if (blockIdx.x == 0) {  // t straight from shared memory: every rank column was written above
    for (int e = tid; e < kBM * r; e += kThreads) {
      const int il = e / r, q = e % r;
      if (m0 + il < a.m) a.t[(m0 + il) * a.r + q] = Ts[il * (kRT + 1) + q];
    }
  }
}

template <WeightKind K, typename T>
void launch_mma(const FusedArgs& a, const Weight& w, cudaStream_t stream) {
  const int64_t gy = ceil_div(a.m, kBM), gx = ceil_div(a.n_cols, kBN);
  PYLLMOPS_CHECK(gy <= 65535, "the LoRA CUDA kernel takes at most ", 65535 * kBM, " rows, got ", a.m);
  launch("fused_mma_kernel", fused_mma_kernel<K, T>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
         kThreads, 0, stream, a, w);
}

}  // namespace

void fused_cuda_mma(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    switch (kind) {
      case WeightKind::dense: return launch_mma<WeightKind::dense, T>(args, w, s);
      case WeightKind::nf4: return launch_mma<WeightKind::nf4, T>(args, w, s);
      case WeightKind::int_q: return launch_mma<WeightKind::int_q, T>(args, w, s);
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
