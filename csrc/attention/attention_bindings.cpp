// Python bindings of the flash attention kernels (csrc/attention/attention.h). Every view is checked
// (dtype, rank, shapes, head_dim contiguity, devices, cu_seqlens) before a kernel runs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "bindings.h"
#include "common/dtype.h"
#include "common/parallel.h"

using pyllmops::DType;
using pyllmops::TensorView;
using pyllmops::bind::OptView;
using pyllmops::bind::check_float_dtype;
namespace attn = pyllmops::attention;

namespace {

// float32 max / log2(e): the largest softmax_scale whose base-2 form is finite in float32 (ops/attention.py too).
constexpr double kMaxSoftmaxScale = 2.3589112e38;

// A window bound of at least sq + sk is unbounded (no query is that far from any key whatever the diagonal's
// shift): it becomes -1, so the mask arithmetic (attention.h Mask) never sees a huge value.
int64_t clamp_window(int64_t w, int64_t sq, int64_t sk) { return w >= sq + sk ? -1 : w; }

// A token-major tensor: (batch, seq, heads, d) or, varlen, (total, heads, d), d contiguous.
void check_tokens(const TensorView& t, const TensorView& ref, const char* name, bool varlen) {
  pyllmops::check_not_null(t, name);
  pyllmops::check_same_device(t, ref, name, "q");
  PYLLMOPS_CHECK(t.dtype == ref.dtype, name, " must have q's dtype ", pyllmops::dtype_name(ref.dtype), ", got ",
                 pyllmops::dtype_name(t.dtype));
  const int64_t want = varlen ? 3 : 4;
  PYLLMOPS_CHECK(t.dim() == want, name, " must be ", want, "-D, got shape ", pyllmops::shape_str(t.shape));
  // (a tensor with no elements has no rows to address: any strides, e.g. the expanded gradient of an empty out)
  PYLLMOPS_CHECK(t.stride(-1) == 1 || t.size(-1) == 1 || t.numel() == 0, name,
                 " must have a contiguous last (head_dim) dim, got strides with last stride ", t.stride(-1));
  for (int64_t i = 0; i < t.dim(); ++i)
    PYLLMOPS_CHECK(t.stride(i) >= 0, name, " has a negative stride in dim ", i);
}

void check_same_shape(const TensorView& t, const TensorView& ref, const char* name, const char* ref_name) {
  PYLLMOPS_CHECK(t.shape == ref.shape, name, " must have ", ref_name, "'s shape ", pyllmops::shape_str(ref.shape),
                 ", got ", pyllmops::shape_str(t.shape));
}

attn::Layout layout(const TensorView& t, bool varlen) {
  attn::Layout l;
  const int off = varlen ? 1 : 0;  // varlen: (total, heads, d), no batch stride
  l.batch = varlen ? 0 : t.stride(0);
  l.seq = t.stride(1 - off);
  l.head = t.stride(2 - off);
  return l;
}

// A float32 per-row buffer laid out as lse (delta, dlse).
void check_row_stats(const TensorView& t, const TensorView& lse, const TensorView& q, const char* name) {
  pyllmops::check_dtype(t, DType::f32, name);
  pyllmops::check_contiguous(t, name);
  pyllmops::check_same_device(t, q, name, "q");
  check_same_shape(t, lse, name, "lse");
}

// Checks q/k/v/out/lse and cu_seqlens, and fills everything the forward needs.
attn::Params make_params(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                         const TensorView& lse, const OptView& cu_q, const OptView& cu_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k, double scale, double softcap, int64_t left, int64_t right,
                         bool top_left) {
  const bool varlen = cu_q.has_value();
  PYLLMOPS_CHECK(varlen == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  check_float_dtype(q, "q");
  check_tokens(q, q, "q", varlen);
  check_tokens(k, q, "k", varlen);
  check_tokens(v, q, "v", varlen);
  check_tokens(out, q, "out", varlen);
  check_same_shape(out, q, "out", "q");
  check_same_shape(v, k, "v", "k");
  const int64_t d = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  PYLLMOPS_CHECK(d % 8 == 0 && d >= 8 && d <= attn::kMaxHeadDim, "head_dim must be a multiple of 8 in [8, ",
                 attn::kMaxHeadDim, "], got ", d);
  PYLLMOPS_CHECK(k.size(-1) == d, "k must have q's head_dim ", d, ", got ", k.size(-1));
  PYLLMOPS_CHECK(hkv >= 1 && hq % hkv == 0, "heads of q (", hq, ") must be a multiple of heads of k/v (", hkv, ")");
  PYLLMOPS_CHECK(left >= -1 && right >= -1, "window_size entries must be >= -1, got (", left, ", ", right, ")");
  // The kernels use scale and scale * log2(e) in float32: both must be finite and positive there.
  const float scale32 = static_cast<float>(scale), scale_log2 = scale32 * 1.4426950408889634f;
  PYLLMOPS_CHECK(std::isfinite(scale) && scale32 > 0.0f && std::isfinite(scale_log2), "softmax_scale must be > 0 and ",
                 "at most ", kMaxSoftmaxScale, " (positive and finite in float32 also after the kernels multiply it by ",
                 "log2(e)), got ", scale);
  PYLLMOPS_CHECK(std::isfinite(softcap) && softcap >= 0.0 && std::isfinite(static_cast<float>(softcap)),
                 "softcap must be 0 (off) or positive and finite in float32 (at most 3.4028e38), got ", softcap);
  pyllmops::check_dtype(lse, DType::f32, "lse");
  pyllmops::check_contiguous(lse, "lse");
  pyllmops::check_same_device(lse, q, "lse", "q");

  attn::Params p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.o = out.data;
  p.lse = lse.ptr<float>();
  p.softcap = static_cast<float>(softcap);
  p.lq = layout(q, varlen);
  p.lk = layout(k, varlen);
  p.lv = layout(v, varlen);
  p.lo = layout(out, varlen);
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.head_dim = d;
  p.scale = static_cast<float>(scale);
  p.top_left = top_left;
  p.device = q.device;
  if (!varlen) {
    p.batch = q.size(0);
    p.seqlen_q = q.size(1);
    p.seqlen_k = k.size(1);
    PYLLMOPS_CHECK(k.size(0) == p.batch, "k has batch ", k.size(0), " but q has batch ", p.batch);
    const std::vector<int64_t> want{p.batch, hq, p.seqlen_q};
    PYLLMOPS_CHECK(lse.shape == want, "lse must have shape (batch, heads_q, seqlen_q) = (", p.batch, ", ", hq, ", ",
                   p.seqlen_q, "), got ", pyllmops::shape_str(lse.shape));
    p.lse_batch_stride = hq * p.seqlen_q;
    p.lse_head_stride = p.seqlen_q;
    p.window_left = clamp_window(left, p.seqlen_q, p.seqlen_k);
    p.window_right = clamp_window(right, p.seqlen_q, p.seqlen_k);
    return p;
  }
  const TensorView& cq = *cu_q;
  const TensorView& ck = *cu_k;
  for (const auto* c : {&cq, &ck}) {
    const char* name = c == &cq ? "cu_seqlens_q" : "cu_seqlens_k";
    pyllmops::check_dtype(*c, DType::i32, name);
    pyllmops::check_contiguous(*c, name);
    pyllmops::check_same_device(*c, q, name, "q");
    PYLLMOPS_CHECK(c->dim() == 1 && c->size(0) >= 2, name, " must be 1-D with batch + 1 >= 2 entries, got shape ",
                   pyllmops::shape_str(c->shape));
  }
  PYLLMOPS_CHECK(cq.size(0) == ck.size(0), "cu_seqlens_q has ", cq.size(0), " entries but cu_seqlens_k has ",
                 ck.size(0));
  PYLLMOPS_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q/k must be >= 0, got ", max_seqlen_q, ", ",
                 max_seqlen_k);
  p.batch = cq.size(0) - 1;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  // No sequence is longer than all the rows: a larger max_seqlen (2**62, say) is clamped before it sizes any loop
  // or grid, and can then neither hang the kernels nor overflow a tile count.
  p.seqlen_q = std::min(max_seqlen_q, p.total_q);
  p.seqlen_k = std::min(max_seqlen_k, p.total_k);
  p.window_left = clamp_window(left, p.seqlen_q, p.seqlen_k);
  p.window_right = clamp_window(right, p.seqlen_q, p.seqlen_k);
  p.cu_seqlens_q = cq.ptr<const int32_t>();
  p.cu_seqlens_k = ck.ptr<const int32_t>();
  // Free on any device (no offset is read): the lengths sum to the rows, so if rows > batch * max_seqlen some
  // sequence is longer than max_seqlen. It also keeps the varlen grids non-empty whenever a tensor has rows.
  for (int which = 0; which < 2; ++which) {
    const int64_t total = which ? p.total_k : p.total_q, mx = which ? max_seqlen_k : max_seqlen_q;
    PYLLMOPS_CHECK(pyllmops::ceil_div(total, p.batch) <= mx, which ? "k" : "q", " has ", total, " rows for ", p.batch,
                   " sequences of at most max_seqlen_", which ? "k" : "q", " = ", mx,
                   " rows: some sequence of cu_seqlens_", which ? "k" : "q", " is longer than max_seqlen_",
                   which ? "k" : "q");
  }
  const std::vector<int64_t> want{hq, p.total_q};
  PYLLMOPS_CHECK(lse.shape == want, "lse must have shape (heads_q, total_q) = (", hq, ", ", p.total_q, "), got ",
                 pyllmops::shape_str(lse.shape));
  p.lse_batch_stride = 0;
  p.lse_head_stride = p.total_q;
  if (!q.is_cuda()) {
    // Host-side offsets can be checked for free; on the GPU the kernels check each sequence as they start
    // (seq_info), write NaN to a bad one's rows and raise bits in error_flag (attention.h).
    for (int which = 0; which < 2; ++which) {
      const int32_t* c = which ? p.cu_seqlens_k : p.cu_seqlens_q;
      const int64_t total = which ? p.total_k : p.total_q, mx = which ? max_seqlen_k : max_seqlen_q;
      const char* name = which ? "cu_seqlens_k" : "cu_seqlens_q";
      PYLLMOPS_CHECK(c[0] == 0, name, "[0] must be 0, got ", c[0]);
      for (int64_t b = 0; b < p.batch; ++b) {
        PYLLMOPS_CHECK(c[b + 1] >= c[b], name, " must be non-decreasing, got ", name, "[", b, "] = ", c[b], " then ",
                       name, "[", b + 1, "] = ", c[b + 1]);
        PYLLMOPS_CHECK(c[b + 1] - c[b] <= mx, "sequence ", b, " of ", name, " has length ", c[b + 1] - c[b], " (",
                       name, "[", b, "] = ", c[b], ", ", name, "[", b + 1, "] = ", c[b + 1], ") > max_seqlen_",
                       which ? "k = " : "q = ", mx);
      }
      PYLLMOPS_CHECK(c[p.batch] == total, name, "[-1] = ", c[p.batch], " must equal the ", total, " rows of ",
                     which ? "k" : "q");
    }
  }
  return p;
}

// The int32 error word of the CUDA kernels (attention.h, kErrorWords entries); required on CUDA, unused on the CPU.
int* error_flag_ptr(const OptView& flag, const TensorView& q) {
  if (!q.is_cuda()) return nullptr;
  PYLLMOPS_CHECK(flag.has_value(), "error_flag is required for CUDA tensors");
  pyllmops::bind::check_input(*flag, q, "error_flag", "q");
  pyllmops::check_dtype(*flag, DType::i32, "error_flag");
  pyllmops::check_min_numel(*flag, attn::kErrorWords, "error_flag");
  return flag->ptr<int>();
}

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const TensorView& lse, const OptView& cu_q, const OptView& cu_k, const OptView& error_flag,
                       int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double softcap, int64_t left,
                       int64_t right, bool top_left, uintptr_t stream) {
  attn::Params p =
      make_params(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, softcap, left, right, top_left);
  p.error_flag = error_flag_ptr(error_flag, q);
  PYLLMOPS_ON_DEVICE(q, "flash_attention", attn::forward_cpu(p, q.dtype), attn::forward_cuda(p, q.dtype, stream));
}

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                        const TensorView& dout, const TensorView& lse, const OptView& dlse, const TensorView& delta,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv, const OptView& cu_q,
                        const OptView& cu_k, const OptView& error_flag, int64_t max_seqlen_q, int64_t max_seqlen_k,
                        double scale, double softcap, int64_t left, int64_t right, bool top_left,
                        bool deterministic, uintptr_t stream) {
  attn::Params p =
      make_params(q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, softcap, left, right, top_left);
  p.error_flag = error_flag_ptr(error_flag, q);
  const bool varlen = p.varlen();
  check_tokens(dout, q, "dout", varlen);
  check_tokens(dq, q, "dq", varlen);
  check_tokens(dk, q, "dk", varlen);
  check_tokens(dv, q, "dv", varlen);
  check_same_shape(dout, q, "dout", "q");
  check_same_shape(dq, q, "dq", "q");
  check_same_shape(dk, k, "dk", "k");
  check_same_shape(dv, v, "dv", "v");
  check_row_stats(delta, lse, q, "delta");
  if (dlse) {
    check_row_stats(*dlse, lse, q, "dlse");
    p.dlse = dlse->ptr<const float>();
  }
  p.deterministic = deterministic;
  p.dout = dout.data;
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
  p.delta = delta.ptr<float>();
  p.ldo = layout(dout, varlen);
  p.ldq = layout(dq, varlen);
  p.ldk = layout(dk, varlen);
  p.ldv = layout(dv, varlen);
  PYLLMOPS_ON_DEVICE(q, "flash_attention (backward)", attn::backward_cpu(p, q.dtype),
                     attn::backward_cuda(p, q.dtype, stream));
}

