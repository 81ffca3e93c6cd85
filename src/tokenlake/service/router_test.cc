// Routing decisions (router.h): the plan's instance unless it is not a candidate or too busy,
// else the least busy candidate; the elastic scheduler's decode placement over the instances'
// reported and routed loads, with a hand-computable cost model; and Router over a real lake and
// membership.
#include "tokenlake/service/router.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/sched/elastic_scheduler.h"

namespace tokenlake::service {
namespace {

using Load = Membership::Load;

TEST(ChooseComputeInstanceTest, FollowsThePlanWhileItsInstanceIsNotTooBusy) {
  const std::vector<Load> c = {{.id = 0, .in_flight = 1}, {.id = 2, .in_flight = 3}};
  absl::StatusOr<RouteChoice> r = ChooseComputeInstance(c, 2, /*balance_abs_threshold=*/2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->instance, 2);
  EXPECT_FALSE(r->overridden);
  // 4 in flight against a minimum of 1: more than 2 above it.
  const std::vector<Load> busier = {{.id = 0, .in_flight = 1}, {.id = 2, .in_flight = 4}};
  r = ChooseComputeInstance(busier, 2, 2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->instance, 0);
  EXPECT_TRUE(r->overridden);
}

TEST(ChooseComputeInstanceTest, APlanOutsideTheCandidatesGoesToTheLeastBusy) {
  // Fewest in flight first, then fewest routed, then the lowest id.
  const std::vector<Load> c = {{.id = 0, .in_flight = 2, .routed = 1},
                               {.id = 1, .in_flight = 1, .routed = 9},
                               {.id = 3, .in_flight = 1, .routed = 4},
                               {.id = 4, .in_flight = 1, .routed = 4}};
  for (int32_t planned : {-1, 2, 7}) {
    absl::StatusOr<RouteChoice> r = ChooseComputeInstance(c, planned, 2, 1);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->instance, 3) << "planned " << planned;
    EXPECT_TRUE(r->overridden);
  }
}

TEST(ChooseComputeInstanceTest, NoCandidateIsUnavailableNamingTheExcluded) {
  absl::StatusOr<RouteChoice> r = ChooseComputeInstance({}, 0, 2, 3);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("3 excluded"), std::string::npos) << r.status();
}

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lake::LakeOptions o;
    o.num_instances = 2;
    o.segment_tokens = 4;
    o.slots_per_instance = 64;
    o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
    o.heavy_hitter.num_instances = 2;
    auto lk = lake::Lake::Create(o, &lake_.clock);
    ASSERT_TRUE(lk.ok()) << lk.status();
    absl::MutexLock lock(&lake_.mu);
    lake_.lake = std::move(*lk);
  }
  // Registers instances 0 and 1 with data ports and sends both the peers: both ready.
  void MakeReady() {
    for (int32_t i = 0; i < 2; ++i) {
      ASSERT_TRUE(membership_.Register(absl::StrCat("i", i), i, 5000 + i, absl::Now()).ok());
      v1::InstanceState s;
      s.set_data_port(6000 + i);
      membership_.Report(i, s);
    }
    google::protobuf::RepeatedPtrField<v1::Peer> peers;
    membership_.AddPeers(0, &peers);
    membership_.AddPeers(1, &peers);
    ASSERT_EQ(membership_.ReadyCount(), 2);
  }
  std::vector<index::SegmentKey> Keys(int32_t segments) {
    std::vector<int32_t> tokens;
    for (int32_t t = 0; t < segments * 4; ++t) tokens.push_back(t);
    auto keys = index::ComputeSegmentKeys(1, tokens, 4);
    EXPECT_TRUE(keys.ok());
    return *keys;
  }
  GuardedLake lake_;
  Membership membership_{2, absl::Seconds(1)};
};

