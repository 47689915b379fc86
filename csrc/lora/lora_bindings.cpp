// Python bindings of the LoRA kernels (csrc/lora/lora.h). Checks everything a kernel relies on:
// dtypes, contiguity, devices, and that every buffer holds what the kernel will index.
#include <cmath>

#include "bindings.h"
#include "nf4/nf4_bindings.h"
#include "lora/lora.h"

using pyllmops::DType;
using pyllmops::TensorView;
using pyllmops::bind::OptView;
using pyllmops::bind::check_float_dtype;
using pyllmops::bind::check_input;
namespace lora = pyllmops::lora;

namespace {

void check_bits_group(int64_t bits, int64_t group_size) {
  PYLLMOPS_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4, got ", bits);
  PYLLMOPS_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128, got ",
                 group_size);
}

void check_shape(const TensorView& t, std::initializer_list<int64_t> shape, const char* name) {
  const std::vector<int64_t> want(shape);
  PYLLMOPS_CHECK(t.shape == want, name, " has shape ", pyllmops::shape_str(t.shape), ", expected ",
                 pyllmops::shape_str(want));
}

// check_input, except that an empty tensor (an r = 0 adapter: IntLinear) is never read, so any strides do.
void check_buffer(const TensorView& t, const TensorView& x, const char* name) {
  if (t.numel() == 0) {
    pyllmops::check_same_device(t, x, name, "x");
  } else {
    check_input(t, x, name, "x");
  }
}

void check_like_x(const TensorView& t, const TensorView& x, const char* name) {
  check_buffer(t, x, name);
  PYLLMOPS_CHECK(t.dtype == x.dtype, name, " must have x's dtype ", pyllmops::dtype_name(x.dtype), ", got ",
                 pyllmops::dtype_name(t.dtype));
}

// A split workspace of the CUDA tensor-core kernel: [splits >= 1, m, cols] fp32 beside x. Returns the split count.
int64_t check_partials(const TensorView& p, const TensorView& x, int64_t m, int64_t cols, const char* name) {
  check_buffer(p, x, name);
  pyllmops::check_dtype(p, DType::f32, name);
  PYLLMOPS_CHECK(p.dim() == 3 && p.size(0) >= 1, name, " must be 3-D with at least one slice, got shape ",
                 pyllmops::shape_str(p.shape));
  check_shape(p, {p.size(0), m, cols}, name);
  return p.size(0);
}

// Common checks of the fused product; fills args. `in` is [m, n_red], out [m, n_cols]; W is
// (out_features, in_features) = transposed ? (n_red, n_cols) : (n_cols, n_red).
lora::FusedArgs fused_args(const TensorView& in, const OptView& in_scale, const OptView& out_scale,
                           bool transposed, const OptView& bias, const TensorView& lora_a,
                           const TensorView& lora_b, int64_t pool, double scaling, const TensorView& out,
                           const TensorView& t, const OptView& t_part, const OptView& o_part, lora::Weight* w) {
  check_float_dtype(in, "x");
  check_like_x(in, in, "x");
  check_like_x(out, in, "out");
  PYLLMOPS_CHECK(in.dim() == 2 && out.dim() == 2, "x and out must be 2-D, got ", in.dim(), "-D and ", out.dim(),
                 "-D");
  PYLLMOPS_CHECK(in.size(0) == out.size(0), "x has ", in.size(0), " rows but out has ", out.size(0));
  lora::FusedArgs a;
  a.m = in.size(0);
  a.n_red = in.size(1);
  a.n_cols = out.size(1);
  a.transposed = transposed;
  const int64_t n_out = transposed ? a.n_red : a.n_cols, k_in = transposed ? a.n_cols : a.n_red;
  PYLLMOPS_CHECK(pool >= 1 && (pool & (pool - 1)) == 0, "pool (group_size) must be a power of two, got ", pool);
  PYLLMOPS_CHECK(k_in % pool == 0, "in_features ", k_in, " is not a multiple of the pooling group ", pool);
  check_like_x(lora_a, in, "lora_a");
  check_like_x(lora_b, in, "lora_b");
  PYLLMOPS_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2, "lora_a and lora_b must be 2-D");
  a.r = lora_a.size(0);
  check_shape(lora_a, {a.r, k_in / pool}, "lora_a");
  check_shape(lora_b, {n_out, a.r}, "lora_b");
  check_buffer(t, in, "t");
  pyllmops::check_dtype(t, DType::f32, "t");
  check_shape(t, {a.m, a.r}, "t");
  if (in_scale) {
    check_like_x(*in_scale, in, "dropout_scale");
    check_shape(*in_scale, {a.m, a.n_red}, "dropout_scale");
    a.in_scale = in_scale->data;
  }
  if (out_scale) {
    check_like_x(*out_scale, in, "dropout_scale");
    check_shape(*out_scale, {a.m, a.n_cols}, "dropout_scale");
    a.out_scale = out_scale->data;
  }
  if (bias) {
    check_like_x(*bias, in, "bias");
    check_shape(*bias, {a.n_cols}, "bias");
    a.bias = bias->data;
  }
  a.in = in.data;
  a.lora_a = lora_a.data;
  a.lora_b = lora_b.data;
  a.pool = pool;
  a.scaling = static_cast<float>(scaling);
  PYLLMOPS_CHECK(std::isfinite(a.scaling), "scaling must be finite after its cast to float32 (|scaling| <= ",
                 "3.4028235e38), got ", scaling);
  a.out = out.data;
  a.t = t.ptr<float>();
  if (t_part) {  // the CUDA tensor-core kernel's down-pass partial sums (r > 64, split-K): [splits, m, r]
    a.t_splits = check_partials(*t_part, in, a.m, a.r, "t_part");
    a.t_part = t_part->ptr<float>();
  }
  if (o_part) {  // the CUDA tensor-core kernel's split-K partial sums of the base product: [splits, m, n_cols]
    a.o_splits = check_partials(*o_part, in, a.m, a.n_cols, "o_part");
    a.o_part = o_part->ptr<float>();
  }
  w->n_out = n_out;
  w->k_in = k_in;
  return a;
}

