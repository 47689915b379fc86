#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pyllmops {

namespace {
std::atomic<int> g_threads{0};
}

int num_threads() {
  int n = g_threads.load();
  if (n > 0) return n;
  if (const char* env = std::getenv("PYLLMOPS_NUM_THREADS")) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
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
  auto run = [&](int64_t begin) {
    try {
      body(begin, std::min(n, begin + per));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t c = 1; c < chunks; ++c) workers.emplace_back(run, c * per);
  run(0);
  for (auto& w : workers) w.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace pyllmops
