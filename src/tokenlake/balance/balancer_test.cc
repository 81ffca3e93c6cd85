#include "tokenlake/balance/balancer.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <set>

#include "gtest/gtest.h"
#include "tokenlake/base/random.h"

namespace tokenlake::balance {
namespace {

InstanceState Inst(int id, int64_t cap, int64_t used, double load) {
  return InstanceState{InstanceId(id), cap, used, load};
}

std::unique_ptr<Balancer> Make(BalancerOptions o = {}) { return *Balancer::Create(o); }

TEST(BalancerTest, RejectsInvalidOptions) {
  BalancerOptions o;
  o.max_actions = 0;
  auto r = Balancer::Create(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("max_actions"), std::string::npos);
  o = {};
  o.memory_slack = -1;
  EXPECT_FALSE(Balancer::Create(o).ok());
}

TEST(BalancerTest, NewSegmentLandsOnProducerWhenItHasRoom) {
  auto b = Make();
  std::vector<InstanceState> s = {Inst(0, 10, 3, 1.0), Inst(1, 10, 2, 1.0), Inst(2, 10, 4, 1.0)};
  EXPECT_EQ(**b->PlaceNewSegment(InstanceId(2), s), InstanceId(2));
}

TEST(BalancerTest, NewSegmentLeavesAFullProducer) {
  auto b = Make();
  std::vector<InstanceState> s = {Inst(0, 10, 10, 0), Inst(1, 10, 7, 0), Inst(2, 10, 5, 0)};
  EXPECT_EQ(**b->PlaceNewSegment(InstanceId(0), s), InstanceId(2));
}

TEST(BalancerTest, NewSegmentLeavesAProducerFarAboveMeanMemory) {
  auto b = Make();  // memory_slack 0.1
  // Mean utilisation 0.4; producer at 0.9 > 0.5.
  std::vector<InstanceState> s = {Inst(0, 10, 9, 0), Inst(1, 10, 1, 0), Inst(2, 10, 2, 0)};
  EXPECT_EQ(**b->PlaceNewSegment(InstanceId(0), s), InstanceId(1));
  // Below the high watermark (0.9) memory imbalance alone never moves it: 0.8 vs mean 0.33.
  s = {Inst(0, 10, 8, 0), Inst(1, 10, 1, 0), Inst(2, 10, 1, 0)};
  EXPECT_EQ(**b->PlaceNewSegment(InstanceId(0), s), InstanceId(0));
  // Above the watermark but within the slack of the mean it stays: 0.9 vs mean 0.9.
  s = {Inst(0, 10, 9, 0), Inst(1, 10, 9, 0), Inst(2, 10, 9, 0)};
  EXPECT_EQ(**b->PlaceNewSegment(InstanceId(0), s), InstanceId(0));
}

TEST(BalancerTest, PrefersProducerIgnoresFullnessButKeepsTheMemoryAndLoadRules) {
  auto b = Make();  // watermark 0.9, memory slack 0.1, load slack 0.5
  // A full pool with even memory: a full producer is still preferred (the Lake evicts there).
  std::vector<InstanceState> s = {Inst(0, 10, 10, 1), Inst(1, 10, 10, 1), Inst(2, 10, 10, 1)};
  EXPECT_TRUE(b->PrefersProducer(InstanceId(0), s));
  // Full producer while the mean utilisation is (10 + 5 + 5) / 30 = 0.67: 1.0 > 0.77.
  s = {Inst(0, 10, 10, 1), Inst(1, 10, 5, 1), Inst(2, 10, 5, 1)};
  EXPECT_FALSE(b->PrefersProducer(InstanceId(0), s));
  // Load 100 against a mean of 40: above 1.5 x mean.
  s = {Inst(0, 10, 10, 100), Inst(1, 10, 10, 10), Inst(2, 10, 10, 10)};
  EXPECT_FALSE(b->PrefersProducer(InstanceId(0), s));
  EXPECT_TRUE(b->PrefersProducer(InstanceId(1), s));
  // Not in the pool, or an inconsistent state: false.
  EXPECT_FALSE(b->PrefersProducer(InstanceId(7), s));
  s = {Inst(0, 10, 11, 0)};
  EXPECT_FALSE(b->PrefersProducer(InstanceId(0), s));
}

TEST(BalancerTest, NewSegmentLeavesAProducerWithTooMuchCacheLoad) {
  auto b = Make();  // load_slack 0.5
  std::vector<InstanceState> s = {Inst(0, 10, 3, 100), Inst(1, 10, 3, 10), Inst(2, 10, 3, 10)};
  // mean 40; 100 > 60.
  auto placed = **b->PlaceNewSegment(InstanceId(0), s);
  EXPECT_NE(placed, InstanceId(0));
}

TEST(BalancerTest, FullPoolReturnsNoPlacementAndUnknownProducerIsAnError) {
  auto b = Make();
  std::vector<InstanceState> s = {Inst(0, 2, 2, 0), Inst(1, 2, 2, 0)};
  auto r = b->PlaceNewSegment(InstanceId(0), s);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  auto bad = b->PlaceNewSegment(InstanceId(7), s);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("7"), std::string::npos);
  s[0].used_slots = 3;
  EXPECT_FALSE(b->PlaceNewSegment(InstanceId(1), s).ok());
}

TEST(BalancerTest, HeavyHitterIsReplicatedOntoLeastLoadedInstances) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 5, 90), Inst(1, 10, 5, 5), Inst(2, 10, 5, 1),
                                     Inst(3, 10, 10, 0)};
  std::vector<SegmentState> segs = {{SegmentId(7), 90, 3, {InstanceId(0)}, false}};
  auto actions = b->Rebalance(segs, inst);
  ASSERT_GE(actions.size(), 2u);
  EXPECT_EQ(actions[0],
            (BalanceAction{ActionKind::kReplicate, SegmentId(7), InstanceId(0), InstanceId(2)}));
  EXPECT_EQ(actions[1].kind, ActionKind::kReplicate);
  EXPECT_EQ(actions[1].to, InstanceId(1));  // instance 3 is full
}

