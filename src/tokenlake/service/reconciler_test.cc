// Reconciliation of instance reports with the lake (reconciler.h), on a real lake: restore at
// registration, orphans retried inside the restore window and freed after it, unlisted copies
// freed, missing replicas dropped after kMissesToDrop heartbeats, unconfirmed rebalance copies
// read from their source until the receiver reports them.
#include "tokenlake/service/reconciler.h"

#include <algorithm>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/guarded_lake.h"

namespace tokenlake::service {
namespace {

const absl::Time kStart = absl::FromUnixSeconds(1'000'000);

class ReconcilerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lake::LakeOptions o;
    o.num_instances = 2;
    o.segment_tokens = 4;
    o.slots_per_instance = 64;
    o.model = {.num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
    o.heavy_hitter.num_instances = 2;
    auto lk = lake::Lake::Create(o, &clock_);
    ASSERT_TRUE(lk.ok()) << lk.status();
    lake_ = std::move(*lk);
  }
  // A report of the chain `ids` (each the parent of the next), 4 tokens each.
  static v1::InstanceState Report(const std::vector<uint64_t>& ids) {
    v1::InstanceState s;
    uint64_t parent = SegmentId().value();
    for (uint64_t id : ids) {
      v1::Segment* seg = s.add_segments();
      seg->set_id(id);
      seg->set_parent(parent);
      seg->set_num_tokens(4);
      parent = id;
    }
    return s;
  }
  std::vector<int32_t> ReplicasOf(uint64_t id) const {
    std::vector<int32_t> out;
    const index::PrefixTree::Node* node = lake_->prefix_tree().Find(SegmentId(id));
    if (node != nullptr) {
      for (InstanceId r : node->replicas) out.push_back(r.value());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  ManualClock clock_{1};
  std::unique_ptr<lake::Lake> lake_;
};

TEST_F(ReconcilerTest, RegistrationRestoresAndHeartbeatsFreeWhatTheLakeDoesNotList) {
  Reconciler r(2, kStart, absl::Seconds(5));
  std::vector<uint64_t> to_free;
  r.Apply(*lake_, 0, Report({11, 12}), /*reconcile=*/false, kStart, &to_free);
  EXPECT_TRUE(to_free.empty());
  EXPECT_EQ(ReplicasOf(11), std::vector<int32_t>{0});
  EXPECT_EQ(ReplicasOf(12), std::vector<int32_t>{0});
  EXPECT_EQ(r.stats().restored, 2);
  // A heartbeat that reports a segment the lake never listed: freed, not restored.
  r.Apply(*lake_, 0, Report({11, 12, 13}), /*reconcile=*/true, kStart + absl::Seconds(1), &to_free);
  EXPECT_EQ(to_free, std::vector<uint64_t>{13});
  EXPECT_TRUE(ReplicasOf(13).empty());
  EXPECT_EQ(r.stats().frees, 1);
}

TEST_F(ReconcilerTest, AListedReplicaMissingFromTwoHeartbeatsLeavesTheLake) {
  Reconciler r(2, kStart, absl::Seconds(5));
  std::vector<uint64_t> to_free;
  r.Apply(*lake_, 1, Report({21, 22}), false, kStart, &to_free);
  r.Apply(*lake_, 1, Report({21}), true, kStart + absl::Seconds(1), &to_free);
  EXPECT_EQ(ReplicasOf(22), std::vector<int32_t>{1});  // one miss: kept
  r.Apply(*lake_, 1, Report({21}), true, kStart + absl::Seconds(2), &to_free);
  EXPECT_TRUE(ReplicasOf(22).empty());
  EXPECT_EQ(r.stats().drops, 1);
  EXPECT_EQ(ReplicasOf(21), std::vector<int32_t>{1});
  // Reported again in between resets the count.
  r.Apply(*lake_, 1, Report({}), true, kStart + absl::Seconds(3), &to_free);
  r.Apply(*lake_, 1, Report({21}), true, kStart + absl::Seconds(4), &to_free);
  r.Apply(*lake_, 1, Report({}), true, kStart + absl::Seconds(5), &to_free);
  EXPECT_EQ(ReplicasOf(21), std::vector<int32_t>{1});
  EXPECT_TRUE(to_free.empty());
}

TEST_F(ReconcilerTest, OrphansAreRetriedInsideTheRestoreWindowAndFreedAfterIt) {
  Reconciler r(2, kStart, absl::Seconds(5));
  // Instance 1 holds 32 whose parent 31 is on instance 0, which has not re-registered yet.
  v1::InstanceState orphan;
  v1::Segment* seg = orphan.add_segments();
  seg->set_id(32);
  seg->set_parent(31);
  seg->set_num_tokens(4);
  std::vector<uint64_t> to_free;
  r.Apply(*lake_, 1, orphan, false, kStart, &to_free);
  EXPECT_TRUE(ReplicasOf(32).empty());
  EXPECT_TRUE(to_free.empty());  // kept for a retry
  r.Apply(*lake_, 0, Report({31}), false, kStart + absl::Seconds(1), &to_free);
  r.Apply(*lake_, 1, orphan, true, kStart + absl::Seconds(2), &to_free);
  EXPECT_EQ(ReplicasOf(32), std::vector<int32_t>{1});
  EXPECT_TRUE(to_free.empty());

  // After the window an orphan is freed at once.
  Reconciler late(2, kStart, absl::Seconds(5));
  v1::InstanceState other;
  seg = other.add_segments();
  seg->set_id(42);
  seg->set_parent(41);
  seg->set_num_tokens(4);
  late.Apply(*lake_, 0, other, false, kStart + absl::Seconds(6), &to_free);
  EXPECT_EQ(to_free, std::vector<uint64_t>{42});
}

TEST_F(ReconcilerTest, AnUnconfirmedRebalanceCopyIsReadFromItsSourceUntilReported) {
  Reconciler r(2, kStart, absl::Seconds(5));
  lake::IterationPlan plan;
  plan.segments.push_back({.segment = SegmentId(51),
                           .num_tokens = 4,
                           .holder = InstanceId(1),
                           .action = plan::HolderAction::kLocal});
  r.AddFresh(51, /*to=*/1, /*from=*/0, kStart);
  // The source is not routable: the plan stays.
  EXPECT_EQ(r.RedirectUnconfirmed(&plan, {false, true}), 0);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(1));
  EXPECT_EQ(r.RedirectUnconfirmed(&plan, {true, true}), 1);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(0));
  EXPECT_EQ(plan.segments[0].action, plan::HolderAction::kMoveQueries);
  // The source's own copy is protected from being freed meanwhile (the lake does not list it).
  std::vector<uint64_t> to_free;
  r.Apply(*lake_, 0, Report({51}), true, kStart + absl::Seconds(1), &to_free);
  EXPECT_TRUE(to_free.empty());
  // The receiver reports it (the lake lists it there): confirmed, plans read it where they say.
  r.Apply(*lake_, 1, Report({51}), false, kStart + absl::Seconds(1), &to_free);
  r.Apply(*lake_, 1, Report({51}), true, kStart + absl::Seconds(2), &to_free);
  plan.segments[0].holder = InstanceId(1);
  EXPECT_EQ(r.RedirectUnconfirmed(&plan, {true, true}), 0);
  EXPECT_EQ(plan.segments[0].holder, InstanceId(1));
  EXPECT_EQ(r.stats().redirects, 1);
}

}  // namespace
}  // namespace tokenlake::service
