#include "tokenlake/plan/planner.h"

#include <iostream>
#include <map>
#include <set>

#include "gtest/gtest.h"
#include "tokenlake/base/random.h"

namespace tokenlake::plan {
namespace {

using balance::InstanceState;

ModelShape OneLayer() { return ModelShape{1, 32, 8, 128, 2}; }

class PlannerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    balancer_ = *balance::Balancer::Create({});
    PlannerOptions o;
    o.shape = OneLayer();
    o.segment_tokens = 512;
    planner_ = *Planner::Create(o, balancer_.get());
  }
  static std::vector<InstanceState> Instances(int n, int64_t cap = 100, int64_t used = 10) {
    std::vector<InstanceState> v;
    for (int i = 0; i < n; ++i) v.push_back({InstanceId(i), cap, used, 0});
    return v;
  }
  static CachedSegment Seg(uint64_t id, std::vector<int> reps, int32_t tokens = 512) {
    CachedSegment s;
    s.segment = SegmentId(id);
    s.num_tokens = tokens;
    for (int r : reps) s.replicas.push_back(InstanceId(r));
    return s;
  }
  // A planner like planner_ (greedy) but with the matching dispatch.
  std::unique_ptr<Planner> MatchingPlanner(bool compare_dispatch = false) const {
    PlannerOptions o = planner_->options();
    o.dispatch = PlannerOptions::Dispatch::kMatching;
    o.compare_dispatch = compare_dispatch;
    return *Planner::Create(o, balancer_.get());
  }
  // `n` requests of `new_tokens` each, reading one segment with a copy on instances 0-3.
  static PlanBatch ReadersOfOneSegment(int n, int64_t new_tokens, uint64_t segment) {
    PlanBatch b;
    b.dop = 1;
    for (int i = 0; i < n; ++i) {
      PlanRequest r;
      r.request = RequestId(i);
      r.new_tokens = new_tokens;
      r.cached = {Seg(segment, {0, 1, 2, 3})};
      b.requests.push_back(r);
    }
    return b;
  }
  // How many of the plan's requests read their first segment on each holder.
  static std::map<InstanceId, int> FirstSegmentHolders(const BatchPlan& plan) {
    std::map<InstanceId, int> per_holder;
    for (const RequestPlan& rp : plan.requests) per_holder[rp.segments[0].holder]++;
    return per_holder;
  }
  // Request 1, computing on instance 2 (of 3), reads s1 (on 0 and 1) and s2 (on 1 only).
  static PlanRequest ReadsFromTwoHolders() {
    PlanRequest r;
    r.request = RequestId(1);
    r.new_tokens = 1;
    r.cached = {Seg(1, {0, 1}), Seg(2, {1})};
    r.preferred_instance = InstanceId(2);
    return r;
  }
  std::unique_ptr<balance::Balancer> balancer_;
  std::unique_ptr<Planner> planner_;
};

TEST_F(PlannerTest, GroupIsTheInstancesHoldingTheBatchPrefix) {
  PlanBatch b;
  b.dop = 2;
  PlanRequest r;
  r.request = RequestId(1);
  r.new_tokens = 16;
  r.cached = {Seg(1, {2}), Seg(2, {3}), Seg(3, {2})};
  b.requests.push_back(r);
  auto plans = *planner_->GenPlans({b}, Instances(4));
  ASSERT_EQ(plans.size(), 1u);
  EXPECT_EQ(plans[0].instance_group, (std::vector<InstanceId>{InstanceId(2), InstanceId(3)}));
  EXPECT_EQ(plans[0].requests[0].compute_instance, InstanceId(2));  // holds 1024 of 1536
}

