// Pending copies (lake.h, "Pending copies"; docs/adr/0016): CommitPending places a request's new
// segments, but no match, plan, cache load or admission sees them until ConfirmStored says their
// data is stored; a copy never confirmed goes at its request's Release.
//
// The race these tests pin down (issue 15, finding 9): request A commits segment X, placed on
// instance 1, and its engine has not stored X there yet; request B plans in between. B must not
// be told to read X from instance 1: its plan has no cached segment, lists X among the segments
// B computes itself, and B's own commit of X places no second copy and reads nothing (B keeps
// X's KV in its own tail). Once A confirms, request C hits X on instance 1.
#include <algorithm>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/lake/lake_testing.h"

namespace tokenlake::lake {
namespace {

using index::SegmentKey;

constexpr int32_t kS = kTestSegmentTokens;

LakeRequest Req(uint64_t id, std::vector<SegmentKey> keys, int64_t q = 4) {
  LakeRequest r;
  r.id = RequestId(id);
  r.keys = std::move(keys);
  r.new_tokens = q;
  return r;
}

// Placements of `keys` (a chain from the root) for `request`, computed on and stored at
// `instance`.
std::vector<plan::NewSegmentPlacement> Placements(uint64_t request,
                                                  const std::vector<SegmentKey>& keys,
                                                  int32_t instance) {
  std::vector<plan::NewSegmentPlacement> out;
  SegmentId parent;
  for (const SegmentKey& k : keys) {
    out.push_back({RequestId(request), k.id, parent, k.num_tokens, InstanceId(instance),
                   InstanceId(instance)});
    parent = k.id;
  }
  return out;
}

std::vector<SegmentId> Ids(std::initializer_list<uint64_t> ids) {
  std::vector<SegmentId> out;
  for (uint64_t id : ids) out.emplace_back(id);
  return out;
}

class LakePendingTest : public ::testing::Test {
 protected:
  void Make(const LakeOptions& o = SmallOptions(2)) {
    auto lake = Lake::Create(o, &clock_);
    ASSERT_TRUE(lake.ok()) << lake.status();
    lake_ = std::move(*lake);
  }
  void ExpectIntact() { EXPECT_TRUE(lake_->CheckIntegrity().ok()) << lake_->CheckIntegrity(); }

  ManualClock clock_{1'000'000};
  std::unique_ptr<Lake> lake_;
};

TEST_F(LakePendingTest, AStoreOnItsWayIsReadByNoPlanAndHitOnceConfirmed) {
  Make();
  const std::vector<SegmentKey> x = Chain({10, 11});  // X: two segments
  // A commits X on instance 1; its engine has not stored it yet.
  ASSERT_TRUE(lake_->Admit(Req(1, x)).ok());
  auto a = lake_->CommitPending(RequestId(1), Placements(1, x, 1));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->stored.size(), 2u);
  EXPECT_EQ(a->stored[0], (StoredReplica{SegmentId(10), InstanceId(1)}));
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  EXPECT_EQ(lake_->Stats().instances[1].used_slots, 2);  // the slots are taken already
  ExpectIntact();

  // B plans in between: nothing of X is cached, so nothing is read from instance 1; B
  // computes X itself (the plan places X among B's new segments).
  const std::vector<SegmentKey> bx = Chain({10, 11, 12});
  EXPECT_EQ(lake_->Match(bx).matched_segments, 0);
  auto plans = lake_->GenPlans({Batch{{Req(2, bx)}, 2}});
  ASSERT_TRUE(plans.ok()) << plans.status();
  const plan::BatchPlan& bp = (*plans)[0];
  EXPECT_EQ(bp.requests[0].cached_tokens, 0);
  EXPECT_TRUE(bp.requests[0].segments.empty());
  EXPECT_EQ(bp.transfer.kv_pull_bytes, 0);
  ASSERT_EQ(bp.transfer.new_segments.size(), 3u);
  EXPECT_EQ(bp.transfer.new_segments[0].segment, SegmentId(10));
  auto load = lake_->GetCacheLoad({Req(2, bx)});
  ASSERT_TRUE(load.ok());
  for (const plan::InstanceCacheLoad& l : *load) EXPECT_EQ(l.cached_tokens, 0);
  auto admitted = lake_->Admit(Req(2, bx));
  ASSERT_TRUE(admitted.ok());
  EXPECT_EQ(admitted->matched_segments, 0);
  // B's commit of X: no second copy, no pin, no read; its own segment 12 hangs under a copy
  // nobody may read yet, so it is not stored either (B keeps all three in its tail).
  auto b = lake_->CommitPending(RequestId(2), bp.transfer.new_segments);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->pending_elsewhere, Ids({10, 11}));
  EXPECT_TRUE(b->deduplicated.empty());
  EXPECT_TRUE(b->stored.empty());
  EXPECT_EQ(b->not_stored, Ids({12}));
  EXPECT_EQ(lake_->Stats().replicas, 2);
  EXPECT_EQ(lake_->Stats().pending_elsewhere_segments, 2);
  EXPECT_EQ(lake_->prefix_tree().Find(SegmentId(10))->pin_count, 1);  // A's only
  ExpectIntact();

