// The Lake's cache access in force (lake.h, "Cache access in force"): which plans count, and
// that the planner spreads a replicated prefix by it when requests are planned one at a time.
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/lake/lake_testing.h"

namespace tokenlake::lake {
namespace {

using index::SegmentKey;

// The plan's access, computed from its segments (not from its holders, as the ledger does).
std::map<int, int64_t> AccessOf(const plan::RequestPlan& rp) {
  std::map<int, int64_t> out;
  for (const plan::SegmentAssignment& a : rp.segments) {
    const InstanceId where =
        a.action == plan::HolderAction::kPullKv ? rp.compute_instance : a.holder;
    out[where.value()] += a.num_tokens;
  }
  return out;
}

// Random plans, admissions, commits, releases and instance losses against a model of the plans
// in force: a request's latest plan, until its Commit or Release; a plan of a request not
// admitted by the next GenPlans is dropped; a lost instance's shares go with it.
TEST(LakeAccessTest, AccessInForceMatchesAModelOfThePlansInForce) {
  const uint64_t seed = TestSeed(5302);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  int64_t in_force_steps = 0;  // steps with some plan in force (the test is not vacuous)
  for (int round = 0; round < 10; ++round) {
    ManualClock clock(1'000'000);
    const int n = 2 + static_cast<int>(rng() % 4);
    std::unique_ptr<Lake> lake = MakeLake(&clock, n, 12);
    std::map<uint64_t, std::map<int, int64_t>> model;  // request -> instance -> tokens
    std::set<uint64_t> active;
    std::map<uint64_t, std::vector<SegmentKey>> keys_of;
    std::map<uint64_t, std::vector<plan::NewSegmentPlacement>> placements;
    for (int step = 0; step < 300; ++step) {
      clock.AdvanceUs(1000);
      const uint64_t id = 1 + rng() % 8;
      const uint32_t op = rng() % 10;
      if (op < 4) {  // plan one request (a batch of one, or of two)
        std::vector<uint64_t> ids = {id};
        if (rng() % 3 == 0) ids.push_back(1 + (id + rng() % 7) % 8);
        if (ids.size() == 2 && ids[0] == ids[1]) ids.pop_back();
        Batch batch;
        batch.dop = 1;
        for (uint64_t r : ids) {
          if (!keys_of.contains(r)) {
            // A shared root (2 segments), then the request's own segments.
            std::vector<SegmentKey> keys = Chain({1000, 1001});
            const int own = 1 + static_cast<int>(rng() % 3);
            for (int k = 0; k < own; ++k) {
              keys.push_back({SegmentId(r * 100 + static_cast<uint64_t>(k)), kTestSegmentTokens});
            }
            keys_of[r] = keys;
          }
          batch.requests.push_back(LakeRequest{.id = RequestId(r),
                                               .keys = keys_of[r],
                                               .new_tokens = 1 + static_cast<int64_t>(rng() % 64)});
        }
        auto plans = lake->GenPlans({batch});
        ASSERT_TRUE(plans.ok()) << plans.status();
        std::erase_if(model, [&](const auto& e) { return !active.contains(e.first); });
        for (const plan::RequestPlan& rp : (*plans)[0].requests) {
          std::map<int, int64_t> a = AccessOf(rp);
          if (a.empty()) {
            model.erase(rp.request.value());
          } else {
            model[rp.request.value()] = a;
          }
          placements[rp.request.value()].clear();
          for (const plan::NewSegmentPlacement& p : (*plans)[0].transfer.new_segments) {
            if (p.request == rp.request) placements[rp.request.value()].push_back(p);
          }
        }
      } else if (op < 6) {  // admit
        if (!active.contains(id) && keys_of.contains(id)) {
          auto admitted =
              lake->Admit(LakeRequest{.id = RequestId(id), .keys = keys_of[id], .new_tokens = 1});
          ASSERT_TRUE(admitted.ok()) << admitted.status();
          active.insert(id);
        }
      } else if (op < 8) {  // commit the latest plan's new segments
        if (active.contains(id)) {
          auto committed = lake->Commit(RequestId(id), placements[id]);
          ASSERT_TRUE(committed.ok()) << committed.status();
          placements[id].clear();
          model.erase(id);
        }
      } else if (op == 9 && rng() % 8 == 0) {  // an instance is lost
        const int lost = static_cast<int>(rng() % n);
        ASSERT_TRUE(lake->DropInstance(InstanceId(lost)).ok());
        for (auto& [r, a] : model) a.erase(lost);
        std::erase_if(model, [](const auto& e) { return e.second.empty(); });
      } else if (active.contains(id)) {  // release
        ASSERT_TRUE(lake->Release(RequestId(id)).ok());
        active.erase(id);
        model.erase(id);
        keys_of.erase(id);  // its next life reads a new chain
      }
      ASSERT_TRUE(lake->CheckIntegrity().ok()) << "step " << step << ": " << lake->CheckIntegrity();
      std::vector<int64_t> sums(n, 0);
      for (const auto& [r, a] : model) {
        for (const auto& [i, t] : a) sums[i] += t;
      }
      in_force_steps += model.empty() ? 0 : 1;
      const LakeStats stats = lake->Stats();
      for (int i = 0; i < n; ++i) {
        ASSERT_EQ(stats.instances[i].access_tokens, sums[i])
            << "step " << step << " instance " << i;
      }
    }
  }
  EXPECT_GT(in_force_steps, 1000);
}

// Eight requests share a two-segment prefix with a copy on every instance; each is admitted and
// planned alone on instance 0, and stays in force (a decode). The prefix's reads spread over all
// four copies, where each call alone would have kept them on instance 0.
TEST(LakeAccessTest, RequestsPlannedOneAtATimeSpreadAReplicatedPrefix) {
  ManualClock clock(1'000'000);
  std::unique_ptr<Lake> lake = MakeLake(&clock, 4, 64);
  const std::vector<SegmentKey> prefix = Chain({1, 2});
  const LakeRequest first{.id = RequestId(100), .keys = prefix, .new_tokens = 32};
  auto plans = lake->GenPlans({Batch{{first}, 1, {InstanceId(0)}}});
  ASSERT_TRUE(plans.ok());
  ASSERT_TRUE(lake->Admit(first).ok());
  ASSERT_TRUE(lake->Commit(first.id, (*plans)[0].transfer.new_segments).ok());
  ASSERT_TRUE(lake->Release(first.id).ok());
  for (int32_t i = 1; i < 4; ++i) {
    auto restored =
        lake->RestoreReplicas(InstanceId(i), {{SegmentId(1), SegmentId(), kTestSegmentTokens},
                                              {SegmentId(2), SegmentId(1), kTestSegmentTokens}});
    ASSERT_TRUE(restored.ok()) << restored.status();
    ASSERT_EQ(restored->restored_replicas, 2);
  }
  std::map<int, int> prefix_reader;
  for (uint64_t r = 0; r < 8; ++r) {
    // The request's own context: 8 segments computed on instance 0 (their work keeps the
    // planner's per-holder work cap above the prefix's).
    std::vector<SegmentKey> keys = prefix;
    for (uint64_t k = 0; k < 8; ++k) {
      keys.push_back({SegmentId(1000 + r * 10 + k), kTestSegmentTokens});
    }
    const LakeRequest prefill{
        .id = RequestId(r), .keys = keys, .new_tokens = int64_t{8} * kTestSegmentTokens};
    ASSERT_TRUE(lake->Admit(prefill).ok());
    auto p = lake->GenPlans({Batch{{prefill}, 1, {InstanceId(0)}}});
    ASSERT_TRUE(p.ok());
    for (plan::NewSegmentPlacement& np : (*p)[0].transfer.new_segments) np.target = InstanceId(0);
    ASSERT_TRUE(lake->Commit(prefill.id, (*p)[0].transfer.new_segments).ok());
    // Its decode: one plan in force until it ends.
    const LakeRequest decode{.id = RequestId(r), .keys = keys, .new_tokens = 1};
    auto d = lake->GenPlans({Batch{{decode}, 1, {InstanceId(0)}}});
    ASSERT_TRUE(d.ok());
    const plan::RequestPlan& rp = (*d)[0].requests[0];
    ASSERT_EQ(rp.compute_instance, InstanceId(0));
    ASSERT_EQ(rp.segments[0].holder, rp.segments[1].holder);  // one reader per run
    prefix_reader[rp.segments[0].holder.value()] += 1;
  }
  EXPECT_EQ(prefix_reader.size(), 4u);
  for (const auto& [instance, reads] : prefix_reader) EXPECT_GE(reads, 1) << instance;
  EXPECT_LE(prefix_reader[0], 2);
  EXPECT_TRUE(lake->CheckIntegrity().ok());
}

}  // namespace
}  // namespace tokenlake::lake