TEST_F(PlannerTest, LocalSegmentsNeedNoTransfer) {
  PlanBatch b;
  PlanRequest r;
  r.request = RequestId(1);
  r.new_tokens = 100;
  r.cached = {Seg(1, {1}), Seg(2, {1})};
  b.requests.push_back(r);
  auto plans = *planner_->GenPlans({b}, Instances(3));
  const RequestPlan& rp = plans[0].requests[0];
  EXPECT_EQ(rp.compute_instance, InstanceId(1));
  ASSERT_EQ(rp.holders.size(), 1u);
  EXPECT_EQ(rp.holders[0].action, HolderAction::kLocal);
  EXPECT_EQ(rp.cached_tokens, 1024);
  EXPECT_TRUE(plans[0].transfer.transfers.empty());
  EXPECT_EQ(plans[0].transfer.total_bytes, 0);
}

TEST_F(PlannerTest, RemoteHolderChoiceFlipsBetweenPullAndMoveQueriesAtBreakEven) {
  // dop 1; the group is instance 0 (holds 1 segment of 512 tokens + most tokens); instance 1
  // holds a part-segment of T tokens. q = 128: break-even T = 516 (see cost_model_test).
  for (int32_t t : {515, 516}) {
    PlanBatch b;
    PlanRequest r;
    r.request = RequestId(9);
    r.new_tokens = 128;
    r.cached = {Seg(1, {0}), Seg(2, {0}), Seg(3, {1}, t)};
    b.requests.push_back(r);
    auto plans = *planner_->GenPlans({b}, Instances(2));
    const RequestPlan& rp = plans[0].requests[0];
    ASSERT_EQ(rp.compute_instance, InstanceId(0));
    ASSERT_EQ(rp.holders.size(), 2u);
    const HolderPlan& remote = rp.holders[1];
    EXPECT_EQ(remote.holder, InstanceId(1));
    if (t == 515) {
      EXPECT_EQ(remote.action, HolderAction::kPullKv);
      EXPECT_EQ(remote.bytes, 4096 * 515);
      EXPECT_EQ(plans[0].transfer.kv_pull_bytes, 4096 * 515);
      ASSERT_EQ(plans[0].transfer.transfers.size(), 1u);
      EXPECT_EQ(plans[0].transfer.transfers[0].kind, TransferKind::kSegmentKv);
      EXPECT_EQ(plans[0].transfer.transfers[0].segment, SegmentId(3));
    } else {
      EXPECT_EQ(remote.action, HolderAction::kMoveQueries);
      EXPECT_EQ(remote.bytes, 16512 * 128);
      EXPECT_EQ(plans[0].transfer.query_bytes, 16512 * 128);
      ASSERT_EQ(plans[0].transfer.transfers.size(), 2u);
      EXPECT_EQ(plans[0].transfer.transfers[0].kind, TransferKind::kQueries);
      EXPECT_EQ(plans[0].transfer.transfers[0].bytes, 8192 * 128);
      EXPECT_EQ(plans[0].transfer.transfers[1].kind, TransferKind::kPartialResults);
      EXPECT_EQ(plans[0].transfer.transfers[1].bytes, 8320 * 128);
    }
    EXPECT_EQ(rp.segments[2].action, remote.action);
  }
}

TEST_F(PlannerTest, HeavyHitterQueriesAreSpreadOverItsReplicas) {
  const PlanBatch b = ReadersOfOneSegment(16, 64, 100);
  auto plans = *planner_->GenPlans({b}, Instances(4));
  const std::map<InstanceId, int> per_holder = FirstSegmentHolders(plans[0]);
  EXPECT_EQ(per_holder.size(), 4u);
  for (auto& [h, c] : per_holder) EXPECT_LE(c, 5) << h;  // 16 / 4 x 1.25
}

