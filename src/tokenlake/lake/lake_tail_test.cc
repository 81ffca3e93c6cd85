// Tails in the pool (lake.h, "Tails in the pool"): accounting tests, and a randomised model test
// of tail requests iterating over a shared pool beside requests without tails.
#include <algorithm>
#include <iostream>
#include <map>
#include <optional>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/lake/lake_testing.h"

namespace tokenlake::lake {
namespace {

constexpr int32_t kS = kTestSegmentTokens;

std::vector<plan::NewSegmentPlacement> Placements(uint64_t request,
                                                  const std::vector<index::SegmentKey>& keys,
                                                  size_t from, InstanceId source,
                                                  std::vector<InstanceId> targets) {
  std::vector<plan::NewSegmentPlacement> out;
  for (size_t i = from; i < keys.size(); ++i) {
    out.push_back({RequestId(request), keys[i].id, i > 0 ? keys[i - 1].id : SegmentId(),
                   keys[i].num_tokens, source, targets[i - from]});
  }
  return out;
}

TEST(LakeTailTest, TailSlotsAreUsedSlotsNothingIsPlacedOn) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 1, 4);
  // Request 1's tail: 2.5 segments of rows -> 3 slots.
  auto a = lake->TryAdmit(TailRequest(1, {}, 2 * kS + 8));
  ASSERT_TRUE(a.ok() && a->has_value()) << a.status();
  EXPECT_EQ((*a)->tail_slots, std::vector<InstanceId>(3, InstanceId(0)));
  EXPECT_EQ(lake->AvailableSlots(), 1);
  EXPECT_EQ(lake->Stats().instances[0].used_slots, 3);
  // Request 2 (no tail) commits 2 segments: one fits, the other finds only tail slots.
  ASSERT_TRUE(lake->Admit({.id = RequestId(2), .keys = {}, .new_tokens = 32}).ok());
  auto c = lake->Commit(RequestId(2), Placements(2, Chain({10, 11}), 0, InstanceId(0),
                                                 {InstanceId(0), InstanceId(0)}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->stored.size(), 1u);
  EXPECT_EQ(c->not_stored, std::vector<SegmentId>{SegmentId(11)});
  EXPECT_TRUE(c->evicted.empty());
  EXPECT_EQ(lake->TailSlots(RequestId(1)).size(), 3u);
  // A tail outlives Release; ReleaseTail gives it back.
  ASSERT_TRUE(lake->Release(RequestId(1)).ok());
  EXPECT_EQ(lake->TailSlots(RequestId(1)).size(), 3u);
  EXPECT_EQ(lake->Stats().tail_slots, 3);
  lake->ReleaseTail(RequestId(1));
  EXPECT_TRUE(lake->TailSlots(RequestId(1)).empty());
  EXPECT_EQ(lake->Stats().tail_slots, 0);
  EXPECT_EQ(lake->Stats().instances[0].used_slots, 1);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeTailTest, AdmissionWaitsWhileTailsFillThePool) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 2, 2);
  auto a = lake->TryAdmit(TailRequest(1, {}, int64_t{3} * kS));
  ASSERT_TRUE(a.ok() && a->has_value());
  ASSERT_TRUE(lake->Release(RequestId(1)).ok());  // between iterations: the tail stays
  // Two slots wanted, one left: request 2 waits; its one-slot tail fits.
  auto b = lake->TryAdmit(TailRequest(2, {}, int64_t{2} * kS));
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->has_value());
  EXPECT_EQ(lake->Stats().admissions_deferred, 1);
  // Plain Admit refuses a tail that cannot grow, naming the need, and changes nothing.
  auto forced = lake->Admit(TailRequest(2, {}, int64_t{2} * kS));
  EXPECT_EQ(forced.status().code(), absl::StatusCode::kResourceExhausted) << forced.status();
  EXPECT_EQ(lake->Stats().active_requests, 0);
  auto c = lake->TryAdmit(TailRequest(2, {}, kS));
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ(lake->AvailableSlots(), 0);
  // Request 1 ends: its slots go back and request 2 can grow.
  lake->ReleaseTail(RequestId(1));
  ASSERT_TRUE(lake->Release(RequestId(2)).ok());
  auto d = lake->TryAdmit(TailRequest(2, {}, int64_t{4} * kS));
  ASSERT_TRUE(d.ok() && d->has_value());
  EXPECT_EQ((*d)->tail_slots.size(), 4u);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeTailTest, SegmentsPlacedOnTheTailsInstanceAreCommittedInPlace) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 2, 4);
  const auto keys = Chain({1, 2});
  auto a = lake->TryAdmit(TailRequest(7, keys, 2 * kS + 3, /*instance=*/0));
  ASSERT_TRUE(a.ok() && a->has_value());
  ASSERT_EQ((*a)->tail_slots.size(), 3u);
  EXPECT_EQ((*a)->reserved_slots, 0);  // its new segments are its tail's blocks
  // Segment 1 goes where its block is (in place), segment 2 to instance 1 (a copy).
  auto c = lake->CommitPending(
      RequestId(7), Placements(7, keys, 0, InstanceId(0), {InstanceId(0), InstanceId(1)}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->stored, (std::vector<StoredReplica>{{SegmentId(1), InstanceId(0)},
                                                   {SegmentId(2), InstanceId(1)}}));
  EXPECT_EQ(c->in_place, std::vector<SegmentId>{SegmentId(1)});
  // The part-segment's block stays in the tail; the others left it.
  EXPECT_EQ(lake->TailSlots(RequestId(7)), std::vector<InstanceId>{InstanceId(0)});
  const LakeStats st = lake->Stats();
  EXPECT_EQ(st.tail_slots, 1);
  EXPECT_EQ(st.in_place_commits, 1);
  EXPECT_EQ(st.instances[0].used_slots, 2);  // segment 1 in the former block + the tail
  EXPECT_EQ(st.instances[1].used_slots, 1);
  ASSERT_TRUE(lake->ConfirmStored({{RequestId(7), SegmentId(1), InstanceId(0)},
                                   {RequestId(7), SegmentId(2), InstanceId(1)}})
                  .ok());
  ASSERT_TRUE(lake->Release(RequestId(7)).ok());
  // The next iteration matches both segments: the tail starts after them.
  auto b = lake->TryAdmit(TailRequest(7, keys, 2 * kS + 4));
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->matched_tokens, 2 * kS);
  EXPECT_EQ((*b)->tail_slots, std::vector<InstanceId>{InstanceId(0)});
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeTailTest, TailsEvictUnpinnedSegmentsAndReportThem) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 1, 3);
  ASSERT_TRUE(lake->Admit({.id = RequestId(1), .keys = {}, .new_tokens = 48}).ok());
  ASSERT_TRUE(lake->CommitKeys(RequestId(1), Chain({1, 2, 3}), InstanceId(0)).ok());
  ASSERT_TRUE(lake->Release(RequestId(1)).ok());
  auto a = lake->TryAdmit(TailRequest(2, {}, int64_t{2} * kS));
  ASSERT_TRUE(a.ok() && a->has_value());
  // The two least recently used leaves go (3, then 2).
  EXPECT_EQ((*a)->evicted, (std::vector<StoredReplica>{{SegmentId(3), InstanceId(0)},
                                                       {SegmentId(2), InstanceId(0)}}));
  EXPECT_GT((*a)->sequence, 0u);
  EXPECT_EQ(lake->Stats().segments, 1);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeTailTest, AfterASegmentThatStaysInTheTailTheRestStayToo) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 1, 8);
  const auto keys = Chain({1, 2, 3});
  // Request 1 places segment 1 and has not confirmed it: request 2's copy of it is pending
  // elsewhere, so its tail keeps all three blocks.
  ASSERT_TRUE(lake->Admit({.id = RequestId(1), .keys = {}, .new_tokens = 16}).ok());
  ASSERT_TRUE(lake->CommitPending(RequestId(1),
                                  Placements(1, Chain({1}), 0, InstanceId(0), {InstanceId(0)}))
                  .ok());
  auto a = lake->TryAdmit(TailRequest(2, keys, int64_t{3} * kS));
  ASSERT_TRUE(a.ok() && a->has_value());
  auto c = lake->CommitPending(
      RequestId(2),
      Placements(2, keys, 0, InstanceId(0), {InstanceId(0), InstanceId(0), InstanceId(0)}));
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->pending_elsewhere, std::vector<SegmentId>{SegmentId(1)});
  EXPECT_EQ(c->not_stored, (std::vector<SegmentId>{SegmentId(2), SegmentId(3)}));
  EXPECT_TRUE(c->stored.empty());
  EXPECT_EQ(lake->TailSlots(RequestId(2)).size(), 3u);
  // Request 1 confirms; request 2's next iteration matches segment 1: its first block goes.
  ASSERT_TRUE(lake->ConfirmStored({{RequestId(1), SegmentId(1), InstanceId(0)}}).ok());
  ASSERT_TRUE(lake->Release(RequestId(2)).ok());
  auto b = lake->TryAdmit(TailRequest(2, keys, int64_t{3} * kS));
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->matched_tokens, kS);
  EXPECT_EQ((*b)->tail_slots.size(), 2u);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

