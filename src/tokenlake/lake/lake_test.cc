#include "tokenlake/lake/lake.h"

#include <set>
#include <thread>
#include <tuple>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/lake/lake_testing.h"

namespace tokenlake::lake {
namespace {

using index::SegmentKey;

constexpr int32_t kS = kTestSegmentTokens;

LakeRequest Req(uint64_t id, std::vector<SegmentKey> keys, int64_t q) {
  LakeRequest r;
  r.id = RequestId(id);
  r.keys = std::move(keys);
  r.new_tokens = q;
  return r;
}

class LakeTest : public ::testing::Test {
 protected:
  void Make(LakeOptions o) {
    auto lake = Lake::Create(o, &clock_);
    ASSERT_TRUE(lake.ok()) << lake.status();
    lake_ = std::move(*lake);
  }
  // One full iteration through the plan: GenPlans, Admit, Commit(plan placements), Release.
  plan::BatchPlan RunIteration(const LakeRequest& r, int32_t dop = 1) {
    auto plans = lake_->GenPlans({Batch{{r}, dop}});
    EXPECT_TRUE(plans.ok()) << plans.status();
    EXPECT_TRUE(lake_->Admit(r).ok());
    auto c = lake_->Commit(r.id, (*plans)[0].transfer.new_segments);
    EXPECT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE(lake_->Release(r.id).ok());
    EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
    return (*plans)[0];
  }
  ManualClock clock_{1'000'000};
  std::unique_ptr<Lake> lake_;
};

TEST_F(LakeTest, InvalidOptionsAreErrorsNamingTheField) {
  LakeOptions o = SmallOptions();
  o.segment_tokens = 0;
  auto r = Lake::Create(o, &clock_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("segment_tokens"), std::string::npos);
  o = SmallOptions(0);
  r = Lake::Create(o, &clock_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("num_instances"), std::string::npos);
  o = SmallOptions();
  o.instance_slots = {1, 2};
  EXPECT_FALSE(Lake::Create(o, &clock_).ok());
  o.instance_slots = {1, 2, 0, 4};
  EXPECT_FALSE(Lake::Create(o, &clock_).ok());
  o = SmallOptions();
  o.model.head_dim = 0;
  r = Lake::Create(o, &clock_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("head_dim"), std::string::npos);
  o = SmallOptions();
  o.heavy_hitter.half_life_us = -1;
  EXPECT_FALSE(Lake::Create(o, &clock_).ok());
  o = SmallOptions();
  o.local_eviction_min_age_ratio = -0.5;
  r = Lake::Create(o, &clock_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("local_eviction_min_age_ratio"), std::string::npos);
  EXPECT_FALSE(Lake::Create(SmallOptions(), nullptr).ok());
}

TEST_F(LakeTest, CommittedSegmentsAreMatchedByTheNextRequest) {
  Make(SmallOptions());
  EXPECT_EQ(lake_->Match(Chain({1, 2, 3})).matched_segments, 0);
  RunIteration(Req(1, Chain({1, 2, 3}), 3 * kS));
  auto m = lake_->Match(Chain({1, 2, 3, 4}));
  EXPECT_EQ(m.matched_segments, 3);
  EXPECT_EQ(m.matched_tokens, 3 * kS);
  EXPECT_EQ(m.last_segment, SegmentId(3));
  // A second request sharing two segments hits them.
  auto admitted = lake_->Admit(Req(2, Chain({1, 2, 9}), kS));
  ASSERT_TRUE(admitted.ok());
  EXPECT_EQ(admitted->matched_tokens, 2 * kS);
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  LakeStats s = lake_->Stats();
  EXPECT_EQ(s.segments, 3);
  EXPECT_EQ(s.replicas, 3);
  EXPECT_DOUBLE_EQ(s.redundancy, 1.0);
  EXPECT_EQ(s.prompt_tokens, 6 * kS);
  EXPECT_EQ(s.hit_tokens, 2 * kS);
  EXPECT_DOUBLE_EQ(s.hit_rate, 2.0 / 6.0);
}

TEST_F(LakeTest, NewSegmentLandsOnTheProducerUnlessItIsFull) {
  LakeOptions o = SmallOptions(3, 2);
  o.balancer.memory_slack = 1.0;  // memory imbalance alone never overrides the producer here
  Make(o);
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2, 3}), 3 * kS)).ok());
  auto c = lake_->CommitKeys(RequestId(1), Chain({1, 2, 3}), InstanceId(1));
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->stored.size(), 3u);
  EXPECT_EQ(c->stored[0], (StoredReplica{SegmentId(1), InstanceId(1)}));
  EXPECT_EQ(c->stored[1], (StoredReplica{SegmentId(2), InstanceId(1)}));
  // Instance 1 is full (2 slots): the third goes elsewhere and its KV moves.
  EXPECT_NE(c->stored[2].instance, InstanceId(1));
  EXPECT_EQ(c->moved_bytes, plan::KvBytes(o.model, kS));
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, PlansComputeWhereThePrefixLivesAndStoreNewSegmentsThere) {
  Make(SmallOptions());
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), Chain({1, 2}), InstanceId(2)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  auto plans = lake_->GenPlans({Batch{{Req(2, Chain({1, 2, 3}), 4)}, 1}});
  ASSERT_TRUE(plans.ok()) << plans.status();
  const plan::BatchPlan& p = (*plans)[0];
  EXPECT_EQ(p.instance_group, std::vector<InstanceId>{InstanceId(2)});
  ASSERT_EQ(p.requests.size(), 1u);
  EXPECT_EQ(p.requests[0].compute_instance, InstanceId(2));
  ASSERT_EQ(p.requests[0].segments.size(), 2u);
  EXPECT_EQ(p.requests[0].segments[0].action, plan::HolderAction::kLocal);
  ASSERT_EQ(p.transfer.new_segments.size(), 1u);
  EXPECT_EQ(p.transfer.new_segments[0].segment, SegmentId(3));
  EXPECT_EQ(p.transfer.new_segments[0].parent, SegmentId(2));
  EXPECT_EQ(p.transfer.new_segments[0].target, InstanceId(2));
  EXPECT_EQ(p.transfer.total_bytes, 0);
  // GenPlans is pure: the same state gives the same plan.
  auto again = lake_->GenPlans({Batch{{Req(2, Chain({1, 2, 3}), 4)}, 1}});
  EXPECT_EQ(*again, *plans);
}