// A request computing on instance 2 (of 4) reads s1 (on 0 and 1) and s2 (on 1 and 3). Greedy, in
// prefix order, gives each run to its replica with the least access (all zero), then the less
// loaded: s1 from 0, s2 from 3, two remote holders. The matching sees that holder 1 can serve all
// of it: one holder, one query move fewer. Three other requests keep the holders' work caps loose.
TEST_F(PlannerTest, MatchingServesARequestFromFewerHoldersThanGreedy) {
  PlanBatch b;
  b.dop = 3;
  PlanRequest r;
  r.request = RequestId(1);
  r.new_tokens = 1;
  r.cached = {Seg(1, {0, 1}), Seg(2, {1, 3})};
  r.preferred_instance = InstanceId(2);
  b.requests.push_back(r);
  for (int i = 0; i < 3; ++i) {
    PlanRequest big;
    big.request = RequestId(10 + i);
    big.new_tokens = 64;
    big.cached = {Seg(100 + i, {i}, 8192)};
    big.preferred_instance = InstanceId(i);
    b.requests.push_back(big);
  }
  auto inst = Instances(4);
  inst[1].load = 10;  // greedy's ties between 0 and 1, and 1 and 3, go to 0 and 3
  auto greedy = *planner_->GenPlans({b}, inst);
  auto matched = *MatchingPlanner()->GenPlans({b}, inst);
  ASSERT_EQ(greedy[0].requests[0].compute_instance, InstanceId(2));
  ASSERT_EQ(matched[0].requests[0].compute_instance, InstanceId(2));
  EXPECT_EQ(greedy[0].requests[0].holders.size(), 2u);
  ASSERT_EQ(matched[0].requests[0].holders.size(), 1u);
  EXPECT_EQ(matched[0].requests[0].holders[0].holder, InstanceId(1));
  EXPECT_EQ(greedy[0].transfer.query_bytes - matched[0].transfer.query_bytes,
            MoveQueriesBytes(OneLayer(), 1));
}

// Greedy reads a replicated run from an instance the request reads from anyway (the holder of its
// single-copy segment) when none is below the pool's mean access: s1 (on 0 and 1) from 1, which
// holds s2, though 0 is less loaded. (The request's own context, s3 on its computing instance,
// keeps the work cap above s1's work.)
TEST_F(PlannerTest, GreedyReadsAReplicatedRunFromAHolderTheRequestNeedsAnyway) {
  PlanBatch b;
  b.dop = 1;
  b.candidates = {InstanceId(2)};
  PlanRequest r = ReadsFromTwoHolders();
  r.cached.push_back(Seg(3, {2}, 8192));
  b.requests.push_back(r);
  auto inst = Instances(3);
  inst[1].load = 10;
  auto plans = *planner_->GenPlans({b}, inst);
  const RequestPlan& rp = plans[0].requests[0];
  ASSERT_EQ(rp.compute_instance, InstanceId(2));
  EXPECT_EQ(rp.segments[0].holder, InstanceId(1));
  EXPECT_EQ(rp.segments[1].holder, InstanceId(1));
  EXPECT_EQ(rp.holders.size(), 2u);  // 1, and the computing instance for s3
}

// The access in force steers a replicated run: the computing instance keeps it while its access
// with the run's stays within the pool's mean (access_slack 0), else the replica with the least
// access reads it.
TEST_F(PlannerTest, ReplicatedRunGoesWhereTheAccessInForceIsLeast) {
  PlanBatch b;
  b.dop = 1;
  b.candidates = {InstanceId(0)};
  PlanRequest r;
  r.request = RequestId(1);
  r.new_tokens = 1;
  // The run, then the request's own context on its computing instance (which keeps the work
  // cap above the run's work).
  r.cached = {Seg(1, {0, 1, 2, 3}), Seg(2, {0, 1, 2, 3}), Seg(3, {0}, 8192)};
  b.requests.push_back(r);
  auto inst = Instances(4);
  const auto run_holders = [](const std::vector<BatchPlan>& plans) {
    const RequestPlan& rp = plans[0].requests[0];
    return std::make_pair(rp.segments[0].holder, rp.segments[1].holder);
  };
  // Equal access: the computing instance keeps the run (a tie with every replica).
  for (auto& st : inst) st.access_tokens = 1000;
  EXPECT_EQ(run_holders(*planner_->GenPlans({b}, inst)),
            std::make_pair(InstanceId(0), InstanceId(0)));
  // The computing instance far above the mean: the least accessed replica reads the whole run.
  inst[0].access_tokens = 5000;
  inst[2].access_tokens = 200;
  EXPECT_EQ(run_holders(*planner_->GenPlans({b}, inst)),
            std::make_pair(InstanceId(2), InstanceId(2)));
  // Within (1 + access_slack) x the mean the computing instance keeps it.
  PlannerOptions o = planner_->options();
  o.access_slack = 2;
  auto slack = *Planner::Create(o, balancer_.get());
  EXPECT_EQ(run_holders(*slack->GenPlans({b}, inst)), std::make_pair(InstanceId(0), InstanceId(0)));
}

