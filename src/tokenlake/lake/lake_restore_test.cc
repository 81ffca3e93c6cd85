// Lake::RestoreReplicas and Lake::DropReplica (rebuilding the pool from the instances' reports,
// as after a coordinator restart, and reconciling a lost copy).
//
// The randomised test builds a random forest of segments, gives every instance a random subset
// (plus orphans whose parent nobody holds, duplicates and segments with a conflicting parent),
// shuffles each report and restores the instances one after the other into an empty lake. The
// reference model is computed independently: for each instance in order, the reported segments
// whose whole ancestor chain is in the tree so far or restorable from the same report. After
// every instance: the tree's replica map equals the model's, the lake's integrity check passes,
// and restored + rejected + already listed = reported.
#include <algorithm>
#include <iostream>
#include <map>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {
namespace {

constexpr int32_t kS = 4;

LakeOptions Options(int32_t instances, int32_t slots) {
  LakeOptions o;
  o.num_instances = instances;
  o.segment_tokens = kS;
  o.slots_per_instance = slots;
  o.model = plan::ModelShape{2, 8, 2, 16, 2};
  return o;
}

TEST(LakeRestoreTest, ChildrenBeforeParentsInTheReportAreStillRestored) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(2, 8), &clock);
  ASSERT_TRUE(lake.ok()) << lake.status();
  const std::vector<HeldSegment> held = {{SegmentId(3), SegmentId(2), kS},
                                         {SegmentId(2), SegmentId(1), kS},
                                         {SegmentId(1), SegmentId(), kS}};
  auto r = (*lake)->RestoreReplicas(InstanceId(1), held);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->restored_replicas, 3);
  EXPECT_EQ(r->new_segments, 3);
  EXPECT_TRUE(r->rejected.empty());
  const std::vector<index::SegmentKey> keys = {
      {SegmentId(1), kS}, {SegmentId(2), kS}, {SegmentId(3), kS}};
  EXPECT_EQ((*lake)->Match(keys).matched_segments, 3);
  EXPECT_TRUE((*lake)->CheckIntegrity().ok());
}

TEST(LakeRestoreTest, OrphansConflictsAndBadLengthsAreRejected) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(2, 8), &clock);
  ASSERT_TRUE(lake.ok());
  ASSERT_TRUE((*lake)->RestoreReplicas(InstanceId(0), {{{SegmentId(1), SegmentId(), kS}}}).ok());
  const std::vector<HeldSegment> held = {
      {SegmentId(7), SegmentId(6), kS},     // orphan: 6 is nowhere
      {SegmentId(1), SegmentId(9), kS},     // known with another parent
      {SegmentId(5), SegmentId(), kS + 1},  // too long
      {SegmentId(1), SegmentId(), kS}};     // a second copy of a known segment
  auto r = (*lake)->RestoreReplicas(InstanceId(1), held);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->restored_replicas, 1);
  EXPECT_EQ(r->new_segments, 0);
  std::set<uint64_t> rejected;
  for (SegmentId id : r->rejected) rejected.insert(id.value());
  EXPECT_EQ(rejected, (std::set<uint64_t>{1, 5, 7}));
  EXPECT_EQ((*lake)->Stats().replicas, 2);
  EXPECT_TRUE((*lake)->CheckIntegrity().ok());
  // Unknown instance: an error, not a crash.
  EXPECT_EQ((*lake)->RestoreReplicas(InstanceId(2), held).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LakeRestoreTest, ReportBeyondTheFreeSlotsIsRejectedNotCrashed) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(1, 2), &clock);
  ASSERT_TRUE(lake.ok());
  const std::vector<HeldSegment> held = {{SegmentId(1), SegmentId(), kS},
                                         {SegmentId(2), SegmentId(1), kS},
                                         {SegmentId(3), SegmentId(2), kS}};
  auto r = (*lake)->RestoreReplicas(InstanceId(0), held);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->restored_replicas, 2);
  ASSERT_EQ(r->rejected.size(), 1u);
  EXPECT_EQ(r->rejected[0], SegmentId(3));
  EXPECT_TRUE((*lake)->CheckIntegrity().ok());
}