  // A's engine stored X on instance 1 and confirms: X is visible.
  auto confirmed = lake_->ConfirmStored(
      {{RequestId(1), SegmentId(10), InstanceId(1)}, {RequestId(1), SegmentId(11), InstanceId(1)}});
  ASSERT_TRUE(confirmed.ok()) << confirmed.status();
  EXPECT_EQ(confirmed->confirmed, 2);
  EXPECT_TRUE(confirmed->refused.empty());
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  // C hits X, read from instance 1.
  auto c_plans = lake_->GenPlans({Batch{{Req(3, bx)}, 2}});
  ASSERT_TRUE(c_plans.ok());
  const plan::RequestPlan& cp = (*c_plans)[0].requests[0];
  EXPECT_EQ(cp.cached_tokens, 2 * kS);
  ASSERT_EQ(cp.segments.size(), 2u);
  EXPECT_EQ(cp.segments[0].holder, InstanceId(1));
  EXPECT_EQ(cp.segments[1].holder, InstanceId(1));
  auto c = lake_->Admit(Req(3, bx));
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->matched_tokens, 2 * kS);
  // Releasing everyone keeps X (confirmed) and drops nothing.
  for (uint64_t r : {1, 2, 3}) ASSERT_TRUE(lake_->Release(RequestId(r)).ok());
  EXPECT_EQ(lake_->Stats().segments, 2);
  EXPECT_EQ(lake_->Stats().dropped_pending_copies, 0);
  EXPECT_EQ(lake_->Match(bx).matched_segments, 2);
  ExpectIntact();
}

TEST_F(LakePendingTest, CopiesNeverConfirmedGoAtReleaseAndFreeTheirSlots) {
  Make();
  const std::vector<SegmentKey> x = Chain({10, 11, 12});
  ASSERT_TRUE(lake_->Admit(Req(1, x)).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, x, 0)).ok());
  EXPECT_EQ(lake_->Stats().instances[0].used_slots, 3);
  // Only the first segment was stored before the engine failed.
  auto confirmed = lake_->ConfirmStored({{RequestId(1), SegmentId(10), InstanceId(0)}});
  ASSERT_TRUE(confirmed.ok());
  EXPECT_EQ(confirmed->confirmed, 1);
  EXPECT_EQ(lake_->Match(x).matched_segments, 1);
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  const LakeStats s = lake_->Stats();
  EXPECT_EQ(s.segments, 1);
  EXPECT_EQ(s.pending_copies, 0);
  EXPECT_EQ(s.dropped_pending_copies, 2);
  EXPECT_EQ(s.instances[0].used_slots, 1);
  EXPECT_EQ(s.pinned_replicas, 0);
  EXPECT_EQ(lake_->prefix_tree().Find(SegmentId(11)), nullptr);
  // A late confirmation of a dropped copy changes nothing.
  confirmed = lake_->ConfirmStored({{RequestId(1), SegmentId(11), InstanceId(0)}});
  ASSERT_TRUE(confirmed.ok());
  EXPECT_EQ(confirmed->confirmed, 0);
  EXPECT_EQ(confirmed->refused.size(), 1u);
  EXPECT_EQ(lake_->Stats().segments, 1);
  ExpectIntact();
}