TEST_F(RouterTest, NoReadyInstanceIsUnavailable) {
  Router router({.num_instances = 2}, &lake_, &membership_);
  EXPECT_EQ(router.Route(Keys(2), 9, {}, RequestId(1)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(RouterTest, RotationVisitsEveryReadyInstanceInTurn) {
  MakeReady();
  Router router({.num_instances = 2, .rotate = true}, &lake_, &membership_);
  // (rotation counts as its own decision)
  std::vector<int32_t> got;
  for (int i = 0; i < 4; ++i) got.push_back(*router.Route(Keys(2), 9, {}, RequestId(i + 1)));
  EXPECT_EQ(got, (std::vector<int32_t>{0, 1, 0, 1}));
  EXPECT_EQ(*router.Route(Keys(2), 9, {1}, RequestId(9)), 0);  // excluded never chosen
}

TEST_F(RouterTest, PlansOnTheLakeAndNeverPicksAnExcludedInstance) {
  MakeReady();
  Router router({.num_instances = 2}, &lake_, &membership_);
  absl::StatusOr<int32_t> a = router.Route(Keys(2), 9, {}, RequestId(1));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(*a == 0 || *a == 1);
  absl::StatusOr<int32_t> b = router.Route(Keys(2), 9, {*a}, RequestId(2));
  ASSERT_TRUE(b.ok());
  EXPECT_NE(*b, *a);
  EXPECT_EQ(router.Route(Keys(2), 9, {0, 1}, RequestId(3)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(RouterTest, ThePlanRuleCountsItsDecisions) {
  MakeReady();
  Router router({.num_instances = 2, .rule = RoutingRule::kPlan}, &lake_, &membership_);
  ASSERT_TRUE(router.Route(Keys(2), 9, {}, RequestId(1)).ok());
  EXPECT_EQ(router.decisions()[Router::kByPlan], 1);
  EXPECT_EQ(router.decisions()[Router::kByScheduler], 0);
  // The scheduler rule without a cost model is the plan rule too.
  Router no_cost({.num_instances = 2}, &lake_, &membership_);
  ASSERT_TRUE(no_cost.Route(Keys(2), 9, {}, RequestId(2)).ok());
  EXPECT_EQ(no_cost.decisions()[Router::kByPlan], 1);
}

TEST(RoutingRuleTest, ParsesItsNamesAndRefusesOthers) {
  EXPECT_EQ(*ParseRoutingRule("scheduler"), RoutingRule::kScheduler);
  EXPECT_EQ(*ParseRoutingRule("plan"), RoutingRule::kPlan);
  EXPECT_STREQ(RoutingRuleName(RoutingRule::kPlan), "plan");
  absl::StatusOr<RoutingRule> bad = ParseRoutingRule("lake");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'lake'"), std::string::npos) << bad.status();
}

// Iteration times that are easy to add up by hand: 1 ms per token of dense work, 1 us per
// context token a query attends to.
class HandCost final : public sched::BatchCostModel {
 public:
  double DenseSeconds(int64_t tokens) const override { return 1e-3 * static_cast<double>(tokens); }
  double AttentionSeconds(int64_t new_tokens, int64_t context_tokens) const override {
    return 1e-6 * static_cast<double>(new_tokens * context_tokens);
  }
  double ParallelSeconds(int64_t, int32_t) const override { return 0; }
};

// Three ready instances whose loads the tests report, a router under the scheduler rule.
class SchedulerRouterTest : public ::testing::Test {
 protected:
  static constexpr int32_t kInstances = 3;
  void SetUp() override {
    lake::LakeOptions o;
    o.num_instances = kInstances;
    o.segment_tokens = 4;
    o.slots_per_instance = 64;
    o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
    o.heavy_hitter.num_instances = kInstances;
    auto lk = lake::Lake::Create(o, &lake_.clock);
    ASSERT_TRUE(lk.ok()) << lk.status();
    {
      absl::MutexLock lock(&lake_.mu);
      lake_.lake = std::move(*lk);
    }
    for (int32_t i = 0; i < kInstances; ++i) {
      ASSERT_TRUE(membership_.Register(absl::StrCat("i", i), i, 5000 + i, absl::Now()).ok());
      v1::InstanceState s;
      s.set_data_port(6000 + i);
      membership_.Report(i, s);
    }
    google::protobuf::RepeatedPtrField<v1::Peer> peers;
    for (int32_t i = 0; i < kInstances; ++i) membership_.AddPeers(i, &peers);
    ASSERT_EQ(membership_.ReadyCount(), kInstances);
  }
  // Instance `id` reports snapshot `number`: `decodes` decoding requests over `context` tokens,
  // listing `ids`, at most `max_batch` requests an iteration (0: no limit).
  void ReportLoad(int32_t id, uint64_t number, int64_t decodes, int64_t context,
                  const std::vector<uint64_t>& ids = {}, int64_t max_batch = 0) {
    v1::InstanceState s;
    s.set_data_port(6000 + id);
    v1::InstanceLoad* load = s.mutable_load();
    load->set_snapshot(number);
    load->set_decode_requests(decodes);
    load->set_decode_context_tokens(context);
    load->set_max_batch_requests(max_batch);
    for (uint64_t r : ids) load->add_request_ids(r);
    membership_.Report(id, s);
  }
  // The full segments of a prompt of `segments` x 4 tokens starting at token `first`.
  std::vector<index::SegmentKey> Keys(int32_t segments, int32_t first = 0) {
    std::vector<int32_t> tokens;
    tokens.reserve(static_cast<size_t>(segments) * 4);
    for (int32_t t = 0; t < segments * 4; ++t) tokens.push_back(first + t);
    auto keys = index::ComputeSegmentKeys(1, tokens, 4);
    EXPECT_TRUE(keys.ok());
    return *keys;
  }
  // Instance `id` holds the segments `keys` (a chain).
  void Hold(int32_t id, const std::vector<index::SegmentKey>& keys) {
    std::vector<lake::HeldSegment> held;
    SegmentId parent;
    for (const index::SegmentKey& k : keys) {
      held.push_back({.id = k.id, .parent = parent, .num_tokens = 4});
      parent = k.id;
    }
    absl::MutexLock lock(&lake_.mu);
    absl::StatusOr<lake::RestoreResult> r = lake_.lake->RestoreReplicas(InstanceId(id), held);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->restored_replicas, static_cast<int64_t>(keys.size()));
  }
  Router MakeRouter(double budget_s) {
    return Router({.num_instances = kInstances,
                   .rule = RoutingRule::kScheduler,
                   .decode_budget_s = budget_s,
                   .cost = &cost_},
                  &lake_, &membership_);
  }
  HandCost cost_;
  GuardedLake lake_;
  Membership membership_{kInstances, absl::Seconds(1)};
};

TEST_F(SchedulerRouterTest, ADecodeInstanceWithRoomIsPreferredToAnIdleOne) {
  // 1: 2 decodes over 1,000 tokens: 2 ms + 2 x 500 us = 3 ms now; 2: 3 decodes over 3,000
  // tokens: 3 + 3 = 6 ms now, with the new 9-token decode 4 ms + 4 x 752 us = 7.008 ms. Both fit
  // 100 ms; the busier (best fit) takes it, not idle 0.
  ReportLoad(1, 1, 2, 1000);
  ReportLoad(2, 1, 3, 3000);
  Router router = MakeRouter(0.1);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(1)), 2);
  EXPECT_EQ(router.decisions()[Router::kByScheduler], 1);
  EXPECT_EQ(router.decisions()[Router::kByPlan] + router.decisions()[Router::kByPlanFallback], 0);
  // An excluded instance is never chosen.
  EXPECT_EQ(*router.Route(Keys(2), 9, {2}, RequestId(2)), 1);
}

TEST_F(SchedulerRouterTest, WherePrefixLivesBreaksTheTieAmongEquallyLoadedInstances) {
  ReportLoad(1, 1, 2, 1000);
  ReportLoad(2, 1, 2, 1000);
  const std::vector<index::SegmentKey> cached = Keys(2, 100);
  Hold(2, cached);
  Router router = MakeRouter(0.1);
  // Both fit at 3 ms; 2 holds the prompt's 8 cached tokens, 1 none.
  EXPECT_EQ(*router.Route(cached, 9, {}, RequestId(1)), 2);
  // A prompt cached nowhere: 2 now runs 3 decodes over 1,009 tokens (4.008 ms), more than 1
  // (3 ms): the busier fit takes it.
  EXPECT_EQ(*router.Route(Keys(2, 200), 9, {}, RequestId(2)), 2);
  // 2 runs 4 over 1,018 tokens now; 1 reports the same: a tie, and no prefix anywhere: the
  // lower index.
  ReportLoad(1, 2, 4, 1018);
  EXPECT_EQ(*router.Route(Keys(2, 300), 9, {}, RequestId(3)), 1);
}

TEST_F(SchedulerRouterTest, AnInstanceOverTheBudgetIsSkipped) {
  // 2: 90 decodes over 9,000 tokens: 90 ms + 90 x 100 us = 99 ms now; with a 9-token decode
  // 91 ms + 91 x 99 us = 100.009 ms > 100 ms. 1 fits (3 ms; 4.008 ms with it).
  ReportLoad(1, 1, 2, 1000);
  ReportLoad(2, 1, 90, 9000);
  Router router = MakeRouter(0.1);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(1)), 1);
}

TEST_F(SchedulerRouterTest, AnIdleInstanceTakesItWhenNoneFitsElseTheLeastLoaded) {
  // 1: 95 decodes over 950 tokens, 95.95 ms now, 96 ms + 96 x 9 us = 96.864 ms with a 9-token
  // decode; 2: 99 decodes without context, 99 ms now, 100 ms with it. Neither fits 96.5 ms.
  ReportLoad(1, 1, 95, 950);
  ReportLoad(2, 1, 99, 0);
  Router router = MakeRouter(0.0965);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(1)), 0);  // idle 0 takes it
  // Now 0 runs it (1.009 ms; 2.018 ms with another): the one that fits takes the next.
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(2)), 0);
  // 0 reports 97 decodes (listing both): none fits, none is idle: the least loaded now, 1
  // (95.95 ms against 97 and 99), takes it.
  ReportLoad(0, 1, 97, 0, {1, 2});
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(3)), 1);
}