TEST(BalancerTest, CooledHeavyHitterLosesExtraReplicasFromMostLoadedHolderFirst) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 5, 10), Inst(1, 10, 5, 30), Inst(2, 10, 5, 20)};
  std::vector<SegmentState> segs = {
      {SegmentId(7), 3, 1, {InstanceId(0), InstanceId(1), InstanceId(2)}, false}};
  auto actions = b->Rebalance(segs, inst);
  ASSERT_GE(actions.size(), 2u);
  EXPECT_EQ(actions[0], (BalanceAction{ActionKind::kDrop, SegmentId(7), InstanceId(1), {}}));
  EXPECT_EQ(actions[1], (BalanceAction{ActionKind::kDrop, SegmentId(7), InstanceId(2), {}}));
}

TEST(BalancerTest, PinnedSegmentsAreNeitherDroppedNorMovedButReplicatedToFixImbalance) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 5, 100), Inst(1, 10, 5, 0)};
  // Segment 1 has an extra replica (2 > desired 1) but is pinned: not dropped. Segment 2 loads
  // instance 0 alone and is pinned: it cannot move, so a replica on instance 1 takes half of
  // its load (100 / 2), which balances the pool.
  std::vector<SegmentState> segs = {{SegmentId(1), 50, 1, {InstanceId(0), InstanceId(1)}, true},
                                    {SegmentId(2), 100, 1, {InstanceId(0)}, true}};
  const auto actions = b->Rebalance(segs, inst);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0],
            (BalanceAction{ActionKind::kReplicate, SegmentId(2), InstanceId(0), InstanceId(1)}));
}

TEST(BalancerTest, ImbalanceIsFixedByMovingTheSegmentClosestToHalfTheGap) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 4, 100), Inst(1, 10, 4, 20), Inst(2, 10, 4, 30)};
  // Gap from 0 to 1 is 80; ideal share 40.
  std::vector<SegmentState> segs = {{SegmentId(1), 70, 1, {InstanceId(0)}, false},
                                    {SegmentId(2), 38, 1, {InstanceId(0)}, false},
                                    {SegmentId(3), 10, 1, {InstanceId(0)}, false}};
  auto actions = b->Rebalance(segs, inst);
  ASSERT_FALSE(actions.empty());
  EXPECT_EQ(actions[0],
            (BalanceAction{ActionKind::kMove, SegmentId(2), InstanceId(0), InstanceId(1)}));
}

TEST(BalancerTest, BalancedPoolNeedsNoAction) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 4, 50), Inst(1, 10, 4, 52), Inst(2, 10, 4, 48)};
  std::vector<SegmentState> segs = {{SegmentId(1), 20, 1, {InstanceId(0)}, false}};
  EXPECT_TRUE(b->Rebalance(segs, inst).empty());
}