// max |x| over a CPU float tensor of any rank and strides, NaN if any element is NaN: the cheap pass
// ops/attention.py uses to decide whether torch's CPU kernel may take a call (finite inputs; |lse| bound; a zero
// lse gradient). Contiguous runs: the maximum of the bits without the sign, an integer reduction that vectorizes
// (a float max is not: its NaN rules make it a serial maxss chain, 4 cycles an element); AVX-512F and AVX2 clones
// where the CPU has them (a vpmaxud on 16 lanes with AVX-512F; 16-bit floats get 16-lane vpmaxuw from AVX2 in both), split over parallel_for above kParallelBytes (the pool torch's
// ops use: no thread start per call). For non-NaN values the unsigned order of those bits is the order of |x|,
// and every NaN lies above infinity's bits.
// kLanes independent running maxima (4 zmm / 8 ymm of them), so the loop is not one chain of vpmaxud; measured on a
// 512 KB float32 input at one thread: 7.1 us in L2 (10.3 with the single maximum and AVX2 only), ~25 us from L3.
template <typename U>
__attribute__((always_inline)) inline U max_bits_lanes(const U* p, int64_t n, U sign_off) {
  constexpr int kLanes = 64;
  U m[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const U u = p[i + j] & sign_off;
      m[j] = u > m[j] ? u : m[j];
    }
  U mx = 0;
  for (; i < n; ++i) {
    const U u = p[i] & sign_off;
    mx = u > mx ? u : mx;
  }
  for (int j = 0; j < kLanes; ++j) mx = m[j] > mx ? m[j] : mx;
  return mx;
}
__attribute__((target_clones("avx512f", "avx2", "default"))) uint32_t max_bits(const uint32_t* p, int64_t n) {
  return max_bits_lanes<uint32_t>(p, n, 0x7fffffffu);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) uint16_t max_bits(const uint16_t* p, int64_t n) {
  return max_bits_lanes<uint16_t>(p, n, 0x7fff);
}