TEST_F(LakeTest, HotSystemPromptIsReplicatedAndItsExtraReplicasDropFirstWhenItCools) {
  Make(SmallOptions(4, 64));
  uint64_t next = 1000;
  // Phase 1: every request shares the system prompt segment 1 and has a private segment.
  for (int i = 0; i < 40; ++i) {
    RunIteration(Req(i + 1, Chain({1, next++}), 8));
    clock_.AdvanceUs(10'000);
  }
  EXPECT_TRUE(lake_->IsHeavyHitter(SegmentId(1)));
  // Without the scan, the heavy-hitter count is the latest Rebalance's (none yet).
  EXPECT_GE(lake_->Stats().heavy_hitters, 1);
  EXPECT_EQ(lake_->Stats(/*scan_heavy_hitters=*/false).heavy_hitters, 0);
  const int64_t heavy = lake_->Stats().heavy_hitters;
  auto rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(lake_->Stats(/*scan_heavy_hitters=*/false).heavy_hitters, heavy);
  int replicate = 0;
  for (const auto& a : rb->actions) {
    if (a.kind == balance::ActionKind::kReplicate && a.segment == SegmentId(1)) ++replicate;
  }
  EXPECT_GE(replicate, 2);
  EXPECT_GT(rb->bytes_moved, 0);
  ASSERT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  const auto* node = lake_->prefix_tree().Find(SegmentId(1));
  ASSERT_NE(node, nullptr);
  EXPECT_GE(node->replicas.size(), 3u);
  EXPECT_GT(lake_->Stats().redundancy, 1.0);
  // Plans now spread the prompt's queries over its replicas.
  std::vector<LakeRequest> batch;
  for (int i = 0; i < 16; ++i) batch.push_back(Req(500 + i, Chain({1, next++}), 8));
  auto plans = lake_->GenPlans({Batch{batch, 4}});
  ASSERT_TRUE(plans.ok());
  std::set<InstanceId> holders;
  for (const auto& rp : (*plans)[0].requests) holders.insert(rp.segments[0].holder);
  EXPECT_GE(holders.size(), 3u);
  // Phase 2: the prompt cools: a popular document (segment 3000) takes over for a long time.
  for (int i = 0; i < 40; ++i) {
    clock_.AdvanceUs(200'000);
    RunIteration(Req(100 + i, Chain({3000, 4000 + static_cast<uint64_t>(i)}), 8));
  }
  EXPECT_FALSE(lake_->IsHeavyHitter(SegmentId(1)));
  rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok());
  ASSERT_FALSE(rb->actions.empty());
  // The first actions drop the cooled prompt's extra replicas.
  EXPECT_EQ(rb->actions[0].kind, balance::ActionKind::kDrop);
  EXPECT_EQ(rb->actions[0].segment, SegmentId(1));
  EXPECT_EQ(lake_->prefix_tree().Find(SegmentId(1))->replicas.size(), 1u);
  ASSERT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, DecodeLoadMakesASegmentHeavyWithoutNewPrefills) {
  Make(SmallOptions(4, 64));
  // Ten requests each prefill one private segment after a shared prefix segment 1 (1 query
  // token each: almost no prefill load), then decode for a long time over the whole sequence.
  for (uint64_t r = 1; r <= 10; ++r) {
    auto a = lake_->TryAdmit(Req(r, Chain({1, 100 + r}), 1));
    ASSERT_TRUE(a.ok() && a->has_value());
    ASSERT_TRUE(lake_->CommitKeys(RequestId(r), Chain({1, 100 + r}), InstanceId(0)).ok());
  }
  EXPECT_FALSE(lake_->IsHeavyHitter(SegmentId(1)));
  const double before = lake_->SegmentLoad(SegmentId(1));
  for (uint64_t r = 1; r <= 10; ++r) ASSERT_TRUE(lake_->RecordQueryLoad(RequestId(r), 500).ok());
  // Segment 1 is read by all ten decodes (10 x 500 x 16), each private segment by one.
  EXPECT_NEAR(lake_->SegmentLoad(SegmentId(1)) - before, 10 * 500.0 * kS, 1e-6);
  EXPECT_NEAR(lake_->SegmentLoad(SegmentId(105)), 500.0 * kS, 1e-6);
  EXPECT_TRUE(lake_->IsHeavyHitter(SegmentId(1)));
  EXPECT_EQ(lake_->RecordQueryLoad(RequestId(99), 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(lake_->RecordQueryLoad(RequestId(1), -1).code(), absl::StatusCode::kInvalidArgument);
  for (uint64_t r = 1; r <= 10; ++r) ASSERT_TRUE(lake_->Release(RequestId(r)).ok());
  ASSERT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, ExtraSlotsAreReservedForGeneratedTokensUntilRelease) {
  Make(SmallOptions(2, 4));  // 8 slots
  LakeRequest r = Req(1, Chain({1, 2}), 2 * kS);
  r.extra_slots = 3;  // its generated tokens will need 3 segments
  auto a = lake_->TryAdmit(r);
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->reserved_slots, 5);
  EXPECT_EQ(lake_->AvailableSlots(), 3);
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), r.keys, InstanceId(0)).ok());
  EXPECT_EQ(lake_->AvailableSlots(), 3);  // 2 pinned + 3 still reserved
  LakeRequest big = Req(2, Chain({7, 8, 9, 10}), 4 * kS);
  auto b = lake_->TryAdmit(big);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->has_value());  // 4 > 3: waits for the first request's memory
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->AvailableSlots(), 8);
  b = lake_->TryAdmit(big);
  ASSERT_TRUE(b.ok() && b->has_value());
  r.id = RequestId(3);
  r.extra_slots = -1;
  EXPECT_EQ(lake_->TryAdmit(r).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LakeTest, GroupsAreChosenAmongTheCandidates) {
  Make(SmallOptions(4, 8));
  // The prefix lives on instance 0, but only instances 2 and 3 are free.
  RunIteration(Req(1, Chain({1, 2}), 2 * kS));
  const auto* node = lake_->prefix_tree().Find(SegmentId(1));
  ASSERT_NE(node, nullptr);
  const InstanceId holder = node->replicas[0];
  std::vector<InstanceId> free;
  for (int32_t i = 0; i < 4 && free.size() < 2; ++i) {
    if (InstanceId(i) != holder) free.push_back(InstanceId(i));
  }
  auto plans = lake_->GenPlans({Batch{{Req(2, Chain({1, 2, 3}), kS)}, 1, free}});
  ASSERT_TRUE(plans.ok()) << plans.status();
  const plan::BatchPlan& p = (*plans)[0];
  ASSERT_EQ(p.instance_group.size(), 1u);
  EXPECT_TRUE(p.instance_group[0] == free[0] || p.instance_group[0] == free[1]);
  EXPECT_EQ(p.requests[0].compute_instance, p.instance_group[0]);
  EXPECT_EQ(p.requests[0].holders[0].holder, holder);  // its queries go to the prefix
  // Bad candidates: out of range, repeated, fewer than the DoP.
  for (const std::vector<InstanceId>& bad :
       {std::vector<InstanceId>{InstanceId(4)}, std::vector<InstanceId>{free[0], free[0]},
        std::vector<InstanceId>{free[0]}}) {
    auto e = lake_->GenPlans({Batch{{Req(3, Chain({1}), 1)}, 2, bad}});
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(LakeTest, LoadImbalanceIsFixedByMovingWarmSegments) {
  Make(SmallOptions(2, 8));
  // Six documents of one segment each, all produced on instance 0, then read equally often.
  for (uint64_t d = 1; d <= 6; ++d) {
    ASSERT_TRUE(lake_->Admit(Req(d, Chain({d}), kS)).ok());
    ASSERT_TRUE(lake_->CommitKeys(RequestId(d), Chain({d}), InstanceId(0)).ok());
    ASSERT_TRUE(lake_->Release(RequestId(d)).ok());
  }
  uint64_t id = 100;
  for (int round = 0; round < 10; ++round) {
    for (uint64_t d = 1; d <= 6; ++d) {
      ASSERT_TRUE(lake_->Admit(Req(id, Chain({d, 1000 + id}), 4)).ok());
      ASSERT_TRUE(lake_->Release(RequestId(id++)).ok());
    }
  }
  LakeStats before = lake_->Stats();
  EXPECT_GT(before.instances[0].load, 0);
  EXPECT_EQ(before.instances[1].load, 0);
  for (uint64_t d = 1; d <= 6; ++d) EXPECT_FALSE(lake_->IsHeavyHitter(SegmentId(d)));
  auto rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok());
  // Each segment carries 1/6 of the load: three moves balance the two instances exactly.
  ASSERT_EQ(rb->actions.size(), 3u);
  for (const auto& a : rb->actions) {
    EXPECT_EQ(a.kind, balance::ActionKind::kMove);
    EXPECT_EQ(a.from, InstanceId(0));
    EXPECT_EQ(a.to, InstanceId(1));
  }
  EXPECT_EQ(rb->bytes_moved, 3 * plan::KvBytes(SmallOptions().model, kS));
  LakeStats after = lake_->Stats();
  EXPECT_NEAR(after.instances[0].load, after.instances[1].load, 1e-6 * before.instances[0].load);
  EXPECT_EQ(after.instances[0].used_slots, 3);
  EXPECT_EQ(after.instances[1].used_slots, 3);
  EXPECT_EQ(after.rebalance_bytes, rb->bytes_moved);
  // Balanced now: a second call changes nothing.
  EXPECT_TRUE(lake_->Rebalance()->actions.empty());
  EXPECT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, FullPoolEvictsLruUnpinnedLeavesAndNeverPinnedOnes) {
  Make(SmallOptions(2, 2));  // 4 slots in all
  RunIteration(Req(1, Chain({1, 2}), 2 * kS));
  clock_.AdvanceUs(10);
  // Request 2 holds segments 3, 4 pinned.
  ASSERT_TRUE(lake_->Admit(Req(2, Chain({3, 4}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(2), Chain({3, 4}), InstanceId(0)).ok());
  clock_.AdvanceUs(10);
  // The pool is full; request 3 needs one slot: the LRU unpinned leaf (2) goes.
  ASSERT_TRUE(lake_->Admit(Req(3, Chain({5}), kS)).ok());
  auto c = lake_->CommitKeys(RequestId(3), Chain({5}), InstanceId(1));
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->stored.size(), 1u);
  ASSERT_EQ(c->evicted.size(), 1u);
  EXPECT_EQ(c->evicted[0].segment, SegmentId(2));
  EXPECT_TRUE(lake_->prefix_tree().Contains(SegmentId(3)));
  EXPECT_TRUE(lake_->prefix_tree().Contains(SegmentId(4)));
  // Everything left is pinned (3, 4 by request 2; 5 by request 3) except segment 1, now a leaf.
  ASSERT_TRUE(lake_->Admit(Req(4, Chain({6, 7}), 2 * kS)).ok());
  c = lake_->CommitKeys(RequestId(4), Chain({6, 7}), InstanceId(0));
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->evicted.size(), 1u);
  EXPECT_EQ(c->evicted[0].segment, SegmentId(1));
  ASSERT_EQ(c->stored.size(), 1u);
  EXPECT_EQ(c->not_stored, std::vector<SegmentId>{SegmentId(7)});
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  LakeStats s = lake_->Stats();
  EXPECT_EQ(s.evicted_segments, 2);
  EXPECT_EQ(s.not_stored_segments, 1);
  for (const InstanceStats& i : s.instances) EXPECT_EQ(i.used_slots + i.free_slots, 2);
  for (uint64_t r : {2, 3, 4}) ASSERT_TRUE(lake_->Release(RequestId(r)).ok());
}

TEST_F(LakeTest, TryAdmitReservesNewSegmentsAndDefersWhatDoesNotFit) {
  Make(SmallOptions(2, 2));  // 4 slots in all
  EXPECT_EQ(lake_->AvailableSlots(), 4);
  RunIteration(Req(1, Chain({1, 2}), 2 * kS));  // 1, 2 stored, unpinned (evictable)
  EXPECT_EQ(lake_->AvailableSlots(), 4);
  clock_.AdvanceUs(10);
  // A: matches 1, 2 (pins their 2 replicas) and needs 2 new slots: 2 + 2 <= 4.
  auto a = lake_->TryAdmit(Req(2, Chain({1, 2, 7, 8}), 2 * kS));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(a->has_value());
  EXPECT_EQ((*a)->matched_segments, 2);
  EXPECT_EQ((*a)->reserved_slots, 2);
  EXPECT_EQ(lake_->AvailableSlots(), 0);  // 4 - 2 pinned - 2 reserved
  // B needs one slot: none is available, so it is deferred and nothing changes.
  const LakeStats before = lake_->Stats();
  auto b = lake_->TryAdmit(Req(3, Chain({9}), kS));
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->has_value());
  LakeStats s = lake_->Stats();
  EXPECT_EQ(s.admissions_deferred, 1);
  EXPECT_EQ(s.admitted_requests, before.admitted_requests);
  EXPECT_EQ(s.active_requests, 1);
  // C is fully cached in pinned segments: it needs nothing and is admitted.
  auto c = lake_->TryAdmit(Req(4, Chain({1, 2}), 1));
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->reserved_slots, 0);
  // A commits: its 2 reserved slots become 2 pinned replicas (the 2 free slots).
  auto commit = lake_->CommitKeys(RequestId(2), Chain({1, 2, 7, 8}), InstanceId(0));
  ASSERT_TRUE(commit.ok()) << commit.status();
  EXPECT_EQ(commit->stored.size(), 2u);
  EXPECT_TRUE(commit->not_stored.empty());
  s = lake_->Stats();
  EXPECT_EQ(s.pinned_replicas, 4);
  EXPECT_EQ(s.reserved_slots, 0);
  EXPECT_EQ(s.available_slots, 0);
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  // Releasing A leaves 1, 2 pinned by C: 7, 8 become evictable, B fits.
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  EXPECT_EQ(lake_->AvailableSlots(), 2);
  b = lake_->TryAdmit(Req(3, Chain({9}), kS));
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ(lake_->AvailableSlots(), 1);
  commit = lake_->CommitKeys(RequestId(3), Chain({9}), InstanceId(1));
  ASSERT_TRUE(commit.ok());
  EXPECT_EQ(commit->stored.size(), 1u);  // by evicting the LRU unpinned leaf (8)
  ASSERT_EQ(commit->evicted.size(), 1u);
  EXPECT_EQ(commit->evicted[0].segment, SegmentId(8));
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  for (uint64_t r : {3, 4}) ASSERT_TRUE(lake_->Release(RequestId(r)).ok());
  s = lake_->Stats();
  EXPECT_EQ(s.pinned_replicas, 0);
  EXPECT_EQ(s.reserved_slots, 0);
  EXPECT_EQ(s.available_slots, 4);
  EXPECT_EQ(s.not_stored_segments, 0);
}

