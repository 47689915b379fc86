// Kernel launches and shared-memory declarations: the two CUDA constructs that differ between nvcc
// and the emulated backend (PYLLMOPS_EMU, docs/emulator.md), written once here.
//
//   launch("fwd_kernel", fwd_kernel<T, kD>, grid, block, smem_bytes, stream, params);
//     nvcc: kernel<<<grid, block, smem, stream>>>(args), then cudaGetLastError; a failure throws a
//     RuntimeError naming the kernel. Emulated: the grid runs on the CPU before launch returns, with
//     the hardware's launch limits enforced.
//   PYLLMOPS_SHARED(float[16], s_code);           // __shared__ float s_code[16] (16-byte aligned)
//   PYLLMOPS_DYNAMIC_SHARED(unsigned char, smem);  // the launch's dynamic shared memory, as T*
//   set_max_dynamic_smem(kernel, bytes);           // opt-in above 48 KB, once per kernel and device
//   static DynamicSmemOptIn opt; opt.ensure(kernel, bytes, device, name);  // the same, one atomic load per launch
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/cuda_utils.cuh"

#if defined(PYLLMOPS_EMU)
#include <functional>
#endif

namespace pyllmops {

template <typename T>
using type_identity_t = T;

#if defined(PYLLMOPS_EMU)
namespace emu {
struct LaunchConfig {
  const char* name;
  const void* kernel;
  dim3 grid, block;
  size_t dynamic_smem;
};
// Runs body() once per CUDA thread of the grid (runtime.cpp). Throws std::runtime_error naming the
// kernel on a launch error (limits) or an error detected while it runs.
void run_grid(const LaunchConfig& cfg, const std::function<void()>& body);
}  // namespace emu
#endif

template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
            cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: argument count differs from the kernel's");
#if defined(PYLLMOPS_EMU)
  (void)stream;
  const std::tuple<std::decay_t<KArgs>...> params(static_cast<std::decay_t<KArgs>>(std::forward<Args>(args))...);
  emu::run_grid({name, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes},
                [&] { std::apply(kernel, params); });
#else
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<std::decay_t<KArgs>>(std::forward<Args>(args))...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw_runtime("pyllmops: launching ", name, " (grid ", grid.x, "x", grid.y, "x", grid.z, ", block ", block.x,
                  "x", block.y, "x", block.z, ", ", smem_bytes, " B dynamic shared memory) failed: ",
                  cudaGetErrorString(err));
#endif
}

// Allows `kernel` up to `bytes` of dynamic shared memory (needed above 48 KB). The attribute is set
// once per kernel and device: later calls with no larger size cost a mutex and a lookup.
template <typename Kernel>
void set_max_dynamic_smem(Kernel kernel, int bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  PYLLMOPS_CUDA_CHECK(cudaGetDevice(&dev));
  struct Key {
    const void* kernel;
    int dev;
    int bytes;
  };
  static std::mutex mu;
  static Key done[64];
  static int n_done = 0;
  std::lock_guard<std::mutex> lock(mu);
  const void* k = reinterpret_cast<const void*>(kernel);
  for (int i = 0; i < n_done; ++i)
    if (done[i].kernel == k && done[i].dev == dev && done[i].bytes >= bytes) return;
  int max_optin = 0;
  PYLLMOPS_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > max_optin)
    throw_runtime("pyllmops: ", name, " needs ", bytes, " bytes of shared memory per block; the device allows ",
                  max_optin);
  PYLLMOPS_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (n_done < 64) done[n_done++] = Key{k, dev, bytes};
}

// The opt-in of one kernel (keep it as a function-local static in the kernel's launcher), remembered per device:
// after the first launch on a device, a launch costs one atomic load instead of set_max_dynamic_smem's
// cudaGetDevice, mutex and lookup. `device` is the tensors' device (current under the caller's device guard).
class DynamicSmemOptIn {
 public:
  template <typename Kernel>
  void ensure(Kernel kernel, int bytes, int device, const char* name) {
    if (bytes <= 48 * 1024) return;
    const bool known = device >= 0 && device < kMaxDevices;
    if (known && done_[device].load(std::memory_order_acquire)) return;
    set_max_dynamic_smem(kernel, bytes, name);
    if (known) done_[device].store(true, std::memory_order_release);
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::atomic<bool> done_[kMaxDevices] = {};
};

}  // namespace pyllmops

#if defined(PYLLMOPS_EMU)
#define PYLLMOPS_SHARED(T, name)                                                              \
  static const char name##_emu_tag = 0;                                                       \
  ::pyllmops::type_identity_t<T>& name = *::pyllmops::emu::shared_static_as<::pyllmops::type_identity_t<T>>( \
      &name##_emu_tag, #name, ::pyllmops::emu::Site{__FILE__, __LINE__})
#define PYLLMOPS_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::pyllmops::emu::shared_dynamic())
#else
#define PYLLMOPS_SHARED(T, name) __shared__ __align__(16) ::pyllmops::type_identity_t<T> name
#define PYLLMOPS_DYNAMIC_SHARED(T, name)                                     \
  extern __shared__ __align__(16) unsigned char pyllmops_dynamic_smem[];     \
  T* name = reinterpret_cast<T*>(pyllmops_dynamic_smem)
#endif
