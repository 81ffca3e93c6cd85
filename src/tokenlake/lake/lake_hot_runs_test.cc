// Lake::ReplicateHotRuns (docs/adr/0020): copies of hot runs decided from the plans in force.
#include <algorithm>
#include <map>
#include <memory>
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

LakeOptions HotOptions(int32_t instances, int32_t slots) {
  LakeOptions o = SmallOptions(instances, slots);
  o.hot_runs.enabled = true;
  return o;
}

std::unique_ptr<Lake> MakeHotLake(ManualClock* clock, int32_t instances, int32_t slots) {
  auto lake = Lake::Create(HotOptions(instances, slots), clock);
  EXPECT_TRUE(lake.ok()) << lake.status();
  return *std::move(lake);
}

// A document: a chain of `segments` segments with ids base, base + 1, ..., held on `instance`.
std::vector<SegmentKey> StoreDocument(Lake& lake, uint64_t base, int segments, int instance) {
  std::vector<SegmentKey> keys;
  std::vector<HeldSegment> held;
  for (int k = 0; k < segments; ++k) {
    const SegmentId id(base + static_cast<uint64_t>(k));
    held.push_back({id, k == 0 ? SegmentId() : SegmentId(base + k - 1), kTestSegmentTokens});
    keys.push_back({id, kTestSegmentTokens});
  }
  auto restored = lake.RestoreReplicas(InstanceId(instance), held);
  EXPECT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->restored_replicas, segments);
  return keys;
}

// Admits request `id` reading `keys` (all cached) and puts its plan on `computing` in force.
std::vector<plan::BatchPlan> AdmitAndPlan(Lake& lake, uint64_t id,
                                          const std::vector<SegmentKey>& keys, int computing) {
  const LakeRequest r{.id = RequestId(id), .keys = keys, .new_tokens = 1};
  EXPECT_TRUE(lake.Admit(r).ok());
  auto plans = lake.GenPlans({Batch{{r}, 1, {InstanceId(computing)}}});
  EXPECT_TRUE(plans.ok()) << plans.status();
  return *std::move(plans);
}

// Every question of a document held on instance 0 reads it there, until the plans in force
// make instance 0 hot: then the document is copied to an instance with no access, and the next
// question, computed on instance 0, reads the copy.
TEST(LakeHotRunsTest, AHotDocumentIsCopiedWhereAccessIsLowestAndReadThere) {
  ManualClock clock(1'000'000);
  std::unique_ptr<Lake> lake = MakeHotLake(&clock, 4, 64);
  const std::vector<SegmentKey> doc = StoreDocument(*lake, 100, 8, 0);
  const std::vector<SegmentKey> other = StoreDocument(*lake, 200, 8, 1);
  // Instance 1 is read too (below the mean is then only 2 and 3).
  ASSERT_TRUE(lake->ReplicateHotRuns(AdmitAndPlan(*lake, 50, other, 1)).ok());
  auto first = lake->ReplicateHotRuns(AdmitAndPlan(*lake, 1, doc, 0));
  ASSERT_TRUE(first.ok()) << first.status();
  // Instance 0's access (8 segments) is twice the mean (16 / 4): hot; the run is all of it.
  ASSERT_EQ(first->actions.size(), 8u);
  for (const balance::BalanceAction& a : first->actions) {
    EXPECT_EQ(a.kind, balance::ActionKind::kReplicate);
    EXPECT_EQ(a.from, InstanceId(0));
    EXPECT_EQ(a.to, InstanceId(2));  // the least access below the mean (ties: lowest id)
  }
  EXPECT_EQ(first->bytes_moved, 8 * plan::KvBytes(lake->options().model, kTestSegmentTokens));
  // The next question on instance 0 reads the copy on instance 2 (ADR 0019: a replicated run is
  // read where access is lowest when its own instance is above the mean), as far as the
  // planner's per-holder work cap lets it (planner.h, step 3): at least a segment.
  const std::vector<plan::BatchPlan> second = AdmitAndPlan(*lake, 2, doc, 0);
  int on_copy = 0;
  for (const plan::SegmentAssignment& a : second[0].requests[0].segments) {
    EXPECT_TRUE(a.holder == InstanceId(0) || a.holder == InstanceId(2)) << a.holder;
    on_copy += a.holder == InstanceId(2) ? 1 : 0;
  }
  EXPECT_GE(on_copy, 1);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
  // Once nothing pins it, Rebalance drops the extra copy (the document is not heavy).
  ASSERT_TRUE(lake->Release(RequestId(1)).ok());
  ASSERT_TRUE(lake->Release(RequestId(2)).ok());
  clock.AdvanceUs(60'000'000);
  ASSERT_TRUE(lake->Rebalance().ok());
  EXPECT_EQ(lake->prefix_tree().Find(SegmentId(100))->replicas.size(), 1u);
}

