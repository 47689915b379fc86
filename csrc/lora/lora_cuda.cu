// LoRA CUDA kernels: the fused matmul + low-rank epilogue (lora.h), INT quantize / dequantize.
//
// Fused kernel. One CTA (256 threads as 16 x 16) owns a 64 x 64 tile of `out` and walks the whole
// reduction in 16-wide steps; per step it stages in shared memory, as fp32:
//   Xs [16][64]  the rows of `in` (read from global once, for both products),
//   Xd [16][64]  the same times the dropout mask (only when a mask is given; else Xd aliases Xs),
//   Ws [16][64]  W decoded on the fly (dense / NF4 via nf4::Scales and the NF4 codebook / INT),
//   Ds [16][64]  the adapter's down-projection (A_exp or B^T), ranks >= r zero-filled,
// and each thread accumulates a 4 x 4 block of out (acc) and a 4 x 4 block of t (4 rows x ranks
// tx, tx+16, tx+32, tx+48; ranks >= r skipped by a uniform predicate). After the loop t is complete
// for the CTA's 64 rows: it goes to shared memory with U (the up-projection for the CTA's columns),
// and the epilogue adds scaling * t.U^T (times the mask in the backward) and the bias, then writes
// out once. The CTA in column tile 0 also writes t. All register arrays are indexed by unrolled
// compile-time constants (checked with -Xptxas -v: no local memory).
//
// Work and traffic per CTA-step: 64*64*16*2 = 131k FLOPs for the base, 64*16*2*r for t; loads of
// 2*64*16 elements + 16*64 codes. Redundant t work across column tiles: r / 64 of the base FLOPs
// (12.5% at r = 8). 4096 tokens x 4096 x 4096 is 137 GFLOP: SIMT fp32 FMA on an H100 (~60 TFLOP/s
// peak, this simple single-buffered tiling perhaps 1/3 of it) would take ~7 ms, against ~0.2 ms for
// a bf16 tensor-core GEMM at ~700 TFLOP/s. So this kernel is the correct, fused, memory-frugal
// reference for the GPU (W is never written out; x is read once; y written once), and a tensor-core
// (mma.sync / wgmma) main loop with the same epilogue is the step that makes it fast (lora_cuda_mma.cu
// has an mma.sync version: experimental, never run, used only with PYLLMOPS_LORA_TENSOR_CORES=1). Decode
// shapes (tokens <= 16) are bound by reading W: 4096 x 4096 NF4 is 8 MiB + scales, ~3 us at 3 TB/s.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/launch.cuh"
#include "common/dtype.h"
#include "lora/lora.h"
#include "lora/lora_cuda.cuh"

