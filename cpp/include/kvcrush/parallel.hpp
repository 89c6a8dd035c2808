// Parallel loops over independent items (a (layer, head) row, a layer). Each thread that runs
// a parallel loop owns a small pool of worker threads, made on its first loop and joined when
// that thread ends: no process-wide state, and no spinning between loops (idle workers sleep on
// a condition variable, so the inference runtime gets every core back as soon as a loop
// returns). A pool saves starting and joining a thread per worker and loop, which costs tens of
// microseconds each on a large VM (an eviction event runs several loops).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
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

/// True on a pool's worker and on a thread inside its own parallel loop: a nested loop runs on
/// the calling thread (no pool of pools).
inline bool& in_parallel_loop() {
  thread_local bool inside = false;
  return inside;
}

/// Worker threads that run one job at a time for the thread that owns them.
class WorkerPool {
 public:
  explicit WorkerPool(int64_t workers) {
    threads_.reserve(static_cast<size_t>(workers));
    for (int64_t i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int64_t size() const { return static_cast<int64_t>(threads_.size()); }

  /// Calls job(t) for t in [1, threads) on workers and job(0) here; returns when all returned.
  /// job must not throw (parallel_for catches inside it).
  void run(int64_t threads, const std::function<void(int64_t)>& job) {
    const int64_t helpers = std::min(threads - 1, size());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      wanted_ = helpers;
      taken_ = 0;
      pending_ = helpers;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    in_parallel_loop() = true;  // a worker only ever runs items of a loop
    int64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (taken_ >= wanted_) continue;  // enough helpers for this job already
      const int64_t id = ++taken_;
      const auto* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t generation_ = 0, wanted_ = 0, taken_ = 0, pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

/// The calling thread's pool, with at least ``workers`` workers (made or grown on demand).
inline WorkerPool& local_pool(int64_t workers) {
  thread_local std::unique_ptr<WorkerPool> pool;
#if defined(__unix__) || defined(__APPLE__)
  thread_local pid_t owner = 0;
  if (pool && owner != getpid()) (void)pool.release();  // a fork()ed child: those workers are
  owner = getpid();                                      // not here; leave them, make new ones
#endif
  if (!pool || pool->size() < workers) {
    pool.reset();
    pool = std::make_unique<WorkerPool>(workers);
  }
  return *pool;
}

/// Sets in_parallel_loop() for the scope of a loop.
class InsideLoop {
 public:
  InsideLoop() { in_parallel_loop() = true; }
  ~InsideLoop() { in_parallel_loop() = false; }
  InsideLoop(const InsideLoop&) = delete;
  InsideLoop& operator=(const InsideLoop&) = delete;
};

}  // namespace detail

/// Work (in elements touched) below which a call runs on the calling thread only: waking a
/// worker and handing out chunks costs microseconds. 1 << 14, from a sweep of the selection
/// bench on the 16-core Xeon (per event: 1 << 18: 7.8 ms, 1 << 17: 5.7, 1 << 16: 4.3-5.3,
/// 1 << 15: 2.9-3.8, 1 << 14: 2.5, 1 << 13: 2.5); on 2 cores 1 << 14 and 1 << 16 are equal
/// (docs/performance.md).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 14;

/// Calls ``fn(i)`` for every ``i`` in ``[0, n)`` on up to available_cores() threads (fewer when
/// ``n * work_per_item`` is small), the calling thread included. Items are handed out in small
/// chunks from a shared counter, so a thread the OS delays (a busy machine) holds up at most
/// one chunk. A loop inside another one runs on the calling thread. The first exception thrown
/// by any ``fn`` is rethrown here after every thread has finished (the others stop taking new
/// chunks).
template <class F>
void parallel_for(int64_t n, int64_t work_per_item, F&& fn) {
  if (n <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) /
                                                   kMinWorkPerThread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(available_cores()), n, by_work});
  if (threads <= 1 || detail::in_parallel_loop()) {
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
    detail::InsideLoop inside;
    detail::local_pool(available_cores() - 1).run(threads, work);
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace kvcrush