TEST_F(LakePendingTest, ConfirmationsAreRefusedOutOfChainOrderOrForTheWrongOwnerOrPlace) {
  Make();
  const std::vector<SegmentKey> x = Chain({10, 11});
  ASSERT_TRUE(lake_->Admit(Req(1, x)).ok());
  ASSERT_TRUE(lake_->Admit(Req(2, Chain({20}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, x, 1)).ok());
  // A bad instance is an error, and nothing is applied.
  auto bad = lake_->ConfirmStored(
      {{RequestId(1), SegmentId(10), InstanceId(1)}, {RequestId(1), SegmentId(11), InstanceId(7)}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("instance 7"), std::string::npos) << bad.status();
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  // The child before its parent, another request's, the wrong instance: all refused.
  auto r = lake_->ConfirmStored({{RequestId(1), SegmentId(11), InstanceId(1)},
                                 {RequestId(2), SegmentId(10), InstanceId(1)},
                                 {RequestId(1), SegmentId(10), InstanceId(0)},
                                 {RequestId(1), SegmentId(99), InstanceId(1)}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->confirmed, 0);
  EXPECT_EQ(r->refused.size(), 4u);
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  // Parents first works; a repeated confirmation is refused and harmless.
  r = lake_->ConfirmStored({{RequestId(1), SegmentId(10), InstanceId(1)},
                            {RequestId(1), SegmentId(11), InstanceId(1)},
                            {RequestId(1), SegmentId(10), InstanceId(1)}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->confirmed, 2);
  EXPECT_EQ(r->refused.size(), 1u);
  EXPECT_EQ(lake_->Match(x).matched_segments, 2);
  ExpectIntact();
}

TEST_F(LakePendingTest, AVisibleCommitNeverHangsUnderAPendingCopy) {
  Make();
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({10}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10}), 0)).ok());
  // The same request's own immediate (visible) commit under its pending copy: not stored, so
  // the visible copies stay a prefix-closed set.
  plan::NewSegmentPlacement child{RequestId(1), SegmentId(11), SegmentId(10),
                                  kS,           InstanceId(0), InstanceId(0)};
  auto c = lake_->Commit(RequestId(1), {child});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->not_stored, Ids({11}));
  // Its pending commit may extend its own pending chain.
  auto p = lake_->CommitPending(RequestId(1), {child});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->stored.size(), 1u);
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  ExpectIntact();
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->Stats().segments, 0);
  EXPECT_EQ(lake_->Stats().dropped_pending_copies, 2);
  ExpectIntact();
}

TEST_F(LakePendingTest, APendingCopyLostWithItsInstanceIsGoneAndItsRequestReleasesCleanly) {
  Make(SmallOptions(3));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({10, 11}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10, 11}), 2)).ok());
  ASSERT_TRUE(lake_->DropInstance(InstanceId(2)).ok());
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  EXPECT_EQ(lake_->Stats().segments, 0);
  auto r = lake_->ConfirmStored({{RequestId(1), SegmentId(10), InstanceId(2)}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->confirmed, 0);
  ExpectIntact();
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->Stats().dropped_pending_copies, 0);  // nothing left to drop
  // A pending copy reported lost (reconciliation) goes the same way.
  ASSERT_TRUE(lake_->Admit(Req(2, Chain({20}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(2), Placements(2, Chain({20}), 0)).ok());
  auto lost = lake_->LoseReplica(SegmentId(20), InstanceId(0));
  ASSERT_TRUE(lost.ok()) << lost.status();
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  ExpectIntact();
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  ExpectIntact();
}

TEST_F(LakePendingTest, TheHoldingInstancesReportConfirmsAPendingCopy) {
  Make();
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({10, 11}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10, 11}), 1)).ok());
  // Instance 1 reports holding both (it re-registered after storing them).
  auto restored = lake_->RestoreReplicas(
      InstanceId(1), {{SegmentId(11), SegmentId(10), kS}, {SegmentId(10), SegmentId(), kS}});
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->already_listed, 2);
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  EXPECT_EQ(lake_->Match(Chain({10, 11})).matched_segments, 2);
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->Stats().segments, 2);
  ExpectIntact();
}