namespace pyllmops {
namespace lora {

namespace {

__constant__ float c_nf4_code[16] = {PYLLMOPS_NF4_CODE_VALUES};

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256, kRT = kMaxRankCuda;
constexpr int kLoopFloats = 4 * kBK * 64;                  // Xs, Xd, Ws, Ds
constexpr int kEpiFloats = kBM * (kRT + 1) + kBN * (kRT + 1);  // Ts, Us (padded rows)
constexpr int kSmemFloats = kLoopFloats > kEpiFloats ? kLoopFloats : kEpiFloats;

template <WeightKind K, typename T>
__global__ void __launch_bounds__(kThreads) fused_kernel(FusedArgs a, Weight w) {
  PYLLMOPS_SHARED(float[kSmemFloats], smem);
  PYLLMOPS_SHARED(float[16], s_code);
  if (threadIdx.x < 16) s_code[threadIdx.x] = c_nf4_code[threadIdx.x];
  float* Xs = smem;
  float* Xd = a.in_scale ? smem + kBK * 64 : Xs;
  float* Ws = smem + 2 * kBK * 64;
  float* Ds = smem + 3 * kBK * 64;

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, j0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int r = static_cast<int>(a.r);

  float acc[4][4], tacc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = tacc[i][c] = 0.0f;

  for (int64_t red0 = 0; red0 < a.n_red; red0 += kBK) {
    __syncthreads();  // previous step's reads done (and s_code visible on the first step)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int e = tid + s * kThreads;
      {  // in tile: consecutive threads walk the reduction of one row
        const int i = e / kBK, kk = e % kBK;
        float v, vd;
        load_in<T>(a, m0 + i, red0 + kk, &v, &vd);
        Xs[kk * kBM + i] = v;
        if (a.in_scale) Xd[kk * kBM + i] = vd;
      }
      {  // W tile: forward walks W's rows along the reduction, backward along the output columns
        const int jj = a.transposed ? e % kBN : e / kBK, kk = a.transposed ? e / kBN : e % kBK;
        Ws[kk * kBN + jj] = load_w<K, T>(a, w, j0 + jj, red0 + kk, s_code);
      }
      {  // D tile
        const int q = e % kRT, kk = e / kRT;
        Ds[kk * kRT + q] = load_d<T>(a, q, red0 + kk);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float xv[4], xdv[4], wv[4], dv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xv[i] = Xs[kk * kBM + ty * 4 + i];
        xdv[i] = Xd[kk * kBM + ty * 4 + i];
        wv[i] = Ws[kk * kBN + tx * 4 + i];
        dv[i] = Ds[kk * kRT + tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[i][c] = fmaf(xv[i], wv[c], acc[i][c]);
          if (c * 16 < r) tacc[i][c] = fmaf(xdv[i], dv[c], tacc[i][c]);
        }
    }
  }

  // ---- epilogue: out = acc + bias + scaling * mask * t.U^T --------------------------------------
  __syncthreads();
  float* Ts = smem;                      // [kBM][kRT + 1]
  float* Us = smem + kBM * (kRT + 1);    // [kBN][kRT + 1]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) Ts[(ty * 4 + i) * (kRT + 1) + tx + 16 * c] = tacc[i][c];
  load_up<T>(a, j0, kBN, kRT, Us);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
#pragma unroll
    for (int c = 0; c < 4; ++c)
      store_out<T>(a, row, j0 + tx * 4 + c, acc[i][c], &Ts[(ty * 4 + i) * (kRT + 1)], &Us[(tx * 4 + c) * (kRT + 1)]);
    if (blockIdx.x == 0 && row < a.m) {
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (tx + 16 * c < r) a.t[row * a.r + tx + 16 * c] = tacc[i][c];
    }
  }
}

template <WeightKind K, typename T>
void launch_fused(const FusedArgs& a, const Weight& w, cudaStream_t stream) {
  const int64_t gy = ceil_div(a.m, kBM), gx = ceil_div(a.n_cols, kBN);
  PYLLMOPS_CHECK(gy <= 65535, "the LoRA CUDA kernel takes at most ", 65535 * kBM, " rows, got ", a.m);
  PYLLMOPS_CHECK(gx <= 2147483647LL, "too many output columns: ", a.n_cols);
  launch("fused_kernel", fused_kernel<K, T>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0,
         stream, a, w);
}

// ---- INT quantize: (1) per (row, group) min/max -> scale, zero; (2) per word: pack codes ---------
template <typename T>
__global__ void int_params_kernel(const T* __restrict__ w, int64_t n, int64_t k, int bits, int64_t group_size,
                                  float* __restrict__ scales, float* __restrict__ zeros) {
  const int64_t groups = k / group_size, total = n * groups;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* src = w + (idx / groups) * k + (idx % groups) * group_size;
    float lo = to_float(src[0]), hi = lo;
    for (int64_t e = 1; e < group_size; ++e) {
      const float v = to_float(src[e]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    int_group_params(lo, hi, bits, &scales[idx], &zeros[idx]);
  }
}

template <typename T>
__global__ void int_pack_kernel(const T* __restrict__ w, int64_t n, int64_t k, int bits, int64_t group_size,
                                const float* __restrict__ scales, const float* __restrict__ zeros,
                                int32_t* __restrict__ qweight) {
  const int64_t wpr = words_per_row(k, bits), total = n * wpr, groups = k / group_size;
  const int cpw = codes_per_word(bits);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / wpr, wi = idx % wpr;
    uint32_t word = 0;
    for (int c = 0; c < cpw; ++c) {
      const int64_t e = wi * cpw + c;
      if (e >= k) break;
      const int64_t g = row * groups + e / group_size;
      word |= int_encode(to_float(w[row * k + e]), scales[g], zeros[g], bits) << (c * bits);
    }
    qweight[idx] = static_cast<int32_t>(word);
  }
}

template <typename T>
__global__ void int_dequantize_kernel(Weight w, T* __restrict__ out) {
  const int64_t total = w.n_out * w.k_in;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[idx] = from_float<T>(load_weight<WeightKind::int_q, T>(w, idx / w.k_in, idx % w.k_in, nullptr));
}

int grid_for(int64_t items) { return pyllmops::grid_for(items, kThreads); }

}  // namespace

void fused_cuda(WeightKind kind, DType dtype, const FusedArgs& args, const Weight& w, int device, uintptr_t stream,
                bool tensor_cores) {
  // The tensor-core kernel indexes in 32 bits; larger problems (W of 2^31 weights or more) take this
  // file's SIMT kernel, which indexes in 64 and keeps t in registers (r <= 64: fp32 inputs are not the
  // decode target, and workspace-path GEMMs serve them at any rank).
  const bool mma = tensor_cores && (dtype == DType::f16 || dtype == DType::bf16) && fits_32bit_indices(args, w);
  const int64_t max_rank = mma ? kMaxRankCudaMma : kMaxRankCuda;
  PYLLMOPS_CHECK(args.r <= max_rank, "the LoRA CUDA ", mma ? "tensor-core" : "SIMT", " kernel supports rank r <= ",
                 max_rank, ", got ", args.r);
  if (args.m == 0 || args.n_cols == 0) return;
  CudaDeviceGuard guard(device);
  if (mma) return fused_cuda_mma(kind, dtype, args, w, stream);
  const cudaStream_t s = as_stream(stream);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(dtype, "x", __half, __nv_bfloat16, [&] {
    switch (kind) {
      case WeightKind::dense: return launch_fused<WeightKind::dense, scalar_t>(args, w, s);
      case WeightKind::nf4: return launch_fused<WeightKind::nf4, scalar_t>(args, w, s);
      case WeightKind::int_q: return launch_fused<WeightKind::int_q, scalar_t>(args, w, s);
    }
  });
}

void int_quantize_cuda(const TensorView& w, int bits, int64_t group_size, const TensorView& qweight,
                       const TensorView& scales, const TensorView& zeros, uintptr_t stream) {
  const int64_t n = w.size(0), k = w.size(1);
  if (n * k == 0) return;
  CudaDeviceGuard guard(w.device);
  const cudaStream_t s = as_stream(stream);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(w.dtype, "w", __half, __nv_bfloat16, [&] {
    launch("int_params_kernel", int_params_kernel<scalar_t>, grid_for(n * (k / group_size)), kThreads, 0, s,
           w.ptr<const scalar_t>(), n, k, bits, group_size, scales.ptr<float>(), zeros.ptr<float>());
    launch("int_pack_kernel", int_pack_kernel<scalar_t>, grid_for(n * words_per_row(k, bits)), kThreads, 0, s,
           w.ptr<const scalar_t>(), n, k, bits, group_size, scales.ptr<const float>(), zeros.ptr<const float>(),
           qweight.ptr<int32_t>());
  });
}

void int_dequantize_cuda(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int bits,
                         int64_t group_size, const TensorView& out, uintptr_t stream) {
  Weight w;
  w.n_out = out.size(0);
  w.k_in = out.size(1);
  w.qweight = qweight.ptr<const int32_t>();
  w.scales = scales.ptr<const float>();
  w.zeros = zeros.ptr<const float>();
  w.bits = bits;
  w.group_size = group_size;
  if (w.n_out * w.k_in == 0) return;
  CudaDeviceGuard guard(out.device);
  PYLLMOPS_DISPATCH_FLOAT_TYPES(out.dtype, "out", __half, __nv_bfloat16, [&] {
    launch("int_dequantize_kernel", int_dequantize_kernel<scalar_t>, grid_for(w.n_out * w.k_in), kThreads, 0,
           as_stream(stream), w, out.ptr<scalar_t>());
  });
}

}  // namespace lora
}  // namespace pyllmops