constexpr int64_t kParallelBytes = int64_t{1} << 20;

template <typename U>
U max_bits_parallel(const U* p, int64_t n) {
  const int64_t grain = kParallelBytes / static_cast<int64_t>(sizeof(U));
  if (n <= grain) return max_bits(p, n);
  std::atomic<U> mx{0};
  pyllmops::parallel_for(n, grain, [&](int64_t b, int64_t e) {
    const U m = max_bits(p + b, e - b);
    U cur = mx.load();
    while (m > cur && !mx.compare_exchange_weak(cur, m)) {
    }
  });
  return mx.load();
}

float max_abs_contiguous(const float* p, int64_t n) {
  const uint32_t mx = max_bits_parallel(reinterpret_cast<const uint32_t*>(p), n);
  float r;
  std::memcpy(&r, &mx, 4);
  return mx > 0x7f800000u ? NAN : r;
}
template <typename T>  // bf16_t / f16_t: a 16-bit `bits` member
float max_abs_contiguous(const T* p, int64_t n) {
  static_assert(sizeof(T) == 2, "16-bit float");
  T m;
  m.bits = max_bits_parallel(reinterpret_cast<const uint16_t*>(p), n);
  const float r = pyllmops::to_float(m);
  return r != r ? NAN : r;
}

template <typename T>
float max_abs_rec(const char* base, const TensorView& t, int64_t dim, float m) {
  const int64_t n = t.shape[dim], st = t.strides[dim] * static_cast<int64_t>(sizeof(T));
  if (dim + 1 == t.dim()) {
    bool nan = false;
    if (st == static_cast<int64_t>(sizeof(T))) {
      const float x = max_abs_contiguous(reinterpret_cast<const T*>(base), n);
      nan = x != x;
      m = x > m ? x : m;
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float x = std::fabs(pyllmops::to_float(*reinterpret_cast<const T*>(base + i * st)));
        nan |= x != x;
        m = x > m ? x : m;
      }
    }
    return nan ? NAN : m;
  }
  for (int64_t i = 0; i < n && m == m; ++i) m = max_abs_rec<T>(base + i * st, t, dim + 1, m);
  return m;
}

