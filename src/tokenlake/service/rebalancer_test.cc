// Rebalancing (rebalancer.h) on a real lake with a heavy hitter: the lake's replicate actions
// become one order per receiving instance, only between routable instances, each recorded as an
// unconfirmed copy that plans read from its source; nothing is sent to an instance that is not
// routable, and copies the lake placed there are taken back.
#include "tokenlake/service/rebalancer.h"

#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/guarded_lake.h"

namespace tokenlake::service {
namespace {

constexpr int32_t kS = 16;

class RebalancerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lake::LakeOptions o;
    o.num_instances = 4;
    o.segment_tokens = kS;
    o.slots_per_instance = 64;
    o.model = plan::ModelShape{1, 32, 8, 128, 2};
    o.heavy_hitter.num_instances = 4;
    o.heavy_hitter.half_life_us = 1'000'000;
    o.heavy_hitter.min_heavy_load = 0;
    auto lk = lake::Lake::Create(o, &lake_.clock);
    ASSERT_TRUE(lk.ok()) << lk.status();
    absl::MutexLock lock(&lake_.mu);
    lake_.lake = std::move(*lk);
    // Every request shares segment 1 (a system prompt) and has a private one: 1 gets hot.
    for (uint64_t i = 0; i < 40; ++i) {
      lake::LakeRequest r{.id = RequestId(i + 1),
                          .keys = {{SegmentId(1), kS}, {SegmentId(1000 + i), kS}},
                          .new_tokens = 8};
      auto plans = lake_.lake->GenPlans({lake::Batch{{r}, 1}});
      ASSERT_TRUE(plans.ok());
      ASSERT_TRUE(lake_.lake->Admit(r).ok());
      ASSERT_TRUE(lake_.lake->Commit(r.id, (*plans)[0].transfer.new_segments).ok());
      ASSERT_TRUE(lake_.lake->Release(r.id).ok());
      lake_.clock.AdvanceUs(10'000);
    }
    ASSERT_TRUE(lake_.lake->IsHeavyHitter(SegmentId(1)));
  }
  // Registers `ids` with data ports (routable).
  void MakeRoutable(const std::vector<int32_t>& ids) {
    for (int32_t i : ids) {
      ASSERT_TRUE(membership_.Register(absl::StrCat("i", i), i, 5000 + i, absl::Now()).ok());
      v1::InstanceState s;
      s.set_data_port(6000 + i);
      membership_.Report(i, s);
    }
  }
  std::vector<int32_t> HoldersOf(uint64_t segment) {
    absl::MutexLock lock(&lake_.mu);
    std::vector<int32_t> out;
    const index::PrefixTree::Node* node = lake_.lake->prefix_tree().Find(SegmentId(segment));
    if (node != nullptr) {
      for (InstanceId r : node->replicas) out.push_back(r.value());
    }
    return out;
  }
  GuardedLake lake_;
  Membership membership_{4, absl::Seconds(1)};
  Reconciler reconciler_{&lake_, {.num_instances = 4, .started = absl::Now()}};
  std::map<int32_t, v1::RebalanceOrder> sent_;
};

TEST_F(RebalancerTest, ReplicasOfAHeavyHitterAreOrderedFromTheirReceivers) {
  MakeRoutable({0, 1, 2, 3});
  const std::vector<int32_t> before = HoldersOf(1);
  ASSERT_EQ(before.size(), 1u);
  Rebalancer r({.interval = absl::ZeroDuration()}, &lake_, &membership_, &reconciler_,
               [this](int32_t to, const v1::RebalanceOrder& o) { sent_[to] = o; });
  absl::StatusOr<int64_t> n = r.RebalanceNow();
  ASSERT_TRUE(n.ok()) << n.status();
  ASSERT_GT(*n, 0);
  int replicate_orders = 0;
  for (const auto& [to, order] : sent_) {
    for (const v1::RebalanceAction& a : order.actions()) {
      EXPECT_EQ(a.to(), to);
      EXPECT_NE(a.from(), to);
      if (a.kind() == v1::REBALANCE_KIND_REPLICATE && a.segment() == 1) {
        ++replicate_orders;
        EXPECT_EQ(a.from(), before[0]);
      }
    }
  }
  EXPECT_GE(replicate_orders, 2);
  EXPECT_EQ(r.actions(), *n);  // every action counted (orders and drops)
  // Until a receiver reports its copy, a plan that reads segment 1 there reads the source.
  const int32_t receiver = sent_.begin()->first;
  lake::IterationPlan plan;
  plan.segments.push_back(
      {.segment = SegmentId(1), .num_tokens = kS, .holder = InstanceId(receiver)});
  EXPECT_EQ(reconciler_.RedirectUnconfirmed(&plan, membership_.RoutableSet()), 1);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(before[0]));
}

TEST_F(RebalancerTest, NothingIsSentToInstancesThatAreNotRoutable) {
  // Only the holder is routable: every copy the lake wants elsewhere is taken back.
  const std::vector<int32_t> before = HoldersOf(1);
  ASSERT_EQ(before.size(), 1u);
  MakeRoutable({before[0]});
  Rebalancer r({.interval = absl::ZeroDuration()}, &lake_, &membership_, &reconciler_,
               [this](int32_t to, const v1::RebalanceOrder& o) { sent_[to] = o; });
  ASSERT_TRUE(r.RebalanceNow().ok());
  EXPECT_TRUE(sent_.empty());
  EXPECT_EQ(HoldersOf(1), before);
}

}  // namespace
}  // namespace tokenlake::service