// ---------------------------------------------------------------------------------------------
// Randomised: tail requests iterate (admit, commit from the tail, release) beside requests
// without tails over a small pool, against a model of each tail built from what the lake
// reported. After every step:
//   - the lake's integrity check passes (the stores' tail slots are exactly the tails');
//   - every tail is the model's: no other request's admission, commit or eviction changed it
//     (a tail slot is never placed on nor evicted);
//   - used slots = replicas + tail slots on every instance, and AvailableSlots = total -
//     pinned replicas - reserved - tail slots;
//   - an admitted tail covers [matched, end); a TryAdmit waits exactly when its growth, the
//     replicas it newly pins and its reservations exceed AvailableSlots;
//   - a commit takes its stored and deduplicated segments from the tail's front, as a
//     contiguous run; a segment in place is on its block's instance, a copy on its target;
//   - when another process takes an instance's place, exactly the tails of the requests its
//     engine computed go, every block of them.
struct TailParams {
  int32_t instances;
  int32_t slots;
  uint64_t seed;
};

class LakeTailModelTest : public ::testing::TestWithParam<TailParams> {};

TEST_P(LakeTailModelTest, TailsMatchTheModelAndTheAccountingIsExact) {
  TailParams p = GetParam();
  p.seed = TestSeed(p.seed);
  SCOPED_TRACE(testing::Message() << "seed=" << p.seed);
  Rng rng(p.seed);
  ManualClock clock(1);
  auto lake = MakeLake(&clock, p.instances, p.slots);
  const int64_t total = int64_t{p.instances} * p.slots;
  // Documents: chains of segment ids; requests read a prefix of one (shared prefixes).
  auto doc_key = [](int32_t doc, int32_t i) {
    return index::SegmentKey{SegmentId(static_cast<uint64_t>(doc) * 1000 + i + 1), kS};
  };
  struct Req {
    int32_t doc = 0;
    int64_t computed = 0;  // rows with KV (the tail's end)
    bool active = false;
    std::vector<index::SegmentKey> keys;  // of the admitted iteration
    int64_t matched = 0;
    int32_t compute = 0;
  };
  std::map<uint64_t, Req> reqs;
  std::map<uint64_t, std::vector<InstanceId>> model_tails;
  uint64_t next_id = 1;
  int admitted = 0, deferred = 0, in_place = 0, copied = 0, ended = 0, refused = 0, died = 0;

  for (int step = 0; step < 1500; ++step) {
    SCOPED_TRACE(testing::Message() << "step=" << step);
    clock.AdvanceUs(1000);
    const int64_t op = rng.UniformInt(0, 99);
    if (op < 10 && reqs.size() < 6) {
      reqs[next_id++] = Req{.doc = static_cast<int32_t>(rng.UniformInt(0, 3))};
    } else if (op < 55 && !reqs.empty()) {
      // An iteration of a tail request: release its pins, plan its next rows, admit.
      auto it = reqs.begin();
      std::advance(it, rng.UniformInt(0, reqs.size() - 1));
      const uint64_t id = it->first;
      Req& r = it->second;
      if (r.active) {
        ASSERT_TRUE(lake->Release(RequestId(id)).ok());
        r.active = false;
      }
      const int64_t end = r.computed + rng.UniformInt(1, int64_t{3} * kS);
      if (end > int64_t{10} * kS) continue;
      std::vector<index::SegmentKey> keys;
      keys.reserve(static_cast<size_t>(end / kS));
      for (int32_t i = 0; i < end / kS; ++i) keys.push_back(doc_key(r.doc, i));
      // As the control plane: only segments before the first row to compute may be cached
      // (more matched: the keys are cut there).
      const auto cap = static_cast<int32_t>(r.computed / kS);
      if (lake->Match(keys).matched_segments > cap) keys.resize(static_cast<size_t>(cap));
      const index::MatchResult m = lake->Match(keys);
      const std::vector<index::SegmentKey>& iter_keys = keys;
      const int64_t need = (end + kS - 1) / kS - m.matched_tokens / kS;
      const auto have = static_cast<int64_t>(model_tails[id].size());
      int64_t newly_pinned = 0;
      for (int32_t i = 0; i < m.matched_segments; ++i) {
        const index::PrefixTree::Node* node = lake->prefix_tree().Find(iter_keys[i].id);
        if (!node->is_pinned()) newly_pinned += static_cast<int64_t>(node->replicas.size());
      }
      const int64_t available = lake->AvailableSlots();
      const auto compute = static_cast<int32_t>(rng.UniformInt(0, p.instances - 1));
      LakeRequest lr = TailRequest(id, iter_keys, end, compute);
      std::optional<AdmitResult> result;
      if (rng.UniformInt(0, 3) > 0) {
        auto t = lake->TryAdmit(lr);
        ASSERT_TRUE(t.ok()) << t.status();
        ASSERT_EQ(t->has_value(), need - have + newly_pinned <= available)
            << "need " << need << " have " << have << " newly pinned " << newly_pinned
            << " available " << available;
        if (!t->has_value()) {
          ++deferred;
          continue;
        }
        result = **t;
      } else {
        // Plain Admit: refused exactly when slots neither pinned nor tails cannot hold the growth.
        const LakeStats before = lake->Stats();
        const bool fits =
            need - have + newly_pinned <= total - before.pinned_replicas - before.tail_slots;
        auto a = lake->Admit(lr);
        ASSERT_EQ(a.ok(), fits) << a.status();
        if (!a.ok()) {
          ASSERT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
          ++refused;
          continue;
        }
        result = *a;
      }
      ++admitted;
      ASSERT_EQ(result->matched_tokens, m.matched_tokens);
      ASSERT_EQ(static_cast<int64_t>(result->tail_slots.size()), need);
      ASSERT_EQ(result->tail_slots, lake->TailSlots(RequestId(id)));
      for (const InstanceId& x : result->tail_slots) ASSERT_TRUE(x.valid());
      model_tails[id] = result->tail_slots;
      if (model_tails[id].empty()) model_tails.erase(id);
      r.active = true;
      r.keys = iter_keys;
      r.matched = m.matched_tokens;
      r.compute = compute;
      r.computed = end;
    } else if (op < 75 && !reqs.empty()) {
      // Commit an active request's new segments, random targets.
      auto it = reqs.begin();
      std::advance(it, rng.UniformInt(0, reqs.size() - 1));
      const uint64_t id = it->first;
      Req& r = it->second;
      if (!r.active) continue;
      const auto from = static_cast<size_t>(r.matched / kS);
      std::vector<InstanceId> targets;
      for (size_t i = from; i < r.keys.size(); ++i) {
        targets.emplace_back(static_cast<int32_t>(rng.UniformInt(0, p.instances - 1)));
      }
      const std::vector<InstanceId> tail_before = lake->TailSlots(RequestId(id));
      auto placements = Placements(id, r.keys, from, InstanceId(r.compute), targets);
      auto c = lake->Commit(RequestId(id), placements);
      ASSERT_TRUE(c.ok()) << c.status();
      ASSERT_TRUE(c->evicted.empty());  // a tail's segments never evict: in place instead
      // The stored and deduplicated segments are the contiguous run at the tail's front.
      size_t run = 0;
      for (size_t k = 0; k < placements.size(); ++k) {
        const SegmentId seg = placements[k].segment;
        auto stored = std::find_if(c->stored.begin(), c->stored.end(),
                                   [&](const StoredReplica& s) { return s.segment == seg; });
        const bool dedup =
            std::find(c->deduplicated.begin(), c->deduplicated.end(), seg) != c->deduplicated.end();
        if (stored == c->stored.end() && !dedup) break;
        ASSERT_EQ(run, k) << "segment " << k << " left the tail after one that stayed";
        ++run;
        if (stored == c->stored.end()) continue;
        const bool placed_in_place =
            std::find(c->in_place.begin(), c->in_place.end(), seg) != c->in_place.end();
        if (placed_in_place) {
          ASSERT_EQ(stored->instance, tail_before[k]);
          ++in_place;
        } else {
          ASSERT_EQ(stored->instance, targets[k]);
          ASSERT_NE(stored->instance, tail_before[k]);
          ++copied;
        }
      }
      for (size_t k = run; k < placements.size(); ++k) {
        const SegmentId seg = placements[k].segment;
        ASSERT_TRUE(std::none_of(c->stored.begin(), c->stored.end(),
                                 [&](const StoredReplica& s) { return s.segment == seg; }));
      }
      std::vector<InstanceId> after(tail_before.begin() + static_cast<std::ptrdiff_t>(run),
                                    tail_before.end());
      ASSERT_EQ(lake->TailSlots(RequestId(id)), after);
      if (after.empty()) {
        model_tails.erase(id);
      } else {
        model_tails[id] = after;
      }
      // Commit once per iteration: the next one plans again.
      ASSERT_TRUE(lake->Release(RequestId(id)).ok());
      r.active = false;
    } else if (op < 85 && !reqs.empty()) {
      // A request ends (finished, cancelled, failed): pins and tail go.
      auto it = reqs.begin();
      std::advance(it, rng.UniformInt(0, reqs.size() - 1));
      if (it->second.active) {
        ASSERT_TRUE(lake->Release(RequestId(it->first)).ok());
      }
      lake->ReleaseTail(RequestId(it->first));
      model_tails.erase(it->first);
      reqs.erase(it);
      ++ended;
    } else if (op < 89 && !reqs.empty()) {
      // Another process takes an instance's place: the tails of the requests its engine computed
      // end (those of the latest admission's computing instance), the others stay; their failed
      // attempts' pins go too, as the request path releases them.
      const auto dead = static_cast<int32_t>(rng.UniformInt(0, p.instances - 1));
      std::vector<RequestId> want;
      for (const auto& [id, r] : reqs) {
        auto tail = model_tails.find(id);
        if (r.compute == dead && tail != model_tails.end() && !tail->second.empty()) {
          want.emplace_back(id);
        }
      }
      ASSERT_EQ(lake->ReleaseTailsComputedOn(InstanceId(dead)), want);
      for (auto it = reqs.begin(); it != reqs.end();) {
        if (it->second.compute != dead) {
          ++it;
          continue;
        }
        if (it->second.active) {
          ASSERT_TRUE(lake->Release(RequestId(it->first)).ok());
        }
        model_tails.erase(it->first);
        it = reqs.erase(it);
        ++died;
      }
    } else {
      // A request without a tail stores a few segments of a document (fills the pool).
      const uint64_t id = 1'000'000 + static_cast<uint64_t>(step);
      const auto doc = static_cast<int32_t>(rng.UniformInt(0, 5));
      const auto num_keys = static_cast<int32_t>(rng.UniformInt(1, 6));
      std::vector<index::SegmentKey> keys;
      keys.reserve(static_cast<size_t>(num_keys));
      for (int32_t i = 0; i < num_keys; ++i) keys.push_back(doc_key(doc, i));
      if (!lake->Admit({.id = RequestId(id), .keys = keys, .new_tokens = 1}).ok()) continue;
      ASSERT_TRUE(
          lake->CommitKeys(RequestId(id), keys,
                           InstanceId(static_cast<int32_t>(rng.UniformInt(0, p.instances - 1))))
              .ok());
      ASSERT_TRUE(lake->Release(RequestId(id)).ok());
    }
    // Invariants.
    ASSERT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
    int64_t model_total = 0;
    for (const auto& [id, tail] : model_tails) {
      ASSERT_EQ(lake->TailSlots(RequestId(id)), tail) << "request " << id;
      model_total += static_cast<int64_t>(tail.size());
    }
    const LakeStats st = lake->Stats();
    ASSERT_EQ(st.tail_slots, model_total);
    int64_t used = 0;
    for (const InstanceStats& i : st.instances) used += i.used_slots;
    ASSERT_EQ(used, st.replicas + st.tail_slots);
    ASSERT_EQ(st.available_slots, total - st.pinned_replicas - st.reserved_slots - st.tail_slots);
  }
  std::cout << "admitted=" << admitted << " deferred=" << deferred << " refused=" << refused
            << " in_place=" << in_place << " copied=" << copied << " ended=" << ended
            << " died=" << died << "\n";
  EXPECT_GT(admitted, 0);
  EXPECT_GT(in_place, 0);
  if (p.instances > 1) {
    EXPECT_GT(copied, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, LakeTailModelTest,
                         ::testing::Values(TailParams{1, 6, 71}, TailParams{2, 5, 72},
                                           TailParams{3, 8, 73}, TailParams{4, 4, 74}));

}  // namespace
}  // namespace tokenlake::lake