// A split-K workspace (o_part) is only for the CUDA tensor-core kernel (fp16 / bf16, tensor cores on, 32-bit
// indices); the CPU and SIMT kernels refuse it rather than ignore it.
void check_split_k(const lora::FusedArgs& a, DType dtype, bool tensor_cores, bool cuda) {
  if (a.o_part == nullptr) return;
  const bool mma = cuda && tensor_cores && (dtype == DType::f16 || dtype == DType::bf16);
  PYLLMOPS_CHECK(mma, "o_part (the split-K workspace) is for the CUDA tensor-core LoRA kernel (float16 / bfloat16 ",
                 "on CUDA with tensor cores on), got ", pyllmops::dtype_name(dtype), cuda ? " on CUDA" : " on the CPU",
                 tensor_cores ? "" : " with tensor cores off");
}

void run_fused(lora::WeightKind kind, const TensorView& in, const lora::FusedArgs& a, const lora::Weight& w,
               bool tensor_cores, uintptr_t stream) {
  check_split_k(a, in.dtype, tensor_cores, in.is_cuda());
  PYLLMOPS_ON_DEVICE(in, "lora_linear", lora::fused_cpu(kind, in.dtype, a, w), {
    PYLLMOPS_CHECK(a.o_part == nullptr || lora::fits_32bit_indices(a, w), "o_part (the split-K workspace) is for ",
                   "the tensor-core LoRA kernel, whose 32-bit indices do not cover this problem");
    lora::fused_cuda(kind, in.dtype, a, w, in.device, stream, tensor_cores);
  });
}

void lora_fused_dense(const TensorView& in, const OptView& in_scale, const OptView& out_scale,
                      const TensorView& weight, bool transposed, const OptView& bias, const TensorView& lora_a,
                      const TensorView& lora_b, double scaling, const TensorView& out, const TensorView& t,
                      const OptView& t_part, const OptView& o_part, bool tensor_cores, uintptr_t stream) {
  lora::Weight w;
  const auto a =
      fused_args(in, in_scale, out_scale, transposed, bias, lora_a, lora_b, 1, scaling, out, t, t_part, o_part, &w);
  check_like_x(weight, in, "weight");
  check_shape(weight, {w.n_out, w.k_in}, "weight");
  w.dense = weight.data;
  run_fused(lora::WeightKind::dense, in, a, w, tensor_cores, stream);
}

void lora_fused_nf4(const TensorView& in, const OptView& in_scale, const OptView& out_scale,
                    const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
                    const OptView& nested_code, const OptView& nested_offset, int64_t blocksize,
                    int64_t nested_blocksize, bool transposed, const OptView& bias, const TensorView& lora_a,
                    const TensorView& lora_b, double scaling, const TensorView& out, const TensorView& t,
                    const OptView& t_part, const OptView& o_part, bool tensor_cores, uintptr_t stream) {
  lora::Weight w;
  const auto a =
      fused_args(in, in_scale, out_scale, transposed, bias, lora_a, lora_b, 1, scaling, out, t, t_part, o_part, &w);
  pyllmops::nf4::check_blocksize(blocksize, "blocksize");
  check_input(packed, in, "packed", "x");
  pyllmops::check_dtype(packed, DType::u8, "packed");
  const int64_t n = w.n_out * w.k_in;
  pyllmops::check_min_numel(packed, (n + 1) / 2, "packed");
  w.nf4_scales = pyllmops::nf4::make_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize,
                                            pyllmops::ceil_div(n, blocksize), in, "x");
  w.packed = packed.ptr<const uint8_t>();
  w.blocksize = blocksize;
  run_fused(lora::WeightKind::nf4, in, a, w, tensor_cores, stream);
}