TEST_F(LakeTest, TryAdmitNeverFitsARequestLargerThanThePoolAndReleaseReturnsReservations) {
  Make(SmallOptions(2, 2));
  auto big = lake_->TryAdmit(Req(1, Chain({1, 2, 3, 4, 5}), 5 * kS));
  ASSERT_TRUE(big.ok());
  EXPECT_FALSE(big->has_value());
  auto r = lake_->TryAdmit(Req(2, Chain({1, 2, 3}), 3 * kS));
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ(lake_->AvailableSlots(), 1);
  // Released without committing (e.g. cancelled): the reservation comes back.
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  EXPECT_EQ(lake_->AvailableSlots(), 4);
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  // Errors as Admit.
  EXPECT_EQ(lake_->TryAdmit(Req(5, {SegmentKey{SegmentId(1), 0}}, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(lake_->TryAdmit(Req(5, Chain({1}), -1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(lake_->TryAdmit(Req(3, Chain({1}), 1)).ok());
  EXPECT_EQ(lake_->TryAdmit(Req(3, Chain({1}), 1)).status().code(),
            absl::StatusCode::kAlreadyExists);
}

// A full pool: instance 0 holds leaves Y1 (last access t0+50) and Y2 (t0+60), instance 1 holds
// X1 (t0+100) and X2 (t0+110); at t0+200 instance 1 produces a new segment. The global LRU
// leaf is Y1 (age 150), instance 1's is X1 (age 100).
class LocalEvictionTest : public LakeTest,
                          public ::testing::WithParamInterface<std::tuple<double, bool>> {};

TEST_P(LocalEvictionTest, FullProducerEvictsItsOwnLruLeafUnlessMuchMoreRecent) {
  const auto [ratio, local] = GetParam();
  LakeOptions o = SmallOptions(2, 2);
  o.local_eviction_min_age_ratio = ratio;
  Make(o);
  const int64_t t0 = clock_.NowUs();
  const std::vector<std::tuple<uint64_t, int32_t, int64_t>> setup = {
      {11, 0, 50}, {12, 0, 60}, {21, 1, 100}, {22, 1, 110}};
  uint64_t id = 1;
  for (const auto& [seg, inst, t] : setup) {
    clock_.SetUs(t0 + t);
    ASSERT_TRUE(lake_->Admit(Req(id, Chain({seg}), kS)).ok());
    auto c = lake_->CommitKeys(RequestId(id), Chain({seg}), InstanceId(inst));
    ASSERT_TRUE(c.ok());
    ASSERT_EQ(c->stored, (std::vector<StoredReplica>{{SegmentId(seg), InstanceId(inst)}}));
    ASSERT_TRUE(lake_->Release(RequestId(id)).ok());
    ++id;
  }
  clock_.SetUs(t0 + 200);
  ASSERT_TRUE(lake_->Admit(Req(9, Chain({99}), kS)).ok());
  auto c = lake_->CommitKeys(RequestId(9), Chain({99}), InstanceId(1));
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->evicted.size(), 1u);
  ASSERT_EQ(c->stored.size(), 1u);
  if (local) {  // age 100 >= ratio x 150
    EXPECT_EQ(c->evicted[0], (StoredReplica{SegmentId(21), InstanceId(1)}));
    EXPECT_EQ(c->stored[0].instance, InstanceId(1));
    EXPECT_EQ(c->moved_bytes, 0);
    EXPECT_EQ(lake_->Stats().local_evictions, 1);
  } else {
    EXPECT_EQ(c->evicted[0], (StoredReplica{SegmentId(11), InstanceId(0)}));
    EXPECT_EQ(c->stored[0].instance, InstanceId(0));
    EXPECT_EQ(c->moved_bytes, plan::KvBytes(o.model, kS));
    EXPECT_EQ(lake_->Stats().local_evictions, 0);
  }
  ASSERT_TRUE(lake_->Release(RequestId(9)).ok());
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
}

// 100 / 150 = 0.67: local at ratios 0 and 0.5, global at 0.8 and (the old behaviour) 2.
INSTANTIATE_TEST_SUITE_P(Ratios, LocalEvictionTest,
                         ::testing::Values(std::make_tuple(0.0, true), std::make_tuple(0.5, true),
                                           std::make_tuple(0.8, false),
                                           std::make_tuple(2.0, false)));

TEST_F(LakeTest, FullProducerWithTooMuchLoadStoresElsewhere) {
  // Same full pool, but instance 1 serves all the cache load: the balancer does not prefer it,
  // so the global LRU leaf goes and the new segment moves.
  LakeOptions o = SmallOptions(2, 2);
  o.local_eviction_min_age_ratio = 0;
  Make(o);
  const int64_t t0 = clock_.NowUs();
  uint64_t id = 1;
  for (const auto& [seg, inst, t] : std::vector<std::tuple<uint64_t, int32_t, int64_t>>{
           {11, 0, 50}, {12, 0, 60}, {21, 1, 100}, {22, 1, 110}}) {
    clock_.SetUs(t0 + t);
    ASSERT_TRUE(lake_->Admit(Req(id, Chain({seg}), kS)).ok());
    ASSERT_TRUE(lake_->CommitKeys(RequestId(id), Chain({seg}), InstanceId(inst)).ok());
    ASSERT_TRUE(lake_->Release(RequestId(id)).ok());
    ++id;
  }
  // A request reading X2 (on instance 1) with many query tokens loads instance 1.
  clock_.SetUs(t0 + 150);
  ASSERT_TRUE(lake_->Admit(Req(8, Chain({22}), 1000)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(8)).ok());
  clock_.SetUs(t0 + 200);
  ASSERT_TRUE(lake_->Admit(Req(9, Chain({99}), kS)).ok());
  auto c = lake_->CommitKeys(RequestId(9), Chain({99}), InstanceId(1));
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->evicted.size(), 1u);
  EXPECT_EQ(c->evicted[0], (StoredReplica{SegmentId(11), InstanceId(0)}));
  EXPECT_EQ(c->stored[0].instance, InstanceId(0));
  ASSERT_TRUE(lake_->Release(RequestId(9)).ok());
}

TEST_F(LakeTest, ConcurrentCommitOfTheSameSegmentIsDeduplicated) {
  Make(SmallOptions());
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->Admit(Req(2, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), Chain({1, 2}), InstanceId(0)).ok());
  auto c = lake_->Commit(
      RequestId(2), {{RequestId(2), SegmentId(1), SegmentId(), kS, InstanceId(1), InstanceId(1)}});
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->stored.empty());
  EXPECT_EQ(c->deduplicated, std::vector<SegmentId>{SegmentId(1)});
  EXPECT_EQ(lake_->Stats().replicas, 2);
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  EXPECT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, BadInputIsAClearStatus) {
  Make(SmallOptions(4));
  auto plans = lake_->GenPlans({Batch{{Req(1, Chain({1}), 1)}, 5}});
  ASSERT_FALSE(plans.ok());
  EXPECT_EQ(plans.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plans.status().message().find("dop 5"), std::string::npos) << plans.status();
  EXPECT_FALSE(lake_->GenPlans({Batch{{}, 0}}).ok());
  // Keys: a part-segment that is not last; a key longer than a segment; negative new_tokens.
  std::vector<SegmentKey> bad = {{SegmentId(1), 3}, {SegmentId(2), kS}};
  EXPECT_FALSE(lake_->Admit(Req(1, bad, 1)).ok());
  EXPECT_FALSE(lake_->Admit(Req(1, {{SegmentId(1), kS + 1}}, 1)).ok());
  EXPECT_FALSE(lake_->Admit(Req(1, Chain({1}), -1)).ok());
  LakeRequest pref = Req(1, Chain({1}), 1);
  pref.preferred_instance = InstanceId(9);
  auto g = lake_->GenPlans({Batch{{pref}, 1}});
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("unknown preferred instance 9"), std::string::npos);
  // Lifecycle errors.
  EXPECT_EQ(lake_->Release(RequestId(77)).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1}), 1)).ok());
  EXPECT_EQ(lake_->Admit(Req(1, Chain({1}), 1)).status().code(), absl::StatusCode::kAlreadyExists);
  auto c = lake_->CommitKeys(RequestId(1), Chain({1}), InstanceId(4));
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("unknown producer instance 4"), std::string::npos);
  c = lake_->Commit(RequestId(1),
                    {{RequestId(1), SegmentId(1), SegmentId(), kS, InstanceId(0), InstanceId(7)}});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("unknown instance 7"), std::string::npos);
  c = lake_->Commit(RequestId(1),
                    {{RequestId(2), SegmentId(1), SegmentId(), kS, InstanceId(0), InstanceId(0)}});
  EXPECT_FALSE(c.ok());
  EXPECT_EQ(lake_->CommitKeys(RequestId(55), Chain({1}), InstanceId(0)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(lake_->DropInstance(InstanceId(4)).ok());
  EXPECT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_TRUE(lake_->CheckIntegrity().ok());
}

TEST_F(LakeTest, DroppingAnInstanceLosesOnlyItsSegments) {
  Make(SmallOptions(3, 8));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), Chain({1, 2}), InstanceId(0)).ok());
  ASSERT_TRUE(lake_->Admit(Req(2, Chain({5, 6}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(2), Chain({5, 6}), InstanceId(1)).ok());
  ASSERT_TRUE(lake_->DropInstance(InstanceId(0)).ok());
  EXPECT_EQ(lake_->Match(Chain({1, 2})).matched_segments, 0);
  EXPECT_EQ(lake_->Match(Chain({5, 6})).matched_segments, 2);
  // Another request stores segment 1 again (elsewhere) and releases it: request 1's old pin
  // must not touch the new copy.
  ASSERT_TRUE(lake_->Admit(Req(3, Chain({1}), kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(3), Chain({1}), InstanceId(2)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(3)).ok());
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  EXPECT_TRUE(lake_->Release(RequestId(1)).ok());  // its pins went with the instance
  EXPECT_TRUE(lake_->Release(RequestId(2)).ok());
  EXPECT_EQ(lake_->Match(Chain({1})).matched_segments, 1);
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
}

TEST_F(LakeTest, CacheLoadCountsWorkWhereTheSegmentsLive) {
  Make(SmallOptions(2, 8));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), Chain({1, 2}), InstanceId(1)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  auto load = lake_->GetCacheLoad({Req(2, Chain({1, 2, 3}), 10)});
  ASSERT_TRUE(load.ok());
  ASSERT_EQ(load->size(), 2u);
  EXPECT_EQ((*load)[0].load_units, 0);
  EXPECT_DOUBLE_EQ((*load)[1].load_units, 10.0 * 2 * kS);
  EXPECT_EQ((*load)[1].new_memory_bytes, plan::KvBytes(SmallOptions().model, kS));
}

TEST_F(LakeTest, CacheLoadRooflineUsesThePoolsMatchByHand) {
  // 2 instances; the pool holds segments 1 and 2 (2 x 16 tokens) of the chain {1, 2, 3}.
  Make(SmallOptions(2, 8));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({1, 2}), 2 * kS)).ok());
  ASSERT_TRUE(lake_->CommitKeys(RequestId(1), Chain({1, 2}), InstanceId(1)).ok());
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  // One layer, 8 KV heads of 128, bf16: 4,096 KV bytes per token; 32 query heads of 128.
  // Request A: prefix 32 (matched), input 10: M = 4096 x 42 = 172,032 bytes,
  // F = 4 x 4096 x 32 x 10 = 5,242,880 FLOPs. Request B, a miss: prefix 0, input 5:
  // M = 4096 x 5 = 20,480, F = 0. In all M = 192,512, F = 5,242,880.
  const std::vector<LakeRequest> batch = {Req(2, Chain({1, 2, 3}), 10), Req(3, Chain({9}), 5)};
  // N = 2, B = 1e6 bytes/s, P = 1e8 FLOP/s, T = 0.1 s: N B T = 200,000, N P T = 2e7.
  // Memory: 192512 / 392512 = 0.490461; compute: 5242880 / 25242880 = 0.207697.
  const plan::InstanceRoofline hw{.kv_bytes_per_s = 1e6, .attention_flops_per_s = 1e8};
  auto load = lake_->GetCacheLoad(batch, hw, 0.1);
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_NEAR(*load, 192512.0 / 392512.0, 1e-12);
  // A faster memory makes it compute-bound: B = 1e8, N B T = 2e7: 192512 / 20192512 = 0.00953.
  const plan::InstanceRoofline fast{.kv_bytes_per_s = 1e8, .attention_flops_per_s = 1e8};
  load = lake_->GetCacheLoad(batch, fast, 0.1);
  ASSERT_TRUE(load.ok());
  EXPECT_NEAR(*load, 5242880.0 / 25242880.0, 1e-12);
  // Bad inputs are named.
  auto bad = lake_->GetCacheLoad(batch, hw, 0);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("batch_seconds"), std::string::npos);
  bad = lake_->GetCacheLoad(batch, plan::InstanceRoofline{}, 0.1);
  EXPECT_NE(bad.status().message().find("kv_bytes_per_s"), std::string::npos);
  EXPECT_FALSE(lake_->GetCacheLoad({Req(4, Chain({1}), -1)}, hw, 0.1).ok());
}