TEST_F(LakePendingTest, ACopyRestoredElsewhereIsReadThereAndThePendingOneNever) {
  Make(SmallOptions(3));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({10, 11}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10, 11}), 1)).ok());
  // Instance 2 reports an old copy of segment 11 alone: its parent has no visible copy, so it
  // is an orphan (rejected); then of both: both become visible there.
  auto orphan = lake_->RestoreReplicas(InstanceId(2), {{SegmentId(11), SegmentId(10), kS}});
  ASSERT_TRUE(orphan.ok());
  EXPECT_EQ(orphan->rejected, Ids({11}));
  auto both = lake_->RestoreReplicas(
      InstanceId(2), {{SegmentId(11), SegmentId(10), kS}, {SegmentId(10), SegmentId(), kS}});
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->restored_replicas, 2);
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  auto plans = lake_->GenPlans({Batch{{Req(2, Chain({10, 11, 12}))}, 3}});
  ASSERT_TRUE(plans.ok());
  const plan::RequestPlan& rp = (*plans)[0].requests[0];
  ASSERT_EQ(rp.segments.size(), 2u);
  EXPECT_EQ(rp.segments[0].holder, InstanceId(2));
  EXPECT_EQ(rp.segments[1].holder, InstanceId(2));
  ExpectIntact();
  // Released unconfirmed: the pending copies on instance 1 go, the restored ones stay.
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->Stats().dropped_pending_copies, 2);
  EXPECT_EQ(lake_->Stats().instances[1].used_slots, 0);
  EXPECT_EQ(lake_->Stats().instances[2].used_slots, 2);
  EXPECT_EQ(lake_->Match(Chain({10, 11})).matched_segments, 2);
  ExpectIntact();
}

TEST_F(LakePendingTest, RebalanceLeavesAPendingSegmentAloneUntilItIsConfirmed) {
  Make(SmallOptions(4, 64));
  ASSERT_TRUE(lake_->Admit(Req(1, Chain({10}))).ok());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10}), 0)).ok());
  // Decode load over the pending segment makes it heavy.
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(lake_->RecordQueryLoad(RequestId(1), 1000).ok());
    clock_.AdvanceUs(1'000);
  }
  ASSERT_TRUE(lake_->IsHeavyHitter(SegmentId(10)));
  auto rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok()) << rb.status();
  for (const balance::BalanceAction& a : rb->actions) {
    EXPECT_NE(a.segment, SegmentId(10)) << balance::ToString(a);
  }
  // Confirmed, the same load replicates it.
  ASSERT_TRUE(lake_->ConfirmStored({{RequestId(1), SegmentId(10), InstanceId(0)}}).ok());
  rb = lake_->Rebalance();
  ASSERT_TRUE(rb.ok()) << rb.status();
  int replicated = 0;
  for (const balance::BalanceAction& a : rb->actions) {
    replicated += a.segment == SegmentId(10) && a.kind == balance::ActionKind::kReplicate;
  }
  EXPECT_GE(replicated, 1);
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  ExpectIntact();
}

TEST_F(LakePendingTest, PendingCopiesCountForMemoryAdmission) {
  Make(SmallOptions(1, 4));
  LakeRequest a = Req(1, Chain({10, 11}));
  auto ta = lake_->TryAdmit(a);
  ASSERT_TRUE(ta.ok() && ta->has_value());
  ASSERT_TRUE(lake_->CommitPending(RequestId(1), Placements(1, Chain({10, 11}), 0)).ok());
  // Two slots pinned by A's pending copies: a request wanting three more waits.
  EXPECT_EQ(lake_->AvailableSlots(), 2);
  auto tb = lake_->TryAdmit(Req(2, Chain({20, 21, 22})));
  ASSERT_TRUE(tb.ok());
  EXPECT_FALSE(tb->has_value());
  // A released unconfirmed: its slots are free again.
  ASSERT_TRUE(lake_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->AvailableSlots(), 4);
  tb = lake_->TryAdmit(Req(2, Chain({20, 21, 22})));
  ASSERT_TRUE(tb.ok());
  EXPECT_TRUE(tb->has_value());
  ASSERT_TRUE(lake_->Release(RequestId(2)).ok());
  ExpectIntact();
}

}  // namespace
}  // namespace tokenlake::lake
