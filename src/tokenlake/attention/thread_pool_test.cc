#include "tokenlake/attention/thread_pool.h"

#include <atomic>
#include <iostream>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/random.h"

namespace tokenlake::attention {
namespace {

TEST(ThreadPoolTest, RejectsOutOfRangeThreadCounts) {
  EXPECT_EQ(ThreadPool::Create({.num_threads = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ThreadPool::Create({.num_threads = 5000}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class ThreadPoolSizeTest : public ::testing::TestWithParam<int> {};

TEST_P(ThreadPoolSizeTest, EveryItemRunsExactlyOnceOverManyLoops) {
  const int threads = GetParam();
  auto pool = std::move(ThreadPool::Create({.num_threads = threads})).value();
  EXPECT_EQ(pool->num_threads(), threads);
  const uint64_t seed = 17 + static_cast<uint64_t>(threads);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  for (int loop = 0; loop < 200; ++loop) {
    const int64_t n = rng.UniformInt(0, 300);
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    pool->ParallelFor(n, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << "loop " << loop << " item " << i;
    }
  }
}

TEST_P(ThreadPoolSizeTest, ConcurrentCallersAreSerialisedAndComplete) {
  auto pool = std::move(ThreadPool::Create({.num_threads = GetParam()})).value();
  std::atomic<int64_t> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c) {
    callers.emplace_back([&] {
      for (int loop = 0; loop < 50; ++loop) {
        pool->ParallelFor(100, [&](int64_t i) { sum.fetch_add(i); });
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum.load(), 3 * 50 * (99 * 100 / 2));
}

INSTANTIATE_TEST_SUITE_P(Sizes, ThreadPoolSizeTest, ::testing::Values(1, 2, 4));

}  // namespace
}  // namespace tokenlake::attention
