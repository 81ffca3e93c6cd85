#include "tokenlake/sim/links.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::sim {
namespace {

TEST(LinkClockTest, CopiesSerialisePerLinkByHand) {
  LinkClock links(4);
  // 0 -> 1 at t = 0 for 2 s: both links idle, 0 to 2.
  EXPECT_DOUBLE_EQ(links.Copy(0, 1, 0, 2), 2);
  // 0 -> 2 at t = 1 for 1 s: link 0 is busy until 2: 2 to 3.
  EXPECT_DOUBLE_EQ(links.Copy(0, 2, 1, 1), 3);
  // 3 -> 1 at t = 0.5 for 1 s: link 1 busy until 2: 2 to 3.
  EXPECT_DOUBLE_EQ(links.Copy(3, 1, 0.5, 1), 3);
  // 2 -> 3 at t = 0 (issued later, so after both): links 2 and 3 free at 3: 3 to 3.5.
  EXPECT_DOUBLE_EQ(links.Copy(2, 3, 0, 0.5), 3.5);
  // Issued after every link is free: starts at once.
  EXPECT_DOUBLE_EQ(links.Copy(1, 0, 10, 0.25), 10.25);
  EXPECT_DOUBLE_EQ(links.free_at(0), 10.25);
  EXPECT_DOUBLE_EQ(links.free_at(2), 3.5);
}

// The naive model: every copy issued so far, with its interval; a new copy starts when every
// earlier copy touching one of its instances has ended (and not before it is issued).
TEST(LinkClockTest, MatchesTheHistoryOfCopiesOnRandomSequences) {
  const uint32_t seed = std::random_device{}();
  std::printf("LinkClockTest seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 200; ++round) {
    SCOPED_TRACE(testing::Message() << "seed " << seed << " round " << round);
    const int n = std::uniform_int_distribution<int>(2, 6)(rng);
    LinkClock links(n);
    struct Past {
      int a, b;
      double end;
    };
    std::vector<Past> history;
    double now = 0;
    for (int k = 0; k < 40; ++k) {
      now += std::uniform_real_distribution<double>(0, 1)(rng);
      const int src = std::uniform_int_distribution<int>(0, n - 1)(rng);
      int dst = std::uniform_int_distribution<int>(0, n - 2)(rng);
      if (dst >= src) ++dst;
      const double seconds = std::uniform_real_distribution<double>(0, 2)(rng);
      double start = now;
      for (const Past& p : history) {
        if (p.a == src || p.b == src || p.a == dst || p.b == dst) start = std::max(start, p.end);
      }
      history.push_back({src, dst, start + seconds});
      ASSERT_DOUBLE_EQ(links.Copy(src, dst, now, seconds), start + seconds);
    }
    for (int i = 0; i < n; ++i) {
      double free = 0;
      for (const Past& p : history) {
        if (p.a == i || p.b == i) free = std::max(free, p.end);
      }
      EXPECT_DOUBLE_EQ(links.free_at(i), free);
    }
  }
}

}  // namespace
}  // namespace tokenlake::sim
