// A small fixed-size pool of worker threads for data-parallel loops (the CPU attention kernels
// split their work over (query tile, KV head, KV chunk) items with it). It is injected: callers
// create one pool per process or per engine and pass a borrowed pointer to the kernels; a null
// pool means "run on the calling thread".
//
// Thread-safety: ParallelFor may be called from any thread; concurrent calls are serialised (one
// loop runs on the pool at a time). ParallelFor must not be called from inside a ParallelFor body
// of the same pool (that would deadlock; it is a programmer error).
#ifndef TOKENLAKE_ATTENTION_THREAD_POOL_H_
#define TOKENLAKE_ATTENTION_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace tokenlake::attention {

class ThreadPool {
 public:
  struct Options {
    // Total number of threads that execute a ParallelFor, INCLUDING the calling thread (so 1
    // means no worker threads at all). Must be in [1, 1024].
    int num_threads = 1;
  };

  // Returns the pool, or InvalidArgument when options.num_threads is out of range.
  static absl::StatusOr<std::unique_ptr<ThreadPool>> Create(const Options& options);

  // Joins the workers. REQUIRES: no ParallelFor is running.
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs body(i) for every i in [0, num_items), spread over the workers and the calling thread,
  // and returns when all have finished. Items are claimed dynamically (one at a time) so uneven
  // items balance. num_items <= 0 does nothing.
  void ParallelFor(int64_t num_items, absl::FunctionRef<void(int64_t)> body);

  // Total threads that run a loop, including the caller.
  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

 private:
  explicit ThreadPool(int num_threads);
  void WorkerLoop();
  void RunItems();

  std::mutex call_mu_;  // serialises ParallelFor calls.
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  // All of the following are guarded by mu_ except the atomics.
  uint64_t generation_ = 0;
  bool stop_ = false;
  int active_workers_ = 0;
  const absl::FunctionRef<void(int64_t)>* body_ = nullptr;
  int64_t num_items_ = 0;
  std::atomic<int64_t> next_item_{0};
  std::vector<std::thread> workers_;
};

}  // namespace tokenlake::attention

#endif  // TOKENLAKE_ATTENTION_THREAD_POOL_H_