TEST(BalancerTest, PicksTheCoolestExtraReplicaToEvict) {
  auto b = Make();
  std::vector<InstanceState> inst = {Inst(0, 10, 9, 0), Inst(1, 10, 5, 0)};
  std::vector<SegmentState> segs = {
      {SegmentId(1), 100, 1, {InstanceId(0), InstanceId(1)}, false},
      {SegmentId(2), 10, 1, {InstanceId(0), InstanceId(1)}, false},
      {SegmentId(3), 1, 1, {InstanceId(0), InstanceId(1)}, true},    // pinned
      {SegmentId(4), 1, 2, {InstanceId(0), InstanceId(1)}, false}};  // still wanted
  auto pick = b->PickExtraReplicaToEvict(segs, inst);
  ASSERT_TRUE(pick.has_value());
  EXPECT_EQ(*pick, (BalanceAction{ActionKind::kDrop, SegmentId(2), InstanceId(0), {}}));
  auto on1 = b->PickExtraReplicaToEvict(segs, inst, InstanceId(1));
  ASSERT_TRUE(on1.has_value());
  EXPECT_EQ(on1->from, InstanceId(1));
  segs.resize(1);
  segs[0].desired_replicas = 2;
  EXPECT_FALSE(b->PickExtraReplicaToEvict(segs, inst).has_value());
}

// Randomised: apply the actions to a naive model and check conservation after every action.
class BalancerModelTest : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(BalancerModelTest, ActionsKeepSlotsAndReplicasConsistent) {
  const auto [num_instances, num_segments] = GetParam();
  const uint64_t seed = 77 + num_instances * 1000 + num_segments;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  BalancerOptions o;
  o.max_actions = 8;
  auto b = Make(o);
  const int64_t cap = num_segments / num_instances + 3;
  std::map<int, std::set<int>> holders;  // segment -> instances
  std::vector<int64_t> used(num_instances, 0);
  std::vector<double> seg_load(num_segments, 0);
  for (int s = 0; s < num_segments; ++s) {
    int i = static_cast<int>(rng.UniformInt(0, num_instances - 1));
    while (used[i] >= cap) i = (i + 1) % num_instances;
    holders[s].insert(i);
    used[i]++;
  }
  for (int round = 0; round < 30; ++round) {
    for (int s = 0; s < num_segments; ++s) {
      seg_load[s] = rng.Bernoulli(0.1) ? rng.UniformDouble() * 100 : rng.UniformDouble();
    }
    std::vector<InstanceState> inst;
    std::vector<double> load(num_instances, 0);
    for (auto& [s, hs] : holders) {
      for (int h : hs) load[h] += seg_load[s] / hs.size();
    }
    for (int i = 0; i < num_instances; ++i) inst.push_back(Inst(i, cap, used[i], load[i]));
    std::vector<SegmentState> segs;
    std::set<int> pinned;
    for (auto& [s, hs] : holders) {
      SegmentState st;
      st.segment = SegmentId(s);
      st.load = seg_load[s];
      st.desired_replicas = static_cast<int32_t>(rng.UniformInt(1, num_instances));
      for (int h : hs) st.replicas.push_back(InstanceId(h));
      st.pinned = rng.Bernoulli(0.2);
      if (st.pinned) pinned.insert(s);
      segs.push_back(st);
    }
    auto actions = b->Rebalance(segs, inst);
    ASSERT_LE(static_cast<int>(actions.size()), o.max_actions);
    for (const BalanceAction& a : actions) {
      auto& hs = holders[static_cast<int>(a.segment.value())];
      ASSERT_TRUE(hs.count(a.from.value())) << ToString(a);
      switch (a.kind) {
        case ActionKind::kDrop:
          ASSERT_FALSE(pinned.count(static_cast<int>(a.segment.value()))) << ToString(a);
          ASSERT_GE(hs.size(), 2u) << "dropping the last replica: " << ToString(a);
          hs.erase(a.from.value());
          used[a.from.value()]--;
          break;
        case ActionKind::kReplicate:
          ASSERT_FALSE(hs.count(a.to.value())) << ToString(a);
          hs.insert(a.to.value());
          used[a.to.value()]++;
          break;
        case ActionKind::kMove:
          ASSERT_FALSE(pinned.count(static_cast<int>(a.segment.value()))) << ToString(a);
          ASSERT_FALSE(hs.count(a.to.value())) << ToString(a);
          hs.erase(a.from.value());
          hs.insert(a.to.value());
          used[a.from.value()]--;
          used[a.to.value()]++;
          break;
      }
      // Conservation: used within capacity, sum of used = total replicas, replicas <= instances.
      int64_t total = 0;
      for (auto& [s, h] : holders) {
        ASSERT_GE(h.size(), 1u);
        ASSERT_LE(static_cast<int>(h.size()), num_instances);
        total += h.size();
      }
      int64_t sum_used = 0;
      for (int i = 0; i < num_instances; ++i) {
        ASSERT_GE(used[i], 0);
        ASSERT_LE(used[i], cap) << "instance " << i << " over capacity after " << ToString(a);
        sum_used += used[i];
      }
      ASSERT_EQ(total, sum_used);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, BalancerModelTest,
                         ::testing::Values(std::make_pair(1, 5), std::make_pair(3, 20),
                                           std::make_pair(8, 100)));

}  // namespace
}  // namespace tokenlake::balance
