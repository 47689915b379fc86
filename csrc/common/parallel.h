// parallel_for: the CPU kernels' only threading primitive.
//
// Splits [0, n) into contiguous chunks of at least `grain` items over up to num_threads() threads
// (the caller's thread takes the first chunk). Threads are started per call: at tens of
// microseconds each this only pays for work of at least ~100 us, which `grain` should ensure.
// Exceptions thrown by the body are rethrown on the caller's thread.
#pragma once
#include <cstdint>
#include <functional>

namespace pyllmops {

int num_threads();             // PYLLMOPS_NUM_THREADS, else set_num_threads(), else all cores
void set_num_threads(int n);   // n <= 0 restores the default

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace pyllmops