// Requests planned in one call see each other's reads: a shared prefix with a copy on every
// instance is read from each in turn, however the requests are computed.
TEST_F(PlannerTest, OneCallSpreadsASharedRunByItsOwnReads) {
  PlanBatch b = ReadersOfOneSegment(8, 1, 1);
  b.candidates = {InstanceId(0)};
  auto plans = *planner_->GenPlans({b}, Instances(4));
  const std::map<InstanceId, int> per_holder = FirstSegmentHolders(plans[0]);
  ASSERT_EQ(per_holder.size(), 4u);
  for (auto& [h, c] : per_holder) EXPECT_EQ(c, 2) << h;
}

// Instance 0 has one free slot; instance 1 none; instance 2 two, but fuller. Request 1 computes
// on the full instance 1, request 2 on instance 0. Greedy, in request order, stores request 1's
// new segment in instance 0's last slot (the emptier), so request 2's must move too: two copies.
// The matching lets each producer keep what fits first: one copy.
TEST_F(PlannerTest, MatchingLetsProducersKeepTheirFreeSlots) {
  PlanBatch b;
  b.dop = 2;
  b.candidates = {InstanceId(0), InstanceId(1)};
  for (int i = 0; i < 2; ++i) {
    PlanRequest r;
    r.request = RequestId(i + 1);
    r.new_tokens = 512;
    r.new_segments = {{SegmentId(50 + i), 512}};
    r.preferred_instance = InstanceId(1 - i);
    b.requests.push_back(r);
  }
  std::vector<InstanceState> inst = {
      {InstanceId(0), 2, 1, 0}, {InstanceId(1), 10, 10, 0}, {InstanceId(2), 10, 8, 0}};
  auto greedy = *planner_->GenPlans({b}, inst);
  auto matched = *MatchingPlanner()->GenPlans({b}, inst);
  ASSERT_EQ(matched[0].requests[0].compute_instance, InstanceId(1));
  ASSERT_EQ(matched[0].requests[1].compute_instance, InstanceId(0));
  EXPECT_EQ(greedy[0].transfer.new_segment_bytes, 2 * KvBytes(OneLayer(), 512));
  EXPECT_EQ(matched[0].transfer.new_segment_bytes, KvBytes(OneLayer(), 512));
  EXPECT_EQ(matched[0].transfer.new_segments[0].target, InstanceId(2));
  EXPECT_EQ(matched[0].transfer.new_segments[1].target, InstanceId(0));
}

TEST_F(PlannerTest, CompareDispatchCountsBothRulesOnTheSameBatches) {
  PlanBatch b;
  b.dop = 3;
  b.requests.push_back(ReadsFromTwoHolders());
  auto inst = Instances(3);
  inst[1].load = 10;
  auto matching = MatchingPlanner();
  auto comparing = MatchingPlanner(/*compare_dispatch=*/true);
  const auto expected = *matching->GenPlans({b}, inst);
  const auto other = *planner_->GenPlans({b}, inst);
  for (int call = 0; call < 2; ++call) {
    EXPECT_EQ(*comparing->GenPlans({b}, inst), expected);  // no effect on the plans
  }
  const DispatchComparison c = comparing->dispatch_comparison();
  EXPECT_EQ(c.batches, 2);
  EXPECT_EQ(c.query_bytes, 2 * expected[0].transfer.query_bytes);
  EXPECT_EQ(c.other_query_bytes, 2 * other[0].transfer.query_bytes);
  EXPECT_NE(c.query_bytes, c.other_query_bytes);
  EXPECT_EQ(c.holders, 2 * static_cast<int64_t>(expected[0].requests[0].holders.size()));
  EXPECT_EQ(c.other_holders, 2 * static_cast<int64_t>(other[0].requests[0].holders.size()));
  EXPECT_EQ(matching->dispatch_comparison().batches, 0);
}