// A run longer than max_instance_share of an instance is never copied (small caches).
TEST(LakeHotRunsTest, ARunLongerThanItsShareOfAnInstanceIsNotCopied) {
  ManualClock clock(1'000'000);
  std::unique_ptr<Lake> lake = MakeHotLake(&clock, 4, 28);  // 8 > 0.25 x 28
  const std::vector<SegmentKey> doc = StoreDocument(*lake, 100, 8, 0);
  auto copied = lake->ReplicateHotRuns(AdmitAndPlan(*lake, 1, doc, 0));
  ASSERT_TRUE(copied.ok());
  EXPECT_TRUE(copied->actions.empty());
}

// Off by default.
TEST(LakeHotRunsTest, DisabledDoesNothing) {
  ManualClock clock(1'000'000);
  std::unique_ptr<Lake> lake = MakeLake(&clock, 4, 64);
  const std::vector<SegmentKey> doc = StoreDocument(*lake, 100, 8, 0);
  auto copied = lake->ReplicateHotRuns(AdmitAndPlan(*lake, 1, doc, 0));
  ASSERT_TRUE(copied.ok());
  EXPECT_TRUE(copied->actions.empty());
}

TEST(LakeHotRunsTest, InvalidOptionsAreRefused) {
  ManualClock clock(0);
  for (auto mutate :
       std::vector<void (*)(HotRunOptions&)>{[](HotRunOptions& h) { h.access_margin = -0.1; },
                                             [](HotRunOptions& h) { h.min_access_share = 0; },
                                             [](HotRunOptions& h) { h.min_access_share = 1.5; },
                                             [](HotRunOptions& h) { h.max_instance_share = 0; },
                                             [](HotRunOptions& h) { h.max_instance_share = 2; }}) {
    LakeOptions o = HotOptions(4, 8);
    mutate(o.hot_runs);
    EXPECT_EQ(Lake::Create(o, &clock).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// The naive rule (ADR 0020), on plain maps: the copies one ReplicateHotRuns call makes when
// every instance has room, given the access in force per instance, the copies of each segment
// and the requests pinning each segment.
std::set<std::pair<uint64_t, int>> NaiveCopies(const std::vector<plan::BatchPlan>& plans,
                                               const std::vector<double>& access,
                                               std::map<uint64_t, std::set<int>> copies,
                                               const std::map<uint64_t, int>& pins,
                                               const std::set<uint64_t>& active,
                                               const HotRunOptions& opt, int slots) {
  const int n = static_cast<int>(access.size());
  // The mean as the lake computes it (the sum over n), so that ties at the margin agree.
  double sum = 0;
  for (double a : access) sum += a;
  const double mean = sum / n;
  std::set<std::pair<uint64_t, int>> out;
  for (const plan::BatchPlan& p : plans) {
    for (const plan::RequestPlan& rp : p.requests) {
      if (!active.contains(rp.request.value())) continue;
      const auto& segs = rp.segments;
      for (size_t i = 0; i < segs.size();) {
        const int holder = segs[i].holder.value();
        const std::set<int> first = copies[segs[i].segment.value()];
        size_t j = i;
        while (j < segs.size() && segs[j].holder.value() == holder &&
               copies[segs[j].segment.value()] == first) {
          ++j;
        }
        const size_t len = j - i;
        const uint64_t head = segs[i].segment.value();
        const size_t begin = i;
        i = std::max(j, i + 1);
        if (!first.contains(holder)) continue;
        if (!(access[holder] > (1 + opt.access_margin) * mean)) continue;
        const double estimate = static_cast<double>(pins.at(head)) *
                                static_cast<double>(len * kTestSegmentTokens) /
                                static_cast<double>(first.size());
        if (estimate < opt.min_access_share * access[holder]) continue;
        if (static_cast<double>(len) > opt.max_instance_share * slots) continue;
        int target = -1;
        for (int c = 0; c < n; ++c) {
          if (first.contains(c) || !(access[c] < mean)) continue;
          if (target < 0 || access[c] < access[target]) target = c;
        }
        if (target < 0) continue;
        for (size_t k = begin; k < begin + len; ++k) {
          const uint64_t s = segs[k].segment.value();
          if (copies[s].insert(target).second) out.insert({s, target});
        }
      }
    }
  }
  return out;
}

// Random documents, questions (admitted, planned on a random instance, released) and
// Rebalance calls; with room everywhere the copies are exactly the naive rule's; with little
// room, the pool stays consistent, no run longer than its share of an instance is copied, and
// the slots promised to admitted requests are kept.
TEST(LakeHotRunsTest, CopiesMatchANaiveModelOfTheRule) {
  const uint64_t seed = TestSeed(2020);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  int64_t copies_made = 0;
  for (int round = 0; round < 12; ++round) {
    ManualClock clock(1'000'000);
    const int n = 2 + static_cast<int>(rng() % 5);
    const bool roomy = round % 2 == 0;
    const int slots = roomy ? 400 : 12 + static_cast<int>(rng() % 12);
    std::unique_ptr<Lake> lake = MakeHotLake(&clock, n, slots);
    const HotRunOptions& opt = lake->options().hot_runs;
    std::vector<std::vector<SegmentKey>> docs;
    // Round robin from a random instance: at most 3 documents of at most 4 segments each on one
    // instance when room is short (slots >= 12), so every document fits where it is put.
    const int num_docs = 3 + static_cast<int>(rng() % 4);
    const int offset = static_cast<int>(rng() % n);
    for (int d = 0; d < num_docs; ++d) {
      const int len = 1 + static_cast<int>(rng() % (roomy ? 8 : 4));
      docs.push_back(StoreDocument(*lake, uint64_t{1000} * static_cast<uint64_t>(d + 1), len,
                                   (d + offset) % n));
    }
    std::map<uint64_t, int> doc_of;  // active request -> document
    std::set<uint64_t> active;
    uint64_t next_id = 1;
    for (int step = 0; step < 200; ++step) {
      clock.AdvanceUs(10'000);
      const uint32_t op = rng() % 10;
      if (op < 6) {  // a question
        const uint64_t id = next_id++;
        // Skewed: document 0 is asked most.
        const int d = rng() % 2 == 0 ? 0 : static_cast<int>(rng() % docs.size());
        const LakeRequest r{.id = RequestId(id), .keys = docs[d], .new_tokens = 1};
        if (!lake->Admit(r).ok()) continue;  // a document lost to eviction: skip
        active.insert(id);
        doc_of[id] = d;
        auto plans = lake->GenPlans({Batch{{r}, 1, {InstanceId(static_cast<int32_t>(rng() % n))}}});
        ASSERT_TRUE(plans.ok()) << plans.status();
        // The naive model's inputs, read before the call.
        std::vector<double> access(n);
        const LakeStats before = lake->Stats();
        for (int i = 0; i < n; ++i) {
          access[i] = static_cast<double>(before.instances[i].access_tokens);
        }
        std::map<uint64_t, std::set<int>> copies;
        std::map<uint64_t, int> pins;
        for (const plan::SegmentAssignment& a : (*plans)[0].requests[0].segments) {
          const index::PrefixTree::Node* node = lake->prefix_tree().Find(a.segment);
          ASSERT_NE(node, nullptr);
          for (InstanceId i : node->replicas) copies[a.segment.value()].insert(i.value());
          pins[a.segment.value()] = 0;
        }
        for (const auto& [rid, dd] : doc_of) {
          for (const SegmentKey& k : docs[dd]) {
            if (pins.contains(k.id.value())) pins[k.id.value()] += 1;
          }
        }
        const std::set<std::pair<uint64_t, int>> expected =
            NaiveCopies(*plans, access, copies, pins, active, opt, slots);
        const int64_t available_before = lake->AvailableSlots();
        auto copied = lake->ReplicateHotRuns(*plans);
        ASSERT_TRUE(copied.ok()) << copied.status();
        std::set<std::pair<uint64_t, int>> got;
        for (const balance::BalanceAction& a : copied->actions) {
          if (a.kind != balance::ActionKind::kReplicate) continue;
          got.insert({a.segment.value(), a.to.value()});
          EXPECT_TRUE(copies[a.segment.value()].contains(a.from.value()));
          EXPECT_FALSE(copies[a.segment.value()].contains(a.to.value()));
        }
        copies_made += static_cast<int64_t>(got.size());
        if (roomy) {
          EXPECT_EQ(got, expected) << "step " << step;
        } else {
          // Only copies the rule allows (room may stop a run part-way).
          for (const auto& c : got) EXPECT_TRUE(expected.contains(c)) << "step " << step;
          EXPECT_GE(lake->AvailableSlots(), std::min<int64_t>(available_before, 0));
        }
      } else if (op < 9) {  // a question ends
        if (active.empty()) continue;
        auto it = active.begin();
        std::advance(it, rng() % active.size());
        ASSERT_TRUE(lake->Release(RequestId(*it)).ok());
        doc_of.erase(*it);
        active.erase(it);
      } else {
        ASSERT_TRUE(lake->Rebalance().ok());
      }
      ASSERT_TRUE(lake->CheckIntegrity().ok()) << "step " << step << ": " << lake->CheckIntegrity();
    }
  }
  EXPECT_GT(copies_made, 0);
}

}  // namespace
}  // namespace tokenlake::lake
