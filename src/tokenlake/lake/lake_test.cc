#include "tokenlake/lake/lake.h"

#include <set>
#include <thread>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"

namespace tokenlake::lake {
namespace {

using index::SegmentKey;

constexpr int32_t kS = 16;  // segment tokens in these tests

LakeOptions SmallOptions(int32_t instances = 4, int32_t slots = 8) {
  LakeOptions o;
  o.num_instances = instances;
  o.segment_tokens = kS;
  o.slots_per_instance = slots;
  o.model = plan::ModelShape{1, 32, 8, 128, 2};
  o.heavy_hitter.half_life_us = 1'000'000;
  o.heavy_hitter.min_heavy_load = 0;
  return o;
}

// A chain of n full segments whose ids start at base (ids are arbitrary but unique per chain
// position, like real chained hashes).
std::vector<SegmentKey> Chain(std::initializer_list<uint64_t> ids) {
  std::vector<SegmentKey> keys;
  for (uint64_t id : ids) keys.push_back({SegmentId(id), kS});
  return keys;
}

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
  auto rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok()) << rb.status();
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
