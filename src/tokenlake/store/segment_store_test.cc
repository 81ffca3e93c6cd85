#include "tokenlake/store/segment_store.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"

namespace tokenlake::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

SegmentId Seg(uint64_t v) { return SegmentId(v); }

std::unique_ptr<SegmentStore> MetaStore(int32_t slots) {
  auto s = SegmentStore::Create({.num_slots = slots, .instance = InstanceId(3)});
  EXPECT_TRUE(s.ok()) << s.status();
  return *std::move(s);
}

TEST(SegmentStoreTest, CreateRejectsStoresWithoutSlotsOrInconsistentArenas) {
  std::vector<std::byte> arena(1000);
  EXPECT_EQ(SegmentStore::Create({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SegmentStore::Create({.num_slots = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SegmentStore::Create({.arena = arena.data(), .arena_bytes = 1000, .slot_bytes = 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto too_big = SegmentStore::Create(
      {.arena = arena.data(), .arena_bytes = 1000, .slot_bytes = 100, .num_slots = 11});
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_big.status().message(), HasSubstr("11"));
  EXPECT_EQ(SegmentStore::Create({.arena = arena.data(), .arena_bytes = 99, .slot_bytes = 100})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SegmentStoreTest, CapacityIsArenaBytesOverSlotBytes) {
  std::vector<std::byte> arena(1050);
  auto s = SegmentStore::Create({.arena = arena.data(), .arena_bytes = 1050, .slot_bytes = 100});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)->capacity(), 10);
  EXPECT_EQ((*s)->free(), 10);
  EXPECT_EQ((*s)->used(), 0);
  EXPECT_FALSE((*s)->metadata_only());
  auto t = SegmentStore::Create(
      {.arena = arena.data(), .arena_bytes = 1050, .slot_bytes = 100, .num_slots = 4});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->capacity(), 4);
}

TEST(SegmentStoreTest, SlotDataCoversDisjointSlotsOfTheArena) {
  std::vector<std::byte> arena(4 * 64);
  auto s =
      SegmentStore::Create({.arena = arena.data(), .arena_bytes = arena.size(), .slot_bytes = 64});
  ASSERT_TRUE(s.ok());
  SegmentStore& store = **s;
  std::vector<std::pair<std::byte*, size_t>> seen;
  for (uint64_t i = 0; i < 4; ++i) {
    auto slot = store.Allocate(Seg(i));
    ASSERT_TRUE(slot.ok());
    absl::Span<std::byte> data = store.SlotData(*slot);
    ASSERT_EQ(data.size(), 64u);
    EXPECT_GE(data.data(), arena.data());
    EXPECT_LE(data.data() + 64, arena.data() + arena.size());
    EXPECT_EQ((data.data() - arena.data()) % 64, 0);
    seen.emplace_back(data.data(), data.size());
  }
  std::sort(seen.begin(), seen.end());
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_NE(seen[i].first, seen[i - 1].first);
  EXPECT_TRUE(store.SlotData(SlotId(4)).empty());
  EXPECT_TRUE(store.SlotData(SlotId()).empty());
  auto pin = store.Pin(Seg(2));
  ASSERT_TRUE(pin.ok());
  EXPECT_EQ(pin->data().data(), store.SlotData(*store.Find(Seg(2))).data());
}

TEST(SegmentStoreTest, MetadataOnlyStoreHasNoBytes) {
  auto store = MetaStore(2);
  EXPECT_TRUE(store->metadata_only());
  auto slot = store->Allocate(Seg(1));
  ASSERT_TRUE(slot.ok());
  EXPECT_TRUE(store->SlotData(*slot).empty());
}

TEST(SegmentStoreTest, FullStoreReturnsResourceExhaustedAndDuplicatesAlreadyExists) {
  auto store = MetaStore(2);
  ASSERT_TRUE(store->Allocate(Seg(1)).ok());
  auto dup = store->Allocate(Seg(1));
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(store->Allocate(Seg(2)).ok());
  auto full = store->Allocate(Seg(3));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.status().message(), HasSubstr("instance 3"));
  EXPECT_EQ(store->Allocate(SegmentId()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->used(), 2);
  EXPECT_EQ(store->free(), 0);
  ASSERT_TRUE(store->Free(Seg(1)).ok());
  EXPECT_TRUE(store->Allocate(Seg(3)).ok());
  EXPECT_TRUE(store->CheckIntegrity().ok());
}

TEST(SegmentStoreTest, FreeOfAbsentOrPinnedSegmentFails) {
  auto store = MetaStore(2);
  EXPECT_EQ(store->Free(Seg(1)).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(store->Allocate(Seg(1)).ok());
  {
    auto pin = store->Pin(Seg(1));
    ASSERT_TRUE(pin.ok());
    EXPECT_EQ(store->Free(Seg(1)).code(), absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_TRUE(store->Free(Seg(1)).ok());
  EXPECT_EQ(store->Find(Seg(1)), std::nullopt);
  EXPECT_EQ(store->Pin(Seg(1)).status().code(), absl::StatusCode::kNotFound);
}

TEST(SegmentStoreTest, PinsAreRefcountedAndReleasedByRaii) {
  auto store = MetaStore(3);
  ASSERT_TRUE(store->Allocate(Seg(1)).ok());
  auto a = store->Pin(Seg(1));
  auto b = store->Pin(Seg(1));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(store->PinCount(Seg(1)), 2);
  EXPECT_EQ(store->num_pinned(), 1);
  EXPECT_EQ(a->segment(), Seg(1));
  EXPECT_EQ(a->slot(), *store->Find(Seg(1)));
  SlotPin moved = *std::move(a);
  EXPECT_FALSE(a->valid());
  EXPECT_TRUE(moved.valid());
  EXPECT_EQ(store->PinCount(Seg(1)), 2);
  moved.Reset();
  EXPECT_FALSE(moved.valid());
  EXPECT_EQ(store->PinCount(Seg(1)), 1);
  moved.Reset();  // no-op
  SlotPin assigned;
  assigned = *std::move(b);
  EXPECT_EQ(store->PinCount(Seg(1)), 1);
  assigned = SlotPin();  // move-assigning releases the old pin
  EXPECT_EQ(store->PinCount(Seg(1)), 0);
  EXPECT_EQ(store->num_pinned(), 0);
  EXPECT_TRUE(store->CheckIntegrity().ok());
}

TEST(SegmentStoreTest, SegmentsListsStoredIdsInOrder) {
  auto store = MetaStore(4);
  for (uint64_t i : {9, 2, 7}) ASSERT_TRUE(store->Allocate(Seg(i)).ok());
  ASSERT_TRUE(store->Free(Seg(7)).ok());
  EXPECT_THAT(store->Segments(), ElementsAre(Seg(2), Seg(9)));
}

TEST(SegmentStoreDeathTest, DestroyingTheStoreWhilePinsAreAliveIsAProgrammerError) {
  EXPECT_DEATH(
      {
        auto store = MetaStore(1);
        TOKENLAKE_CHECK_OK(store->Allocate(Seg(1)).status());
        auto pin = store->Pin(Seg(1));
        SlotPin leaked = *std::move(pin);
        store.reset();
        leaked = SlotPin();
      },
      "SlotPins are alive");
}

TEST(SegmentStoreTest, FullyPinnedStoreFreesNothingAndTakesNothingNew) {
  auto store = MetaStore(2);
  ASSERT_TRUE(store->Allocate(Seg(1)).ok());
  ASSERT_TRUE(store->Allocate(Seg(2)).ok());
  auto p1 = store->Pin(Seg(1));
  auto p2 = store->Pin(Seg(2));
  EXPECT_EQ(store->Free(Seg(1)).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Free(Seg(2)).code(), absl::StatusCode::kFailedPrecondition);
  const auto full = store->Allocate(Seg(3));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.status().message(), HasSubstr("2 pinned"));
  EXPECT_EQ(store->used(), 2);
}

TEST(SegmentStoreTest, ConcurrentPinsFromSeveralThreadsBalance) {
  auto store = MetaStore(8);
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(store->Allocate(Seg(i)).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&store, t] {
      Rng rng(static_cast<uint64_t>(t));
      std::vector<SlotPin> held;
      for (int i = 0; i < 2000; ++i) {
        if (held.size() < 4 && rng.Bernoulli(0.6)) {
          auto pin = store->Pin(Seg(static_cast<uint64_t>(rng.UniformInt(0, 7))));
          if (pin.ok()) held.push_back(*std::move(pin));
        } else if (!held.empty()) {
          held.erase(held.begin() + rng.UniformInt(0, held.size() - 1));
        }
        EXPECT_TRUE(store->Find(Seg(static_cast<uint64_t>(rng.UniformInt(0, 7)))).has_value());
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(store->num_pinned(), 0);
  EXPECT_EQ(store->used(), 8);
  for (uint64_t i = 0; i < 8; ++i) EXPECT_EQ(store->PinCount(Seg(i)), 0);
  EXPECT_TRUE(store->CheckIntegrity().ok()) << store->CheckIntegrity();
}

// ---------------------------------------------------------------------------------------------
TEST(SegmentStoreTest, TailSlotsCountAsUsedAndBecomeSegmentsInPlace) {
  auto store = MetaStore(2);
  absl::StatusOr<SlotId> tail = store->AllocateTail();
  ASSERT_TRUE(tail.ok()) << tail.status();
  ASSERT_TRUE(store->Allocate(Seg(1)).ok());
  EXPECT_EQ(store->used(), 2);
  EXPECT_EQ(store->free(), 0);
  EXPECT_EQ(store->num_tail_slots(), 1);
  EXPECT_EQ(store->Allocate(Seg(2)).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store->AllocateTail().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(store->Segments(), ElementsAre(Seg(1)));
  // Committed in place: the same slot, now the segment's; nothing freed, nothing taken.
  EXPECT_EQ(store->AssignTail(*tail, Seg(1)).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(store->AssignTail(*tail, Seg(2)).ok());
  EXPECT_EQ(store->Find(Seg(2)), *tail);
  EXPECT_EQ(store->num_tail_slots(), 0);
  EXPECT_EQ(store->used(), 2);
  EXPECT_EQ(store->FreeTail(*tail).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(store->Free(Seg(2)).ok());
  absl::StatusOr<SlotId> again = store->AllocateTail();
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE(store->FreeTail(*again).ok());
  EXPECT_EQ(store->free(), 1);
  EXPECT_TRUE(store->CheckIntegrity().ok()) << store->CheckIntegrity();
}

// Randomised model test against a std::map reference.

struct StoreParams {
  int32_t capacity;
  int32_t universe;  // segment ids drawn from [0, universe)
  uint64_t seed;
};

class SegmentStoreModelTest : public ::testing::TestWithParam<StoreParams> {};

TEST_P(SegmentStoreModelTest, RandomOperationsMatchReferenceModel) {
  StoreParams p = GetParam();
  // TOKENLAKE_TEST_SEED=<n> replays or explores other seeds with the same sizes.
  p.seed = TestSeed(p.seed);
  SCOPED_TRACE(::testing::Message() << "seed=" << p.seed << " capacity=" << p.capacity);
  Rng rng(p.seed);
  std::vector<std::byte> arena(static_cast<size_t>(p.capacity) * 16);
  auto created =
      SegmentStore::Create({.arena = arena.data(), .arena_bytes = arena.size(), .slot_bytes = 16});
  ASSERT_TRUE(created.ok());
  SegmentStore& store = **created;

  std::map<SegmentId, int> ref_pins;     // stored segments -> pin count
  std::map<SegmentId, SlotId> ref_slot;  // stored segments -> the slot Allocate gave them
  std::map<SegmentId, std::vector<SlotPin>> pins;
  std::vector<SlotId> ref_tails;  // tail slots held
  int allocs = 0, exhausted = 0, evictions = 0, pinned_max = 0, assigned = 0;
  auto used = [&] { return static_cast<int32_t>(ref_pins.size() + ref_tails.size()); };

  for (int step = 0; step < 3000; ++step) {
    SCOPED_TRACE(::testing::Message() << "step=" << step);
    const SegmentId id(static_cast<uint64_t>(rng.UniformInt(0, p.universe - 1)));
    const int64_t op = rng.UniformInt(0, 114);
    if (op < 30) {
      auto r = store.Allocate(id);
      if (ref_pins.count(id)) {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kAlreadyExists);
      } else if (used() == p.capacity) {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
        ++exhausted;
      } else {
        ASSERT_TRUE(r.ok()) << r.status();
        ref_pins[id] = 0;
        ref_slot[id] = *r;
        ++allocs;
        // Write a pattern to the slot; checked when the segment is later pinned.
        absl::Span<std::byte> data = store.SlotData(*r);
        ASSERT_EQ(data.size(), 16u);
        std::fill(data.begin(), data.end(), static_cast<std::byte>(id.value() & 0xff));
      }
    } else if (op < 45) {
      // Evict: free an unpinned segment the model picks (the lake's choice, made elsewhere).
      std::vector<SegmentId> unpinned;
      for (const auto& [sid, count] : ref_pins) {
        if (count == 0) unpinned.push_back(sid);
      }
      if (unpinned.empty()) continue;
      const SegmentId victim = unpinned[rng.UniformInt(0, unpinned.size() - 1)];
      ASSERT_TRUE(store.Free(victim).ok());
      ref_pins.erase(victim);
      ref_slot.erase(victim);
      ++evictions;
    } else if (op < 55) {
      const absl::Status st = store.Free(id);
      if (!ref_pins.count(id)) {
        ASSERT_EQ(st.code(), absl::StatusCode::kNotFound);
      } else if (ref_pins[id] > 0) {
        ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
      } else {
        ASSERT_TRUE(st.ok());
        ref_pins.erase(id);
        ref_slot.erase(id);
      }
    } else if (op < 72) {
      auto pin = store.Pin(id);
      if (!ref_pins.count(id)) {
        ASSERT_EQ(pin.status().code(), absl::StatusCode::kNotFound);
        continue;
      }
      ASSERT_TRUE(pin.ok());
      ASSERT_EQ(pin->slot(), ref_slot[id]);
      for (std::byte b : pin->data()) ASSERT_EQ(b, static_cast<std::byte>(id.value() & 0xff));
      ++ref_pins[id];
      pins[id].push_back(*std::move(pin));
    } else if (op < 88) {
      if (pins.empty()) continue;
      auto it = pins.begin();
      std::advance(it, rng.UniformInt(0, pins.size() - 1));
      it->second.pop_back();  // RAII release
      --ref_pins[it->first];
      if (it->second.empty()) pins.erase(it);
    } else if (op >= 100 && op < 106) {
      // A request's tail takes a slot: it must be one no segment or tail holds.
      auto r = store.AllocateTail();
      if (used() == p.capacity) {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
        continue;
      }
      ASSERT_TRUE(r.ok()) << r.status();
      for (const auto& [sid, slot] : ref_slot) ASSERT_NE(slot, *r);
      ASSERT_EQ(std::count(ref_tails.begin(), ref_tails.end(), *r), 0);
      ref_tails.push_back(*r);
      // The forward writes the tail's rows.
      absl::Span<std::byte> data = store.SlotData(*r);
      std::fill(data.begin(), data.end(), static_cast<std::byte>((r->value() * 7) & 0xff));
    } else if (op >= 106 && op < 111) {
      // A tail block committed in place: its bytes become the segment's.
      if (ref_tails.empty()) {
        ASSERT_EQ(store.AssignTail(SlotId(0), id).code(), absl::StatusCode::kInvalidArgument);
        continue;
      }
      const auto k = static_cast<size_t>(rng.UniformInt(0, ref_tails.size() - 1));
      const SlotId slot = ref_tails[k];
      const absl::Status st = store.AssignTail(slot, id);
      if (ref_pins.count(id)) {
        ASSERT_EQ(st.code(), absl::StatusCode::kAlreadyExists);
        continue;
      }
      ASSERT_TRUE(st.ok()) << st;
      ref_tails.erase(ref_tails.begin() + static_cast<std::ptrdiff_t>(k));
      ref_pins[id] = 0;
      ref_slot[id] = slot;
      ++assigned;
      ASSERT_EQ(store.AssignTail(slot, Seg(p.universe + 1)).code(),
                absl::StatusCode::kInvalidArgument);  // no longer a tail slot
      absl::Span<std::byte> data = store.SlotData(slot);
      ASSERT_EQ(data[0], static_cast<std::byte>((slot.value() * 7) & 0xff));
      std::fill(data.begin(), data.end(), static_cast<std::byte>(id.value() & 0xff));
    } else if (op >= 111) {
      if (ref_tails.empty()) continue;
      const auto k = static_cast<size_t>(rng.UniformInt(0, ref_tails.size() - 1));
      ASSERT_TRUE(store.FreeTail(ref_tails[k]).ok());
      ASSERT_EQ(store.FreeTail(ref_tails[k]).code(), absl::StatusCode::kInvalidArgument);
      ref_tails.erase(ref_tails.begin() + static_cast<std::ptrdiff_t>(k));
    } else {
      const std::optional<SlotId> got = store.Find(id);
      ASSERT_EQ(got.has_value(), ref_slot.count(id) > 0);
      if (got) {
        ASSERT_EQ(*got, ref_slot[id]);
      }
    }
    // Compare and check conservation.
    ASSERT_TRUE(store.CheckIntegrity().ok()) << store.CheckIntegrity();
    ASSERT_EQ(store.used() + store.free(), store.capacity());
    ASSERT_EQ(store.used(), used());
    ASSERT_EQ(store.num_tail_slots(), static_cast<int32_t>(ref_tails.size()));
    int32_t pinned = 0;
    for (const auto& [sid, count] : ref_pins) {
      ASSERT_TRUE(store.Find(sid).has_value());
      ASSERT_EQ(store.PinCount(sid), count);
      pinned += count > 0;
    }
    pinned_max = std::max(pinned_max, pinned);
    ASSERT_EQ(store.num_pinned(), pinned);
    std::vector<SegmentId> stored;
    for (const auto& [sid, count] : ref_pins) stored.push_back(sid);
    ASSERT_EQ(store.Segments(), stored);
  }
  pins.clear();
  EXPECT_EQ(store.num_pinned(), 0);
  std::cout << "allocs=" << allocs << " exhausted=" << exhausted << " evictions=" << evictions
            << " max_pinned=" << pinned_max << " assigned_tails=" << assigned << "\n";
  EXPECT_GT(allocs, 0);
  EXPECT_GT(evictions, 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, SegmentStoreModelTest,
                         ::testing::Values(StoreParams{1, 3, 11}, StoreParams{4, 8, 12},
                                           StoreParams{16, 24, 13}, StoreParams{64, 80, 14},
                                           StoreParams{8, 100, 15}));

}  // namespace
}  // namespace tokenlake::store
