#include "tokenlake/balance/heavy_hitter.h"

#include <cmath>
#include <iostream>
#include <map>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random.h"

namespace tokenlake::balance {
namespace {

HeavyHitterOptions Opts(int32_t instances) {
  HeavyHitterOptions o;
  o.num_instances = instances;
  o.half_life_us = 1'000'000;
  o.min_heavy_load = 0;
  return o;
}

TEST(HeavyHitterTrackerTest, RejectsInvalidOptionsWithFieldName) {
  ManualClock clock;
  HeavyHitterOptions o = Opts(4);
  o.half_life_us = 0;
  auto r = HeavyHitterTracker::Create(o, &clock);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("half_life_us"), std::string::npos);
  o = Opts(0);
  r = HeavyHitterTracker::Create(o, &clock);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("num_instances"), std::string::npos);
  o = Opts(2);
  o.track_fraction = 0.9;  // above heavy_fraction
  EXPECT_FALSE(HeavyHitterTracker::Create(o, &clock).ok());
  EXPECT_FALSE(HeavyHitterTracker::Create(Opts(2), nullptr).ok());
}

TEST(HeavyHitterTrackerTest, LoadHalvesEveryHalfLife) {
  ManualClock clock;
  auto t = *HeavyHitterTracker::Create(Opts(2), &clock);
  t->Record(SegmentId(1), 800);
  EXPECT_DOUBLE_EQ(t->Load(SegmentId(1)), 800);
  clock.AdvanceUs(1'000'000);
  EXPECT_NEAR(t->Load(SegmentId(1)), 400, 1e-9);
  clock.AdvanceUs(2'000'000);
  EXPECT_NEAR(t->Load(SegmentId(1)), 100, 1e-9);
  t->Record(SegmentId(1), 50);
  EXPECT_NEAR(t->Load(SegmentId(1)), 150, 1e-9);
  EXPECT_NEAR(t->TotalLoad(), 150, 1e-9);
  EXPECT_EQ(t->Load(SegmentId(99)), 0);
}

TEST(HeavyHitterTrackerTest, IgnoresNegativeAndNonFiniteLoads) {
  ManualClock clock;
  auto t = *HeavyHitterTracker::Create(Opts(2), &clock);
  t->Record(SegmentId(1), -5);
  t->Record(SegmentId(1), std::nan(""));
  t->Record(SegmentId(1), INFINITY);
  EXPECT_EQ(t->TotalLoad(), 0);
  EXPECT_EQ(t->tracked_segments(), 0u);
}

TEST(HeavyHitterTrackerTest, SegmentAboveFractionOfFairShareIsHeavy) {
  ManualClock clock;
  auto t = *HeavyHitterTracker::Create(Opts(4), &clock);  // heavy_fraction 0.5
  // Total 1000, fair share 250, heavy threshold 125.
  t->Record(SegmentId(1), 600);
  t->Record(SegmentId(2), 126);
  t->Record(SegmentId(3), 124);
  t->Record(SegmentId(4), 150);
  EXPECT_TRUE(t->IsHeavy(SegmentId(1)));
  EXPECT_TRUE(t->IsHeavy(SegmentId(2)));
  EXPECT_FALSE(t->IsHeavy(SegmentId(3)));
  // Desired replicas: ceil(load / (0.5 * 250)): 600/125 = 4.8 -> 5, capped at 4 instances.
  EXPECT_EQ(t->DesiredReplicas(SegmentId(1), 4), 4);
  EXPECT_EQ(t->DesiredReplicas(SegmentId(1), 3), 3);
  EXPECT_EQ(t->DesiredReplicas(SegmentId(2), 4), 2);  // 126/125 -> 2
  EXPECT_EQ(t->DesiredReplicas(SegmentId(3), 4), 1);
  auto heavy = t->HeavyHitters();
  ASSERT_EQ(heavy.size(), 3u);
  EXPECT_EQ(heavy[0].segment, SegmentId(1));
  EXPECT_EQ(heavy[1].segment, SegmentId(4));
  EXPECT_EQ(heavy[2].segment, SegmentId(2));
}

TEST(HeavyHitterTrackerTest, MinHeavyLoadKeepsAnIdlePoolFromReplicating) {
  ManualClock clock;
  HeavyHitterOptions o = Opts(4);
  o.min_heavy_load = 1000;
  auto t = *HeavyHitterTracker::Create(o, &clock);
  t->Record(SegmentId(1), 999);
  EXPECT_FALSE(t->IsHeavy(SegmentId(1)));
  EXPECT_EQ(t->DesiredReplicas(SegmentId(1), 4), 1);
  t->Record(SegmentId(1), 1);
  EXPECT_TRUE(t->IsHeavy(SegmentId(1)));
}

