// parallel_for: the CPU kernels' only threading primitive.
//
// Splits [0, n) into contiguous chunks of at least `grain` items over up to num_threads() threads
// (the caller's thread takes the first chunk). Exceptions thrown by the body are rethrown on the
// caller's thread.
//
// The chunks run on the OpenMP thread pool that torch's CPU ops use (the module links libgomp.so.1,
// the soname torch's wheel loads, so the process has one pool; built without OpenMP, or in a child
// forked from a process whose pool is gone, they run on threads started per call). Sharing the pool
// matters on a small machine: after each torch op its OpenMP workers spin for a while waiting for the
// next region, and threads of our own would compete with them for the cores (on 2 cores that made
// a QLoRA layer, which alternates our kernels and torch matmuls, 1.2-1.7x slower).
#pragma once
#include <cstdint>
#include <functional>

namespace pyllmops {

// PYLLMOPS_NUM_THREADS, else set_num_threads(), else torch's thread count (omp_get_max_threads(), which
// torch.set_num_threads sets), else all cores.
int num_threads();
void set_num_threads(int n);   // n <= 0 restores the default

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace pyllmops
