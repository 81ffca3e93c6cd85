// HostedStore against a naive model (per segment: its bytes, metadata and the generation of its
// copy; the list of changes), under random stores (new and overwriting), tail blocks committed
// in place, frees guarded by an eviction's change number, frees guarded by a report's
// generation, failing writes and acknowledgements: after every step the slots hold the model's
// bytes, Held / MetaOf / Generation / ChangesSince agree with it, and errors are the model's.
#include "tokenlake/engine/hosted_store.h"

#include <cstring>
#include <iostream>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::engine {
namespace {

constexpr size_t kSlotBytes = 8;

TEST(HostedStoreTest, MatchesANaiveModelUnderRandomOperations) {
  for (uint64_t seed : {1u, 2u, 3u, 4u}) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::cout << "seed=" << seed << "\n";
    std::mt19937_64 rng(seed);
    constexpr int32_t kSlots = 6;
    const int64_t kept = seed % 2 == 0 ? 1000 : 5;  // a short log forgets: full reports
    std::vector<std::byte> arena(kSlots * kSlotBytes);
    auto st = store::SegmentStore::Create({.arena = arena.data(),
                                           .arena_bytes = arena.size(),
                                           .slot_bytes = kSlotBytes,
                                           .num_slots = kSlots,
                                           .instance = InstanceId(3)});
    ASSERT_TRUE(st.ok()) << st.status();
    HostedStore hosted(*std::move(st), kept);

    struct Copy {
      std::vector<std::byte> bytes;
      StoredMeta meta;
      uint64_t generation = 0;
    };
    std::map<uint64_t, Copy> model;
    std::vector<store::SegmentChange> log;  // log[g - 1] is generation g's change
    // Changes up to `first` are forgotten (segment_change_log.h: acknowledged, or all of them
    // when the log would hold more than `kept`).
    uint64_t first = 0;
    auto record = [&](const store::SegmentChange& c) {
      if (static_cast<int64_t>(log.size() - first) >= kept) first = log.size() + 1;
      log.push_back(c);
    };
    std::vector<SlotId> tails;
    uint64_t sequence = 0;
    auto bytes_of = [&](uint64_t fill) {
      std::vector<std::byte> b(kSlotBytes);
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(fill * 31 + i);
      return b;
    };
    for (int step = 0; step < 500; ++step) {
      SCOPED_TRACE(testing::Message() << "step " << step);
      const uint64_t id = 1 + rng() % 10;
      const StoredMeta meta{.parent = SegmentId(100 + id),
                            .num_tokens = 1 + static_cast<int32_t>(rng() % 4),
                            .placement_sequence = ++sequence};
      const auto used = static_cast<int32_t>(model.size() + tails.size());
      switch (rng() % 7) {
        case 0:
        case 1: {  // a store (the write fails now and then)
          const std::vector<std::byte> b = bytes_of(rng());
          const bool fail = rng() % 6 == 0;
          absl::Status s = hosted.Store(SegmentId(id), meta, [&](absl::Span<std::byte> slot) {
            if (fail) return absl::DataLossError("write failed");
            std::memcpy(slot.data(), b.data(), b.size());
            return absl::OkStatus();
          });
          if (!model.contains(id) && used == kSlots) {
            EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
          } else if (fail) {
            EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
          } else {
            ASSERT_TRUE(s.ok()) << s;
            record({.id = SegmentId(id),
                    .stored = true,
                    .parent = meta.parent,
                    .num_tokens = meta.num_tokens});
            model[id] = {b, meta, log.size()};
          }
          break;
        }
        case 2: {  // a tail block taken, then committed in place or given back
          if (used < kSlots) {
            absl::StatusOr<SlotId> t = hosted.slots().AllocateTail();
            ASSERT_TRUE(t.ok()) << t.status();
            tails.push_back(*t);
          }
          if (tails.empty() || rng() % 2 == 0) break;
          const SlotId t = tails.back();
          tails.pop_back();
          if (model.contains(id)) {
            ASSERT_TRUE(hosted.slots().FreeTail(t).ok());
            break;
          }
          const std::vector<std::byte> b = bytes_of(rng());
          std::memcpy(hosted.slots().SlotData(t).data(), b.data(), b.size());
          ASSERT_TRUE(hosted.CommitTail(t, SegmentId(id), meta).ok());
          record({.id = SegmentId(id),
                  .stored = true,
                  .parent = meta.parent,
                  .num_tokens = meta.num_tokens});
          model[id] = {b, meta, log.size()};
          break;
        }
        case 3: {  // a free guarded by the change that evicted the copy
          auto it = model.find(id);
          const uint64_t evicted_at =
              it == model.end() || rng() % 3 != 0 ? 0 : it->second.meta.placement_sequence - 1;
          absl::Status s = hosted.Free(SegmentId(id), evicted_at);
          if (it == model.end()) {
            EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
          } else if (evicted_at > 0) {
            EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
          } else {
            ASSERT_TRUE(s.ok()) << s;
            model.erase(it);
            record({.id = SegmentId(id), .stored = false});
          }
          break;
        }
        case 4: {  // a free decided from a report at some generation
          const uint64_t generation = rng() % (log.size() + 2);
          auto it = model.find(id);
          absl::Status s = hosted.FreeIfUnchangedSince(SegmentId(id), generation);
          if (it == model.end()) {
            EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
          } else if (it->second.generation > generation) {
            EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
          } else {
            ASSERT_TRUE(s.ok()) << s;
            model.erase(it);
            record({.id = SegmentId(id), .stored = false});
          }
          break;
        }
        case 5: {  // a report acknowledged
          const uint64_t through = rng() % (log.size() + 1);
          hosted.ForgetChanges(through);
          first = std::max(first, through);
          break;
        }
        case 6: {  // the changes since some generation
          const uint64_t from = rng() % (log.size() + 2);
          std::optional<std::vector<store::SegmentChange>> since = hosted.ChangesSince(from);
          if (from < first || from > log.size()) {
            EXPECT_FALSE(since.has_value()) << "from " << from << ", first " << first;
          } else {
            ASSERT_TRUE(since.has_value()) << "from " << from << ", first " << first;
            EXPECT_EQ(*since, std::vector<store::SegmentChange>(log.begin() + from, log.end()));
          }
          break;
        }
      }
      // The whole state against the model.
      EXPECT_EQ(hosted.Generation(), log.size());
      const HostedStore::HeldReport held = hosted.Held();
      EXPECT_EQ(held.generation, log.size());
      ASSERT_EQ(held.segments.size(), model.size());
      for (const HeldSegmentInfo& h : held.segments) {
        ASSERT_TRUE(model.contains(h.id.value())) << h.id.value();
        const Copy& c = model[h.id.value()];
        EXPECT_EQ(h.meta.parent, c.meta.parent);
        EXPECT_EQ(h.meta.num_tokens, c.meta.num_tokens);
        EXPECT_EQ(h.meta.placement_sequence, c.meta.placement_sequence);
        EXPECT_EQ(hosted.MetaOf(h.id).placement_sequence, c.meta.placement_sequence);
        const std::optional<SlotId> slot = hosted.slots().Find(h.id);
        ASSERT_TRUE(slot.has_value());
        const absl::Span<std::byte> data = hosted.slots().SlotData(*slot);
        ASSERT_TRUE(std::vector<std::byte>(data.begin(), data.end()) == c.bytes)
            << "segment " << h.id.value();
      }
      EXPECT_EQ(hosted.slots().used(), static_cast<int32_t>(model.size() + tails.size()));
      EXPECT_EQ(hosted.MetaOf(SegmentId(999)).placement_sequence, 0u);
      if (HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace tokenlake::engine