TEST(HeavyHitterTrackerTest, CooledSegmentStopsBeingHeavyWhenOthersAreUsed) {
  ManualClock clock;
  auto t = *HeavyHitterTracker::Create(Opts(2), &clock);
  t->Record(SegmentId(1), 1000);
  EXPECT_TRUE(t->IsHeavy(SegmentId(1)));
  for (int step = 0; step < 20; ++step) {
    clock.AdvanceUs(500'000);
    for (uint64_t s = 10; s < 30; ++s) t->Record(SegmentId(s), 100);
  }
  EXPECT_FALSE(t->IsHeavy(SegmentId(1)));
  EXPECT_EQ(t->DesiredReplicas(SegmentId(1), 2), 1);
  for (const SegmentLoad& w : t->CollectWarm()) EXPECT_NE(w.segment, SegmentId(1));
}

TEST(HeavyHitterTrackerTest, ForgetRemovesTheCounter) {
  ManualClock clock;
  auto t = *HeavyHitterTracker::Create(Opts(2), &clock);
  t->Record(SegmentId(1), 10);
  t->Forget(SegmentId(1));
  EXPECT_EQ(t->Load(SegmentId(1)), 0);
  EXPECT_TRUE(t->CollectWarm().empty());
  t->Forget(SegmentId(2));  // unknown: no-op
}

// Randomised test against a naive model that keeps every (time, load) event and recomputes the
// decayed sums from scratch.
class HeavyHitterModelTest : public ::testing::TestWithParam<int> {};

TEST_P(HeavyHitterModelTest, MatchesNaiveDecayedSums) {
  const int num_segments = GetParam();
  const uint64_t seed = 1234 + num_segments;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  ManualClock clock;
  HeavyHitterOptions o = Opts(4);
  o.half_life_us = 200'000;
  auto t = *HeavyHitterTracker::Create(o, &clock);
  std::map<uint64_t, std::vector<std::pair<int64_t, double>>> events;
  auto naive = [&](uint64_t s) {
    double sum = 0;
    for (auto [at, load] : events[s]) {
      sum += load * std::exp2(-static_cast<double>(clock.NowUs() - at) / o.half_life_us);
    }
    return sum;
  };
  for (int step = 0; step < 400; ++step) {
    clock.AdvanceUs(rng.UniformInt(0, 50'000));
    // Skewed: segment 0 gets most of the load.
    const uint64_t s = rng.Bernoulli(0.3) ? 0 : rng.UniformInt(0, num_segments - 1);
    const double load = static_cast<double>(rng.UniformInt(1, 1000));
    t->Record(SegmentId(s), load);
    events[s].push_back({clock.NowUs(), load});
    double total = 0;
    for (auto& [seg, _] : events) {
      const double expect = naive(seg);
      total += expect;
      ASSERT_NEAR(t->Load(SegmentId(seg)), expect, 1e-6 * (1 + expect)) << "step " << step;
    }
    ASSERT_NEAR(t->TotalLoad(), total, 1e-6 * (1 + total));
    const double fair = total / o.num_instances;
    for (auto& [seg, _] : events) {
      const double l = naive(seg);
      const bool heavy = l > o.heavy_fraction * fair;
      if (std::abs(l - o.heavy_fraction * fair) > 1e-6 * (1 + l)) {
        ASSERT_EQ(t->IsHeavy(SegmentId(seg)), heavy) << "segment " << seg;
        const int32_t want =
            heavy ? std::min<int32_t>(4, static_cast<int32_t>(std::ceil(
                                             l / (o.replica_target_fraction * fair) - 1e-9)))
                  : 1;
        ASSERT_EQ(t->DesiredReplicas(SegmentId(seg), 4), std::max(1, want));
      }
    }
    // Every heavy hitter appears in the warm list (it can only become heavy on its own Record).
    auto warm = t->CollectWarm();
    for (auto& [seg, _] : events) {
      if (t->IsHeavy(SegmentId(seg))) {
        bool found = false;
        for (auto& w : warm) found |= w.segment == SegmentId(seg);
        ASSERT_TRUE(found) << "heavy segment " << seg << " missing from warm set";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, HeavyHitterModelTest, ::testing::Values(1, 5, 40));

}  // namespace
}  // namespace tokenlake::balance

namespace tokenlake::balance {
namespace {

TEST(DecayingCounterTest, DecaysAndNeverGoesNegative) {
  DecayingCounter c(100);
  c.Add(64, 0);
  EXPECT_DOUBLE_EQ(c.Value(0), 64);
  EXPECT_NEAR(c.Value(200), 16, 1e-12);
  c.Add(-10, 200);
  EXPECT_NEAR(c.Value(200), 6, 1e-12);
  c.Add(-100, 300);
  EXPECT_EQ(c.Value(300), 0);
}

}  // namespace
}  // namespace tokenlake::balance