TEST_F(PlannerTest, ComputeInstancesAreBalancedWithinTheGroup) {
  PlanBatch b;
  b.dop = 2;
  for (int i = 0; i < 8; ++i) {
    PlanRequest r;
    r.request = RequestId(i);
    r.new_tokens = 100;
    r.cached = {Seg(1, {0, 1})};
    b.requests.push_back(r);
  }
  auto plans = *planner_->GenPlans({b}, Instances(3));
  std::map<InstanceId, int> per;
  for (const RequestPlan& rp : plans[0].requests) per[rp.compute_instance]++;
  EXPECT_EQ(per[InstanceId(0)], 4);
  EXPECT_EQ(per[InstanceId(1)], 4);
}

TEST_F(PlannerTest, NewSegmentsStayWhereComputedUnlessThatInstanceIsFull) {
  PlanBatch b;
  PlanRequest r;
  r.request = RequestId(5);
  r.new_tokens = 600;
  r.cached = {Seg(1, {1})};
  r.new_segments = {index::SegmentKey{SegmentId(2), 512}, index::SegmentKey{SegmentId(3), 88}};
  b.requests.push_back(r);
  auto instances = Instances(3, 10, 2);
  auto plans = *planner_->GenPlans({b}, instances);
  const auto& ns = plans[0].transfer.new_segments;
  ASSERT_EQ(ns.size(), 2u);
  EXPECT_EQ(ns[0].target, InstanceId(1));
  EXPECT_EQ(ns[0].parent, SegmentId(1));
  EXPECT_EQ(ns[1].parent, SegmentId(2));
  EXPECT_EQ(ns[1].target, InstanceId(1));
  EXPECT_EQ(plans[0].transfer.new_segment_bytes, 0);
  // Now instance 1 is full: the new segments go elsewhere and their KV moves.
  instances[1].used_slots = 10;
  plans = *planner_->GenPlans({b}, instances);
  for (const auto& n : plans[0].transfer.new_segments) {
    EXPECT_EQ(n.source, InstanceId(1));
    EXPECT_NE(n.target, InstanceId(1));
  }
  EXPECT_EQ(plans[0].transfer.new_segment_bytes, 4096 * (512 + 88));
}

TEST_F(PlannerTest, BadInputIsAnErrorNamingWhere) {
  PlanBatch b;
  b.dop = 5;
  auto r = planner_->GenPlans({b}, Instances(4));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("dop 5"), std::string::npos);
  b.dop = 0;
  EXPECT_FALSE(planner_->GenPlans({b}, Instances(4)).ok());
  b.dop = 1;
  PlanRequest req;
  req.cached = {Seg(1, {7})};
  b.requests.push_back(req);
  r = planner_->GenPlans({b}, Instances(4));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("unknown instance 7"), std::string::npos);
  b.requests[0].cached = {Seg(1, {})};
  EXPECT_FALSE(planner_->GenPlans({b}, Instances(4)).ok());
  b.requests[0].cached = {Seg(1, {0})};
  b.requests[0].new_tokens = -1;
  EXPECT_FALSE(planner_->GenPlans({b}, Instances(4)).ok());
  EXPECT_FALSE(planner_->GenPlans({b}, {}).ok());
  EXPECT_FALSE(Planner::Create({}, nullptr).ok());
  PlannerOptions bad;
  bad.segment_tokens = 0;
  EXPECT_FALSE(Planner::Create(bad, balancer_.get()).ok());
}