void check_int_weight(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int64_t bits,
                      int64_t group_size, int64_t n_out, int64_t k_in, const TensorView& ref) {
  check_bits_group(bits, group_size);
  PYLLMOPS_CHECK(k_in % group_size == 0, "in_features ", k_in, " is not a multiple of group_size ", group_size);
  check_input(qweight, ref, "qweight", "x");
  check_input(scales, ref, "scales", "x");
  check_input(zeros, ref, "zeros", "x");
  pyllmops::check_dtype(qweight, DType::i32, "qweight");
  pyllmops::check_dtype(scales, DType::f32, "scales");
  pyllmops::check_dtype(zeros, DType::f32, "zeros");
  check_shape(qweight, {n_out, lora::words_per_row(k_in, static_cast<int>(bits))}, "qweight");
  check_shape(scales, {n_out, k_in / group_size}, "scales");
  check_shape(zeros, {n_out, k_in / group_size}, "zeros");
}

void lora_fused_int(const TensorView& in, const OptView& in_scale, const OptView& out_scale,
                    const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int64_t bits,
                    int64_t group_size, bool transposed, const OptView& bias, const TensorView& lora_a,
                    const TensorView& lora_b, double scaling, const TensorView& out, const TensorView& t,
                    const OptView& t_part, const OptView& o_part, bool tensor_cores, uintptr_t stream) {
  check_bits_group(bits, group_size);
  lora::Weight w;
  const auto a = fused_args(in, in_scale, out_scale, transposed, bias, lora_a, lora_b, group_size, scaling, out, t,
                            t_part, o_part, &w);
  check_int_weight(qweight, scales, zeros, bits, group_size, w.n_out, w.k_in, in);
  w.qweight = qweight.ptr<const int32_t>();
  w.scales = scales.ptr<const float>();
  w.zeros = zeros.ptr<const float>();
  w.bits = static_cast<int>(bits);
  w.group_size = group_size;
  run_fused(lora::WeightKind::int_q, in, a, w, tensor_cores, stream);
}

void int_quantize(const TensorView& w, int64_t bits, int64_t group_size, const TensorView& qweight,
                  const TensorView& scales, const TensorView& zeros, uintptr_t stream) {
  check_float_dtype(w, "w");
  check_input(w, w, "w", "w");
  PYLLMOPS_CHECK(w.dim() == 2, "w must be 2-D, got ", w.dim(), "-D");
  check_bits_group(bits, group_size);
  check_int_weight(qweight, scales, zeros, bits, group_size, w.size(0), w.size(1), w);
  if (!w.is_cuda()) {  // host memory: refuse non-finite weights before anything is written
    PYLLMOPS_DISPATCH_FLOAT_TYPES(w.dtype, "w", pyllmops::f16_t, pyllmops::bf16_t, [&] {
      const scalar_t* p = w.ptr<const scalar_t>();
      for (int64_t i = 0; i < w.numel(); ++i) {
        const float v = pyllmops::to_float(p[i]);
        PYLLMOPS_CHECK(std::isfinite(v), "w must be finite to be quantized, got ", v, " at index (", i / w.size(1),
                       ", ", i % w.size(1), ")");
      }
    });
  }
  PYLLMOPS_ON_DEVICE(w, "quantize_int",
                     lora::int_quantize_cpu(w, static_cast<int>(bits), group_size, qweight, scales, zeros),
                     lora::int_quantize_cuda(w, static_cast<int>(bits), group_size, qweight, scales, zeros, stream));
}

void int_dequantize(const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int64_t bits,
                    int64_t group_size, const TensorView& out, uintptr_t stream) {
  check_float_dtype(out, "out");
  check_input(out, out, "out", "out");
  PYLLMOPS_CHECK(out.dim() == 2, "out must be 2-D, got ", out.dim(), "-D");
  check_int_weight(qweight, scales, zeros, bits, group_size, out.size(0), out.size(1), out);
  PYLLMOPS_ON_DEVICE(out, "dequantize_int",
                     lora::int_dequantize_cpu(qweight, scales, zeros, static_cast<int>(bits), group_size, out),
                     lora::int_dequantize_cuda(qweight, scales, zeros, static_cast<int>(bits), group_size, out,
                                               stream));
}

}  // namespace

void register_lora(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("lora_fused_dense", &lora_fused_dense, nogil);
  m.def("lora_fused_nf4", &lora_fused_nf4, nogil);
  m.def("lora_fused_int", &lora_fused_int, nogil);
  m.def("int_quantize", &int_quantize, nogil);
  m.def("int_dequantize", &int_dequantize, nogil);
}
