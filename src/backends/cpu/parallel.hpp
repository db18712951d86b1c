// A minimal fork-join parallel loop for the CPU backend: `threads` workers
// take task indices from a shared counter, so uneven tasks balance.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace moba::backends::cpu {

/// Number of workers for a request of `requested` threads (0 = all).
inline int resolve_threads(int requested) noexcept {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

/// Calls fn(worker, task) for task in [0, tasks), on up to `threads` workers;
/// rethrows the first exception a task threw.
template <class Fn>
void parallel_for(int64_t tasks, int threads, Fn&& fn) {
  // Each worker runs its own single-threaded products.
  openblas_set_num_threads(1);
  const int workers = static_cast<int>(std::min<int64_t>(threads, tasks));
  if (workers <= 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(0, t);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  const auto work = [&](int worker) {
    try {
      for (int64_t t = next++; t < tasks; t = next++) fn(worker, t);
    } catch (...) {
      const std::lock_guard lock(error_mutex);
      if (!error) error = std::current_exception();
      next = tasks;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace moba::backends::cpu