TEST_F(PlannerTest, CacheLoadSplitsWorkOverReplicas) {
  PlanRequest r;
  r.request = RequestId(1);
  r.new_tokens = 10;
  r.cached = {Seg(1, {0, 1}), Seg(2, {1})};
  r.new_segments = {index::SegmentKey{SegmentId(3), 512}};
  auto loads = *planner_->GetCacheLoad({r}, Instances(3, 100, 10));
  ASSERT_EQ(loads.size(), 3u);
  EXPECT_DOUBLE_EQ(loads[0].load_units, 10 * 256);
  EXPECT_DOUBLE_EQ(loads[1].load_units, 10 * 256 + 10 * 512);
  EXPECT_DOUBLE_EQ(loads[2].load_units, 0);
  EXPECT_DOUBLE_EQ(loads[1].attention_flops, 4.0 * 10 * 768 * 32 * 128);
  EXPECT_DOUBLE_EQ(loads[0].kv_read_bytes, 4096.0 * 256);
  EXPECT_EQ(loads[1].new_memory_bytes, 4096 * 512);  // instance 1 holds most of the prefix
  EXPECT_EQ(loads[0].memory_used_bytes, 10 * 4096 * 512);
  EXPECT_EQ(loads[0].memory_free_bytes, 90 * 4096 * 512);
}

