#include "common/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#ifdef PYLLMOPS_OPENMP
#include <omp.h>
#endif

namespace pyllmops {

namespace {
std::atomic<int> g_threads{0};

// A forked child inherits the parent's OpenMP pool bookkeeping but none of its threads: libgomp then
// waits forever at the first parallel region (torch's own ops hang there too). The child therefore
// runs on threads of its own.
std::atomic<bool> g_forked{false};
const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });

bool use_openmp() {
#ifdef PYLLMOPS_OPENMP
  return !g_forked.load();
#else
  return false;
#endif
}
}  // namespace

int num_threads() {
  (void)g_atfork;
  int n = g_threads.load();
  if (n > 0) return n;
  if (const char* env = std::getenv("PYLLMOPS_NUM_THREADS")) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
#ifdef PYLLMOPS_OPENMP
  return std::max(1, omp_get_max_threads());  // a getter: safe in a forked child too
#else
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
#endif
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(num_threads(), (n + grain - 1) / grain);
  if (chunks <= 1) {
    body(0, n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int64_t c) {
    try {
      body(c * per, std::min(n, (c + 1) * per));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  if (use_openmp()) {
#ifdef PYLLMOPS_OPENMP
    // A team smaller than asked (nested inside another region, or a thread limit) runs several chunks
    // per thread; the chunk boundaries, and so the results, do not depend on the team size.
#pragma omp parallel num_threads(static_cast<int>(chunks))
    {
      const int64_t team = omp_get_num_threads();
      for (int64_t c = omp_get_thread_num(); c < chunks; c += team) run(c);
    }
#endif
  } else {
    std::vector<std::thread> workers;
    workers.reserve(chunks - 1);
    for (int64_t c = 1; c < chunks; ++c) workers.emplace_back(run, c);
    run(0);
    for (auto& w : workers) w.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace pyllmops