float max_abs(const TensorView& t) {
  pyllmops::check_not_null(t, "tensor");
  PYLLMOPS_CHECK(!t.is_cuda(), "attention_max_abs reads CPU tensors only");
  if (t.numel() == 0) return 0.0f;
  if (t.dim() == 0) {
    return PYLLMOPS_DISPATCH_FLOAT_TYPES(t.dtype, "tensor", pyllmops::f16_t, pyllmops::bf16_t,
                                         [&] { return std::fabs(pyllmops::to_float(*static_cast<scalar_t*>(t.data))); });
  }
  // A dense tensor in any dimension order (a BHSD tensor seen as BSHD, say) is one flat run of numel elements.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.shape[d] > 1) dims.emplace_back(t.strides[d], t.shape[d]);
  std::sort(dims.begin(), dims.end());
  int64_t expect = 1;
  bool dense = true;
  for (const auto& [stride, size] : dims) {
    dense = dense && stride == expect;
    expect *= size;
  }
  return PYLLMOPS_DISPATCH_FLOAT_TYPES(t.dtype, "tensor", pyllmops::f16_t, pyllmops::bf16_t, [&] {
    if (dense) return max_abs_contiguous(static_cast<const scalar_t*>(t.data), t.numel());
    return max_abs_rec<scalar_t>(static_cast<const char*>(t.data), t, 0, 0.0f);
  });
}

}  // namespace

void register_attention(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("attention_forward", &attention_forward, nogil);
  m.def("attention_backward", &attention_backward, nogil);
  m.def("attention_cpu_isa", [] { return std::string(attn::cpu_isa_name()); });
  m.def("attention_cpu_single_pass_backward", &attn::cpu_single_pass_backward, py::arg("batch"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("head_dim"));
  m.def("attention_max_abs", &max_abs, nogil);
}
