// pyllmops._C: the module. Each op family registers its kernels from csrc/<family>/<family>_bindings.cpp.
//
// Each tensor arrives as a tuple (data_ptr, dtype code, shape, strides, device index, owner) built by
// pyllmops/ops/_common.py; CUDA kernels also get the caller's stream handle. Every function checks
// what its kernel relies on and throws (ValueError / RuntimeError in Python) before any kernel runs.
#include "bindings.h"
#include "common/parallel.h"

namespace {

py::dict build_info() {
  py::dict d;
#ifdef PYLLMOPS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef PYLLMOPS_EMU
  d["emulated"] = true;
  d["emu_cuda_include"] = std::string(PYLLMOPS_EMU_CUDA_INCLUDE);  // the toolkit headers it was built against
#else
  d["emulated"] = false;
#endif
  d["cuda_archs"] = std::string(PYLLMOPS_CUDA_ARCHS);
  d["cuda_version"] = std::string(PYLLMOPS_CUDA_VERSION);
  d["cpu"] = true;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllmops kernels (CPU and CUDA), called through pyllmops.ops";
  py::dict dtypes;
  using pyllmops::DType;
  for (DType d : {DType::f32, DType::f16, DType::bf16, DType::u8, DType::i32, DType::i64, DType::f64})
    dtypes[pyllmops::dtype_name(d)] = static_cast<int>(d);
  m.attr("DTYPES") = dtypes;
  m.def("build_info", &build_info);
  m.def("num_threads", &pyllmops::num_threads);
  m.def("set_num_threads", &pyllmops::set_num_threads, py::arg("n"));

  register_nf4(m);
  register_attention(m);
  register_paged(m);
  register_lora(m);
  register_fused(m);
#ifdef PYLLMOPS_EMU
  register_emu(m);
#endif
}
