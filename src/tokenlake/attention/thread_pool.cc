#include "tokenlake/attention/thread_pool.h"

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::attention {

absl::StatusOr<std::unique_ptr<ThreadPool>> ThreadPool::Create(const Options& options) {
  if (options.num_threads < 1 || options.num_threads > 1024) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ThreadPool::Options::num_threads must be in [1, 1024], got %d", options.num_threads));
  }
  return std::unique_ptr<ThreadPool>(new ThreadPool(options.num_threads));
}

ThreadPool::ThreadPool(int num_threads) {
  workers_.reserve(num_threads - 1);
  for (int i = 0; i + 1 < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunItems() {
  const absl::FunctionRef<void(int64_t)>& body = *body_;
  for (;;) {
    const int64_t i = next_item_.fetch_add(1, std::memory_order_relaxed);
    if (i >= num_items_) return;
    body(i);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen_generation = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen_generation; });
      if (stop_) return;
      seen_generation = generation_;
      // The loop may already be over (the caller ran every item before this worker woke).
      if (body_ == nullptr) continue;
      ++active_workers_;
    }
    RunItems();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --active_workers_;
    }
    done_cv_.notify_one();
  }
}

void ThreadPool::ParallelFor(int64_t num_items, absl::FunctionRef<void(int64_t)> body) {
  if (num_items <= 0) return;
  if (workers_.empty() || num_items == 1) {
    for (int64_t i = 0; i < num_items; ++i) body(i);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    TOKENLAKE_CHECK(body_ == nullptr, "ThreadPool::ParallelFor called from inside a loop body");
    body_ = &body;
    num_items_ = num_items;
    next_item_.store(0, std::memory_order_relaxed);
    ++generation_;
  }
  work_cv_.notify_all();
  RunItems();
  // Every worker that woke for this generation has incremented active_workers_ under mu_ before
  // claiming items; a worker that wakes late finds no items left. Wait until the claimed items are
  // done, and keep body_ valid until no worker can still read it.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return active_workers_ == 0; });
  body_ = nullptr;
}

}  // namespace tokenlake::attention