// Randomised: structural properties of every plan (checked against the inputs, not the planner).
class PlannerPropertyTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(PlannerPropertyTest, PlansAreConsistentAndDeterministic) {
  const auto [num_instances, num_requests] = GetParam();
  const uint64_t seed = 4242 + num_instances * 100 + num_requests;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  Rng rng(seed);
  auto balancer = *balance::Balancer::Create({});
  PlannerOptions o;
  o.shape = ModelShape{4, 32, 8, 128, 2};
  o.dispatch = PlannerOptions::Dispatch::kMatching;
  auto matching_planner = *Planner::Create(o, balancer.get());
  o.dispatch = PlannerOptions::Dispatch::kGreedy;
  auto greedy_planner = *Planner::Create(o, balancer.get());
  for (int round = 0; round < 40; ++round) {
    const Planner* planner = (round % 2 == 0 ? matching_planner : greedy_planner).get();
    SCOPED_TRACE(round % 2 == 0 ? "matching" : "greedy");
    std::vector<InstanceState> inst;
    for (int i = 0; i < num_instances; ++i) {
      const int64_t cap = rng.UniformInt(1, 50);
      inst.push_back({InstanceId(i), cap, rng.UniformInt(0, cap), rng.UniformDouble() * 1000});
    }
    std::vector<PlanBatch> batches(rng.UniformInt(1, 3));
    uint64_t next_id = 1;
    for (PlanBatch& b : batches) {
      b.dop = static_cast<int32_t>(rng.UniformInt(1, num_instances));
      const int nreq = static_cast<int>(rng.UniformInt(0, num_requests));
      for (int k = 0; k < nreq; ++k) {
        PlanRequest r;
        r.request = RequestId(next_id++);
        r.new_tokens = rng.UniformInt(0, 2000);
        const int nseg = static_cast<int>(rng.UniformInt(0, 12));
        for (int s = 0; s < nseg; ++s) {
          std::set<int> reps;
          const int nrep = static_cast<int>(rng.UniformInt(1, num_instances));
          while (static_cast<int>(reps.size()) < nrep) {
            reps.insert(static_cast<int>(rng.UniformInt(0, num_instances - 1)));
          }
          CachedSegment seg;
          seg.segment = SegmentId(next_id++);
          seg.num_tokens = static_cast<int32_t>(rng.UniformInt(1, 512));
          for (int rep : reps) seg.replicas.push_back(InstanceId(rep));
          r.cached.push_back(seg);
        }
        const int nnew = static_cast<int>(rng.UniformInt(0, 3));
        for (int s = 0; s < nnew; ++s) {
          r.new_segments.push_back({SegmentId(next_id++), 512});
        }
        if (rng.Bernoulli(0.3)) {
          r.preferred_instance = InstanceId(rng.UniformInt(0, num_instances - 1));
        }
        b.requests.push_back(r);
      }
    }
    auto plans = *planner->GenPlans(batches, inst);
    auto again = *planner->GenPlans(batches, inst);
    ASSERT_EQ(plans, again) << "plans are not deterministic";
    ASSERT_EQ(plans.size(), batches.size());
    for (size_t b = 0; b < plans.size(); ++b) {
      const BatchPlan& p = plans[b];
      std::set<InstanceId> group(p.instance_group.begin(), p.instance_group.end());
      ASSERT_EQ(static_cast<int>(group.size()), batches[b].dop);
      ASSERT_EQ(p.requests.size(), batches[b].requests.size());
      int64_t q_bytes = 0, pull_bytes = 0, new_bytes = 0;
      for (const Transfer& t : p.transfer.transfers) {
        ASSERT_NE(t.src, t.dst);
        if (t.kind == TransferKind::kQueries || t.kind == TransferKind::kPartialResults) {
          q_bytes += t.bytes;
        } else if (t.kind == TransferKind::kSegmentKv) {
          pull_bytes += t.bytes;
        } else {
          new_bytes += t.bytes;
        }
      }
      ASSERT_EQ(q_bytes, p.transfer.query_bytes);
      ASSERT_EQ(pull_bytes, p.transfer.kv_pull_bytes);
      ASSERT_EQ(new_bytes, p.transfer.new_segment_bytes);
      ASSERT_EQ(p.transfer.total_bytes, q_bytes + pull_bytes + new_bytes);
      size_t new_count = 0;
      for (size_t ri = 0; ri < p.requests.size(); ++ri) {
        const RequestPlan& rp = p.requests[ri];
        const PlanRequest& in = batches[b].requests[ri];
        ASSERT_EQ(rp.request, in.request);
        ASSERT_TRUE(group.count(rp.compute_instance));
        ASSERT_EQ(rp.segments.size(), in.cached.size());
        int64_t tokens = 0;
        std::map<InstanceId, int64_t> by_holder;
        for (size_t s = 0; s < in.cached.size(); ++s) {
          const SegmentAssignment& a = rp.segments[s];
          ASSERT_EQ(a.segment, in.cached[s].segment);
          const auto& reps = in.cached[s].replicas;
          ASSERT_NE(std::find(reps.begin(), reps.end(), a.holder), reps.end())
              << "segment served by an instance without a replica";
          ASSERT_EQ(a.action == HolderAction::kLocal, a.holder == rp.compute_instance);
          tokens += a.num_tokens;
          by_holder[a.holder] += a.num_tokens;
        }
        ASSERT_EQ(rp.cached_tokens, tokens);
        ASSERT_EQ(rp.holders.size(), by_holder.size());
        double flops = 0;
        for (const HolderPlan& h : rp.holders) flops += h.attention_flops;
        ASSERT_NEAR(flops, 4.0 * o.shape.num_layers * in.new_tokens * tokens * 32 * 128,
                    1e-6 * (1 + flops));
        for (const HolderPlan& h : rp.holders) {
          ASSERT_EQ(h.cached_tokens, by_holder[h.holder]);
          if (h.action == HolderAction::kMoveQueries) {
            ASSERT_LE(MoveQueriesBytes(o.shape, in.new_tokens), KvBytes(o.shape, h.cached_tokens));
          } else if (h.action == HolderAction::kPullKv) {
            ASSERT_GT(MoveQueriesBytes(o.shape, in.new_tokens), KvBytes(o.shape, h.cached_tokens));
          }
        }
        for (size_t k = 0; k < in.new_segments.size(); ++k) {
          const NewSegmentPlacement& n = p.transfer.new_segments[new_count++];
          ASSERT_EQ(n.segment, in.new_segments[k].id);
          ASSERT_EQ(n.source, rp.compute_instance);
          ASSERT_TRUE(n.target.valid() && n.target.value() < num_instances);
        }
      }
      ASSERT_EQ(new_count, p.transfer.new_segments.size());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, PlannerPropertyTest,
                         ::testing::Values(std::make_tuple(1, 4), std::make_tuple(4, 16),
                                           std::make_tuple(16, 64)));

}  // namespace
}  // namespace tokenlake::plan