TEST(LakeRestoreTest, DropReplicaKeepsPinnedAndInteriorLastCopies) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(2, 8), &clock);
  ASSERT_TRUE(lake.ok());
  ASSERT_TRUE((*lake)
                  ->RestoreReplicas(InstanceId(0), {{{SegmentId(1), SegmentId(), kS},
                                                     {SegmentId(2), SegmentId(1), kS}}})
                  .ok());
  ASSERT_TRUE((*lake)->RestoreReplicas(InstanceId(1), {{{SegmentId(1), SegmentId(), kS}}}).ok());
  // Interior last copy: refused; extra copy: fine.
  EXPECT_EQ((*lake)->DropReplica(SegmentId(1), InstanceId(1)).code(), absl::StatusCode::kOk);
  EXPECT_EQ((*lake)->DropReplica(SegmentId(1), InstanceId(0)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*lake)->DropReplica(SegmentId(1), InstanceId(1)).code(), absl::StatusCode::kNotFound);
  // Pinned leaf: refused while the request runs, dropped after.
  LakeRequest req{.id = RequestId(1),
                  .keys = {{SegmentId(1), kS}, {SegmentId(2), kS}, {SegmentId(9), 1}},
                  .new_tokens = 1};
  ASSERT_TRUE((*lake)->Admit(req).ok());
  EXPECT_EQ((*lake)->DropReplica(SegmentId(2), InstanceId(0)).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*lake)->Release(RequestId(1)).ok());
  EXPECT_TRUE((*lake)->DropReplica(SegmentId(2), InstanceId(0)).ok());
  EXPECT_EQ((*lake)->Stats().segments, 1);
  EXPECT_TRUE((*lake)->CheckIntegrity().ok());
  EXPECT_EQ((*lake)->DropReplica(SegmentId(2), InstanceId(5)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LakeRestoreTest, LoseReplicaErasesAPinnedSubtreeAndItsCopiesElsewhere) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(2, 8), &clock);
  ASSERT_TRUE(lake.ok());
  // 1 <- 2 <- 3 on instance 0; 3 also on instance 1; 1 also on instance 1.
  ASSERT_TRUE((*lake)
                  ->RestoreReplicas(InstanceId(0), {{{SegmentId(1), SegmentId(), kS},
                                                     {SegmentId(2), SegmentId(1), kS},
                                                     {SegmentId(3), SegmentId(2), kS}}})
                  .ok());
  ASSERT_TRUE((*lake)
                  ->RestoreReplicas(InstanceId(1), {{{SegmentId(1), SegmentId(), kS},
                                                     {SegmentId(3), SegmentId(2), kS}}})
                  .ok());
  LakeRequest req{
      .id = RequestId(1),
      .keys = {{SegmentId(1), kS}, {SegmentId(2), kS}, {SegmentId(3), kS}, {SegmentId(9), 1}},
      .new_tokens = 1};
  ASSERT_TRUE((*lake)->Admit(req).ok());
  // A non-last copy goes even though pinned.
  auto a = (*lake)->LoseReplica(SegmentId(1), InstanceId(1));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->empty());
  // The last copy of the interior, pinned segment 2: 2 and 3 go, 3's copy on 1 is reported.
  auto b = (*lake)->LoseReplica(SegmentId(2), InstanceId(0));
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->size(), 1u);
  EXPECT_EQ((*b)[0], (StoredReplica{SegmentId(3), InstanceId(1)}));
  EXPECT_EQ((*lake)->Stats().segments, 1);
  EXPECT_TRUE((*lake)->CheckIntegrity().ok()) << (*lake)->CheckIntegrity();
  // The request's remaining pin (segment 1) is released normally.
  EXPECT_TRUE((*lake)->Release(RequestId(1)).ok());
  EXPECT_EQ((*lake)->Stats().pinned_segments, 0);
  EXPECT_EQ((*lake)->LoseReplica(SegmentId(2), InstanceId(0)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ((*lake)->LoseReplica(SegmentId(1), InstanceId(7)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LakeRestoreTest, CommitsAndRebalancesTakeIncreasingSequenceNumbers) {
  ManualClock clock(1);
  auto lake = Lake::Create(Options(2, 8), &clock);
  ASSERT_TRUE(lake.ok());
  uint64_t last = 0;
  for (uint64_t r = 1; r <= 3; ++r) {
    LakeRequest req{.id = RequestId(r), .keys = {{SegmentId(r), kS}}, .new_tokens = kS};
    ASSERT_TRUE((*lake)->Admit(req).ok());
    auto c = (*lake)->CommitKeys(RequestId(r), req.keys, InstanceId(0));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_GT(c->sequence, last);
    last = c->sequence;
    ASSERT_TRUE((*lake)->Release(RequestId(r)).ok());
    auto b = (*lake)->Rebalance();
    ASSERT_TRUE(b.ok());
    EXPECT_GT(b->sequence, last);
    last = b->sequence;
  }
}

struct Params {
  int32_t instances;
  int32_t segments;
};

class LakeRestoreModelTest : public ::testing::TestWithParam<Params> {};

TEST_P(LakeRestoreModelTest, RestoredTreeEqualsTheReferenceModel) {
  const Params p = GetParam();
  for (int trial = 0; trial < 20; ++trial) {
    const uint64_t seed = 4242 + p.instances * 1000 + p.segments * 10 + trial;
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    if (trial == 0) std::cout << "seed=" << seed << "\n";
    Rng rng(seed);
    // A random forest: segment k (id k+1) has a random earlier parent or none.
    std::vector<HeldSegment> all;
    for (int32_t k = 0; k < p.segments; ++k) {
      const bool root = k == 0 || rng.UniformInt(0, 3) == 0;
      const SegmentId parent =
          root ? SegmentId() : all[static_cast<size_t>(rng.UniformInt(0, k - 1))].id;
      all.push_back({SegmentId(static_cast<uint64_t>(k + 1)), parent, kS});
    }
    std::map<uint64_t, HeldSegment> by_id;
    for (const HeldSegment& h : all) by_id[h.id.value()] = h;
    ManualClock clock(1);
    auto lake_or = Lake::Create(Options(p.instances, p.segments + 8), &clock);
    ASSERT_TRUE(lake_or.ok());
    Lake& lake = **lake_or;
    std::set<uint64_t> in_tree;                   // model: node ids
    std::set<std::pair<uint64_t, int32_t>> reps;  // model: (id, instance)
    for (int32_t i = 0; i < p.instances; ++i) {
      std::vector<HeldSegment> report;
      for (const HeldSegment& h : all) {
        if (rng.UniformInt(0, 2) != 0) report.push_back(h);
      }
      const int32_t extras = static_cast<int32_t>(rng.UniformInt(0, 3));
      for (int32_t e = 0; e < extras; ++e) {
        switch (rng.UniformInt(0, 2)) {
          case 0:  // orphan under an id nobody has
            report.push_back({SegmentId(100000 + rng.UniformInt(0, 50)), SegmentId(99999), kS});
            break;
          case 1:  // conflicting parent for a known id
            report.push_back({all[rng.UniformInt(0, p.segments - 1)].id, SegmentId(77777), kS});
            break;
          default:  // duplicate entry
            if (!report.empty()) report.push_back(report[rng.UniformInt(0, report.size() - 1)]);
        }
      }
      for (size_t k = report.size(); k > 1; --k) {
        std::swap(report[k - 1], report[static_cast<size_t>(rng.UniformInt(0, k - 1))]);
      }
      // Reference: closure of the valid reported segments whose parent is known.
      std::set<uint64_t> valid;
      for (const HeldSegment& h : report) {
        auto it = by_id.find(h.id.value());
        if (it != by_id.end() && it->second.parent == h.parent) valid.insert(h.id.value());
      }
      bool grew = true;
      std::set<uint64_t> restorable;
      while (grew) {
        grew = false;
        for (uint64_t id : valid) {
          if (restorable.contains(id)) continue;
          const SegmentId parent = by_id[id].parent;
          if (!parent.valid() || in_tree.contains(parent.value()) ||
              restorable.contains(parent.value())) {
            restorable.insert(id);
            grew = true;
          }
        }
      }
      auto r = lake.RestoreReplicas(InstanceId(i), report);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->restored_replicas + r->already_listed + static_cast<int64_t>(r->rejected.size()),
                static_cast<int64_t>(report.size()));
      EXPECT_EQ(r->restored_replicas, static_cast<int64_t>(restorable.size()));
      for (uint64_t id : restorable) {
        in_tree.insert(id);
        reps.insert({id, i});
      }
      std::set<std::pair<uint64_t, int32_t>> actual;
      lake.prefix_tree().ForEachNode([&](const index::PrefixTree::Node& n) {
        for (InstanceId inst : n.replicas) actual.insert({n.id.value(), inst.value()});
      });
      ASSERT_EQ(actual, reps) << "after instance " << i;
      ASSERT_TRUE(lake.CheckIntegrity().ok()) << lake.CheckIntegrity();
    }
    EXPECT_EQ(lake.Stats().segments, static_cast<int64_t>(in_tree.size()));
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, LakeRestoreModelTest,
                         ::testing::Values(Params{1, 6}, Params{2, 20}, Params{3, 60},
                                           Params{4, 200}));

}  // namespace
}  // namespace tokenlake::lake