TEST_F(LakeTest, ConcurrentCallersKeepThePoolConsistent) {
  Make(SmallOptions(4, 16));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([this, t] {
      for (int i = 0; i < 200; ++i) {
        const uint64_t id = 1 + t * 1000 + i;
        // Shared prefix {1, 2} plus a per-thread tail, so threads race on the same segments.
        LakeRequest r = Req(id, Chain({1, 2, 100 + static_cast<uint64_t>(t * 1000 + i % 7)}), 4);
        auto plans = lake_->GenPlans({Batch{{r}, 2}});
        ASSERT_TRUE(plans.ok()) << plans.status();
        ASSERT_TRUE(lake_->Admit(r).ok());
        ASSERT_TRUE(lake_->Commit(r.id, (*plans)[0].transfer.new_segments).ok());
        ASSERT_TRUE(lake_->Release(r.id).ok());
        if (i % 50 == 0) {
          ASSERT_TRUE(lake_->Rebalance().ok());
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity();
  LakeStats s = lake_->Stats();
  EXPECT_EQ(s.active_requests, 0);
  EXPECT_EQ(s.pinned_segments, 0);
  EXPECT_EQ(s.admitted_requests, 800);
  for (const InstanceStats& i : s.instances) EXPECT_EQ(i.used_slots + i.free_slots, 16);
}

}  // namespace
}  // namespace tokenlake::lake
