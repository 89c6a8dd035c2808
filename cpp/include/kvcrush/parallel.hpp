// Parallel loops over independent items (a (layer, head) row, a layer) with plain std::thread:
// no thread pool, no global state, no spinning workers left behind between calls (the
// inference runtime gets every core back as soon as a call returns).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace kvcrush {

/// Cores this process may run on (the affinity mask on Linux, else hardware_concurrency()).
inline int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

namespace detail {

/// Joins every thread it holds when it goes out of scope (also on an exception).
class ThreadGroup {
 public:
  ThreadGroup() = default;
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;
  ~ThreadGroup() {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }
  template <class F>
  void spawn(F&& f) {
    threads_.emplace_back(std::forward<F>(f));
  }

 private:
  std::vector<std::thread> threads_;
};

}  // namespace detail

/// Work (in elements touched) below which a call runs on the calling thread only: starting a
/// thread costs tens of microseconds.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

/// Calls ``fn(i)`` for every ``i`` in ``[0, n)`` on up to available_cores() threads (fewer when
/// ``n * work_per_item`` is small), the calling thread included. Items are handed out in small
/// chunks from a shared counter, so a thread the OS delays (a busy machine) holds up at most
/// one chunk. The first exception thrown by any ``fn`` is rethrown here after every thread has
/// finished (the others stop taking new chunks).
template <class F>
void parallel_for(int64_t n, int64_t work_per_item, F&& fn) {
  if (n <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) /
                                                   kMinWorkPerThread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(available_cores()), n, by_work});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (threads * 4));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  auto work = [&](int64_t t) {
    try {
      for (int64_t lo = next.fetch_add(chunk); lo < n && !failed.load();
           lo = next.fetch_add(chunk)) {
        const int64_t hi = std::min(n, lo + chunk);
        for (int64_t i = lo; i < hi; ++i) fn(i);
      }
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
      failed.store(true);
    }
  };
  {
    detail::ThreadGroup group;
    for (int64_t t = 1; t < threads; ++t) group.spawn([&work, t] { work(t); });
    work(0);
  }  // joins here
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace kvcrush