TEST_F(SchedulerRouterTest, FallsBackToThePlanRuleWhenEveryInstanceIsAtItsBatchLimit) {
  for (int32_t i = 0; i < kInstances; ++i) ReportLoad(i, 1, 2, 10, {}, /*max_batch=*/2);
  Router router = MakeRouter(0.1);
  absl::StatusOr<int32_t> got = router.Route(Keys(2), 9, {}, RequestId(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_GE(*got, 0);
  EXPECT_LT(*got, kInstances);
  EXPECT_EQ(router.decisions()[Router::kByPlanFallback], 1);
  EXPECT_EQ(router.decisions()[Router::kByScheduler], 0);
  // One below its limit takes the next (its report lists request 1, wherever that went).
  ReportLoad(1, 2, 1, 5, {1}, 2);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(2)), 1);
  EXPECT_EQ(router.decisions()[Router::kByScheduler], 1);
  // No candidate at all: Unavailable, as under the plan rule.
  EXPECT_EQ(router.Route(Keys(2), 9, {0, 1, 2}, RequestId(3)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(SchedulerRouterTest, ABurstBetweenReportsSpreadsAsTheSchedulerSays) {
  // A budget of 3.5 ms fits 3 decodes of 9 tokens per instance (3 ms + 3 x 9 us), not 4.
  Router router = MakeRouter(0.0035);
  std::vector<int32_t> got;
  for (uint64_t r = 1; r <= 10; ++r) got.push_back(*router.Route(Keys(2), 9, {}, RequestId(r)));
  // Each instance fills up to its budget before an idle one is opened; the tenth fits nowhere
  // and goes to the least loaded (all equal: the first).
  EXPECT_EQ(got, (std::vector<int32_t>{0, 0, 0, 1, 1, 1, 2, 2, 2, 0}));
  const std::vector<MemberView> view = membership_.Snapshot();
  EXPECT_EQ(view[0].load_requests, 4);
  EXPECT_EQ(view[0].load_context_tokens, 36);
  EXPECT_EQ(view[1].unreported_routed, 3);
  // 1 reports them running (no change), then done: it is idle again and takes the next request
  // (0 runs 4 and 2 runs 3: neither fits).
  ReportLoad(1, 1, 3, 27, {4, 5, 6});
  EXPECT_EQ(membership_.Snapshot()[1].unreported_routed, 0);
  EXPECT_EQ(membership_.Snapshot()[1].load_requests, 3);
  for (uint64_t r : {4, 5, 6}) membership_.EndRequest(1, RequestId(r));
  ReportLoad(1, 2, 0, 0);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(11)), 1);
  // Requests that end before any report lists them stop counting too.
  for (uint64_t r : {7, 8, 9}) membership_.EndRequest(2, RequestId(r));
  EXPECT_EQ(membership_.Snapshot()[2].load_requests, 0);
  EXPECT_EQ(*router.Route(Keys(2), 9, {}, RequestId(12)), 1);  // 1 has room: best fit over idle 2
}

}  // namespace
}  // namespace tokenlake::service
